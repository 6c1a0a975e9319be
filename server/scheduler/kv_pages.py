"""The KV manager: which pages of the engine's KV-cache pool each running job holds.

Pure Python, owned by the Scheduler (as vLLM's scheduler owns its KV manager): pages are taken
at admission and given back when the job leaves, whichever way it leaves (finished, failed,
cancelled, drained). Each cached row gets one contiguous run of pages, so the engine's attention
reads a row's keys and values as one view of the pool (server/engine/kv_cache.py). First fit
over free runs, merged on release; a job whose runs do not fit now waits for running jobs to
leave (when none runs, the whole pool is one free run, so any job within the budget fits).
"""

from __future__ import annotations

import bisect


class KVPages:
    def __init__(self, pages: int) -> None:
        if pages < 0:
            raise ValueError("pages must be >= 0")
        self.pages = pages
        self._free: list[tuple[int, int]] = [(0, pages)] if pages else []  # (first, count), by first
        self.in_use = 0

    def allocate(self, counts: list[int]) -> list[int] | None:
        """A contiguous run for each count (first page of each), or None (nothing taken) if they
        do not all fit now."""
        taken: list[tuple[int, int]] = []
        for count in counts:
            at = next((i for i, (_, size) in enumerate(self._free) if size >= count), None)
            if at is None:
                self.release(taken)
                return None
            first, size = self._free[at]
            if size == count:
                del self._free[at]
            else:
                self._free[at] = (first + count, size - count)
            self.in_use += count
            taken.append((first, count))
        return [first for first, _ in taken]

    def release(self, runs: list[tuple[int, int]]) -> None:
        """Give back (first, count) runs."""
        for first, count in runs:
            at = bisect.bisect_left(self._free, (first, 0))
            self._free.insert(at, (first, count))
            self.in_use -= count
            if at + 1 < len(self._free) and first + count == self._free[at + 1][0]:  # merge with the next
                self._free[at] = (first, count + self._free.pop(at + 1)[1])
            if at > 0 and self._free[at - 1][0] + self._free[at - 1][1] == first:  # and the previous
                before = self._free.pop(at - 1)
                self._free[at - 1] = (before[0], before[1] + self._free[at - 1][1])
