"""`python -m bench` selects what it is told to: policy names contain commas."""

from __future__ import annotations

import pytest

from bench.__main__ import parser
from bench.replay.run import ALL_NAMES, policies, policy_names


def test_every_policy_can_be_selected_alone_by_name() -> None:
    for policy in ALL_NAMES:
        args = parser().parse_args(["replay", "--policy", policy.name])
        assert [p.name for p in policies(policy_names(args.policy, args.policies))] == [policy.name]


def test_a_comma_separated_list_keeps_names_with_commas_whole() -> None:
    args = parser().parse_args(["replay", "--policies", "best-fit,gpulab, no reservation,gpulab"])
    chosen = [p.name for p in policies(policy_names(args.policy, args.policies))]
    assert chosen == ["best-fit", "gpulab", "gpulab, no reservation"]  # in the table's order


def test_an_unknown_policy_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        policies(policy_names(["gpulab, no such thing"], None))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown policy 'gpulab, no such thing'" in err
