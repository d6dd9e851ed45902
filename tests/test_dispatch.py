"""The dispatcher's rules under random arrivals, completions, cancellations, worker failures and
recoveries (hypothesis), and the worked examples that name each rule."""
from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tornado_gateway.supervisor.dispatch import Dispatcher, Overloaded


class Worker:
    def __init__(self) -> None:
        self.ready = True

    def is_flask_ready(self) -> bool:
        return self.ready


def make(n: int = 2, limit: int = 2, queue_limit: int = 4):
    workers = [Worker() for _ in range(n)]
    return workers, Dispatcher(workers, limit, queue_limit)


def test_reads_pass_the_limit_and_go_where_the_least_work_is():
    _, d = make(n=2, limit=1, queue_limit=0)
    assert [d.try_acquire(work=False) for _ in range(3)] == [0, 0, 0]  # reads alone: one worker
    assert d.try_acquire() == 0  # work: the least work in flight, then the lowest index
    assert d.try_acquire(work=False) == 1  # a read avoids the worker that computes
    assert d.try_acquire() == 1
    assert d.try_acquire() is None  # work: both at the limit
    assert d.try_acquire(work=False) == 0  # a read is still served
    assert d.in_flight == [5, 2] and d.working == [1, 1]
    d.release(0, work=False)
    assert d.in_flight == [4, 2] and d.working == [1, 1]


def test_least_in_flight_then_lowest_index():
    _, d = make(n=3, limit=2)
    assert [d.try_acquire() for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    assert d.try_acquire() is None
    d.release(1)
    assert d.try_acquire() == 1


def test_not_ready_workers_get_nothing():
    workers, d = make(n=2, limit=2)
    workers[0].ready = False
    assert [d.try_acquire(), d.try_acquire(), d.try_acquire()] == [1, 1, None]


def test_fifo_among_waiters_and_capacity_goes_to_them_first():
    _, d = make(n=1, limit=1, queue_limit=3)
    assert d.try_acquire() == 0
    got = []
    d.enqueue(lambda i: got.append(("a", i)), lambda: got.append(("a", "fail")))
    d.enqueue(lambda i: got.append(("b", i)), lambda: got.append(("b", "fail")))
    d.release(0)
    assert got == [("a", 0)]
    assert d.try_acquire() is None  # b waits: a new arrival does not overtake it
    d.release(0)
    assert got == [("a", 0), ("b", 0)]


def test_full_queue_refuses_at_once():
    _, d = make(n=1, limit=1, queue_limit=1)
    d.try_acquire()
    d.enqueue(lambda i: None, lambda: None)
    with pytest.raises(Overloaded) as info:
        d.enqueue(lambda i: None, lambda: None)
    assert info.value.queued == 1 and info.value.queue_limit == 1 and d.refused == 1


def test_a_worker_becoming_ready_serves_the_queue():
    workers, d = make(n=2, limit=1)
    workers[1].ready = False
    d.try_acquire()
    got = []
    d.enqueue(got.append, lambda: None)
    workers[1].ready = True
    d.kick()
    assert got == [1]


def test_fail_waiting_answers_each_once_and_cancel_after_slot_is_refused():
    _, d = make(n=1, limit=1)
    d.try_acquire()
    fails = []
    t1 = d.enqueue(lambda i: None, lambda: fails.append(1))
    d.enqueue(lambda i: None, lambda: fails.append(2))
    assert d.fail_waiting() == 2 and fails == [1, 2]
    assert d.cancel(t1) is False  # already answered
    d.release(0)
    with pytest.raises(RuntimeError):  # a second release of the same place is a bug
        d.release(0)


OPS = st.lists(st.one_of(
    st.tuples(st.just("arrive")),
    st.tuples(st.just("read")),
    st.tuples(st.just("complete"), st.integers(0, 1000)),
    st.tuples(st.just("cancel"), st.integers(0, 1000)),
    st.tuples(st.just("down"), st.integers(0, 3)),
    st.tuples(st.just("up"), st.integers(0, 3)),
    # ready before the group's listener hands it the queue (kick): arrivals must still queue
    st.tuples(st.just("up_unannounced"), st.integers(0, 3)),
    st.tuples(st.just("all_down")),
), max_size=120)


@settings(max_examples=500, deadline=None)
# a worker ready before anyone handed it the queue: the next arrival must not overtake
@example(n=2, limit=1, queue_limit=2,
         ops=[("down", 1), ("arrive",), ("arrive",), ("up_unannounced", 1), ("arrive",)])
# the room of an unannounced worker goes to the queue when a read ends there
@example(n=1, limit=1, queue_limit=1,
         ops=[("arrive",), ("arrive",), ("read",), ("down", 0), ("complete", 0),
              ("up_unannounced", 0), ("complete", 0)])
@given(n=st.integers(1, 4), limit=st.integers(1, 3), queue_limit=st.integers(0, 6), ops=OPS)
def test_dispatch_properties(n, limit, queue_limit, ops):
    """Never more work on a worker than its limit; never to a non-ready worker; FIFO among
    waiters; reads never wait and go to the first ready worker with the least work; every
    request answered
    exactly once (a slot, a refusal, a failure or its own cancellation); and after every
    step either nobody waits or no ready worker has room."""
    workers, d = make(n=n, limit=limit, queue_limit=queue_limit)
    answers: dict[int, list] = {}
    running: list[tuple[int, int, bool]] = []  # (request, worker, work?)
    waiting: list[tuple[int, object]] = []  # (request, ticket), in arrival order
    served_order: list[int] = []
    next_id = 0
    unannounced = False  # a worker became ready and nothing has kicked the queue since

    def on_slot(req):
        def cb(index):
            assert workers[index].ready, "a request went to a worker that is not ready"
            answers[req].append("slot")
            running.append((req, index, True))
            served_order.append(req)
            waiting[:] = [(r, t) for r, t in waiting if r != req]
        return cb

    def on_fail(req):
        def cb():
            answers[req].append("fail")
            waiting[:] = [(r, t) for r, t in waiting if r != req]
        return cb

    for op in ops:
        kind = op[0]
        if kind == "arrive":
            req, next_id = next_id, next_id + 1
            answers[req] = []
            index = d.try_acquire()
            if index is not None:
                assert not waiting, "an arrival overtook a waiting request"
                assert workers[index].ready
                answers[req].append("slot")
                running.append((req, index, True))
                served_order.append(req)
            else:
                unannounced = False  # enqueue() hands out free capacity first
                try:
                    ticket = d.enqueue(on_slot(req), on_fail(req))
                except Overloaded:
                    assert len(waiting) >= queue_limit
                    answers[req].append("refused")
                else:
                    if answers[req] == []:
                        waiting.append((req, ticket))
        elif kind == "read":
            # reads never wait: the first ready worker with the least work in flight, or none
            ready = [i for i, w in enumerate(workers) if w.ready]
            expected = min(ready, key=lambda i: (d.working[i], i)) if ready else None
            index = d.try_acquire(work=False)
            assert index == expected
            if index is not None:
                running.append((-1, index, False))
        elif kind == "complete" and running:
            req, index, was_work = running.pop(op[1] % len(running))
            d.release(index, was_work)
            unannounced = False
        elif kind == "cancel" and waiting:
            req, ticket = waiting.pop(op[1] % len(waiting))
            assert d.cancel(ticket)
            answers[req].append("cancelled")
        elif kind == "down":
            workers[op[1] % n].ready = False
        elif kind == "up":
            workers[op[1] % n].ready = True
            d.kick()
            unannounced = False
        elif kind == "up_unannounced":
            workers[op[1] % n].ready = True
            unannounced = True
        elif kind == "all_down":
            for w in workers:
                w.ready = False
            d.fail_waiting()
        # invariants after every step
        for index in range(n):
            work_held = sum(1 for _, i, w in running if i == index and w)
            held = sum(1 for _, i, _w in running if i == index)
            assert d.working[index] == work_held <= limit
            assert d.in_flight[index] == held
        assert d.queued == len(waiting) <= queue_limit
        if waiting and not unannounced:
            assert all(not w.ready or d.working[i] >= limit for i, w in enumerate(workers))
    # FIFO: requests that waited were served in arrival order
    assert served_order == sorted(served_order)
    for req, got in answers.items():
        pending = any(r == req for r, _ in waiting)
        assert len(got) == (0 if pending else 1), (req, got)
