"""WorkerGroup: several Flask workers behind one gateway, and the dispatcher in front of them.

Each worker is a :class:`~tornado_gateway.supervisor.bridge.PythonBridge` of its own, with the whole
single-child lifecycle: spawned on its own port (``FLASK_PORT + i``), validated, health-checked,
log-pumped (its lines say ``[Python] [worker i]``), restarted if ``FLASK_AUTO_RESTART`` allows,
and stopped with its process tree. With ``FLASK_URL`` listing several servers, each is an
external worker. One worker failing never touches the others.

The group answers what the proxy reads of a bridge (``state``, ``is_flask_ready()``,
``wait_until_ready()``, ``status()``), as the group: usable while at least one worker is
``ready``. The group's state is derived, never stored: the workers' state machines stay the
only place that decides readiness. With one worker, every answer is that worker's own.

Requests get a worker through :meth:`WorkerGroup.acquire` (see :mod:`.dispatch`): the ready
worker with the fewest in flight, at most ``worker_limit`` each, and a bounded FIFO queue
beyond that.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Dict, List, Optional

from .bridge import PythonBridge
from ..config import FlaskConfig, GatewayConfig, worker_config
from .dispatch import Dispatcher, Overloaded
from .logpump import LogLine, log_sink
from .state import TERMINAL, BridgeState, ChangeSignal, wait_until_ready

S = BridgeState
log = logging.getLogger("tornado_gateway.group")

# When no worker is ready, the group is in the "best" state any worker is in: a request may
# wait for a starting worker, and the 503 names the most hopeful state.
_PRECEDENCE = (S.READY, S.STARTING, S.UNHEALTHY, S.FAILED, S.EXITED, S.STOPPING, S.STOPPED,
               S.IDLE)


class QueueTimeout(Exception):
    """A request waited for a worker longer than the queue timeout."""


class NoWorker(Exception):
    """While a request waited, every worker went down for good (exited, failed, stopping)."""


class WorkerGroup:
    """``workers`` bridges and the dispatcher in front of them.

    Build it with :meth:`from_config` (what ``python -m tornado_gateway`` does), or from
    bridges of your own. ``worker_limit``, ``queue_limit`` and ``queue_timeout_s`` are the
    dispatch settings (``GATEWAY_WORKER_LIMIT``, ``GATEWAY_QUEUE_LIMIT``,
    ``GATEWAY_QUEUE_TIMEOUT``).
    """

    def __init__(self, workers: List[PythonBridge], *, worker_limit: int = 2,
                 queue_limit: int = 256, queue_timeout_s: float = 30.0) -> None:
        if not workers:
            raise ValueError("a group needs at least one worker")
        self.workers = list(workers)
        self.queue_timeout_s = queue_timeout_s
        self.dispatcher = Dispatcher(self.workers, worker_limit, queue_limit)
        self.timed_out = 0  # requests that waited longer than the queue timeout
        self._changes = ChangeSignal()
        for worker in self.workers:
            worker.add_state_listener(self._on_worker_state)

    @classmethod
    def from_config(cls, config: Any, *, sink: Callable[[LogLine], None] = log_sink,
                    **seams: Any) -> "WorkerGroup":
        """The group ``config`` describes (a :class:`GatewayConfig`, or a
        :class:`FlaskConfig` with default dispatch settings). ``seams`` go to every
        :class:`PythonBridge` (``control``, ``checker``...: tests)."""
        gateway = config if isinstance(config, GatewayConfig) else GatewayConfig(flask=config)
        flask: FlaskConfig = gateway.flask
        count = flask.worker_count
        workers = []
        for index in range(count):
            name = None if count == 1 else "worker %d" % (index + 1)
            workers.append(PythonBridge(worker_config(flask, index), sink=_labelled(sink, name),
                                        name=name, **seams))
        return cls(workers, worker_limit=gateway.worker_limit, queue_limit=gateway.queue_limit,
                   queue_timeout_s=gateway.queue_timeout / 1000.0)

    # --- what the proxy and the status endpoint read ---------------------------------------

    @property
    def state(self) -> BridgeState:
        if len(self.workers) == 1:
            return self.workers[0].state
        states = {worker.state for worker in self.workers}
        for state in _PRECEDENCE:
            if state in states:
                return state
        return S.IDLE

    def is_flask_ready(self) -> bool:
        """True while at least one worker is ``ready``."""
        return any(worker.is_flask_ready() for worker in self.workers)

    @property
    def ready_count(self) -> int:
        """How many workers are ``ready``."""
        return sum(1 for worker in self.workers if worker.is_flask_ready())

    @property
    def flask_url(self) -> str:
        """The first worker's URL (each request goes to the one :meth:`acquire` names)."""
        return self.workers[0].flask_url

    @property
    def external(self) -> bool:
        return self.workers[0].external

    @property
    def config(self) -> FlaskConfig:
        return self.workers[0].config

    @property
    def last_error(self) -> Optional[Dict[str, str]]:
        """Why a worker failed to start (the first one that did), or None."""
        return next((w.last_error for w in self.workers if w.last_error), None)

    @property
    def last_exit(self) -> Optional[Dict[str, Any]]:
        """How a worker last exited (the first one that did), or None."""
        return next((w.last_exit for w in self.workers if w.last_exit), None)

    async def wait_until_ready(self, timeout_s: Optional[float]) -> bool:
        """Wait (bounded) while a worker can still become ready by itself: True once one is
        ``ready``; False after ``timeout_s`` or when none can any more."""
        return await wait_until_ready(self.is_flask_ready, self._hopeless, self._changes,
                                      timeout_s, asyncio.get_running_loop().time)

    def _hopeless(self) -> bool:
        return all(w.state in TERMINAL or w.state is S.IDLE for w in self.workers)

    def report_upstream_failure(self, reason: str) -> None:
        """A failure whose worker is not known: every worker checks its health now."""
        for worker in self.workers:
            worker.report_upstream_failure(reason)

    # --- dispatch --------------------------------------------------------------------------

    def try_acquire(self, work: bool = True) -> Optional[int]:
        """A worker's index for a request, at once, or None: then :meth:`request_worker` (a
        work request) or 503 (a read: no worker is ready). See :mod:`.dispatch` for what is
        work (``work``) and what is a read."""
        return self.dispatcher.try_acquire(work)

    async def acquire(self) -> int:
        """Wait in the queue for a worker; its index (see :meth:`request_worker`)."""
        return await self.request_worker()

    def request_worker(self) -> "asyncio.Future[int]":
        """For a work request, a future of a worker's index: already resolved when one is
        free, else resolved
        when the queue reaches this request. It fails with :class:`QueueTimeout` after
        ``queue_timeout_s`` or :class:`NoWorker` when every worker went down; a full queue
        raises :class:`Overloaded` here, at once. Cancelling the future gives up the place
        (if it already holds a worker, the caller must :meth:`release` it)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        dispatcher = self.dispatcher
        index = dispatcher.try_acquire()
        if index is not None:
            future.set_result(index)
            return future
        timer: List[Any] = []

        def on_slot(index: int) -> None:
            if timer:
                timer[0].cancel()
            if future.done():  # cancelled meanwhile: the place is nobody's, give it back
                dispatcher.release(index)
            else:
                future.set_result(index)

        def on_fail() -> None:
            if timer:
                timer[0].cancel()
            if not future.done():
                future.set_exception(NoWorker())

        ticket = dispatcher.enqueue(on_slot, on_fail)  # may raise Overloaded
        if future.done():  # enqueue() found a free worker at once
            return future

        def on_timeout() -> None:
            if dispatcher.cancel(ticket):
                self.timed_out += 1
                if not future.done():
                    future.set_exception(QueueTimeout())

        def on_done(done: asyncio.Future) -> None:
            if done.cancelled():
                timer[0].cancel()
                dispatcher.cancel(ticket)

        timer.append(loop.call_later(self.queue_timeout_s, on_timeout))
        future.add_done_callback(on_done)
        return future

    def release(self, index: int, work: bool = True) -> None:
        """The request on worker ``index`` is over (``work`` as it was acquired)."""
        self.dispatcher.release(index, work)

    def worker(self, index: int) -> PythonBridge:
        return self.workers[index]

    def _on_worker_state(self, old: BridgeState, new: BridgeState, reason: str) -> None:
        if new is S.READY:
            self.dispatcher.kick()  # its capacity goes to whoever waits
        elif self._hopeless():
            # nobody left to wait for: answer the queue now rather than at its timeout
            failed = self.dispatcher.fail_waiting()
            if failed:
                log.warning("No worker can serve: %d waiting request(s) answered 503.", failed)
        self._changes.notify()

    # --- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> "WorkerGroup":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    async def start(self) -> bool:
        """Start every worker at once and wait for each to be ready or failed (as
        :meth:`PythonBridge.start`: never raises for a worker that does not come up)."""
        results = await asyncio.gather(*(w.start() for w in self.workers),
                                       return_exceptions=True)
        for worker, result in zip(self.workers, results):
            if isinstance(result, BaseException):
                log.error("Starting %s failed: %r", worker.name or "the worker", result)
        return self.is_flask_ready()

    async def stop(self, timeout_s: Optional[float] = None) -> None:
        """Stop every worker and its process tree, all at once (each as
        :meth:`PythonBridge.stop`)."""
        await asyncio.gather(*(w.stop(timeout_s) for w in self.workers))

    async def force_stop(self) -> None:
        """Kill every worker's tree now (the second Ctrl+C)."""
        await asyncio.gather(*(w.force_stop() for w in self.workers))

    def cleanup(self) -> None:
        for worker in self.workers:
            worker.cleanup()

    # --- status ----------------------------------------------------------------------------

    def status(self) -> Dict[str, Any]:
        """The status of ``GET /api/gateway/status``: with one worker, exactly that worker's
        fields; with several, the group's state and the first ready worker's details; plus
        every worker and the queue."""
        workers = [worker.status() for worker in self.workers]
        if len(self.workers) == 1:
            status = dict(workers[0])
        else:
            ready = self.ready_count
            lead = next((i for i, w in enumerate(self.workers) if w.is_flask_ready()), 0)
            status = dict(workers[lead])
            status.update(state=self.state.value, ready=ready > 0,
                          message=self.describe_state(ready))
        for index, (worker, item) in enumerate(zip(self.workers, workers)):
            item.update(index=index + 1, name=worker.name, port=worker.config.port,
                        in_flight=self.dispatcher.in_flight[index],
                        work_in_flight=self.dispatcher.working[index],
                        served=self.dispatcher.served[index])
        status["workers"] = workers
        d = self.dispatcher
        status["dispatch"] = {"worker_limit": d.limit, "queue_limit": d.queue_limit,
                              "queue_timeout_ms": round(self.queue_timeout_s * 1000),
                              "queued": d.queued, "in_flight": sum(d.in_flight),
                              "served": sum(d.served), "refused_queue_full": d.refused,
                              "refused_queue_timeout": self.timed_out}
        return status

    def describe_state(self, ready: Optional[int] = None) -> str:
        if len(self.workers) == 1:
            return self.workers[0].describe_state()
        if ready is None:
            ready = self.ready_count
        total = len(self.workers)
        if ready == total:
            return "The deepfake service is running and healthy (%d workers)." % total
        if ready:
            return ("The deepfake service is running on %d of %d workers; see the workers "
                    "below for the others." % (ready, total))
        return self.workers[0].describe_state() if self.state is self.workers[0].state else (
            "No worker of the deepfake service is ready (state: %s)." % self.state.value)


def _labelled(sink: Callable[[LogLine], None], name: Optional[str]) -> Callable[[LogLine], None]:
    """The sink, with each child line saying which worker printed it."""
    if name is None:
        return sink
    tag = "[%s] " % name

    def labelled(line: LogLine) -> None:
        sink(LogLine(line.stream, tag + line.text))
    return labelled


__all__ = ["NoWorker", "Overloaded", "QueueTimeout", "WorkerGroup"]
