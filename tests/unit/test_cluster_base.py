"""The cluster a pass starts from (scheduler/policy/cluster_state.py, ClusterBase), built
from last pass's: for every kind of change it must be the cluster a build from scratch
gives, leave last pass's as it was, and lead placement to the same decisions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.config import PolicyConfig
from scheduler.policy.accounting import GpuAccount
from scheduler.policy.cluster_state import ClusterBase, ClusterState
from scheduler.policy.placement import PendingJob, RunningJob, WaitingQueue, place_queue
from tests.unit.placement_sim import GIB, POLICY

Accounts = dict[str, list[GpuAccount]]
Inputs = tuple[Accounts, frozenset[str], list[RunningJob]]


def account(node: str, index: int, used: int = 0, total: int = 80 * GIB, uuid: str = "") -> GpuAccount:
    return GpuAccount(
        node=node, index=index, uuid=uuid or f"{node}-{index}", name="Sim GPU", healthy=True, total=total,
        nvml_free=total - used, used=used, committed=used, gpulab_reserved=used, gpulab_used=used, jobs=int(used > 0),
    )  # fmt: skip


def start() -> Inputs:
    accounts = {n: [account(n, i, used=(i + 1) * GIB) for i in range(4)] for n in ("n0", "n1", "n2")}
    running = [
        RunningJob(1, "a", "n0", {"n0-0": GIB}, ends_at=50.0),
        RunningJob(2, "b", "n1", {"n1-0": 2 * GIB, "n1-1": 2 * GIB}, ends_at=None),
        RunningJob(3, "c", "n2", {"n2-3": 80 * GIB}, whole_gpu=True, ends_at=70.0),
    ]
    return accounts, frozenset(), running


def with_node(accounts: Accounts, node: str, gpus: list[GpuAccount]) -> Accounts:
    return {**accounts, node: gpus}


# Each change as the scheduler makes it: a node's accounts are another list when its
# heartbeat or ledger entries changed; the other lists and running jobs are the same objects.
CHANGES: dict[str, Callable[[Inputs], Inputs]] = {
    "a node's free memory": lambda i: (
        with_node(i[0], "n1", [account("n1", g, used=9 * GIB) for g in range(4)]),
        *i[1:],
    ),
    "a job starts": lambda i: (i[0], i[1], [*i[2], RunningJob(4, "a", "n2", {"n2-1": 3 * GIB}, ends_at=90.0)]),
    "a job ends": lambda i: (i[0], i[1], [j for j in i[2] if j.id != 1]),
    "a job on two nodes ends": lambda i: (
        i[0],
        i[1],
        [*i[2][:1], RunningJob(2, "b", "n1", {"n1-0": 2 * GIB, "n0-3": GIB})],
    ),
    "a job's running record is rebuilt": lambda i: (i[0], i[1], [replace(j, ends_at=99.0) for j in i[2]]),
    "a node drains": lambda i: (i[0], frozenset({"n0"}), i[2]),
    "a drained node with changes": lambda i: (
        with_node(i[0], "n0", [account("n0", g, used=5 * GIB) for g in range(4)]),
        frozenset({"n0"}),
        i[2],
    ),
    "a node vanishes": lambda i: ({n: a for n, a in i[0].items() if n != "n1"}, i[1], i[2]),
    "a node comes": lambda i: (with_node(i[0], "n3", [account("n3", g) for g in range(2)]), i[1], i[2]),
    "a GPU swapped": lambda i: (
        with_node(i[0], "n2", [account("n2", g, uuid="new" if g == 3 else "") for g in range(4)]),
        i[1],
        i[2],
    ),
    "a whole-GPU job's GPU grows": lambda i: (
        with_node(i[0], "n2", [account("n2", g, total=96 * GIB) for g in range(4)]),
        i[1],
        i[2],
    ),
    "the same job twice": lambda i: (i[0], i[1], [*i[2], i[2][0]]),
    "a uuid on two nodes": lambda i: (  # a job's GPUs are found by uuid: the last node's wins
        with_node(i[0], "n1", [account("n1", g, uuid="n0-0" if g == 0 else "") for g in range(4)]),
        i[1],
        [*i[2], RunningJob(5, "a", "n0", {"n0-1": GIB, "n0-0": GIB})],
    ),
}


def fresh(inputs: Inputs) -> ClusterBase:
    return ClusterBase.build(inputs[0], POLICY, inputs[1], inputs[2])


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_base_built_from_last_passes_is_the_one_built_from_scratch(change: str) -> None:
    before = start()
    previous = fresh(before)
    after = CHANGES[change](before)
    built = ClusterBase.build(*after[:1], POLICY, after[1], after[2], previous=previous)
    assert built.same_as(fresh(after))
    assert previous.same_as(fresh(before)), "the previous base was modified"
    again = CHANGES[change](after) if change != "the same job twice" else after
    assert ClusterBase.build(again[0], POLICY, again[1], again[2], previous=built).same_as(fresh(again))
    back = ClusterBase.build(before[0], POLICY, before[1], before[2], previous=built)  # and the change undone
    assert back.same_as(previous)


def test_a_pass_changes_its_copies_and_never_the_base() -> None:
    accounts, unavailable, running = start()
    base = fresh((accounts, unavailable, running))
    jobs = [PendingJob(10 + i, 1 + i % 2, (20 + 10 * i) * GIB, user="a", time_limit_s=60.0) for i in range(6)]
    # Fits nowhere now and has waited long enough to hold GPUs: a pass holds and takes.
    jobs.append(PendingJob(40, 4, 79 * GIB + GIB // 2, user="b", submitted_at=-1000.0))
    config = PolicyConfig(reserve_after_s=10.0)
    kwargs = {"config": config, "running": running, "now": 0.0, "unavailable_nodes": unavailable}
    result = place_queue(WaitingQueue(jobs), accounts, POLICY, base=base, **kwargs)  # type: ignore[arg-type]
    assert result.assignments and result.reservations
    assert base.same_as(fresh((accounts, unavailable, running)))
    assert result == place_queue(WaitingQueue(jobs), accounts, POLICY, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # a base from other inputs is refused, not trusted
        place_queue(WaitingQueue(jobs), {**accounts}, POLICY, base=base, **kwargs)  # type: ignore[arg-type]


def test_the_states_copies_share_nothing_they_change() -> None:
    accounts, unavailable, running = start()
    base = fresh((accounts, unavailable, running))
    state = ClusterState(base)
    node = state.nodes["n0"]
    taken = state.take([node.slots[1]], [GIB], False, 10.0)
    assert taken[0] is state.slots[taken[0].order] is state.nodes["n0"].slots[1]
    assert base.nodes["n0"].slots[1] is not taken[0] and base.slots[taken[0].order].acct.jobs == 1
    assert taken[0].acct.jobs == 2 and state.nodes["n0"].max_avail == base.nodes["n0"].max_avail


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(sorted(CHANGES)), st.booleans()), min_size=1, max_size=8))
def test_a_chain_of_changes_keeps_the_base_equal_to_a_fresh_one(steps: list[tuple[str, bool]]) -> None:
    inputs = start()
    base = fresh(inputs)
    jobs = [PendingJob(100 + i, 1 + i % 3, (8 + 9 * i) * GIB, user="abc"[i % 3], time_limit_s=30.0) for i in range(9)]
    for change, place_too in steps:
        inputs = CHANGES[change](inputs)
        base = ClusterBase.build(inputs[0], POLICY, inputs[1], inputs[2], previous=base)
        assert base.same_as(fresh(inputs)), change
        if place_too:
            kwargs = {"running": inputs[2], "now": 5.0, "unavailable_nodes": inputs[1]}
            placed = place_queue(WaitingQueue(jobs), inputs[0], POLICY, base=base, **kwargs)  # type: ignore[arg-type]
            assert placed == place_queue(WaitingQueue(jobs), inputs[0], POLICY, **kwargs)  # type: ignore[arg-type]
