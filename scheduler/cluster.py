"""Read the cluster's current picture from Redis: node heartbeats and the ledger."""

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
    entries = []
    for job_id, raw in client.hgetall(keys.LEDGER).items():
        data = json.loads(raw)
        entries.append(
            Reservation(
                job_id=int(job_id),
                node=str(data["node"]),
                gpus={str(k): int(v) for k, v in data["gpus"].items()},
                whole_gpu=bool(data.get("whole_gpu", False)),
            )
        )
    return entries
