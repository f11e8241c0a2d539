"""Trace replay: a discrete-event simulator driving the real `scheduler.placement.place`
and baseline policies over public GPU cluster traces (see bench/replay/traces.py)."""
