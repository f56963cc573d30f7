"""Cold reads of scattered pieces of one file: page-aligned, merged, several in flight.

Reads bypass the page cache so that what the store reports is what the device did:
O_DIRECT where the filesystem takes it (the device copies straight into our
page-aligned buffers), else an explicit cold-cache mode that turns readahead off
(POSIX_FADV_RANDOM) and drops each range from the page cache (POSIX_FADV_DONTNEED)
just before reading it. `ColdReader.mode` says which one is in use.

O_DIRECT reads must start and end on page boundaries, so a piece costs the pages it
touches; `plan_reads` turns pieces into such extents and, with merging on, joins
extents that touch into one larger read (up to the size of a read buffer).
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

O_DIRECT = "o_direct"
COLD_CACHE = "fadvise_cold_cache"


@dataclass(frozen=True)
class Extent:
    """One read of `length` bytes at `offset` (both page multiples) that delivers the
    pieces first..last-1 of the plan's piece list."""

    offset: int
    length: int
    first: int
    last: int


# Copies what a read brought in out of its buffer: deliver(extent, view of the bytes read).
Deliver = Callable[[Extent, memoryview], None]


def plan_reads(
    offsets: np.ndarray, nbytes: int, *, page: int, max_bytes: int, merge: bool, gap: int = 0
) -> list[Extent]:
    """Reads that fetch pieces of `nbytes` at `offsets` ((n,) int64, ascending).

    Each piece needs the pages it touches. Without `merge` every piece is its own read;
    with it, a piece joins the current read when at most `gap` bytes lie between them
    (0: its pages touch or overlap the read), as long as the read stays within
    `max_bytes`. A gap is read and thrown away: on devices where a read's latency costs
    more than its bytes, fewer larger reads win.

    Example (page 4096, nbytes 3072): offsets [0, 4096, 12288] -> merged:
    Extent(0, 8192, 0, 2), Extent(12288, 4096, 2, 3); unmerged: three 4096-byte reads;
    merged with gap 4096: Extent(0, 16384, 0, 3).
    """
    lows = offsets // page * page
    highs = -(-(offsets + nbytes) // page) * page
    if np.any(highs - lows > max_bytes):
        raise ValueError(f"max_bytes: {max_bytes} cannot hold a {nbytes}-byte piece")
    if not merge:
        return [
            Extent(int(lo), int(hi - lo), i, i + 1)
            for i, (lo, hi) in enumerate(zip(lows.tolist(), highs.tolist(), strict=True))
        ]
    lows_list, highs_list = lows.tolist(), highs.tolist()
    # Pages only grow along the pieces, so a piece touches the read before it when its
    # first page is at most `gap` past the previous piece's last one.
    breaks = np.flatnonzero(lows[1:] > highs[:-1] + gap) + 1
    extents = []
    for run_start, run_end in zip(
        [0, *breaks.tolist()], [*breaks.tolist(), len(offsets)], strict=True
    ):
        first = run_start
        while first < run_end:  # split the run where a read would pass max_bytes
            lo = lows_list[first]
            last = bisect_right(highs_list, lo + max_bytes, first, run_end)
            extents.append(Extent(lo, highs_list[last - 1] - lo, first, last))
            first = last
    return extents


class PendingReads:
    """Reads in flight from `ColdReader.submit`."""

    def __init__(self, start: float, futures: list[Future[float]]) -> None:
        self.start = start
        self._futures = futures
        self.done_at = time.perf_counter() if not futures else 0.0

    def wait(self) -> float:
        """Blocks until every read is delivered (re-raising a failed read's error);
        returns the seconds the reads took, from submission to the last delivery."""
        if self._futures:
            futures, self._futures = self._futures, []
            wait_all(futures)  # all of them, so no read still writes when an error is raised
            self.done_at = max(future.result() for future in futures)
        return self.done_at - self.start


class ColdReader:
    """Reads extents of `path` into page-aligned buffers from `threads` threads at once.

    There are `threads` buffers of `buffer_bytes` (the largest single read). A lane of
    reads takes a free one for its run and gives it back after, so several `submit`s
    can be in flight at once; each job's `deliver` copies out of it before the buffer is
    reused, on the reading thread.

    direct: True needs O_DIRECT, False uses the cold-cache mode, None tries O_DIRECT first.
    """

    def __init__(
        self, path: str | Path, *, threads: int, buffer_bytes: int, direct: bool | None = None
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads: must be >= 1, got {threads}")
        if buffer_bytes < 1 or buffer_bytes % mmap.PAGESIZE:
            raise ValueError(
                f"buffer_bytes: must be a positive multiple of {mmap.PAGESIZE}, got {buffer_bytes}"
            )
        self.path = Path(path)
        self.fd, self.mode = _open_cold(self.path, direct)
        # Anonymous mappings are page-aligned, as O_DIRECT needs.
        self._buffers = [mmap.mmap(-1, buffer_bytes) for _ in range(threads)]
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for buffer in self._buffers:
            self._free.put(buffer)
        self._pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="flash-read") if threads > 1 else None
        )
        self.memory_bytes = buffer_bytes * threads  # all read buffers together

    def read(self, jobs: Sequence[tuple[Extent, Deliver]]) -> None:
        """Performs every read, `threads` at a time; returns once each is delivered."""
        self.submit(jobs).wait()

    def submit(self, jobs: Sequence[tuple[Extent, Deliver]]) -> PendingReads:
        """Starts every read and returns at once (without a pool: after reading), so the
        caller can compute while the device works; `wait` on the result before using
        what the reads deliver.

        Lane t takes jobs t, t + threads, ... in turn, so that one task per thread (not
        per read) crosses the pool.
        """
        start = time.perf_counter()
        lanes = min(len(jobs), len(self._buffers))
        if self._pool is None or lanes <= 1:
            self._read_lane(jobs)
            return PendingReads(start, [])
        futures = [self._pool.submit(self._read_lane, jobs[lane::lanes]) for lane in range(lanes)]
        return PendingReads(start, futures)

    def _read_lane(self, jobs: Sequence[tuple[Extent, Deliver]]) -> float:
        # As many buffers as pool workers. A lane (on a worker, or on the calling thread
        # for a one-lane submit) waits at most until some running lane ends, and running
        # lanes wait on nothing else: no deadlock.
        buffer = self._free.get()
        try:
            return self._read_into(jobs, buffer)
        finally:
            self._free.put(buffer)

    def _read_into(self, jobs: Sequence[tuple[Extent, Deliver]], buffer: mmap.mmap) -> float:
        with memoryview(buffer) as whole:
            for extent, deliver in jobs:
                # Released even when the read fails, or the buffer could never be closed.
                with whole[: extent.length] as view:
                    if self.mode == COLD_CACHE:
                        os.posix_fadvise(
                            self.fd, extent.offset, extent.length, os.POSIX_FADV_DONTNEED
                        )
                    got = os.preadv(self.fd, [view], extent.offset)
                    if got != extent.length:
                        raise OSError(
                            f"{self.path}: short read at {extent.offset}: {got} of "
                            f"{extent.length} bytes (truncated pack?)"
                        )
                    deliver(extent, view)
        return time.perf_counter()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for buffer in self._buffers:
            buffer.close()


def _open_cold(path: Path, direct: bool | None) -> tuple[int, str]:
    if direct is not False and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as error:
            if direct:
                raise OSError(f"{path}: O_DIRECT not supported here: {error}") from error
            logger.info("%s: O_DIRECT refused (%s); using the fadvise cold-cache mode", path, error)
        else:
            if _direct_read_works(fd):
                return fd, O_DIRECT
            os.close(fd)
            if direct:
                raise OSError(f"{path}: O_DIRECT reads fail on this filesystem")
    elif direct:
        raise OSError(f"{path}: this platform has no O_DIRECT")
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return fd, COLD_CACHE


def _direct_read_works(fd: int) -> bool:
    """Some filesystems (tmpfs, some FUSE) accept O_DIRECT at open and fail the reads."""
    probe = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        with memoryview(probe) as view:
            os.preadv(fd, [view], 0)
        return True
    except OSError:
        return False
    finally:
        probe.close()
