"""The GPU accounts kept between passes (scheduler/cluster.py, AccountBook): after every kind
of change to the heartbeats or the ledger they must be what `build_accounts` builds from
scratch, and an unchanged node's accounts stay the same objects (what ClusterBase relies on)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.gpus import GpuDevice, GpuSnapshot, JobGpuUsage, NodeHeartbeat
from scheduler.cluster import AccountBook
from scheduler.policy.accounting import AccountingPolicy, Reservation, build_accounts

GIB = 2**30
POLICY = AccountingPolicy()
Inputs = tuple[list[NodeHeartbeat], dict[int, Reservation]]


def beat(
    node: str,
    free: int = 80 * GIB,
    usage: tuple[JobGpuUsage, ...] = (),
    uuids: tuple[str, ...] = (),
    total: int = 80 * GIB,
) -> NodeHeartbeat:
    names = uuids or tuple(f"{node}-{i}" for i in range(2))
    devices = tuple(GpuDevice(i, u, "Sim", total, free, total - free) for i, u in enumerate(names))
    return NodeHeartbeat(node, GpuSnapshot(devices, 0.0), job_usage=usage, foreign_peak_bytes={names[0]: GIB})


def start() -> Inputs:
    ledger = {
        1: Reservation(1, "n0", {"n0-0": 8 * GIB}),
        2: Reservation(2, "n1", {"n1-0": 80 * GIB, "n1-1": 80 * GIB}, whole_gpu=True),
        3: Reservation(3, "n2", {"n2-1": 4 * GIB}),
    }
    usage = (JobGpuUsage(3, "n2-1", 5 * GIB, 6 * GIB),)  # above its request: counted at its peak
    return [beat("n0"), beat("n1"), beat("n2", usage=usage)], ledger


def replaced(beats: list[NodeHeartbeat], new: NodeHeartbeat) -> list[NodeHeartbeat]:
    return sorted([b for b in beats if b.node != new.node] + [new], key=lambda b: b.node)


CHANGES: dict[str, Callable[[Inputs], Inputs]] = {
    "a heartbeat's free memory": lambda i: (replaced(i[0], beat("n1", free=10 * GIB)), i[1]),
    "a job's usage in a heartbeat": lambda i: (
        replaced(i[0], beat("n0", usage=(JobGpuUsage(1, "n0-0", 9 * GIB, 12 * GIB),))),
        i[1],
    ),
    "a ledger entry appears": lambda i: (i[0], {**i[1], 4: Reservation(4, "n2", {"n2-0": 3 * GIB})}),
    "a ledger entry disappears": lambda i: (i[0], {k: v for k, v in i[1].items() if k != 1}),
    "a ledger entry is rewritten": lambda i: (i[0], {**i[1], 3: Reservation(3, "n2", {"n2-1": 7 * GIB})}),
    "an entry on two nodes": lambda i: (i[0], {**i[1], 5: Reservation(5, "n0", {"n0-1": GIB, "n2-0": GIB})}),
    "an entry on a node that is down": lambda i: (i[0], {**i[1], 6: Reservation(6, "n9", {"n9-0": GIB})}),
    "a node vanishes": lambda i: ([b for b in i[0] if b.node != "n1"], i[1]),
    "a node returns": lambda i: (replaced(i[0], beat("n9")), i[1]),
    "a node's GPUs change": lambda i: (replaced(i[0], beat("n0", uuids=("n0-0", "n0-new"))), i[1]),
    "usage reported on another node's GPU": lambda i: (
        replaced(i[0], beat("n2", usage=(JobGpuUsage(1, "n0-0", 9 * GIB, 30 * GIB),))),
        i[1],
    ),
    "a node replaced by another": lambda i: (replaced([b for b in i[0] if b.node != "n1"], beat("n5")), i[1]),
    "a uuid on two nodes": lambda i: (replaced(i[0], beat("n0", uuids=("n0-0", "n1-1"))), i[1]),
    "a node's GPUs grow": lambda i: (replaced(i[0], beat("n2", total=96 * GIB)), i[1]),
}


def fresh(inputs: Inputs) -> dict[str, list[object]]:
    return build_accounts(inputs[0], list(inputs[1].values()), POLICY)  # type: ignore[return-value]


def built(book: AccountBook, inputs: Inputs) -> dict[str, list[object]]:
    """`book.build`, with its largest GPU checked against the accounts' own."""
    accounts = book.build(*inputs)
    assert book.largest_gpu == max((g.total for gpus in accounts.values() for g in gpus), default=0)
    return accounts  # type: ignore[return-value]


@pytest.mark.parametrize("change", list(CHANGES))
def test_kept_accounts_are_the_ones_built_from_scratch(change: str) -> None:
    book = AccountBook(POLICY)
    before = start()
    first = built(book, before)
    assert first == fresh(before)
    after = CHANGES[change](before)
    assert built(book, after) == fresh(after)
    again = CHANGES[change](after)  # new objects, the same values: a second round of the same change
    assert built(book, again) == fresh(again)
    assert built(book, before) == fresh(before)  # and undone


def test_an_unchanged_node_keeps_its_accounts_and_a_quiet_pass_its_dict() -> None:
    book = AccountBook(POLICY)
    beats, ledger = start()
    first = book.build(beats, ledger)
    assert book.build(beats, dict(ledger)) is first
    second = book.build(beats, {**ledger, 4: Reservation(4, "n2", {"n2-0": 3 * GIB})})
    assert second["n0"] is first["n0"] and second["n1"] is first["n1"] and second["n2"] is not first["n2"]
    assert first == fresh((beats, ledger)), "an earlier answer was modified"


def test_a_kept_picture_that_went_wrong_is_caught_by_the_check_and_replaced() -> None:
    book = AccountBook(POLICY)
    beats, ledger = start()
    book.build(beats, ledger)
    book._accounts["n0"][0].committed += GIB  # what a missed invalidation would leave behind
    assert book.checked(beats, ledger) == fresh((beats, ledger))
    assert book.build(beats, ledger) == fresh((beats, ledger))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(sorted(CHANGES)), min_size=1, max_size=8))
def test_a_chain_of_changes_keeps_the_accounts_equal_to_fresh_ones(steps: list[str]) -> None:
    book = AccountBook(POLICY)
    inputs = start()
    book.build(*inputs)
    for change in steps:
        inputs = CHANGES[change](inputs)
        assert built(book, inputs) == fresh(inputs), change
