"""A job's output in Redis (jobs/joblog.py) on a real redis-server: offsets, the per-job cap
(head kept, oldest of the rest trimmed), stale attempts refused, retention, UTF-8 cuts."""

from __future__ import annotations

import contextlib
import os
import random
import threading
from pathlib import Path

import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs import keys
from jobs.config import Config, WorkerConfig
from jobs.joblog import MAX_ENTRY_BYTES, JobLog, LogLimits, utf8_cut
from jobs.redis_conn import make_client
from scheduler.redis_server import RedisServer
from tests.helpers.stall import stalled
from worker.logship import LogShipper, plan

LIMITS = LogLimits(cap_bytes=4096, head_bytes=512, retention_s=60.0)


def read_all(log: JobLog, job_id: int) -> tuple[bytes, int]:
    """Everything kept, with the bytes not kept marked as a count."""
    data, offset, skipped = b"", 0, 0
    while True:
        chunk = log.read(job_id, offset, max_bytes=700)
        skipped += chunk.skipped
        data += chunk.data
        if chunk.next_offset >= chunk.end:
            return data, skipped
        assert chunk.next_offset > offset
        offset = chunk.next_offset


def test_offsets_are_bytes_across_appends_and_reads_resume_anywhere(redis_client: redis.Redis) -> None:
    log = JobLog(redis_client)
    assert log.append(1, 1, b"hello ", LIMITS) == 6
    assert log.append(1, 1, b"world\n", LIMITS) == 12
    assert log.read(1, 0).data == b"hello world\n"
    middle = log.read(1, 3)
    assert (middle.start, middle.data, middle.skipped, middle.end) == (3, b"lo world\n", 0, 12)
    assert log.read(1, 12).data == b"" and log.read(1, 99).data == b""


def test_cap_keeps_the_head_and_the_newest_and_counts_what_it_dropped(redis_client: redis.Redis) -> None:
    log = JobLog(redis_client)
    written = b""
    for i in range(200):
        piece = f"line {i:04d} ".encode() * 5 + b"\n"
        written += piece
        log.append(7, 1, piece, LIMITS)
    meta = redis_client.hgetall(keys.job_log_meta(7))
    stored, dropped = int(meta[b"stored"]), int(meta[b"dropped"])
    assert stored <= LIMITS.cap_bytes and stored + dropped == len(written) == int(meta[b"end"])
    data, skipped = read_all(log, 7)
    assert skipped == dropped
    assert written.startswith(data[: LIMITS.head_bytes])  # the head is whole
    assert written.endswith(data[-1000:])  # and the newest output is there
    assert b"line 0199" in data and b"line 0000" in data


def test_skipped_bytes_from_the_shipper_show_as_a_gap(redis_client: redis.Redis) -> None:
    log = JobLog(redis_client)
    log.append(3, 1, b"a" * 10, LIMITS)
    log.append(3, 1, b"b" * 10, LIMITS, skipped=1000)
    first = log.read(3, 0)
    assert first.data == b"a" * 10 and first.next_offset == 10
    gap = log.read(3, 10)
    assert (gap.skipped, gap.start, gap.data) == (1000, 1010, b"b" * 10)


def test_an_older_attempt_cannot_append_once_a_newer_one_shipped(redis_client: redis.Redis) -> None:
    log = JobLog(redis_client)
    assert log.append(4, 1, b"first attempt\n", LIMITS) > 0
    assert log.append(4, 2, b"second attempt\n", LIMITS) > 0
    assert log.append(4, 1, b"late flush of a stale worker\n", LIMITS) == -1
    assert read_all(log, 4)[0] == b"first attempt\nsecond attempt\n"


def test_both_keys_expire_after_the_retention(redis_client: redis.Redis) -> None:
    log = JobLog(redis_client)
    log.append(5, 1, b"x", LogLimits(4096, 512, 2.5))
    for key in (keys.job_log(5), keys.job_log_meta(5)):
        assert 0 < redis_client.pttl(key) <= 2500
    log.append(6, 1, b"", LIMITS)  # a job with no output yet: the meta says the log exists
    assert log.exists(6) and log.read(6, 0).data == b""


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 900), st.integers(0, 3000)), min_size=1, max_size=40))
def test_what_is_kept_is_bounded_and_every_byte_read_is_the_one_written(
    redis_server: RedisServer, pieces: list[tuple[int, int]]
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.delete(keys.job_log(9), keys.job_log_meta(9))
    log = JobLog(client)
    rng = random.Random(len(pieces))
    stream, offset = {}, 0  # offset -> byte, what was shipped
    for size, skip in pieces:
        data = bytes(rng.randrange(256) for _ in range(size))
        offset += skip
        for i, b in enumerate(data):
            stream[offset + i] = b
        offset += size
        log.append(9, 1, data, LIMITS, skipped=skip)
    meta = client.hgetall(keys.job_log_meta(9))
    assert int(meta[b"stored"]) <= LIMITS.cap_bytes + 900  # the newest entry is never trimmed
    pos = 0
    while pos < offset:
        chunk = log.read(9, pos, max_bytes=500)
        for i, b in enumerate(chunk.data):
            assert stream[chunk.start + i] == b
        if not chunk.data:
            break
        pos = chunk.next_offset
    client.close()


def test_utf8_cut_never_splits_a_character() -> None:
    text = "é€😀".encode()  # 2, 3 and 4 bytes
    boundaries = {0, 2, 5, 9}
    for end in range(2, len(text) + 1):
        cut = utf8_cut(text[:end], final=False)
        assert cut in boundaries and cut > end - 4  # whole characters, holding back only a partial one
        assert utf8_cut(text[:end], final=True) == end
    assert utf8_cut(b"\xff\xfe", final=False) == 2  # binary: handed out, never held forever
    assert utf8_cut(b"\xe2", final=False) == 1  # nothing else to hand out


# ---- the worker's shipper (worker/logship.py) -------------------------------------------------------
@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**5), st.integers(0, 10**6))
def test_plan_ships_the_unshipped_head_then_the_newest_within_budget(
    pos: int, size: int, head: int, budget: int
) -> None:
    segments = plan(pos, size, head, budget)
    assert sum(s.length for s in segments) <= budget
    at = pos
    for segment in segments:
        assert segment.at == at + segment.skipped and segment.length > 0
        at = segment.at + segment.length
    assert at <= max(pos, size)
    if size > pos and budget > max(0, min(head, size) - pos):
        assert at == size  # past the head, the newest byte is always shipped
    if segments and pos < head:
        assert segments[0].at == pos and segments[0].skipped == 0  # the head first, from where it stopped


def test_the_node_budget_is_shared_by_every_job_printing_at_once(redis_client: redis.Redis, tmp_path: Path) -> None:
    config = Config(worker=WorkerConfig(log_rate_bytes=2**20, log_burst_bytes=2**20, log_node_rate_bytes=256 * 1024))
    shipper = LogShipper(redis_client, config)
    for job in range(1, 5):
        path = tmp_path / f"{job}.log"
        path.write_bytes(bytes([64 + job]) * 2**21)  # 2 MiB each, already written
        shipper.add(job, 1, os.open(path, os.O_RDONLY), 0)
    shipper.tick()
    shipped = []
    for job in range(1, 5):
        meta = {k.decode(): int(v) for k, v in redis_client.hgetall(keys.job_log_meta(job)).items()}
        assert meta["end"] == 2**21  # each job's newest byte is there
        shipped.append(meta["end"] - meta["dropped"])
    assert sum(shipped) <= 2**20 + 4 * MAX_ENTRY_BYTES  # the node's burst, split four ways
    assert max(shipped) - min(shipped) <= MAX_ENTRY_BYTES


def test_an_append_whose_answer_was_lost_is_not_stored_twice(redis_server: RedisServer, tmp_path: Path) -> None:
    """Redis stalls (a busy script here; a slow fsync or fork in life) longer than the
    worker's call timeout while the shipper sends new output: the client gives up and the
    shipper sends the same bytes again, but Redis runs the first send as well once it is
    free. The job's output must read back once, not twice."""
    client = make_client(redis_server.url, timeout_s=0.3)  # the worker's client: calls time out
    client.delete(keys.job_log(11), keys.job_log_meta(11))
    shipper = LogShipper(client, Config())
    path = tmp_path / "11.log"
    path.write_bytes(b"first\n")
    shipper.add(11, 1, os.open(path, os.O_RDONLY), 0)
    shipper.tick()
    with stalled(redis_server.url, 1500):
        with path.open("ab") as f:
            f.write(b"second\n")
        with contextlib.suppress(redis.RedisError):
            shipper.tick()  # times out (perhaps after redis-py's own retries): its bytes reach Redis anyway
    shipper.tick()  # the next tick sends what it does not know was stored
    assert read_all(JobLog(client), 11)[0] == b"first\nsecond\n"
    client.close()


def test_a_resend_planned_differently_stores_only_what_is_new(redis_client: redis.Redis) -> None:
    """The tick after a lost answer plans again (the file grew, the budget changed): what
    overlaps the stored part is left out, the rest is appended, the offsets stay the job's."""
    log = JobLog(redis_client)
    assert log.append(12, 1, b"abcdef", LIMITS, at=0) == 6
    assert log.append(12, 1, b"defghi", LIMITS, skipped=3, at=0) == 9  # skipped 'abc', then overlaps 'def'
    assert log.append(12, 1, b"abc", LIMITS, at=0) == 9  # wholly stored already
    assert read_all(log, 12) == (b"abcdefghi", 0)
    assert log.append(12, 2, b"new attempt\n", LIMITS, at=0) == 21  # another attempt counts from 0 again
    assert read_all(log, 12)[0] == b"abcdefghinew attempt\n"


def test_the_cap_bounds_redis_memory_also_for_output_shipped_a_byte_at_a_time(redis_client: redis.Redis) -> None:
    """A job printing one character per shipping tick (a row of progress dots) makes one
    stream entry per byte, and an entry costs Redis ~26 bytes besides its data: the cap
    counted data only, so a 1 MiB cap kept ~1M entries, ~26 MiB per job (an array of such
    jobs fills Redis, which then refuses every write). Entries count against the cap too."""
    log = JobLog(redis_client)
    log.append(13, 1, b"h" * LIMITS.head_bytes, LIMITS, at=0)  # the head: one entry
    pipe = redis_client.pipeline(transaction=False)
    for i in range(20_000):
        log.append(13, 1, b".", LIMITS, pipe=pipe, at=LIMITS.head_bytes + i)
    pipe.execute()
    used = redis_client.memory_usage(keys.job_log(13), samples=0)
    assert used <= 2 * LIMITS.cap_bytes, used
    data, skipped = read_all(log, 13)
    assert data.startswith(b"h" * LIMITS.head_bytes) and data.endswith(b"." * 50)
    assert len(data) + skipped == LIMITS.head_bytes + 20_000


def test_the_head_bounds_redis_memory_also_for_output_shipped_a_byte_at_a_time(redis_client: redis.Redis) -> None:
    """The head (the first log_head bytes, never trimmed) was bounded in bytes only: a job
    printing one character per tick from its start kept log_head entries untrimmable, ~26
    bytes of Redis each besides the byte (1.7 MB per job at the default 64 KiB). The head
    now ends after log_head / 32 entries; what comes after is trimmable like the rest."""
    log = JobLog(redis_client)
    pipe = redis_client.pipeline(transaction=False)
    for i in range(20_000):
        log.append(15, 1, b".", LIMITS, pipe=pipe, at=i)
    pipe.execute()
    used = redis_client.memory_usage(keys.job_log(15), samples=0)
    assert used <= 2 * (LIMITS.cap_bytes + LIMITS.head_bytes), used
    data, skipped = read_all(log, 15)
    assert data.startswith(b"." * 10) and data.endswith(b"." * 50)
    assert len(data) + skipped == 20_000


def test_the_last_output_is_shipped_when_the_end_comes_while_a_tick_is_on_its_way(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Break: a job's end (`finish`) announced while a shipping tick was on its way made the
    shipper forget the log once that tick was answered, though the tick had been planned
    before the job's last bytes were written: they never reached Redis, and `gpulab logs`
    from another host missed the job's last line. The window is one round trip at every
    job's end; a slow Redis widens it to seconds. Here Redis holds the tick's appends
    (CLIENT PAUSE WRITE) while the job writes its last bytes and ends."""
    shipper = LogShipper(redis_client, Config())
    path = tmp_path / "14.log"
    path.write_bytes(b"first\n")
    shipper.add(14, 1, os.open(path, os.O_RDONLY), 0)
    redis_client.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
    try:
        tick = threading.Thread(target=shipper.tick)
        tick.start()
        while not any(c["cmd"] == "eval" and "b" in c["flags"] for c in redis_client.client_list()):
            pass  # until its appends wait in Redis: planned, sent, not answered
        with path.open("ab") as f:
            f.write(b"last\n")  # the job's last bytes, then its end
        shipper.finish(14, 1, wait_s=0)
    finally:
        redis_client.execute_command("CLIENT", "UNPAUSE")
    tick.join()
    shipper.tick()  # the final flush
    assert read_all(JobLog(redis_client), 14)[0] == b"first\nlast\n"
