"""Steering the page cache for streams larger than it: write-behind for outputs, readahead for inputs.

The kernel's defaults suit files that fit in memory.  A merge whose outputs exceed the dirty-page
limit (``vm.dirty_ratio`` of memory, or ``vm.dirty_bytes``) makes every writer stall in
``balance_dirty_pages`` behind write-back it did not start, in bursts; its dirty pages also
crowd the inputs out of the cache.  :class:`WriteBehind` starts write-back of each region as
soon as it is written (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which queues the I/O and
returns) and, once more than a window of bytes is under way, waits for the oldest regions and
drops them from the cache (``POSIX_FADV_DONTNEED``): the device stays busy, dirty memory stays
at one window per process, and the writer never meets the kernel's limit.  Below that limit
the kernel's own lazy write-back is faster (a run can end before its output reaches the disk),
so write-behind engages only when the outputs being written together exceed the background
write-back threshold (``TVLANG_WRITE_BEHIND=1``/``0`` forces it on or off).

:class:`Readahead` asks for the next window of an input file (``POSIX_FADV_WILLNEED``, or
``MADV_WILLNEED`` through a map) as the reader moves through it, so a cold read keeps the device
busy while the kernels compute.

Only file descriptors, offsets and byte counts: every call is a hint whose failure (another
operating system, an old kernel, a filesystem that refuses it) changes speed, never bytes.
Nothing here affects what is written, nor the temporary-and-rename commit of the writers.
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import os
import sys
import threading
from collections.abc import Callable

__all__ = [
    "Readahead",
    "WriteBehind",
    "dirty_thresholds",
    "drop_cached",
    "prefetch",
    "prefetch_mapped",
    "start_writeback",
    "wait_writeback",
]

# <linux/fs.h>
SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4

#: Bytes of one output under write-back at a time before the writer waits for the oldest.
WINDOW = 64 << 20
#: How far ahead of the reader's position an input is requested.
AHEAD = 32 << 20
ENV = "TVLANG_WRITE_BEHIND"


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range``, or None where it does not exist (not Linux, no libc symbol)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # the process's own symbols, libc's among them (ctypes.util.find_library runs ldconfig: ~2 ms)
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Queue the dirty pages of ``[offset, offset + nbytes)`` for writing, without waiting for
    them; False where the system cannot (then the kernel writes them back when it likes)."""
    if _sync_file_range is None or nbytes <= 0:
        return False
    return _sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE) == 0


def wait_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Write ``[offset, offset + nbytes)`` and wait until it is on the device (data only: not
    a substitute for ``fsync``, which also writes the metadata); False where unsupported."""
    if _sync_file_range is None or nbytes <= 0:
        return False
    flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
    return _sync_file_range(fd, offset, nbytes, flags) == 0


def _fadvise(fd: int, offset: int, nbytes: int, advice_name: str) -> bool:
    advise = getattr(os, "posix_fadvise", None)
    advice = getattr(os, advice_name, None)
    if advise is None or advice is None or nbytes <= 0:
        return False
    try:
        advise(fd, offset, nbytes, advice)
    except OSError:
        return False
    return True


def drop_cached(fd: int, offset: int, nbytes: int) -> bool:
    """Drop the clean cached pages of a region (dirty ones stay: wait for them first)."""
    return _fadvise(fd, offset, nbytes, "POSIX_FADV_DONTNEED")


def prefetch(fd: int, offset: int, nbytes: int) -> bool:
    """Start reading a region into the page cache in the background."""
    return _fadvise(fd, offset, nbytes, "POSIX_FADV_WILLNEED")


def prefetch_mapped(mm: mmap.mmap, offset: int, nbytes: int) -> bool:
    """:func:`prefetch` for a file through its memory map (``MADV_WILLNEED``): no descriptor to
    keep open, so a checkpoint of hundreds of shards stays far from the process's file limit."""
    advice = getattr(mmap, "MADV_WILLNEED", None)
    if advice is None or nbytes <= 0:
        return False
    begin = offset - offset % mmap.PAGESIZE
    try:
        mm.madvise(advice, begin, min(len(mm), offset + nbytes) - begin)
    except (OSError, ValueError):
        return False
    return True


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def dirty_thresholds() -> tuple[int, int] | None:
    """The kernel's (background write-back, writer throttling) dirty-page thresholds in bytes,
    as ``vm.dirty_*`` set them against available memory; None where not known."""
    try:
        with open("/proc/meminfo") as f:
            meminfo = {line.split(":")[0]: line.split()[1] for line in f}
        available = int(meminfo.get("MemAvailable", meminfo["MemFree"])) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None
    out = []
    for name in ("dirty_background", "dirty"):
        nbytes = _read_int(f"/proc/sys/vm/{name}_bytes")
        ratio = _read_int(f"/proc/sys/vm/{name}_ratio")
        if nbytes:
            out.append(nbytes)
        elif ratio is not None:
            out.append(available * ratio // 100)
        else:
            return None
    return out[0], out[1]


class _Pending:
    """Bytes of every output open for writing in this process: one sweep writes many at once."""

    lock = threading.Lock()
    open_bytes = 0


def _forced() -> bool | None:
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("1", "on", "yes", "true"):
        return True
    if value in ("0", "off", "no", "false"):
        return False
    return None


class WriteBehind:
    """Write-back of one output file, started as regions are written and bounded to ``window``.

    Call :meth:`wrote` after each region reaches the file (from any thread) and :meth:`close`
    when the file is done or discarded.  Whether it engages is decided at each call, against the
    bytes of every output open in the process, so a sweep's ten outputs count together."""

    def __init__(self, fd: int, nbytes: int, window: int | None = None) -> None:
        self.fd = fd
        self.nbytes = nbytes
        self.window = WINDOW if window is None else window
        self._lock = threading.Lock()
        self._queued: collections.deque[tuple[int, int]] = collections.deque()
        self._queued_bytes = 0
        self._closed = False
        with _Pending.lock:
            _Pending.open_bytes += nbytes
        forced = _forced()
        if forced is None:
            limits = dirty_thresholds()
            self._threshold = limits[0] if limits is not None else None
        else:
            self._threshold = 0 if forced else None

    @property
    def engaged(self) -> bool:
        """Whether write-behind runs now: supported, and the open outputs exceed the threshold."""
        return (
            _sync_file_range is not None
            and self._threshold is not None
            and _Pending.open_bytes > self._threshold
        )

    def wrote(self, offset: int, nbytes: int) -> None:
        """``[offset, offset + nbytes)`` has just been written: queue it for the device, and wait
        for the oldest queued regions beyond the window (then drop them from the cache)."""
        if nbytes <= 0 or not self.engaged:
            return
        start_writeback(self.fd, offset, nbytes)
        done: list[tuple[int, int]] = []
        with self._lock:
            if self._closed:
                return
            self._queued.append((offset, nbytes))
            self._queued_bytes += nbytes
            while self._queued_bytes > self.window:
                region = self._queued.popleft()
                self._queued_bytes -= region[1]
                done.append(region)
        for off, n in done:  # outside the lock: other threads keep writing meanwhile
            if wait_writeback(self.fd, off, n):
                drop_cached(self.fd, off, n)

    def close(self) -> None:
        """Stop: the file is complete or discarded (its last window is left to the kernel, or to
        the commit's ``fsync``).  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queued.clear()
        with _Pending.lock:
            _Pending.open_bytes -= self.nbytes


class Readahead:
    """Ask for the ``ahead`` bytes of an input past each position the reader reaches, in steps of
    half of it, so a sequential scan never waits for a read it could have started earlier.

    ``hint(offset, nbytes)`` starts the read: ``functools.partial(prefetch, fd)`` for a descriptor,
    ``functools.partial(prefetch_mapped, mm)`` for a memory map."""

    def __init__(self, size: int, hint: Callable[[int, int], bool], ahead: int | None = None) -> None:
        self.size = size
        self.hint: Callable[[int, int], bool] | None = hint
        self.ahead = AHEAD if ahead is None else ahead
        self._requested = 0  # the file is requested up to here

    def reached(self, offset: int) -> None:
        """The reader is at ``offset``: request up to ``offset + ahead`` if less than half of that
        is requested already.  Racy by design across threads: a lost update repeats a hint."""
        want = min(self.size, offset + self.ahead)
        have = self._requested
        if want - max(have, offset) < self.ahead // 2 and have >= offset:
            return
        begin, hint = max(have, offset), self.hint
        if want > begin and hint is not None and hint(begin, want - begin):
            self._requested = want

    def close(self) -> None:
        """Drop the hint (and what it holds: a map, a descriptor); later positions ask nothing."""
        self.hint = None
