"""Scheduler and batching policy, without a model: jobs are plain data, the 'worker' is a loop."""

from __future__ import annotations

import random
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.scheduler import (
    Batch,
    DepartureRate,
    Job,
    JobKind,
    QueueFull,
    Scheduler,
    SchedulerClosed,
    policy,
)

G, S = JobKind.GENERATE, JobKind.SCORE


def gen(length: int = 16, cfg: bool = False, name: str | None = None) -> Job:
    job = Job(G, length=length, rows_per_unit=2 if cfg else 1)
    if name:
        job.id = name
    return job


def score(length: int = 16, units: int = 4, cfg: bool = False, name: str | None = None) -> Job:
    job = Job(S, length=length, rows_per_unit=2 if cfg else 1, units=units)
    if name:
        job.id = name
    return job


def ids(batch: Batch | None) -> list[str]:
    assert batch is not None
    return [j.id for j in batch.jobs]


def check_batch(batch: Batch, sched: Scheduler) -> None:
    """Invariants every batch must hold."""
    assert batch.jobs
    assert all(j.kind is batch.kind for j in batch.jobs)
    assert batch.rows == sum(batch.units[j.id] * j.rows_per_unit for j in batch.jobs)
    assert batch.rows <= sched.max_batch_rows
    assert all(u >= 1 for u in batch.units.values())
    if batch.kind is G:
        assert all(batch.units[j.id] == 1 for j in batch.jobs)
    else:
        assert all(batch.units[j.id] <= j.units for j in batch.jobs)


# --------------------------------------------------------------------------- admission


def test_queue_full_is_immediate_and_queued_jobs_still_run() -> None:
    sched = Scheduler(max_batch_rows=4, max_queue=2)
    a, b = gen(name="a"), gen(name="b")
    sched.submit(a)
    sched.submit(b)
    t0 = time.monotonic()
    with pytest.raises(QueueFull) as info:
        sched.submit(gen(name="c"))
    assert time.monotonic() - t0 < 0.5
    assert info.value.retry_after > 0
    assert sched.queue_depth == 2

    assert ids(sched.next_batch(0)) == ["a", "b"]
    assert sched.queue_depth == 0 and sched.running == 2
    sched.submit(gen(name="c"))  # room again once the waiting ones are admitted
    assert sched.queue_depth == 1


def test_queue_bound_counts_waiting_not_running() -> None:
    sched = Scheduler(max_batch_rows=2, max_queue=1)
    sched.submit(gen(name="a"))
    sched.next_batch(0)
    sched.submit(gen(name="b"))
    sched.next_batch(0)
    assert sched.running == 2
    sched.submit(gen(name="c"))  # running jobs do not count against max_queue
    with pytest.raises(QueueFull):
        sched.submit(gen(name="d"))


def test_retry_after_follows_departure_rate() -> None:
    now = [0.0]
    sched = Scheduler(max_batch_rows=8, max_queue=1, clock=lambda: now[0])
    jobs = [gen(name=f"j{i}") for i in range(4)]
    for job in jobs:
        sched.submit(job)
        sched.next_batch(0)
    for job in jobs:  # departures every 2 s
        sched.finish(job.id)
        now[0] += 2.0
    sched.submit(gen(name="w"))
    with pytest.raises(QueueFull) as info:
        sched.submit(gen(name="x"))
    assert info.value.retry_after == pytest.approx(2.0)


def test_departure_rate_defaults_and_clamps() -> None:
    rate = DepartureRate(default=1.5, floor=0.1, ceiling=10.0)
    assert rate.retry_after() == 1.5
    rate.record(0.0)
    rate.record(0.0)
    assert rate.retry_after() == 0.1  # a burst of departures never yields Retry-After 0
    rate.record(1000.0)
    assert rate.retry_after() == 10.0


@pytest.mark.parametrize(
    "job",
    [
        Job(G, length=8, rows_per_unit=3),  # more rows than a forward may hold
        Job(G, length=8, rows_per_unit=1, units=2),  # generate is one unit per step
        Job(G, length=0, rows_per_unit=1),
        Job(S, length=8, rows_per_unit=1, units=-1),
    ],
)
def test_submit_rejects_jobs_that_can_never_run(job: Job) -> None:
    sched = Scheduler(max_batch_rows=2, max_queue=4)
    with pytest.raises(ValueError):
        sched.submit(job)
    assert sched.queue_depth == 0


def test_submit_rejects_duplicates() -> None:
    sched = Scheduler(max_batch_rows=2, max_queue=4)
    job = gen()
    sched.submit(job)
    with pytest.raises(ValueError):
        sched.submit(job)
    sched.next_batch(0)
    with pytest.raises(ValueError):
        sched.submit(job)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        Scheduler(max_batch_rows=0, max_queue=1)
    with pytest.raises(ValueError):
        Scheduler(max_batch_rows=1, max_queue=0)


# --------------------------------------------------------------------------- join / leave


def test_job_joins_at_the_very_next_step() -> None:
    sched = Scheduler(max_batch_rows=8, max_queue=8)
    sched.submit(gen(name="a"))
    assert ids(sched.next_batch(0)) == ["a"]
    sched.submit(gen(name="b"))  # arrives while "a" is mid-generation
    assert ids(sched.next_batch(0)) == ["a", "b"]


def test_submit_wakes_a_blocked_worker() -> None:
    sched = Scheduler(max_batch_rows=8, max_queue=8)
    got: list[Batch | None] = []
    worker = threading.Thread(target=lambda: got.append(sched.next_batch(timeout=10)))
    worker.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    sched.submit(gen(name="a"))
    worker.join(5)
    assert not worker.is_alive()
    assert time.monotonic() - t0 < 2
    assert ids(got[0]) == ["a"]


def test_next_batch_times_out_when_idle() -> None:
    sched = Scheduler(max_batch_rows=8, max_queue=8)
    t0 = time.monotonic()
    assert sched.next_batch(timeout=0.05) is None
    assert 0.04 <= time.monotonic() - t0 < 2
    assert sched.next_batch(timeout=0) is None


def test_finished_job_leaves_at_once() -> None:
    sched = Scheduler(max_batch_rows=8, max_queue=8)
    sched.submit(gen(name="a"))
    sched.submit(gen(name="b"))
    sched.next_batch(0)
    sched.finish("a")
    assert sched.running == 1
    assert [j.id for j in sched.pending()] == ["b"]
    assert ids(sched.next_batch(0)) == ["b"]
    sched.finish("a")  # idempotent
    sched.finish("unknown")
    assert sched.running == 1


def test_finish_frees_rows_for_the_next_step() -> None:
    sched = Scheduler(max_batch_rows=2, max_queue=8)
    sched.submit(gen(cfg=True, name="a"))
    sched.submit(gen(cfg=True, name="b"))
    assert ids(sched.next_batch(0)) == ["a"]
    assert sched.queue_depth == 1
    sched.finish("a")
    assert ids(sched.next_batch(0)) == ["b"]


# --------------------------------------------------------------------------- row cap / FIFO


def test_row_cap_counts_cfg_as_two_rows_and_head_is_not_overtaken() -> None:
    sched = Scheduler(max_batch_rows=4, max_queue=8)
    sched.submit(gen(cfg=True, name="a"))
    sched.submit(gen(name="b"))
    sched.submit(gen(cfg=True, name="c"))  # 2 + 1 + 2 = 5 rows > 4: c waits
    batch = sched.next_batch(0)
    assert ids(batch) == ["a", "b"] and batch.rows == 3
    assert sched.queue_depth == 1

    sched.submit(gen(name="d"))  # would fit in the spare row, but must not overtake c
    assert ids(sched.next_batch(0)) == ["a", "b"]
    assert sched.queue_depth == 2

    sched.finish("b")
    batch = sched.next_batch(0)
    assert ids(batch) == ["a", "c"] and batch.rows == 4
    sched.finish("a")
    batch = sched.next_batch(0)
    assert ids(batch) == ["c", "d"] and batch.rows == 3


def test_score_is_not_blocked_by_a_waiting_generate_head() -> None:
    # Kinds have separate row budgets (they never share a forward), so FIFO is per kind.
    sched = Scheduler(max_batch_rows=2, max_queue=8)
    sched.submit(gen(cfg=True, name="a"))
    sched.submit(gen(cfg=True, name="b"))
    sched.submit(score(units=1, name="s"))
    assert ids(sched.next_batch(0)) == ["a"]
    assert sched.queue_depth == 1  # "b" waits, "s" was admitted
    assert ids(sched.next_batch(0)) == ["s"]


def test_admit_policy_is_fifo_per_kind() -> None:
    a, b, c = gen(cfg=True, name="a"), gen(name="b"), score(units=3, name="c")
    d = score(units=1, name="d")
    # generate budget has 1 row left: a (2 rows) blocks b; score has room for c, then is full.
    got = policy.admit([a, b, c, d], generate_rows=3, score_rows=0, max_rows=4)
    assert [j.id for j in got] == ["c", "d"]  # 0 < 4 -> c (3 rows), 3 < 4 -> d
    got = policy.admit([a, b, c, d], generate_rows=2, score_rows=4, max_rows=4)
    assert [j.id for j in got] == ["a"]


# --------------------------------------------------------------------------- which jobs step


def test_every_running_generate_job_steps_whatever_its_length() -> None:
    # Padding is the engine's decision (it splits a step into forwards by length), not the
    # scheduler's: jobs of very different lengths share every step.
    sched = Scheduler(max_batch_rows=8, max_queue=8)
    for name, length in [("a", 100), ("b", 500), ("c", 100), ("d", 500)]:
        sched.submit(gen(length, name=name))
    for _ in range(3):
        batch = sched.next_batch(0)
        check_batch(batch, sched)
        assert ids(batch) == ["a", "b", "c", "d"]


def test_pack_score_is_fifo_and_splits_units() -> None:
    s1, s2 = score(100, units=5, cfg=True, name="s1"), score(100, units=3, name="s2")
    assert policy.pack_score([s1, s2], 8) == {"s1": 4}
    assert policy.pack_score([s1, s2], 12) == {"s1": 5, "s2": 2}
    idle = score(100, units=0, name="idle")
    assert policy.pack_score([idle, s2], 8) == {"s2": 3}
    assert policy.pack_score([idle], 8) == {}
    # rows of any length share a score step (the engine decides the forwards)
    assert policy.pack_score([score(100, units=2, name="long"), score(50, units=10, name="short")], 16) == {
        "long": 2,
        "short": 10,
    }


@settings(max_examples=200, deadline=None)
@given(
    specs=st.lists(
        st.tuples(st.sampled_from([8, 16, 32, 100]), st.booleans(), st.integers(0, 20)),
        min_size=1,
        max_size=8,
    ),
    max_rows=st.integers(2, 32),
)
def test_pack_score_properties(specs: list[tuple[int, bool, int]], max_rows: int) -> None:
    jobs = [score(length, units=units, cfg=cfg) for length, cfg, units in specs]
    grants = policy.pack_score(jobs, max_rows)
    by_id = {j.id: j for j in jobs}
    assert sum(k * by_id[i].rows_per_unit for i, k in grants.items()) <= max_rows
    assert all(1 <= k <= by_id[i].units for i, k in grants.items())
    head = next((j for j in jobs if j.units > 0), None)
    if head is not None:  # the FIFO head gets all it has, or a full forward
        assert grants[head.id] == min(head.units, max_rows // head.rows_per_unit)
    else:
        assert grants == {}


def test_choose_kind_round_robin() -> None:
    assert policy.choose_kind(True, True, None) is G
    assert policy.choose_kind(True, True, G) is S
    assert policy.choose_kind(True, True, S) is G
    assert policy.choose_kind(False, True, S) is S
    assert policy.choose_kind(True, False, G) is G
    assert policy.choose_kind(False, False, G) is None


# --------------------------------------------------------------------------- fairness


def simulate(sched: Scheduler, work: dict[str, int], max_forwards: int = 100_000) -> list[Batch]:
    """A model-free worker: a generate job needs work[id] steps, a score job work[id] units."""
    batches = []
    for _ in range(max_forwards):
        batch = sched.next_batch(0)
        sched.drain_cancelled()
        if batch is None:
            break
        check_batch(batch, sched)
        batches.append(batch)
        for job in batch.jobs:
            work[job.id] -= batch.units[job.id]
            if work[job.id] <= 0:
                sched.finish(job.id)
            elif job.kind is S:
                sched.update_units(job.id, work[job.id])
    return batches


def test_kinds_alternate_and_score_flood_never_stops_generate() -> None:
    sched = Scheduler(max_batch_rows=4, max_queue=64)
    work: dict[str, int] = {}
    g = gen(name="g")
    sched.submit(g)
    work["g"] = 20
    for i in range(30):
        s = score(units=100, cfg=True, name=f"s{i}")
        sched.submit(s)
        work[s.id] = 100
    batches = simulate(sched, work, max_forwards=40)
    kinds = [b.kind for b in batches[:40]]
    assert kinds == [G, S] * 20
    assert all("g" in ids(b) for b in batches[:40:2])


def test_score_alone_uses_every_forward() -> None:
    sched = Scheduler(max_batch_rows=4, max_queue=8)
    sched.submit(score(units=10, name="s"))
    batches = simulate(sched, {"s": 10})
    assert [b.units["s"] for b in batches] == [4, 4, 2]
    assert sched.running == 0


def test_zero_units_score_job_waits_for_update() -> None:
    sched = Scheduler(max_batch_rows=4, max_queue=8)
    sched.submit(score(units=0, name="s"))
    assert sched.next_batch(0) is None
    assert sched.running == 1
    sched.update_units("s", 3)
    batch = sched.next_batch(0)
    assert batch.units == {"s": 3}
    with pytest.raises(ValueError):
        sched.update_units("s", -1)
    sched.submit(gen(name="g"))
    sched.next_batch(0)
    with pytest.raises(ValueError):
        sched.update_units("g", 2)
    sched.update_units("gone", 3)  # unknown ids are ignored (finished/cancelled races)


def test_no_starvation_under_mixed_workload() -> None:
    rng = random.Random(1234)
    max_rows = 8
    sched = Scheduler(max_batch_rows=max_rows, max_queue=1000)
    work: dict[str, int] = {}
    kinds: dict[str, JobKind] = {}
    to_submit: list[Job] = []
    for i in range(150):
        if rng.random() < 0.7:
            job = gen(rng.choice([32, 64, 128, 256, 512]), cfg=rng.random() < 0.4, name=f"g{i}")
            work[job.id] = rng.randint(1, 30)
        else:
            units = rng.randint(1, 40)
            job = score(rng.choice([16, 48, 200]), units=units, cfg=rng.random() < 0.4, name=f"s{i}")
            work[job.id] = units
        kinds[job.id] = job.kind
        to_submit.append(job)

    stepped: set[str] = set()
    finished: set[str] = set()
    last_generate_step: dict[str, int] = {}  # generate forward index of each job's latest step
    max_gap = 0
    generate_forwards = 0
    forwards = 0
    while to_submit or sched.pending():
        for _ in range(rng.randint(0, 3)):  # arrivals between forwards
            if to_submit:
                sched.submit(to_submit.pop(0))
        batch = sched.next_batch(0)
        if batch is None:
            continue
        forwards += 1
        assert forwards < 20_000, "scheduler stopped making progress"
        check_batch(batch, sched)
        if batch.kind is G:
            for job in batch.jobs:
                if job.id in last_generate_step:
                    max_gap = max(max_gap, generate_forwards - last_generate_step[job.id] - 1)
                last_generate_step[job.id] = generate_forwards
            generate_forwards += 1
        for job in batch.jobs:
            stepped.add(job.id)
            work[job.id] -= batch.units[job.id]
            if work[job.id] <= 0:
                sched.finish(job.id)
                finished.add(job.id)
            elif job.kind is S:
                sched.update_units(job.id, work[job.id])

    assert stepped == finished == set(kinds)
    # A running generate job steps in every generate step.
    assert max_gap == 0
    assert sched.queue_depth == sched.running == 0


# --------------------------------------------------------------------------- cancellation


def test_cancel_waiting_job_removes_it_at_once() -> None:
    sched = Scheduler(max_batch_rows=1, max_queue=8)
    sched.submit(gen(name="a"))
    sched.next_batch(0)
    b = gen(name="b")
    sched.submit(b)
    assert sched.cancel("b") is b
    assert b.cancelled and sched.queue_depth == 0
    assert sched.drain_cancelled() == [b]
    assert sched.drain_cancelled() == []
    assert sched.cancel("b") is None  # gone


def test_cancel_running_job_leaves_at_next_batch() -> None:
    sched = Scheduler(max_batch_rows=4, max_queue=8)
    a, b = gen(name="a"), gen(name="b")
    sched.submit(a)
    sched.submit(b)
    sched.next_batch(0)
    assert sched.cancel("a") is a
    assert a.cancelled
    assert sched.running == 2  # the worker may be mid-forward with it
    assert sched.drain_cancelled() == []
    assert ids(sched.next_batch(0)) == ["b"]
    assert sched.running == 1
    assert sched.drain_cancelled() == [a]
    sched.finish("a")  # the worker finishing it late is harmless
    assert sched.running == 1


def test_cancel_unknown_or_finished_returns_none() -> None:
    sched = Scheduler(max_batch_rows=4, max_queue=8)
    assert sched.cancel("nope") is None
    sched.submit(gen(name="a"))
    sched.next_batch(0)
    sched.finish("a")
    assert sched.cancel("a") is None
    assert sched.drain_cancelled() == []


def test_cancel_wakes_blocked_worker() -> None:
    sched = Scheduler(max_batch_rows=4, max_queue=8)
    s = score(units=0, name="s")  # running but with no work: the worker blocks
    sched.submit(s)
    assert sched.next_batch(0) is None
    got: list[Batch | None] = [Batch(G, [], {}, 0)]
    worker = threading.Thread(target=lambda: got.__setitem__(0, sched.next_batch(timeout=10)))
    worker.start()
    time.sleep(0.05)
    sched.cancel("s")
    worker.join(5)
    assert not worker.is_alive()
    assert got[0] is None
    assert sched.drain_cancelled() == [s]
    assert sched.running == 0


# --------------------------------------------------------------------------- close / shutdown


def test_close_rejects_new_work_but_serves_accepted_work() -> None:
    sched = Scheduler(max_batch_rows=4, max_queue=8)
    sched.submit(gen(name="a"))
    sched.close()
    assert sched.closed
    with pytest.raises(SchedulerClosed):
        sched.submit(gen(name="b"))
    assert ids(sched.next_batch(0)) == ["a"]
    sched.finish("a")
    t0 = time.monotonic()
    assert sched.next_batch(timeout=None) is None  # closed and idle: returns, never blocks
    assert time.monotonic() - t0 < 1


def test_close_wakes_blocked_worker() -> None:
    sched = Scheduler(max_batch_rows=4, max_queue=8)
    got: list[Batch | None] = [Batch(G, [], {}, 0)]
    worker = threading.Thread(target=lambda: got.__setitem__(0, sched.next_batch(timeout=None)))
    worker.start()
    time.sleep(0.05)
    sched.close()
    worker.join(5)
    assert not worker.is_alive()
    assert got[0] is None


def test_pending_and_drain_all() -> None:
    sched = Scheduler(max_batch_rows=1, max_queue=8)
    a, b, c = gen(name="a"), gen(name="b"), gen(name="c")
    for job in (a, b, c):
        sched.submit(job)
    sched.next_batch(0)
    sched.cancel("c")
    assert sched.pending() == [a, b]
    sched.close()
    assert sched.drain_all() == [c, a, b]
    assert sched.pending() == [] and sched.drain_cancelled() == []
    assert sched.queue_depth == sched.running == 0


# --------------------------------------------------------------------------- threads


def test_many_submitters_one_worker() -> None:
    sched = Scheduler(max_batch_rows=6, max_queue=8)
    lock = threading.Lock()
    work: dict[str, int] = {}
    submitted: list[Job] = []
    finished: list[str] = []
    cancelled: list[str] = []
    errors: list[BaseException] = []

    def submitter(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for i in range(40):
                if rng.random() < 0.7:
                    job = gen(rng.choice([16, 32, 64]), cfg=rng.random() < 0.3, name=f"t{seed}-{i}")
                    need = rng.randint(1, 8)
                else:
                    need = rng.randint(1, 12)
                    job = score(rng.choice([16, 32]), units=need, cfg=rng.random() < 0.3, name=f"t{seed}-{i}")
                with lock:
                    work[job.id] = need
                while True:
                    try:
                        sched.submit(job)
                        break
                    except QueueFull as exc:
                        time.sleep(min(exc.retry_after, 0.002))
                with lock:
                    submitted.append(job)
                if rng.random() < 0.1:
                    time.sleep(rng.random() * 0.002)
                    sched.cancel(job.id)
        except BaseException as exc:  # recorded for the main thread's assert, then re-raised
            errors.append(exc)
            raise

    def worker() -> None:
        try:
            while True:
                batch = sched.next_batch(timeout=0.05)
                cancelled.extend(j.id for j in sched.drain_cancelled())
                if batch is None:
                    if sched.closed and not sched.pending():
                        cancelled.extend(j.id for j in sched.drain_cancelled())
                        return
                    continue
                check_batch(batch, sched)
                for job in batch.jobs:
                    with lock:
                        work[job.id] -= batch.units[job.id]
                        left = work[job.id]
                    if left <= 0:
                        sched.finish(job.id)
                        finished.append(job.id)
                    elif job.kind is S:
                        sched.update_units(job.id, left)
        except BaseException as exc:
            errors.append(exc)
            raise

    worker_thread = threading.Thread(target=worker)
    worker_thread.start()
    submitters = [threading.Thread(target=submitter, args=(seed,)) for seed in range(4)]
    for t in submitters:
        t.start()
    for t in submitters:
        t.join(30)
        assert not t.is_alive()
    sched.close()
    worker_thread.join(30)
    assert not worker_thread.is_alive()
    assert not errors, errors

    # Every accepted job ended exactly once: finished or handed out as cancelled.
    assert len(finished) == len(set(finished))
    assert len(cancelled) == len(set(cancelled))
    assert set(finished).isdisjoint(cancelled)
    ended = set(finished) | set(cancelled)
    assert ended == {j.id for j in submitted}
    assert sched.queue_depth == 0 and sched.running == 0
    assert sched.pending() == []


def test_cache_memory_bounds_admission_and_a_waiting_job_joins_when_pages_free() -> None:
    sched = Scheduler(max_batch_rows=8, max_queue=8, max_cache_pages=10)
    first, second = Job(G, 16, 1, cache_pages=6), Job(G, 16, 1, cache_pages=6)
    exact = Job(G, 16, 1)
    for job in (first, second, exact):
        sched.submit(job)
    # rows would allow all three; pages allow the first only, and FIFO keeps the exact job behind
    assert sched.next_batch(0).jobs == [first]
    assert sched.queue_depth == 2
    sched.finish(first.id)
    assert sched.next_batch(0).jobs == [second, exact]
    with pytest.raises(ValueError, match="KV-cache pages"):
        sched.submit(Job(G, 16, 1, cache_pages=11))
