"""Read the cluster's current picture from Redis: node heartbeats and the ledger.

`Ledger` keeps the reservations between passes: an entry is written and deleted only by
the TRANSITION script (dispatch sets it, leaving a node deletes it), which appends the job
to the event stream in the same step, so a pass reads only the entries of the jobs that
changed (scheduler/changes.py) and reads the whole hash when the active jobs are read
whole (start, gaps, every lease check); an entry is parsed again only when its bytes change.
"""

from __future__ import annotations

import json

import redis

from jobs import keys
from jobs.gpus import NodeHeartbeat
from scheduler.policy.accounting import Reservation


def read_heartbeats(client: redis.Redis) -> tuple[list[NodeHeartbeat], list[str]]:
    """Live heartbeats, and the names of known nodes whose heartbeat has expired."""
    names = sorted(n.decode() for n in client.smembers(keys.NODES))
    if not names:
        return [], []
    raws = client.mget([keys.node(n) for n in names])
    beats, down = [], []
    for name, raw in zip(names, raws, strict=True):
        if raw is None:
            down.append(name)
        else:
            beats.append(NodeHeartbeat.from_json(json.loads(raw)))
    return beats, down


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

    def read(self) -> dict[int, Reservation]:
        """The whole ledger, read again."""
        before = self._entries
        self._entries = {}
        for key, raw in self.redis.hgetall(keys.LEDGER).items():
            job_id = int(key)
            known = before.get(job_id)
            self._entries[job_id] = known if known is not None and known[0] == raw else (raw, _reservation(job_id, raw))
        return self.reservations()

    def update(self, changed: set[int]) -> dict[int, Reservation]:
        """The ledger after re-reading the entries of the jobs in `changed`."""
        ids = sorted(changed)
        for start in range(0, len(ids), 5000):
            page = ids[start : start + 5000]
            for job_id, raw in zip(page, self.redis.hmget(keys.LEDGER, page), strict=True):
                if raw is None:
                    self._entries.pop(job_id, None)
                elif job_id not in self._entries or self._entries[job_id][0] != raw:
                    self._entries[job_id] = (raw, _reservation(job_id, raw))
        return self.reservations()

    def reservations(self) -> dict[int, Reservation]:
        return {job_id: entry[1] for job_id, entry in self._entries.items()}
