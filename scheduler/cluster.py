"""Read the cluster's current picture from Redis: node heartbeats and the ledger.

`Ledger` keeps the reservations between passes: an entry is written and deleted only by
the TRANSITION script (dispatch sets it, leaving a node deletes it), which appends the job
to the event stream in the same step, so a pass reads only the entries of the jobs that
changed (scheduler/changes.py) and reads the whole hash when the active jobs are read
whole (start, gaps, every lease check); an entry is parsed again only when its bytes change.

`AccountBook` keeps the GPU accounts built from both between passes, node by node.
"""

from __future__ import annotations

import json
import logging

import redis

from jobs import keys
from jobs.gpus import NodeHeartbeat
from scheduler.policy.accounting import AccountingPolicy, GpuAccount, Reservation, build_accounts, node_accounts

log = logging.getLogger("gpulab.scheduler")


def read_heartbeats(client: redis.Redis) -> tuple[list[NodeHeartbeat], list[str]]:
    """Live heartbeats, and the names of known nodes whose heartbeat has expired."""
    names = sorted(n.decode() for n in client.smembers(keys.NODES))
    if not names:
        return [], []
    return _heartbeats(names, client.mget([keys.node(n) for n in names]), {})


def read_drained(client: redis.Redis) -> dict[str, str]:
    """Nodes an admin drained (`gpulab node drain`): no new jobs there, running ones finish."""
    return _drained(client.hgetall(keys.DRAINED))


def _drained(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def _heartbeats(
    names: list[str], raws: list[bytes | None], parsed: dict[str, tuple[bytes, NodeHeartbeat]]
) -> tuple[list[NodeHeartbeat], list[str]]:
    beats, down = [], []
    for name, raw in zip(names, raws, strict=True):
        if raw is None:
            down.append(name)
            parsed.pop(name, None)
            continue
        known = parsed.get(name)
        if known is None or known[0] != raw:
            known = parsed[name] = (raw, NodeHeartbeat.from_json(json.loads(raw)))
        beats.append(known[1])
    for gone in parsed.keys() - set(names):
        del parsed[gone]
    return beats, down


class NodeReader:
    """The scheduling pass's read of the nodes: heartbeats and the drained set, in one round
    trip while the set of node names stays the same; a heartbeat is parsed again only when
    its bytes changed (64 nodes: 4 ms of a pass otherwise)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._names: list[str] = []
        self._parsed: dict[str, tuple[bytes, NodeHeartbeat]] = {}

    def read(self) -> tuple[list[NodeHeartbeat], list[str], dict[str, str]]:
        """(live heartbeats, names of nodes whose heartbeat expired, drained nodes)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.smembers(keys.NODES)
        pipe.hgetall(keys.DRAINED)
        if self._names:  # most likely the same nodes as last pass
            pipe.mget([keys.node(n) for n in self._names])
        members, drained, *guess = pipe.execute()
        names = sorted(n.decode() for n in members)
        if names != self._names:
            guess = [self.redis.mget([keys.node(n) for n in names])] if names else [[]]
        self._names = names
        beats, down = _heartbeats(names, guess[0] if guess else [], self._parsed)
        return beats, down, _drained(drained)


def read_ledger(client: redis.Redis) -> list[Reservation]:
    return [_reservation(int(job_id), raw) for job_id, raw in client.hgetall(keys.LEDGER).items()]


def _reservation(job_id: int, raw: bytes) -> Reservation:
    data = json.loads(raw)
    return Reservation(
        job_id=job_id,
        node=str(data["node"]),
        gpus={str(k): int(v) for k, v in data["gpus"].items()},
        whole_gpu=bool(data.get("whole_gpu", False)),
    )


class Ledger:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._entries: dict[int, tuple[bytes, Reservation]] = {}
        # The reservations as last returned: a new dict whenever one changed, never modified
        # (a caller compares it with the one before), the same dict while none changed.
        self._view: dict[int, Reservation] = {}
        self._changed: set[int] | None = None  # see `take_changed`

    def take_changed(self) -> set[int] | None:
        """The jobs whose entry came, changed or went since the last call (None: any, after a
        whole read)."""
        changed, self._changed = self._changed, set()
        return changed

    def read(self) -> dict[int, Reservation]:
        """The whole ledger, read again."""
        before = self._entries
        self._entries = {}
        for key, raw in self.redis.hgetall(keys.LEDGER).items():
            job_id = int(key)
            known = before.get(job_id)
            self._entries[job_id] = known if known is not None and known[0] == raw else (raw, _reservation(job_id, raw))
        self._view = {job_id: entry[1] for job_id, entry in self._entries.items()}
        self._changed = None
        return self._view

    def update(self, changed: set[int]) -> dict[int, Reservation]:
        """The ledger after re-reading the entries of the jobs in `changed`."""
        ids = sorted(changed)
        view: dict[int, Reservation] | None = None  # copied at the first change
        for start in range(0, len(ids), 5000):
            page = ids[start : start + 5000]
            for job_id, raw in zip(page, self.redis.hmget(keys.LEDGER, page), strict=True):
                if raw is None:
                    if self._entries.pop(job_id, None) is None:
                        continue
                    view = dict(self._view) if view is None else view
                    del view[job_id]
                elif job_id not in self._entries or self._entries[job_id][0] != raw:
                    entry = self._entries[job_id] = (raw, _reservation(job_id, raw))
                    view = dict(self._view) if view is None else view
                    view[job_id] = entry[1]
                else:
                    continue
                if self._changed is not None:
                    self._changed.add(job_id)
        if view is not None:
            self._view = view
        return self._view

    def reservations(self) -> dict[int, Reservation]:
        return self._view


class AccountBook:
    """The GPU accounts (scheduler/policy/accounting.py) kept between passes: a node's are
    built again only when its heartbeat or a ledger entry on one of its GPUs changed, found
    by identity - `NodeReader` keeps a heartbeat whose bytes did not change as the same
    object, `Ledger` an unchanged entry - so a pass that follows a few job ends rebuilds a
    few nodes' accounts instead of every GPU's (2-3 ms of a 1k-job pass on 64 x 8 GPUs).

    That is `build_accounts` exactly as long as each node's accounts depend on its own
    heartbeat alone (`node_accounts`): no GPU uuid on two nodes, no heartbeat reporting
    usage on another node's GPU. When that does not hold, or the set of nodes or a node's
    GPUs changed, everything is built from scratch. The scheduler compares the kept accounts
    with a fresh build at each full read (`checked`)."""

    def __init__(self, policy: AccountingPolicy) -> None:
        self.policy = policy
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next `build` starts from scratch."""
        self._beats: dict[str, NodeHeartbeat] = {}  # as of the last build, in heartbeat order
        self._uuids: dict[str, tuple[str, ...]] = {}  # node -> its GPUs' uuids
        self._owner: dict[str, str] = {}  # uuid -> node
        self._ledger: dict[int, Reservation] = {}  # as of the last build
        self._on_node: dict[str, dict[int, Reservation]] = {}  # node -> the entries with a GPU there
        self._accounts: dict[str, list[GpuAccount]] = {}
        self._local = False  # whether each node's accounts depend on its own heartbeat alone
        self.largest_gpu = 0  # bytes of the largest GPU in the accounts (what a whole GPU is charged)

    def build(self, beats: list[NodeHeartbeat], ledger: dict[int, Reservation]) -> dict[str, list[GpuAccount]]:
        """`build_accounts(beats, ledger)`; the lists of unchanged nodes are the ones returned
        before (and the dict itself when nothing changed). Nothing returned is ever modified."""
        if not self._local or [b.node for b in beats] != list(self._beats):
            return self._full(beats, ledger)  # other nodes (or in another order): the owners move
        dirty: set[str] = set()
        kept = self._beats
        for beat in beats:
            if kept[beat.node] is beat:
                continue
            if not self._same_gpus(beat):
                return self._full(beats, ledger)
            dirty.add(beat.node)
        new_beats = bool(dirty)
        previous, owner, on_node = self._ledger, self._owner, self._on_node
        changed = [i for i, r in ledger.items() if previous.get(i) is not r] + list(previous.keys() - ledger.keys())
        for job_id in changed:
            old, new = previous.get(job_id), ledger.get(job_id)
            for res, add in ((old, False), (new, True)):
                if res is None:
                    continue
                for uuid in res.gpus:
                    node = owner.get(uuid)
                    if node is None:
                        continue  # its node is down: no account to charge (as build_accounts)
                    dirty.add(node)
                    if add:
                        on_node[node][job_id] = res
                    else:
                        on_node[node].pop(job_id, None)
        self._ledger = ledger
        if not dirty:
            return self._accounts
        self._beats = {b.node: b for b in beats}
        accounts = dict(self._accounts)
        for node in dirty:
            accounts[node] = node_accounts(self._beats[node], on_node[node].values(), self.policy)
        self._accounts = accounts
        if new_beats:  # a GPU's size comes from its heartbeat
            self._measure()
        return accounts

    def _measure(self) -> None:
        self.largest_gpu = max((g.total for gpus in self._accounts.values() for g in gpus), default=0)

    def checked(self, beats: list[NodeHeartbeat], ledger: dict[int, Reservation]) -> dict[str, list[GpuAccount]]:
        """`build`, compared with a build from scratch (at every full read): on a difference,
        logged, everything is forgotten and the fresh accounts are the answer."""
        kept = self.build(beats, ledger)
        fresh = build_accounts(beats, list(ledger.values()), self.policy)
        if kept != fresh:
            log.error("the GPU accounts kept between passes differ from a fresh build; built again")
            self._full(beats, ledger)
            return self._accounts
        return kept

    def _same_gpus(self, beat: NodeHeartbeat) -> bool:
        """The node still has the same GPUs and reports usage on them alone."""
        uuids = tuple(d.uuid for d in beat.snapshot.devices)
        return uuids == self._uuids[beat.node] and all(u.uuid in uuids for u in beat.job_usage)

    def _full(self, beats: list[NodeHeartbeat], ledger: dict[int, Reservation]) -> dict[str, list[GpuAccount]]:
        self.reset()
        self._accounts = build_accounts(beats, list(ledger.values()), self.policy)
        self._measure()
        self._ledger = ledger
        self._beats = {b.node: b for b in beats}
        if len(self._beats) != len(beats):
            return self._accounts  # a node twice: stays from scratch
        for beat in beats:
            uuids = self._uuids[beat.node] = tuple(d.uuid for d in beat.snapshot.devices)
            self._owner.update(dict.fromkeys(uuids, beat.node))
            self._on_node[beat.node] = {}
        self._local = len(self._owner) == sum(len(u) for u in self._uuids.values()) and all(
            u.uuid in self._uuids[b.node] for b in beats for u in b.job_usage
        )
        for job_id, res in ledger.items():
            for uuid in res.gpus:
                node = self._owner.get(uuid)
                if node is not None:
                    self._on_node[node][job_id] = res
        return self._accounts
