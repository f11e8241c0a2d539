"""Leader election among the schedulers on one Redis (docs/ARCHITECTURE.md, "Leader and fencing").

Every `gpulab scheduler` serves the API; exactly one, the leader, runs the scheduling loop.
The leader holds a lease in Redis (`keys.LEADER`, SET with a PX TTL of `leader_lease_s`),
renewed every third of it by a thread of its own, so a long pass does not lose it. Taking the
lease INCRs an epoch and writes the fence `"<epoch>:<token>"` (`keys.LEADER_FENCE`); every
write of the loop checks that fence atomically in Redis (in its Lua script, or under WATCH
in dispatch's MULTI), so a leader that was paused, cut off or slow past its lease, and finds
a successor when it resumes, has every write refused.

Lease times are Redis's (PX TTLs, TIME): a clock jump on a host neither extends nor cuts a
lease. This process's own belief that it leads (`fence()`) runs on the monotonic clock and
ends a little before the lease can have expired in Redis; it only stops the loop earlier,
the fence in Redis is what keeps writes safe.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from jobs import keys, scripts
from jobs.lifecycle import Fence

log = logging.getLogger("gpulab.leader")

# This process stops believing it leads after this share of the lease since the last renewal
# it sent: before Redis can have expired the lease, since Redis started counting later.
LOCAL_VALIDITY = 0.8


def holder_name(socket_path: Path) -> str:
    """Who a scheduler is, for `gpulab doctor`: host, pid and API socket."""
    return f"{socket.gethostname()}:{os.getpid()} {socket_path}"


def fence_epoch(fence: str) -> int:
    return int(fence.partition(":")[0])


class Leadership:
    """This scheduler's part in the election: `run()` in a thread of its own, `fence()` from
    the loop before each pass."""

    def __init__(self, client: redis.Redis, lease_s: float, holder: str) -> None:
        self.client = client
        self.lease_s = lease_s
        self.holder = holder
        self.token = secrets.token_hex(16)
        self._acquire = client.register_script(scripts.LEADER_ACQUIRE)
        self._renew = client.register_script(scripts.LEADER_RENEW)
        self._release = client.register_script(scripts.LEADER_RELEASE)
        self._lock = threading.Lock()
        self._fence: str | None = None
        self._valid_until = 0.0  # monotonic
        self._releasing: str | None = None  # the fence release() is handing back, until Redis answers
        self.gained = threading.Event()  # set on taking the lease: wakes a waiting loop at once

    @property
    def renew_every_s(self) -> float:
        return self.lease_s / 3

    @property
    def poll_s(self) -> float:
        """How often a follower tries to take the lease: bounds the failover time with it."""
        return min(0.5, self.lease_s / 4)

    @property
    def lease_ms(self) -> str:
        return str(int(self.lease_s * 1000))

    def fence(self) -> Fence | None:
        """The fence of this scheduler's leadership while it leads, else None."""
        with self._lock:
            if self._fence is not None and time.monotonic() < self._valid_until:
                return Fence(keys.LEADER_FENCE, self._fence)
            return None

    def tick(self) -> None:
        """Renew the lease while leading; else try to take it."""
        sent = time.monotonic()
        with self._lock:
            mine = self._fence
        if mine is not None:
            if self._renew(keys=[keys.LEADER, keys.SCHEDULERS], args=[mine, self.holder, self.lease_ms]):
                with self._lock:
                    if self._fence == mine:
                        self._valid_until = sent + self.lease_s * LOCAL_VALIDITY
                return
            self.step_down("the lease lapsed or another scheduler took it")
        taken = self._acquire(
            keys=[keys.LEADER, keys.LEADER_EPOCH, keys.LEADER_FENCE, keys.LEADER_INFO, keys.SCHEDULERS],
            args=[self.token, self.holder, self.lease_ms],
        )
        fence = taken.decode() if isinstance(taken, bytes) else str(taken or "")
        if not fence:
            return
        with self._lock:
            self._fence = fence
            self._valid_until = sent + self.lease_s * LOCAL_VALIDITY
        log.info("leader: this scheduler leads now (epoch %d)", fence_epoch(fence))
        self.gained.set()

    def step_down(self, why: str) -> None:
        """Stop leading now (lease lost, or a write was refused by a newer leader's fence)."""
        with self._lock:
            was, self._fence = self._fence, None
            self.gained.clear()
            self.token = secrets.token_hex(16)  # a later leadership of this process gets a new fence
        if was is not None:
            log.warning("leader: epoch %d ends: %s; this scheduler only serves the API now", fence_epoch(was), why)

    def run(self, stop: threading.Event) -> None:
        """Renew or contend until `stop`, then free the lease for a successor at once."""
        while not stop.is_set():
            try:
                self.tick()
            except redis.RedisError as exc:  # Redis away: the local validity runs out on its own
                log.warning("leader: cannot reach Redis for the lease (%s)", exc)
            except Exception:
                log.exception("leader: lease renewal failed")
            stop.wait(self.renew_every_s if self.fence() is not None else self.poll_s)
        self.release()

    def unreleased_epoch(self) -> int | None:
        """The epoch of a lease this scheduler holds or is handing back and Redis has not yet
        taken back: for a stopping scheduler whose release() is stuck on a Redis that does
        not answer (its `fence()` is already None then)."""
        with self._lock:
            held = self._fence or self._releasing
        return fence_epoch(held) if held else None

    def release(self) -> None:
        with self._lock:
            mine, self._fence = self._fence, None
            self._releasing = mine
        try:
            self._release(keys=[keys.LEADER, keys.SCHEDULERS], args=[mine or "", self.holder])
        except redis.RedisError as exc:
            if mine is not None:
                log.warning(
                    "leader: could not release the lease (epoch %d): %s; it lapses within %gs",
                    fence_epoch(mine), exc, self.lease_s,
                )  # fmt: skip
            return
        finally:
            with self._lock:
                self._releasing = None
        if mine is not None:
            log.info("leader: released the lease (epoch %d)", fence_epoch(mine))

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="leader", daemon=True)
        thread.start()
        return thread


@dataclass(frozen=True)
class LeaderView:
    """What `gpulab doctor` shows: the lease and the schedulers seen alive."""

    holder: str | None  # None: no scheduler holds the lease
    epoch: int | None
    held_for_s: float | None  # since this leadership began
    renewed_ago_s: float | None  # since the lease was last renewed
    expires_in_s: float | None
    alive: list[str]  # schedulers (leader or not) seen within `alive_within_s`


def read_leader(client: redis.Redis, alive_within_s: float) -> LeaderView:
    """The leader and the live schedulers, on Redis's clock."""
    pipe = client.pipeline(transaction=True)
    pipe.time()
    pipe.get(keys.LEADER)
    pipe.pttl(keys.LEADER)
    pipe.hgetall(keys.LEADER_INFO)
    pipe.zrange(keys.SCHEDULERS, 0, -1, withscores=True)
    (sec, usec), lease, pttl, info, members = pipe.execute()
    now_ms = sec * 1000 + usec // 1000
    alive = [m.decode() for m, seen in members if now_ms - seen <= alive_within_s * 1000]
    if lease is None:
        return LeaderView(None, None, None, None, None, alive)
    fields = {k.decode(): v.decode() for k, v in info.items()}
    epoch = fence_epoch(lease.decode())
    if fields.get("epoch") != str(epoch):  # written in the same script; only a hand edit differs
        return LeaderView("?", epoch, None, None, pttl / 1000, alive)
    lease_ms = float(fields.get("lease_ms", "0"))
    return LeaderView(
        fields.get("holder", "?"),
        epoch,
        (now_ms - float(fields.get("since_ms", now_ms))) / 1000,
        max(0.0, lease_ms - pttl) / 1000,
        pttl / 1000,
        alive,
    )
