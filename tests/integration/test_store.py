"""JobStore and dispatch against a real redis-server: atomic transitions and indexes."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from jobs import keys, lifecycle
from jobs.joblog import JobLog, LogLimits
from jobs.lifecycle import Attempt, Fence
from jobs.redis_conn import make_client
from jobs.spec import JobSpec
from jobs.states import JobState
from jobs.store import Fenced, IdTaken, JobStore, Transition, TransitionRefused
from scheduler.dispatch import Dispatcher
from scheduler.policy.accounting import GpuAccount
from scheduler.policy.placement import Assignment
from scheduler.redis_server import RedisServer
from tests.helpers.stall import stalled


def _spec(**kw: object) -> JobSpec:
    return JobSpec(command=("true",), cwd="/", mem_bytes=2**30, **kw)  # type: ignore[arg-type]


def _assignment(job_id: int) -> Assignment:
    gpu = GpuAccount("n1", 0, "GPU-x", "Sim", True, 24 * 2**30, 24 * 2**30, 0)
    return Assignment(job_id, "n1", (gpu,), {"GPU-x": 2**30}, False)


def test_submit_writes_record_index_and_history(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    job_id = store.submit(_spec(name="a"), user="ann", uid=1000)
    record = store.get(job_id)
    assert record is not None and record.state == JobState.PENDING and record.user == "ann"
    assert [r.id for r in store.waiting()] == [job_id]
    assert store.history(job_id)[0]["state"] == "PENDING"
    held = store.submit(_spec(hold=True), user="ann", uid=1000)
    assert store.get(held).state == JobState.HELD  # type: ignore[union-attr]


def test_concurrent_submits_get_unique_ids(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    ids: list[int] = []
    lock = threading.Lock()

    def many() -> None:
        local = [store.submit(_spec(), user="u", uid=1) for _ in range(50)]
        with lock:
            ids.extend(local)

    threads = [threading.Thread(target=many) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ids) == list(range(1, 501))
    assert redis_client.zcard(keys.PENDING) == 500


def test_transitions_follow_the_table_and_maintain_indexes(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    job_id = store.submit(_spec(), user="u", uid=1)
    with pytest.raises(TransitionRefused):
        store.transition(Transition(job_id, JobState.RUNNING, {}))  # PENDING -> RUNNING is not an edge
    dispatcher = Dispatcher(redis_client, store, assign_timeout_s=30)
    assert dispatcher.dispatch([_assignment(job_id)]) == [_assignment(job_id)]
    record = store.get(job_id)
    assert record is not None and (record.state, record.attempt, record.node) == (JobState.ASSIGNED, 1, "n1")
    assert store.ledger() == {job_id: {"node": "n1", "gpus": {"GPU-x": 2**30}, "whole_gpu": False}}
    assert store.has_lease(job_id) and redis_client.sismember(keys.ACTIVE, job_id)
    queue = Queue(keys.node_queue_name("n1"), connection=redis_client, serializer=JSONSerializer)
    [rq_job] = queue.get_jobs()
    assert (rq_job.func_name, rq_job.args) == ("worker.tasks.launch", [job_id, 1])
    # A worker of an older attempt cannot move it.
    with pytest.raises(TransitionRefused):
        store.transition(Transition(job_id, JobState.RUNNING, {}, guard=("attempt", "0")))
    store.transition(
        Transition(job_id, JobState.RUNNING, {"pid": 1}, guard=("attempt", "1"), lease_ttl_s=5, lease_node="n1")
    )
    store.transition(Transition(job_id, JobState.COMPLETED, {"exit_code": 0}))
    assert store.ledger() == {} and not store.has_lease(job_id)
    assert not redis_client.sismember(keys.ACTIVE, job_id)
    assert [r.id for r in store.finished()] == [job_id]
    with pytest.raises(TransitionRefused):  # final is final
        store.transition(Transition(job_id, JobState.PENDING, {}))
    states = [e["state"] for e in store.history(job_id)]
    assert states == ["PENDING", "ASSIGNED", "RUNNING", "COMPLETED"]


def test_dispatch_writes_nothing_for_a_job_cancelled_under_it(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    first = store.submit(_spec(), user="u", uid=1)
    second = store.submit(_spec(), user="u", uid=1)
    store.transition(Transition(second, JobState.CANCELLED, {}))
    dispatched = Dispatcher(redis_client, store, 30).dispatch([_assignment(first), _assignment(second)])
    assert [a.job_id for a in dispatched] == [first]
    assert store.get(second).state == JobState.CANCELLED  # type: ignore[union-attr]
    assert list(store.ledger()) == [first]
    queue = Queue(keys.node_queue_name("n1"), connection=redis_client, serializer=JSONSerializer)
    assert [j.args for j in queue.get_jobs()] == [[first, 1]]


def test_records_are_json_and_rq_tools_see_the_node_queue(redis_client: redis.Redis, redis_server: object) -> None:
    store = JobStore(redis_client)
    job_id = store.submit(_spec(), user="u", uid=1)
    Dispatcher(redis_client, store, 30).dispatch([_assignment(job_id)])
    json.loads(redis_client.hget(keys.job(job_id), "spec"))  # never pickle
    url = redis_server.url  # type: ignore[attr-defined]
    info = subprocess.run([sys.executable, "-m", "rq.cli", "info", "--url", url], capture_output=True, text=True)
    if info.returncode != 0:  # older rq exposes the CLI only as a console script
        info = subprocess.run(["rq", "info", "--url", url], capture_output=True, text=True)
    assert keys.node_queue_name("n1") in info.stdout


def test_an_assignment_its_worker_could_not_hand_over_goes_back_to_wait_whole(redis_client: redis.Redis) -> None:
    """Found by the chaos soak: a worker frozen between starting a job's shim and the shim's
    answer made the shim give up; the job must wait again (reservation, lease and launch
    entry gone, still owned by its attempt's fence), not end FAILED LaunchFailed."""
    store = JobStore(redis_client)
    job_id = store.submit(_spec(), user="ann", uid=1000)
    assert Dispatcher(redis_client, store, 30).dispatch([_assignment(job_id)])
    launches = Queue(keys.node_queue_name("n1"), connection=redis_client, serializer=JSONSerializer)
    assert launches.count == 1 and store.ledger() and store.has_lease(job_id)
    redis_client.set(keys.node_epoch("n1"), "7")
    stale = Attempt(job_id, 1, "n1", Fence(keys.node_epoch("n1"), "6"))
    with pytest.raises(Fenced):
        store.transition(lifecycle.not_started(stale, "the job's launcher gave up", 3))
    current = Attempt(job_id, 1, "n1", Fence(keys.node_epoch("n1"), "7"))
    store.transition(lifecycle.not_started(current, "the job's launcher gave up", 3))
    record = store.get(job_id)
    assert record is not None and record.state == JobState.PENDING and "did not start it" in record.detail
    assert record.node == "" and not store.ledger() and not store.has_lease(job_id) and launches.count == 0


def test_a_batch_of_transitions_writes_what_one_by_one_writes(redis_client: redis.Redis) -> None:
    """TRANSITION_MANY (dispatch's one command per batch) against TRANSITION one at a time:
    the same states, replies, indexes, ledger, leases, waiting counts and history, and a
    refused transition in the batch stops none of the others."""
    store = JobStore(redis_client)

    def plan(ids: list[int]) -> list[Transition]:
        a, b, c, d = ids
        reservation = {"node": "n1", "gpus": {"GPU-x": 2**30}, "whole_gpu": False}
        gpus = [{"index": 0, "uuid": "GPU-x"}]
        return [
            lifecycle.assign(a, 1, "n1", gpus, reservation, 30, 1.0),
            Transition(b, JobState.RUNNING, {}),  # refused: PENDING -> RUNNING is not an edge
            lifecycle.assign(c, 1, "n1", gpus, reservation, 30, 1.0),
            Transition(c, JobState.RUNNING, {"pid": 7}, guard=("attempt", "2")),  # refused: another attempt
            Transition(c, JobState.RUNNING, {"pid": 7}, guard=("attempt", "1"), lease_ttl_s=5, lease_node="n1"),
            Transition(d, JobState.CANCELLED, {}),
            Transition(b, JobState.HELD, {}),
        ]

    def outcome(ids: list[int], user: str, replies: list[object]) -> dict[str, object]:
        ledger = store.ledger()
        return {
            "replies": replies,
            "states": [store.raw_state(i) for i in ids],
            "pids": [redis_client.hget(keys.job(i), "pid") for i in ids],
            "ledger": [ledger.get(i) for i in ids],
            "leases": [store.has_lease(i) for i in ids],
            "active": [redis_client.sismember(keys.ACTIVE, i) for i in ids],
            "pending": [redis_client.zscore(keys.PENDING, i) is not None for i in ids],
            "history": [[e["state"] for e in store.history(i)] for i in ids],
            "waiting": redis_client.hget(keys.WAITING_COUNT, user),
        }

    one = [store.submit(_spec(), user="one", uid=1) for _ in range(4)]
    replies: list[object] = []
    for t in plan(one):
        try:
            replies.append([1, store.transition(t)])
        except TransitionRefused as refused:
            replies.append([0, refused.current])
    many = [store.submit(_spec(), user="many", uid=1) for _ in range(4)]
    pipe = redis_client.pipeline(transaction=True)
    store.queue_transitions(pipe, plan(many))
    [batch] = pipe.execute()
    batch_replies = [[ok, previous.decode()] for ok, previous in batch]
    assert batch_replies == replies == [
        [1, "PENDING"], [0, "PENDING"], [1, "PENDING"], [0, "ASSIGNED"], [1, "ASSIGNED"], [1, "PENDING"], [1, "PENDING"]
    ]  # fmt: skip
    assert outcome(many, "many", batch_replies) == outcome(one, "one", replies)
    assert store.raw_state(many[1]) == JobState.HELD and redis_client.hget(keys.WAITING_COUNT, "many") == b"1"


def test_transition_each_guards_and_answers_each_on_its_own(redis_client: redis.Redis) -> None:
    """A worker's batch of starts in one round trip: each is checked as `transition` checks
    it (state, attempt, fencing token) and gets its own answer; a refused one changes nothing."""
    store = JobStore(redis_client)
    a, b, c = (store.submit(_spec(), user="u", uid=1) for _ in range(3))
    for job_id in (a, b, c):
        store.transition(lifecycle.assign(job_id, 1, "n1", [{"index": 0, "uuid": "GPU-x"}], {}, 30, 1.0))
    store.transition(lifecycle.cancel(b, JobState.ASSIGNED, "test", 2.0))
    fence = Fence(keys.node_epoch("n1"), str(redis_client.incr(keys.node_epoch("n1"))))
    starts = [lifecycle.start(Attempt(j, 1, "n1", fence), 100 + j, "/log", 30, 3.0) for j in (a, b, c)]
    redis_client.script_flush()  # Redis lost its scripts (a restart): loaded again, each applied once
    outcomes = store.transition_each(starts)
    assert outcomes[0] == "ASSIGNED" and outcomes[2] == "ASSIGNED"
    assert isinstance(outcomes[1], TransitionRefused) and outcomes[1].current == "CANCELLED"
    assert [store.raw_state(j) for j in (a, b, c)] == [JobState.RUNNING, JobState.CANCELLED, JobState.RUNNING]
    assert len([e for e in store.history(a) if e["state"] == "RUNNING"]) == 1

    d = store.submit(_spec(), user="u", uid=1)
    store.transition(lifecycle.assign(d, 1, "n1", [{"index": 0, "uuid": "GPU-x"}], {}, 30, 1.0))
    redis_client.incr(keys.node_epoch("n1"))  # another worker took the node's name
    (fenced,) = store.transition_each([lifecycle.start(Attempt(d, 1, "n1", fence), 7, "/log", 30, 3.0)])
    assert isinstance(fenced, Fenced)
    assert store.raw_state(d) == JobState.ASSIGNED


def test_scripts_queued_on_pipelines_cost_no_extra_round_trip(redis_client: redis.Redis) -> None:
    """Queued as itself, a registered script makes redis-py send SCRIPT EXISTS before the
    pipeline (one more round trip at every execute: log shipping, bulk transitions, the
    notifier's intake). Queued by jobs.redis_conn.queue_script, it goes as EVAL: no extra
    command, and nothing to fail when Redis has no script loaded (restarted, flushed)."""
    store, joblog = JobStore(redis_client), JobLog(redis_client)
    spec = JobSpec(command=("true",), cwd="/", mem_bytes=2**20)
    first, second = (store.submit(spec, user="u", uid=1) for _ in range(2))
    redis_client.script_flush()
    redis_client.config_resetstat()
    limits = LogLimits(cap_bytes=4096, head_bytes=512, retention_s=60.0)
    pipe = redis_client.pipeline(transaction=False)
    joblog.append(first, 1, b"hello\n", limits, pipe=pipe)
    joblog.append(second, 1, b"", limits, pipe=pipe)
    assert pipe.execute() == [6, 0]
    held = store.transition_many([lifecycle.hold(first, "u"), lifecycle.hold(second, "u")])
    assert held == ["PENDING", "PENDING"]
    stats = redis_client.info("commandstats")
    assert "cmdstat_script|exists" not in stats and "cmdstat_script|load" not in stats
    assert stats["cmdstat_eval"]["calls"] == 4
    assert joblog.read(first, 0).data == b"hello\n"


def test_a_submit_whose_answer_was_lost_is_stored_once(redis_server: RedisServer) -> None:
    """Redis stalls past the client's call timeout while a submit is on its way: redis-py
    sends the script again, and Redis runs both sends once it is free. The job must be stored
    once: one history entry, and its user counted once among the waiting (a double count
    stays for good and ends in a refused submit at max_pending_per_user)."""
    client = make_client(redis_server.url, timeout_s=0.3)
    client.flushall()
    store = JobStore(client)
    store.submit(_spec(), user="warm", uid=2)  # as in a running scheduler: the script is loaded
    client.delete(keys.EVENTS)
    job_id = store.reserve_ids(1)
    with stalled(redis_server.url, 1500), contextlib.suppress(redis.RedisError):
        # It may answer (a retry), or fail after its retries: stored all the same.
        store.submit_reserved(job_id, [_spec()], user="u", uid=1)
    assert [int(i) for i in client.zrange(keys.PENDING, 0, -1)] == [job_id - 1, job_id]
    assert store.waiting_count("u") == 1
    assert [e["state"] for e in store.history(job_id)] == ["PENDING"]
    assert client.xlen(keys.EVENTS) == 1
    client.close()


def test_a_start_whose_answer_was_lost_is_not_taken_for_a_refusal(redis_server: RedisServer) -> None:
    """Redis stalls past the worker's call timeout as it records a start: redis-py sends the
    transition again; the first send was applied, so the second finds the job RUNNING. That
    is this very start, not a refusal: taken for one, the worker withdrew the command, the
    job stayed RUNNING with nothing running and no renewals, and its lease lapsed into
    NodeLost (or a requeue) on a healthy node. Both the single and the batch path."""
    client = make_client(redis_server.url, timeout_s=0.3)
    client.flushall()
    store = JobStore(client)
    dispatcher = Dispatcher(client, store, assign_timeout_s=30)
    warm, *jobs = [store.submit(_spec(), user="u", uid=1) for _ in range(3)]
    dispatcher.dispatch([_assignment(j) for j in (warm, *jobs)])
    start = [Attempt(j, 1, "n1") for j in (warm, *jobs)]
    store.transition(lifecycle.start(start[0], 100, "/dev/null", 5, 1.0))  # the script is loaded, as in a worker
    single = lifecycle.start(start[1], 101, "/dev/null", 5, 2.0)
    batch = lifecycle.start(start[2], 102, "/dev/null", 5, 3.0)
    with stalled(redis_server.url, 1500):
        assert store.transition(single) == "ASSIGNED"  # answered by a resend: not TransitionRefused
    with stalled(redis_server.url, 1500):
        assert store.transition_each([batch]) == ["ASSIGNED"]
    # A start that another one beat is still refused.
    with pytest.raises(TransitionRefused):
        store.transition(lifecycle.start(start[1], 999, "/dev/null", 5, 9.0))
    client.close()


def test_a_reserved_id_that_names_another_job_stores_nothing(redis_client: redis.Redis) -> None:
    """The id counter went back (a hand edit, a restore of part of the data): a submit whose
    id is another job's is refused, and that job is left as it was (it is not overwritten,
    nor taken for a resend of this submit)."""
    store = JobStore(redis_client)
    first = store.submit(_spec(name="first"), user="ann", uid=1000)
    redis_client.set(keys.NEXT_JOB_ID, first - 1)
    with pytest.raises(IdTaken):
        store.submit(_spec(name="second"), user="bob", uid=1001)
    record = store.get(first)
    assert record is not None and (record.user, record.spec.name) == ("ann", "first")
    assert store.waiting_count("bob") == 0
