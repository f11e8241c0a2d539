"""IdleWatch (worker/idle.py): an idle spell needs memory held and every GPU at or below the
threshold; it is reported once per spell, after idle_after_s; any busy or unknown reading
ends it. And the simulated probe reports the utilisation a process announces."""

from __future__ import annotations

from pathlib import Path

from worker.idle import IdleWatch
from worker.sim_probe import SimProbe


def test_a_spell_is_reported_once_after_its_time_and_ends_on_any_activity() -> None:
    w = IdleWatch(after_s=10.0, max_util_percent=1.0)
    assert not w.update(2**30, [0], 0.0) and w.flagged_since is None
    assert not w.update(2**30, [1, 0], 9.9)
    assert w.update(2**30, [0, 0], 10.0) and w.flagged_since == 0.0
    assert not w.update(2**30, [0], 50.0)  # once per spell
    assert not w.update(2**30, [0, 30], 51.0) and w.flagged_since is None  # one busy GPU ends it
    assert not w.update(2**30, [0], 52.0) and not w.update(2**30, [0], 61.0)
    assert w.update(2**30, [0], 62.0)  # a new spell, reported again


def test_no_memory_held_unknown_utilisation_or_off_is_never_idle() -> None:
    w = IdleWatch(after_s=1.0, max_util_percent=1.0)
    assert not w.update(0, [0], 0.0) and not w.update(0, [0], 100.0)
    assert not w.update(2**30, [None], 200.0) and not w.update(2**30, [None], 300.0)
    assert not w.update(2**30, [], 400.0) and not w.update(2**30, [], 500.0)
    off = IdleWatch(after_s=0.0, max_util_percent=1.0)
    assert not off.update(2**30, [0], 0.0) and not off.update(2**30, [0], 1e9)


def test_the_simulated_probe_reports_announced_utilisation(tmp_path: Path) -> None:
    import os

    probe = SimProbe("n", [24 * 2**30], tmp_path)
    uuid = probe.uuids[0]
    assert probe.snapshot().devices[0].utilization_pct == 0  # nothing allocated
    (tmp_path / uuid / str(os.getpid())).write_text(f"{2**30} 7")
    assert probe.snapshot().devices[0].utilization_pct == 7
    (tmp_path / uuid / str(os.getpid())).write_text(f"{2**30} 900")  # clamped
    assert probe.snapshot().devices[0].utilization_pct == 100
    (tmp_path / uuid / str(os.getpid())).write_text(f"{2**30}")  # no figure: it computes
    assert probe.snapshot().devices[0].utilization_pct == 100
    (tmp_path / uuid / str(os.getpid())).write_text(f"{2**30} x")  # junk: counted as nothing
    assert probe.snapshot().devices[0].used_bytes == 0
