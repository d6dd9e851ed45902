"""The child's lifecycle as one state machine; the only place that decides readiness.

::

    idle --start()--> starting --health ok--> ready <--recovered-- unhealthy
                         |                      +--N failed checks--> +
                         +--timeout / spawn error / bad environment--> failed
    any running state --child exits--> exited      any --stop()--> stopping --> stopped

``is_ready`` is true only in ``ready``. Readers (the proxy, the status endpoint) observe the
state; only :class:`~tornado_gateway.supervisor.bridge.PythonBridge` moves it.
"""
from __future__ import annotations

import asyncio
import enum
import time
from typing import Callable, Optional


class BridgeState(str, enum.Enum):
    IDLE = "idle"
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    FAILED = "failed"
    EXITED = "exited"
    STOPPING = "stopping"
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value


S = BridgeState

# Where each state may go next. stop() may be called from anywhere.
TRANSITIONS: dict[BridgeState, frozenset[BridgeState]] = {
    S.IDLE: frozenset({S.STARTING, S.FAILED, S.STOPPING}),
    S.STARTING: frozenset({S.READY, S.FAILED, S.EXITED, S.STOPPING}),
    S.READY: frozenset({S.UNHEALTHY, S.EXITED, S.STOPPING}),
    S.UNHEALTHY: frozenset({S.READY, S.EXITED, S.STOPPING}),
    # a failed start may still have a live process (health timeout): it can exit or recover
    S.FAILED: frozenset({S.STARTING, S.READY, S.EXITED, S.STOPPING}),
    # start() again (a restart) can find a bad environment before spawning, as from idle
    S.EXITED: frozenset({S.STARTING, S.FAILED, S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.STOPPED: frozenset({S.STARTING, S.FAILED}),
}

# States in which no request will be served soon without someone acting.
TERMINAL = frozenset({S.FAILED, S.EXITED, S.STOPPING, S.STOPPED})


class InvalidTransition(RuntimeError):
    pass


class ChangeSignal:
    """Wakes everyone waiting for "something changed" (one event per round of waiters)."""

    def __init__(self) -> None:
        self._event: Optional[asyncio.Event] = None

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self, timeout: Optional[float]) -> bool:
        """Wait until the next :meth:`notify` or ``timeout`` seconds; True if notified."""
        if self._event is None:
            self._event = asyncio.Event()
        event = self._event
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


async def wait_until_ready(is_ready: Callable[[], bool], hopeless: Callable[[], bool],
                           changes: ChangeSignal, timeout: Optional[float],
                           clock: Callable[[], float]) -> bool:
    """Wait (bounded) while readiness can still come without anyone acting: True once
    ``is_ready()``; False on timeout or once ``hopeless()``. Rechecked on every change."""
    deadline = None if timeout is None else clock() + timeout
    while True:
        if is_ready():
            return True
        if hopeless():
            return False
        remaining = None if deadline is None else deadline - clock()
        if remaining is not None and remaining <= 0:
            return False
        await changes.wait(remaining)


class StateMachine:
    """Holds the current state, validates moves, and wakes whoever waits for a change.

    Not thread-safe by design: every move happens on the IOLoop thread (threads hand work
    over with ``IOLoop.add_callback``).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._state = S.IDLE
        self._clock = clock
        self.since = clock()
        self.history: list[tuple[BridgeState, BridgeState, str]] = []
        self._listeners: list[Callable[[BridgeState, BridgeState, str], None]] = []
        self._changes = ChangeSignal()

    @property
    def state(self) -> BridgeState:
        return self._state

    @property
    def is_ready(self) -> bool:
        return self._state is S.READY

    def can_move(self, new: BridgeState) -> bool:
        return new in TRANSITIONS[self._state]

    def move(self, new: BridgeState, reason: str = "") -> bool:
        """Enter ``new``. Returns False (and changes nothing) for a move to the same state;
        raises :class:`InvalidTransition` for a move the diagram does not allow."""
        old = self._state
        if new is old:
            return False
        if new not in TRANSITIONS[old]:
            raise InvalidTransition("%s -> %s is not a valid transition" % (old, new))
        self._state = new
        self.since = self._clock()
        self.history.append((old, new, reason))
        del self.history[:-50]
        for listener in list(self._listeners):
            listener(old, new, reason)
        self._changes.notify()
        return True

    def add_listener(self, listener: Callable[[BridgeState, BridgeState, str], None]) -> None:
        self._listeners.append(listener)

    async def wait_for_change(self, timeout: Optional[float]) -> bool:
        """Wait until the state changes or ``timeout`` seconds pass; True if it changed."""
        return await self._changes.wait(timeout)

    async def wait_until_ready(self, timeout: Optional[float]) -> bool:
        """Wait (bounded) while the state can still become ready without anyone acting:
        True once ``ready``, False on timeout or when a terminal state is reached."""
        return await wait_until_ready(
            lambda: self._state is S.READY,
            lambda: self._state in TERMINAL or self._state is S.IDLE,
            self._changes, timeout, self._clock)
