"""state.StateMachine: the transition table, listeners, history, and the bounded waits."""
import asyncio

import pytest

from tornado_gateway.supervisor.state import (TERMINAL, TRANSITIONS, BridgeState, InvalidTransition,
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


# --- errors: the JSON the gateway answers for each state (errors.py) ------------------------

import datetime  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402

from tornado_gateway import errors  # noqa: E402

KEYS = {"error", "message", "suggestion", "timestamp"}


def test_utc_timestamp_is_iso8601_utc_with_millis():
    ts = errors.utc_timestamp()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts)
    parsed = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - parsed).total_seconds()) < 5


@pytest.mark.parametrize("state", [s for s in S if s is not S.READY])
def test_service_unavailable_for_every_unusable_state(state):
    err = errors.service_unavailable(state.value, "detail here.")
    assert err.status == 503 and err.error == "Flask server unavailable"
    assert err.message.endswith("(state: %s). detail here." % state.value)
    assert err.suggestion and "Restart the gateway with" not in err.suggestion  # a specific hint
    assert err.retry_after == (5 if state in (S.STARTING, S.UNHEALTHY) else None)
    body = json.loads(err.body())
    assert set(body) == KEYS and body["message"] == err.message


def test_error_catalogue_shapes():
    cases = [
        (errors.bad_gateway("connection reset"), 502, "connection reset", 5),
        (errors.gateway_timeout(300.0), 504, "300 seconds", 10),
        (errors.payload_too_large(2048, 1024), 413, "2048 bytes exceeds the gateway's limit of "
                                                     "1024 bytes", None),
        (errors.payload_too_large(None, 1024), 413, "The request body exceeds", None),
        (errors.not_found("/x"), 404, "/x", None),
        (errors.bad_request_path("/api/deepfake/../x", "'..' segment"), 400, "'..' segment", None),
        (errors.method_not_supported("BREW"), 501, "BREW", None),
        (errors.internal_error(500, "Internal Server Error"), 500, "500 Internal", None),
    ]
    for err, status, text, retry in cases:
        assert err.status == status and text in err.message and err.retry_after == retry
        assert set(json.loads(err.body())) == KEYS


class FakeHandler:
    def __init__(self):
        self.calls = []
        self.headers = {}

    def clear(self):
        self.calls.append("clear")

    def set_status(self, status):
        self.status = status

    def set_header(self, name, value):
        self.headers[name] = value

    def finish(self, body):
        self.calls.append("finish")
        self.body = body


@pytest.mark.parametrize("state,retry", [("starting", "5"), ("exited", None)])
def test_write_error_response(state, retry):
    h = FakeHandler()
    errors.write_error_response(h, errors.service_unavailable(state))
    assert h.calls == ["clear", "finish"] and h.status == 503
    assert h.headers["Content-Type"] == "application/json; charset=utf-8"
    assert h.headers["Cache-Control"] == "no-store"
    assert h.headers.get("Retry-After") == retry
    assert set(json.loads(h.body)) == KEYS


def test_the_503_explains_a_failed_start_by_its_recorded_cause():
    cause = {"message": "Port 5001 on 127.0.0.1 is already in use, so the Flask server cannot "
                        "bind it.", "suggestion": "Stop the other process using port 5001 or "
                        "set FLASK_PORT / --flask-port to a free port.", "at": "x"}
    err = errors.service_unavailable("failed", last_error=cause)
    assert cause["message"] in err.message and err.suggestion == cause["suggestion"]
    assert "[Python]" not in err.suggestion  # the child never ran: there are no such lines


def test_the_503_explains_an_exit_and_a_sigkill():
    err = errors.service_unavailable("exited", last_exit={"code": 3, "signal": None})
    assert "exited with code 3" in err.message
    killed = errors.service_unavailable("exited", last_exit={"code": None, "signal": "SIGKILL"})
    assert "killed by signal SIGKILL" in killed.message and "dmesg" in killed.suggestion


@pytest.mark.parametrize("state", [s for s in S if s is not S.READY])
def test_no_503_tells_an_embedding_program_to_run_the_command_line(state):
    err = errors.service_unavailable(state.value)
    assert "python -m tornado_gateway" not in err.message + err.suggestion
