"""Dispatch: which worker serves a request, and the bounded FIFO queue in front of them.

Pure bookkeeping, no I/O, no event loop: the proxy asks for a slot, gets a worker index at once
or waits in the queue, and gives the slot back when its exchange is over.

Requests are *work* (the CPU-bound kind: in this service every POST — analyze, feedback,
retrain) or *reads* (GET, HEAD, OPTIONS: stats, the health check, downloads). The limit and the
queue are for work: a worker given more images at once only shares one core among them, while
reads are cheap and, held back behind work, would make a busy service look dead. The rules:

* a request goes to the ready worker with the fewest work requests in flight — the one whose
  core is the least busy — ties to the lowest index. So reads alone all go to one worker
  (measured: tiny GETs spread over two processes on two cores ran at 0.7x of one process,
  each process's overhead competing with the other's), and move away from a worker busy
  computing;
* no worker ever has more than ``limit`` work requests in flight; reads never wait;
* beyond that, work waits in one FIFO queue of at most ``queue_limit``; a full queue refuses
  at once (:class:`Overloaded`) instead of piling up latency;
* a waiter is served before any later arrival: while anyone waits, an arrival queues too;
* capacity is handed to waiters the moment it appears (a release, a worker becoming ready), so
  after every call either nobody waits or no ready worker has room.

The bounded wait (the queue timeout) and the "client went away" case are the caller's: it
cancels its ticket with :meth:`Dispatcher.cancel`.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Deque, List, Optional, Sequence


class Overloaded(Exception):
    """The queue is full: the request is refused without waiting."""

    def __init__(self, queued: int, queue_limit: int) -> None:
        super().__init__("%d requests are already waiting (the limit is %d)" % (
            queued, queue_limit))
        self.queued = queued
        self.queue_limit = queue_limit


class Ticket:
    """One waiting request. Exactly one of ``on_slot(index)`` (a worker is free for it) and
    ``on_fail()`` (it will not get one: :meth:`Dispatcher.fail_waiting`) is called, once, and
    neither after :meth:`Dispatcher.cancel`."""

    __slots__ = ("on_slot", "on_fail", "active")

    def __init__(self, on_slot: Callable[[int], None], on_fail: Callable[[], None]) -> None:
        self.on_slot = on_slot
        self.on_fail = on_fail
        self.active = True


class Dispatcher:
    """Least-in-flight choice among ready workers, a per-worker limit on work and a FIFO queue
    for it.

    ``workers`` are any objects; ``is_ready(worker)`` says whether one may get requests now
    (default: its ``is_flask_ready()``). Not thread-safe: every call happens on the event loop.
    """

    def __init__(self, workers: Sequence[Any], limit: int, queue_limit: int,
                 is_ready: Optional[Callable[[Any], bool]] = None) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if queue_limit < 0:
            raise ValueError("queue_limit must be 0 or more")
        self.workers = list(workers)
        self.limit = limit
        self.queue_limit = queue_limit
        self._is_ready = is_ready or (lambda w: w.is_flask_ready())
        self.in_flight: List[int] = [0] * len(self.workers)  # every request
        self.working: List[int] = [0] * len(self.workers)  # work requests (under the limit)
        self.served: List[int] = [0] * len(self.workers)
        self._waiting: Deque[Ticket] = collections.deque()
        self.refused = 0  # arrivals refused because the queue was full

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def _pick_work(self) -> Optional[int]:
        best = None
        best_load = self.limit
        working = self.working
        for index, worker in enumerate(self.workers):
            load = working[index]
            if load < best_load and self._is_ready(worker):
                best, best_load = index, load
                if load == 0:
                    break
        return best

    def _pick_read(self) -> Optional[int]:
        best = None
        best_load = 0
        working = self.working
        for index, worker in enumerate(self.workers):
            load = working[index]
            if (best is None or load < best_load) and self._is_ready(worker):
                best, best_load = index, load
                if load == 0:
                    break
        return best

    def _take(self, index: int, work: bool) -> int:
        self.in_flight[index] += 1
        self.served[index] += 1
        if work:
            self.working[index] += 1
        return index

    def try_acquire(self, work: bool = True) -> Optional[int]:
        """A worker's index for a new request, counted in flight; None when it must wait (a
        work request: every ready worker is at its limit, or others already wait) or when no
        worker is ready."""
        if not work:
            index = self._pick_read()
            return None if index is None else self._take(index, False)
        if self._waiting:
            return None
        index = self._pick_work()
        return None if index is None else self._take(index, True)

    def enqueue(self, on_slot: Callable[[int], None],
                on_fail: Callable[[], None]) -> Ticket:
        """Wait for a worker: ``on_slot(index)`` is called when one is free for this request,
        or ``on_fail()`` when none will be (see :class:`Ticket`). Raises :class:`Overloaded`
        when ``queue_limit`` requests already wait."""
        self.kick()  # a worker may have room no one handed out yet (it just became ready)
        if len(self._waiting) >= self.queue_limit:
            self.refused += 1
            raise Overloaded(len(self._waiting), self.queue_limit)
        ticket = Ticket(on_slot, on_fail)
        self._waiting.append(ticket)
        self.kick()
        return ticket

    def cancel(self, ticket: Ticket) -> bool:
        """Stop waiting (timed out, client gone). False if it already got its slot: the
        caller then owns that slot and must release it."""
        if not ticket.active:
            return False
        ticket.active = False
        try:
            self._waiting.remove(ticket)
        except ValueError:
            pass
        return True

    def release(self, index: int, work: bool = True) -> None:
        """The request on worker ``index`` is over: a work request's place goes to the first
        waiter (and any room not handed out yet, after a read too)."""
        if self.in_flight[index] <= 0 or (work and self.working[index] <= 0):
            raise RuntimeError("release() without a matching acquire on worker %d" % index)
        self.in_flight[index] -= 1
        if work:
            self.working[index] -= 1
        self.kick()  # also after a read: whatever room exists goes to the queue

    def kick(self) -> None:
        """Hand free capacity to waiters, oldest first (after a release, or when a worker
        became ready)."""
        waiting = self._waiting
        while waiting:
            index = self._pick_work()
            if index is None:
                return
            ticket = waiting.popleft()
            ticket.active = False
            self._take(index, True)
            ticket.on_slot(index)

    def fail_waiting(self) -> int:
        """Every waiter gets ``on_fail()`` (no worker can become ready by itself any more);
        returns how many there were."""
        failed = list(self._waiting)
        self._waiting.clear()
        for ticket in failed:
            ticket.active = False
        for ticket in failed:
            ticket.on_fail()
        return len(failed)
