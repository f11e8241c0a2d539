from __future__ import annotations

from jobs.states import ALLOWED_EDGES, FINAL_STATES, JobState, sources_of


def test_final_states_have_no_way_out() -> None:
    for state in FINAL_STATES:
        assert ALLOWED_EDGES[state] == frozenset()


def test_every_state_is_reachable_from_pending() -> None:
    seen, frontier = {JobState.PENDING}, [JobState.PENDING]
    while frontier:
        for nxt in ALLOWED_EDGES[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(JobState)


def test_sources_of_inverts_the_table() -> None:
    assert sources_of(JobState.ASSIGNED) == {JobState.PENDING}
    assert sources_of(JobState.RUNNING) == {JobState.ASSIGNED}
    assert JobState.RUNNING in sources_of(JobState.PENDING)  # requeue
