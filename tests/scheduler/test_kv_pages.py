"""The scheduler's KV manager: contiguous runs per row, all or nothing, merged when given back,
and every way a job leaves the scheduler gives its pages back."""

from __future__ import annotations

from server.scheduler import Job, JobKind, Scheduler
from server.scheduler.kv_pages import KVPages


def test_runs_are_contiguous_all_or_nothing_and_merge_on_release():
    pages = KVPages(10)
    a = pages.allocate([3, 3])
    assert a == [0, 3] and pages.in_use == 6
    assert pages.allocate([3, 2]) is None and pages.in_use == 6  # 4 free, not 5: nothing taken
    b = pages.allocate([4])
    assert b == [6] and pages.in_use == 10
    pages.release([(0, 3)])
    pages.release([(6, 4)])
    assert pages.allocate([4]) == [6]  # runs of 3 and 4 free, not one of 7: first fit of 4
    pages.release([(3, 3)])  # 0..6 free again, merged with its neighbour
    assert pages.allocate([6]) == [0]
    pages.release([(0, 6), (6, 4)])
    assert pages.in_use == 0 and pages.allocate([10]) == [0]


def test_pages_are_reserved_at_admission_and_freed_however_a_job_leaves():
    sched = Scheduler(max_batch_rows=8, max_queue=8, max_cache_pages=12)
    cfg = Job(JobKind.GENERATE, 16, 2, cache_pages=4)  # two rows of four pages
    plain = Job(JobKind.GENERATE, 16, 1, cache_pages=4)
    waiting = Job(JobKind.GENERATE, 16, 1, cache_pages=5)
    for job in (cfg, plain, waiting):
        sched.submit(job)
    batch = sched.next_batch(timeout=0)
    assert [j.id for j in batch.jobs] == [cfg.id, plain.id]  # 5 more pages do not fit: it waits
    assert len(cfg.cache_runs) == 2 and sched.cache_pages_in_use == 12
    sched.finish(plain.id)
    assert sched.cache_pages_in_use == 8
    sched.cancel(cfg.id)
    batch = sched.next_batch(timeout=0)  # the cancelled job is reaped: its pages go back
    assert sched.drain_cancelled() == [cfg] and cfg.cache_runs == []
    assert [j.id for j in batch.jobs] == [waiting.id] and sched.cache_pages_in_use == 5
    sched.drain_all()
    assert sched.cache_pages_in_use == 0
