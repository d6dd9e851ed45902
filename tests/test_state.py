"""state.StateMachine: the transition table, listeners, history, and the bounded waits."""
import asyncio

import pytest

from tornado_gateway.state import (TERMINAL, TRANSITIONS, BridgeState, InvalidTransition,
                                   StateMachine)

S = BridgeState


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_starts_idle_and_not_ready():
    m = StateMachine()
    assert m.state is S.IDLE and not m.is_ready and m.history == []
    assert str(S.READY) == "ready"


def test_happy_path_and_history_and_since():
    clock = Clock()
    m = StateMachine(clock)
    seen = []
    m.add_listener(lambda old, new, why: seen.append((old, new, why)))
    clock.now = 101.0
    assert m.move(S.STARTING, "go")
    clock.now = 102.5
    assert m.move(S.READY, "healthy")
    assert m.is_ready and m.since == 102.5
    assert seen == [(S.IDLE, S.STARTING, "go"), (S.STARTING, S.READY, "healthy")]
    assert m.history == seen


def test_same_state_move_is_a_no_op():
    m = StateMachine()
    calls = []
    m.add_listener(lambda *a: calls.append(a))
    assert m.move(S.IDLE) is False
    assert calls == [] and m.history == []


@pytest.mark.parametrize("old", list(S))
def test_every_transition_matches_the_table(old):
    for new in S:
        m = StateMachine()
        m._state = old
        if new is old:
            assert m.move(new) is False
        elif new in TRANSITIONS[old]:
            assert m.can_move(new) and m.move(new) and m.state is new
        else:
            assert not m.can_move(new)
            with pytest.raises(InvalidTransition, match="%s -> %s" % (old, new)):
                m.move(new)
            assert m.state is old


def test_stop_is_reachable_from_every_state_but_stopped():
    for old in S:
        if old is not S.STOPPED and old is not S.STOPPING:
            assert S.STOPPING in TRANSITIONS[old]
    assert TRANSITIONS[S.STOPPING] == {S.STOPPED}


def test_ready_only_in_ready():
    for s in S:
        m = StateMachine()
        m._state = s
        assert m.is_ready is (s is S.READY)


def test_history_keeps_the_last_fifty():
    m = StateMachine()
    m.move(S.STARTING)
    for _ in range(40):
        m.move(S.READY)
        m.move(S.UNHEALTHY)
    assert len(m.history) == 50
    assert m.history[-1] == (S.READY, S.UNHEALTHY, "")


def test_wait_until_ready_true_when_ready_arrives():
    async def main():
        m = StateMachine()
        m.move(S.STARTING)
        asyncio.get_running_loop().call_later(0.01, m.move, S.READY)
        return await m.wait_until_ready(5.0)

    assert asyncio.run(main()) is True


@pytest.mark.parametrize("end", [S.FAILED, S.EXITED, S.STOPPING])
def test_wait_until_ready_false_on_terminal_state(end):
    async def main():
        m = StateMachine()
        m.move(S.STARTING)
        asyncio.get_running_loop().call_later(0.01, m.move, end)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ok = await m.wait_until_ready(5.0)
        return ok, loop.time() - t0

    ok, took = asyncio.run(main())
    assert ok is False and took < 1.0
    assert end in TERMINAL


def test_wait_until_ready_times_out_while_starting():
    async def main():
        m = StateMachine()
        m.move(S.STARTING)
        return await m.wait_until_ready(0.02)

    assert asyncio.run(main()) is False


def test_wait_until_ready_immediate_answers():
    async def main():
        idle = StateMachine()
        ready = StateMachine()
        ready.move(S.STARTING)
        ready.move(S.READY)
        return await idle.wait_until_ready(None), await ready.wait_until_ready(0)

    assert asyncio.run(main()) == (False, True)


def test_wait_for_change():
    async def main():
        m = StateMachine()
        asyncio.get_running_loop().call_later(0.01, m.move, S.STARTING)
        changed = await m.wait_for_change(5.0)
        unchanged = await m.wait_for_change(0.01)
        return changed, unchanged

    assert asyncio.run(main()) == (True, False)
