"""Fair-share arithmetic: decay, charging, the Slurm-style factor and the priority parts."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.config import PolicyConfig
from scheduler.policy.fairshare import (
    NEGLIGIBLE_USAGE,
    charge,
    decay_factor,
    fairshare_factors,
    overlap_s,
    priority_parts,
)

DAY = 86400.0
GIB_HOUR = 2**30 * 3600.0


def test_usage_halves_every_half_life() -> None:
    assert decay_factor(0, DAY) == 1.0
    assert decay_factor(DAY, DAY) == pytest.approx(0.5)
    assert decay_factor(3 * DAY, DAY) == pytest.approx(0.125)
    assert decay_factor(-5, DAY) == 1.0  # clocks that step back never inflate usage
    assert decay_factor(DAY, 0) == 1.0  # half-life 0: no decay at all


@given(st.floats(0, 10 * DAY), st.floats(0, 10 * DAY), st.floats(1, 30 * DAY), st.floats(1e9, 1e16, allow_nan=False))
def test_decay_in_two_steps_equals_one_step(a: float, b: float, half_life: float, usage: float) -> None:
    two = charge(charge({"u": usage}, 0, a, {}, half_life), a, a + b, {}, half_life)
    one = charge({"u": usage}, 0, a + b, {}, half_life)
    assert two.get("u", 0.0) == pytest.approx(one.get("u", 0.0), rel=1e-9, abs=NEGLIGIBLE_USAGE)


def test_charge_decays_the_old_then_adds_the_new() -> None:
    after = charge({"alice": 100 * GIB_HOUR, "bob": 10 * GIB_HOUR}, 0, DAY, {"bob": 5 * GIB_HOUR}, DAY)
    assert after["alice"] == pytest.approx(50 * GIB_HOUR)
    assert after["bob"] == pytest.approx(10 * GIB_HOUR)
    assert "carol" not in charge({"carol": NEGLIGIBLE_USAGE / 4}, 0, 1, {}, DAY)  # dust is dropped


def test_overlap_counts_only_the_window() -> None:
    assert overlap_s(100, 200, 150, 300) == 50
    assert overlap_s(100, 200, 0, 1000) == 100
    assert overlap_s(100, 200, 200, 300) == 0
    assert overlap_s(None, 200, 0, 300) == 0


def test_fairshare_factor_follows_slurms_classic_formula() -> None:
    assert fairshare_factors({}, ["a", "b"]) == {"a": 1.0, "b": 1.0}
    equal = fairshare_factors({"a": 5.0, "b": 5.0}, [])
    assert equal["a"] == pytest.approx(0.5) and equal["b"] == pytest.approx(0.5)
    hog = fairshare_factors({"a": 10.0}, ["b"])  # two active users, one used everything
    assert hog["a"] == pytest.approx(0.25) and hog["b"] == 1.0


@given(st.dictionaries(st.sampled_from("abcdef"), st.floats(0, 1e15), min_size=2))
def test_more_usage_never_means_a_higher_factor(usage: dict[str, float]) -> None:
    factors = fairshare_factors(usage, usage.keys())
    for u in usage:
        for v in usage:
            if usage[u] < usage[v]:
                assert factors[u] >= factors[v]
    assert all(0 < f <= 1 for f in factors.values())


def test_priority_parts_weigh_priority_fairshare_and_age() -> None:
    config = PolicyConfig(weight_priority=2, weight_fairshare=1000, weight_age=500, max_age_s=DAY)
    parts = priority_parts(10, 0.5, DAY / 2, config)
    assert (parts.priority, parts.fairshare, parts.age) == (20, 500, 250)
    assert parts.total == 770
    assert priority_parts(0, 1.0, 10 * DAY, config).age == 500  # aging stops at max_age
    assert priority_parts(0, 1.0, -5, config).age == 0
    assert math.isclose(parts.to_json()["total"], 770)
