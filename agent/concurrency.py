"""Concurrency helpers shared by services and adapters (no I/O of their own
beyond following a file another thread writes).

* :class:`SingleFlight`: callers asking for the same key while a call runs
  share its outcome (concurrent pulls of one reference, downloads of one blob).
* :class:`KeyedLock`: one lock per key, alive only while used.
* Reading a blob while it downloads, so extraction overlaps the download: the
  downloader writes the blob to its temporary file and reports progress to a
  :class:`BlobProgress`; a :class:`FollowReader` in another thread follows the
  file as it grows (the page cache makes that a memory copy). If the download
  restarts from zero (a broken stream retried), the reader raises
  :class:`Restarted` and the consumer starts over; if the download fails, the
  reader raises its error.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class _Flight(Generic[T]):
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class SingleFlight(Generic[T]):
    """Callers asking for the same key while a call runs share its outcome."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight[T]] = {}

    def do(self, key: str, fn: Callable[[], T]) -> tuple[T, bool]:
        """(result, whether this caller did the work)."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.result, False  # type: ignore[return-value]
        try:
            flight.result = fn()
            return flight.result, True
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()


class KeyedLock:
    """One lock per key; a key's lock exists only while someone holds or awaits it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Hold ``key``'s lock for the ``with`` block."""
        with self._lock:
            lock, users = self._locks.get(key) or (threading.Lock(), 0)
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                users = self._locks[key][1] - 1
                if users:
                    self._locks[key] = (lock, users)
                else:
                    del self._locks[key]


# --- following a blob while it downloads ---------------------------------------


class Restarted(Exception):
    """The download began again from the first byte."""


class BlobProgress:
    """Shared state between one download (writer) and one follower (reader)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.path: str | None = None
        self.written = 0
        self.generation = 0
        self.done = False
        self.error: BaseException | None = None

    # Writer side --------------------------------------------------------------

    def started(self, path: str) -> None:
        """The download writes to ``path`` from now on."""
        with self._cond:
            self.path = path
            self._cond.notify_all()

    def restarted(self) -> None:
        """The download begins again from the first byte."""
        with self._cond:
            self.written = 0
            self.generation += 1
            self._cond.notify_all()

    def wrote(self, n: int) -> None:
        """``n`` more bytes are in the file."""
        with self._cond:
            self.written += n
            self._cond.notify_all()

    def finished(self, error: BaseException | None = None) -> None:
        """The download is over: complete, or failed with ``error``."""
        with self._cond:
            self.done = True
            self.error = error
            self._cond.notify_all()

    # Reader side ----------------------------------------------------------------

    def wait_for(self, offset: int, generation: int) -> tuple[int, bool]:
        """Block until more than ``offset`` bytes exist; (written, finished)."""
        with self._cond:
            while True:
                if self.error is not None:
                    raise self.error
                if self.generation != generation:
                    raise Restarted()
                if self.written > offset or self.done:
                    return self.written, self.done
                self._cond.wait(5.0)

    def wait_path(self) -> tuple[str, int]:
        """Block until the download has a file; (its path, the generation)."""
        with self._cond:
            while True:
                # The error first: a failed download's file is gone, and opening
                # it would replace the download's error by FileNotFoundError.
                if self.error is not None:
                    raise self.error
                if self.path is not None:
                    return self.path, self.generation
                if self.done:
                    raise FileNotFoundError("download finished without a file")
                self._cond.wait(5.0)


class FollowReader(io.RawIOBase):
    """A raw reader over a file that another thread is still writing."""

    def __init__(self, progress: BlobProgress) -> None:
        super().__init__()
        self._progress = progress
        path, self._generation = progress.wait_path()
        # Opened now, it stays readable after the writer renames the file.
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        available, finished = self._progress.wait_for(self._pos, self._generation)
        if available <= self._pos and finished:
            return 0
        want = min(len(buffer), available - self._pos)
        n = os.readv(self._fd, [memoryview(buffer)[:want]])
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()
