"""The cluster as one placement pass sees it, updated as the pass places jobs. Pure.

Built for speed at scale (10k pending jobs on 512 GPUs): the free memory of every GPU
that is not held for a reservation sits in one sorted list, so a 1-GPU job finds its
best-fit GPU by bisection; multi-GPU, whole-GPU and constrained jobs scan nodes, skipping
those whose largest hole (or idle count) is too small.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from scheduler.policy.accounting import AccountingPolicy, GpuAccount
from scheduler.policy.types import PendingJob, RunningJob

INF = math.inf
IGNORE_HOLDS = -INF  # as a job's end: "as if it ended before every hold" (would it fit at all?)
WHOLE = 2**62  # a whole-GPU hold: no memory of that GPU may be promised to anyone else


@dataclass
class Hold:
    job_id: int
    need: int  # bytes per GPU held back (WHOLE for a whole-GPU job)
    until: float  # expected start; jobs sure to end by then may still use the memory

    def lends_to(self, end: float) -> bool:
        """A job ending at `end` may use the held memory: it is gone before the holder starts."""
        return end == IGNORE_HOLDS or (end <= self.until and self.until != INF)


@dataclass
class Slot:
    acct: GpuAccount  # this pass's copy: placing a job reserves on it
    order: int  # position in the cluster (node order, GPU index): the tie-break
    model: str  # GPU name, lower case
    avail: int
    idle: bool
    hold: Hold | None = None
    ends: list[tuple[float, int]] = field(default_factory=list)  # (end time, bytes) of jobs on it

    def usable(self, end: float) -> int:
        """Memory a job ending at `end` may take here (a hold it cannot outlast is not its)."""
        if self.hold is None or self.hold.lends_to(end):
            return self.avail
        return max(0, self.avail - self.hold.need)

    def idle_for(self, end: float) -> bool:
        return self.idle and (self.hold is None or self.hold.lends_to(end))


@dataclass
class NodeState:
    name: str
    slots: list[Slot]
    max_avail: int = 0
    idle_count: int = 0
    first: int = 0  # order of its first slot: a node's slots are consecutive in the cluster's order

    def refresh(self) -> None:
        self.max_avail = max((s.avail for s in self.slots), default=0)
        self.idle_count = sum(1 for s in self.slots if s.idle)


Choice = tuple[str, list[Slot]]


def clone(acct: GpuAccount) -> GpuAccount:
    """A shallow copy of an account (all its fields are plain values), faster than copy.copy."""
    twin = object.__new__(GpuAccount)
    twin.__dict__.update(acct.__dict__)
    return twin


def _slot_copy(slot: Slot) -> Slot:
    return Slot(clone(slot.acct), slot.order, slot.model, slot.avail, slot.idle, slot.hold, list(slot.ends))


class ClusterBase:
    """The cluster before a pass places anything: every GPU's slot, the nodes placement may
    use and the sorted free list, from (accounts, policy, unavailable nodes, running jobs).
    A value: never modified once built (ClusterState copies a slot or node before it changes
    one), so the next pass's may be built from it (`build(..., previous=)`), rebuilding only
    the nodes whose inputs changed: whose account list is another object, or that a running
    job which came or went (another object, or none) holds a GPU of. That is the same value
    as a build from scratch (tests/unit/test_cluster_base.py compares them); it is built
    from scratch when the nodes, their GPUs, the policy or the running jobs' shape (the same
    object twice, a GPU uuid on two nodes) do not allow that.

    Each slot's `ends` (the running jobs' (end, bytes) on it) is sorted, whatever the order
    of `running`: only sorted is it read (scheduler/policy/reservations.py)."""

    __slots__ = (
        "_all",
        "_jobs",
        "_lists",
        "_on_node",
        "_owner",
        "_unique",
        "accounts",
        "free",
        "nodes",
        "policy",
        "running",
        "slots",
        "unavailable",
    )

    def __init__(
        self,
        accounts: Mapping[str, list[GpuAccount]],
        policy: AccountingPolicy,
        unavailable: frozenset[str],
        running: Sequence[RunningJob],
    ) -> None:
        self.accounts = accounts  # the inputs it was built from (place_queue checks them)
        self.policy = policy
        self.unavailable = unavailable
        self.running = running
        self.slots: list[Slot] = []  # every GPU, in the cluster's order (node name, GPU index)
        self.nodes: dict[str, NodeState] = {}  # the nodes placement may use
        self.free: list[tuple[int, int]] = []  # (avail, order) of every usable GPU with free memory, ascending
        self._all: dict[str, NodeState] = {}  # every node, unavailable ones too
        self._lists: dict[str, list[GpuAccount]] = {}  # node -> the account list its slots came from
        self._owner: dict[str, str] = {}  # GPU uuid -> node
        self._jobs: dict[int, RunningJob] = {}  # id(job) -> job, for `running`
        self._on_node: dict[str, dict[int, RunningJob]] = {}  # node -> the running jobs with a GPU there
        self._unique = False  # whether the incremental build applies (see the class's doc)

    @classmethod
    def build(
        cls,
        accounts: Mapping[str, list[GpuAccount]],
        policy: AccountingPolicy,
        unavailable: frozenset[str],
        running: Sequence[RunningJob],
        previous: ClusterBase | None = None,
    ) -> ClusterBase:
        """The base for these inputs, from `previous` (not modified) where it allows."""
        if (
            previous is not None
            and previous.accounts is accounts
            and previous.running is running
            and previous.unavailable == unavailable
            and previous.policy == policy
        ):
            return previous  # the very same inputs (a pass in which nothing changed)
        base = cls(accounts, policy, unavailable, running)
        names = sorted(accounts)
        same_jobs = previous is not None and previous.running is running
        jobs = previous._jobs if previous is not None and same_jobs else {id(j): j for j in running}
        if (
            previous is None
            or not previous._unique
            or previous.policy != policy
            or list(previous._all) != names
            or len(jobs) != len(running)
        ):
            base._full(names, jobs)
            return base
        dirty = {n for n in names if accounts[n] is not previous._lists[n]}
        if 2 * len(dirty) > len(names):  # most nodes changed (a burst): from scratch is cheaper
            base._full(names, jobs)
            return base
        for name in dirty:
            before = previous._all[name].slots
            gpus = sorted(accounts[name], key=lambda a: a.index)
            if len(gpus) != len(before) or any(a.uuid != s.acct.uuid for a, s in zip(gpus, before, strict=True)):
                base._full(names, jobs)  # other GPUs: the owners and the orders move
                return base
        owner = previous._owner
        on_node = dict(previous._on_node)
        copied: set[str] = set()
        before_jobs = previous._jobs
        came_or_went = (
            []
            if same_jobs
            else [(k, False) for k in before_jobs.keys() - jobs.keys()]
            + [(k, True) for k in jobs.keys() - before_jobs.keys()]
        )
        for key, add in came_or_went:
            job = jobs[key] if add else before_jobs[key]
            for uuid in job.gpus:
                at = owner.get(uuid)
                if at is None:
                    continue
                if at not in copied:
                    on_node[at] = dict(on_node[at])
                    copied.add(at)
                dirty.add(at)
                if add:
                    on_node[at][key] = job
                else:
                    on_node[at].pop(key, None)
        if 2 * len(dirty) > len(names):
            base._full(names, jobs)
            return base
        base._owner, base._on_node = owner, on_node
        base._jobs = jobs
        base._lists = dict(previous._lists)
        base._all = dict(previous._all)
        base.slots = list(previous.slots)
        for name in dirty:
            node = base._node(name, accounts[name], previous._all[name].first, on_node[name].values())
            base.slots[node.first : node.first + len(node.slots)] = node.slots
        base._unique = True
        if unavailable != previous.unavailable:
            base._index()
            return base
        base.nodes = dict(previous.nodes)
        free = base.free = list(previous.free)
        for name in dirty:
            node = base._all[name]
            if name in unavailable:
                continue
            base.nodes[name] = node
            for slot in previous._all[name].slots:
                if slot.avail > 0:
                    del free[bisect.bisect_left(free, (slot.avail, slot.order))]
            for slot in node.slots:
                if slot.avail > 0:
                    bisect.insort(free, (slot.avail, slot.order))
        return base

    def same_as(self, other: ClusterBase) -> bool:
        """The same cluster (the inputs it was built from aside)."""
        return (self.slots, self.nodes, self.free) == (other.slots, other.nodes, other.free)

    def _full(self, names: list[str], jobs: dict[int, RunningJob]) -> None:
        self._jobs = jobs
        by_uuid: dict[str, Slot] = {}
        for name in names:
            node = self._node(name, self.accounts[name], len(self.slots), ())
            self.slots += node.slots
            by_uuid.update((s.acct.uuid, s) for s in node.slots)
            self._owner.update((s.acct.uuid, name) for s in node.slots)
            self._on_node[name] = {}
        for job in self.running:  # as the jobs' GPUs are found by uuid: the last GPU of a uuid wins
            for uuid, held in job.gpus.items():
                on = by_uuid.get(uuid)
                if on is not None:
                    on.ends.append(
                        (INF if job.ends_at is None else job.ends_at, on.acct.total if job.whole_gpu else held)
                    )
                    self._on_node[self._owner[uuid]][id(job)] = job
        for slot in self.slots:
            slot.ends.sort()
        # A uuid on two GPUs, or a job twice in `running`: the next build starts from scratch.
        self._unique = len(self._owner) == len(self.slots) and len(jobs) == len(self.running)
        self._index()

    def _node(self, name: str, accounts: list[GpuAccount], first: int, jobs: Iterable[RunningJob]) -> NodeState:
        """The node's slots from its accounts and the running jobs on it (its entry in `_all`)."""
        policy = self.policy
        slots = []
        for i, acct in enumerate(sorted(accounts, key=lambda a: a.index)):
            idle = acct.idle(policy) and not acct.whole_gpu_taken
            slots.append(Slot(acct, first + i, acct.name.lower(), acct.available(policy), idle))
        by_uuid = {s.acct.uuid: s for s in slots}
        for job in jobs:
            end = INF if job.ends_at is None else job.ends_at
            for uuid, held in job.gpus.items():
                on = by_uuid.get(uuid)
                if on is not None:
                    on.ends.append((end, on.acct.total if job.whole_gpu else held))
        for slot in slots:
            slot.ends.sort()
        node = self._all[name] = NodeState(name, slots, first=first)
        node.refresh()
        self._lists[name] = accounts
        return node

    def _index(self) -> None:
        """`nodes` and `free` from `_all` and `unavailable`."""
        self.nodes = {n: node for n, node in self._all.items() if n not in self.unavailable}
        self.free = sorted((s.avail, s.order) for n in self.nodes.values() for s in n.slots if s.avail > 0)


class ClusterState:
    """One pass's cluster, changed as the pass places and holds: starts as `base` and copies
    a slot, and its node, the first time it changes one, so the base stays as it was."""

    def __init__(self, base: ClusterBase) -> None:
        self.policy = base.policy
        self.slots = list(base.slots)
        self.nodes = dict(base.nodes)
        self.free = list(base.free)
        self.held: list[Slot] = []
        self._own: set[int] = set()  # orders of the slots copied by this pass
        self._own_nodes: set[str] = set()

    def _owned(self, slot: Slot) -> Slot:
        """This pass's own copy of `slot` (made the first time, put in its place)."""
        if slot.order in self._own:
            return self.slots[slot.order]
        mine = _slot_copy(slot)
        self._own.add(slot.order)
        self.slots[slot.order] = mine
        name = slot.acct.node
        node = self.nodes.get(name)
        if node is not None:
            if name not in self._own_nodes:
                node = self.nodes[name] = NodeState(name, list(node.slots), node.max_avail, node.idle_count, node.first)
                self._own_nodes.add(name)
            node.slots[slot.order - node.first] = mine
        return mine

    # ---- finding room ---------------------------------------------------------------------------
    def find(self, job: PendingJob, end: float) -> Choice | None:
        """Best-fit GPUs for `job` (ending at `end`) on one node, or None if it cannot start now."""
        if job.gpus == 1 and not job.whole and not job.node and not job.gpu_model:
            return self._find_one(job.mem_bytes or 0, end)
        best: tuple[tuple[int, int], Choice] | None = None
        for node in self._candidate_nodes(job):
            picked = self._pick_on_node(node, job, end)
            if picked is not None and (best is None or picked[0] < best[0]):
                best = (picked[0], (node.name, picked[1]))
        return None if best is None else best[1]

    def _candidate_nodes(self, job: PendingJob) -> list[NodeState]:
        if job.node:
            node = self.nodes.get(job.node)
            return [node] if node is not None else []
        return list(self.nodes.values())

    def _find_one(self, need: int, end: float) -> Choice | None:
        best: Slot | None = None
        i = bisect.bisect_left(self.free, (need, -1))
        if i < len(self.free):
            best = self.slots[self.free[i][1]]
        for slot in self.held:  # few: GPUs held for reservations are kept out of `free`
            if (
                slot.usable(end) >= need
                and slot.acct.node in self.nodes
                and (best is None or (slot.avail, slot.order) < (best.avail, best.order))
            ):
                best = slot
        return None if best is None else (best.acct.node, [best])

    def _pick_on_node(self, node: NodeState, job: PendingJob, end: float) -> tuple[tuple[int, int], list[Slot]] | None:
        k = job.gpus
        if len(node.slots) < k:
            return None
        model = job.gpu_model.lower()
        if job.whole:
            if node.idle_count < k:
                return None
            floor = (job.mem_bytes or 0) + self.policy.headroom_bytes if job.exclusive else 0
            idle = [
                s for s in node.slots if s.idle_for(end) and s.acct.total >= floor and (not model or model in s.model)
            ]
            if len(idle) < k:
                return None
            # Fewest idle GPUs left over first: keep big groups of idle GPUs together.
            return (len(idle) - k, idle[0].order), idle[:k]
        need = job.mem_bytes or 0
        if node.max_avail < need:
            return None
        fit: list[tuple[int, int, Slot]] = []
        for slot in node.slots:
            if not model or model in slot.model:
                room = slot.usable(end)
                if room >= need:
                    fit.append((room, slot.order, slot))
        if len(fit) < k:
            return None
        fit.sort(key=lambda t: (t[0], t[1]))
        chosen = sorted(fit[:k], key=lambda t: t[1])  # in GPU order, as CUDA_VISIBLE_DEVICES lists them
        return (sum(room - need for room, _, _ in chosen), chosen[0][1]), [slot for _, _, slot in chosen]

    # ---- changing it ------------------------------------------------------------------------------
    def take(self, slots: list[Slot], amount_of: list[int], whole: bool, end: float) -> list[Slot]:
        """Account for a job placed on `slots` (it has allocated nothing yet); returns the
        slots as changed (this pass's copies)."""
        touched = set()
        out = []
        for found, amount in zip(slots, amount_of, strict=True):
            slot = self._owned(found)
            out.append(slot)
            self._unlist(slot)
            slot.acct.reserve(amount, whole=whole)
            slot.avail = slot.acct.available(self.policy)
            slot.idle = False
            slot.ends.append((end, amount))
            self._list(slot)
            touched.add(slot.acct.node)
        for name in touched:
            self.nodes[name].refresh()
        return out

    def hold(self, slots: list[Slot], hold: Hold) -> None:
        for found in slots:
            slot = self._owned(found)
            self._unlist(slot)
            slot.hold = hold
            self.held.append(slot)

    def _unlist(self, slot: Slot) -> None:
        if slot.hold is not None:
            return
        i = bisect.bisect_left(self.free, (slot.avail, slot.order))
        if i < len(self.free) and self.free[i] == (slot.avail, slot.order):
            del self.free[i]

    def _list(self, slot: Slot) -> None:
        if slot.hold is None and slot.avail > 0:
            bisect.insort(self.free, (slot.avail, slot.order))
