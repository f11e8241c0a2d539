"""Trace replay: a discrete-event simulator driving the real `scheduler.policy.placement.place`
and baseline policies over public GPU cluster traces (see bench/replay/traces.py)."""
