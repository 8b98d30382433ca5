"""The VM's serial console as the container log, in the CRI log format.

virtlogd copies every byte the guest writes to its serial port into a raw
file (``<log file=... append='on'>`` in the domain), whether or not the agent
runs. One thread here follows those raw files and appends CRI lines
(``<RFC3339Nano> stdout F|P <text>``) to each container's log path.

No output is lost or written twice across agent restarts: the raw offset
consumed and the CRI log's size after the last write are saved together
after each batch. On restart, a CRI log longer than the saved size means the
last batch was written but not recorded: it is cut back and redone.

The CRI log lives in a directory kubelet (anyone with the CRI socket) names:
it is only ever opened relative to its opened directory with ``O_NOFOLLOW``,
so a symbolic link planted at its last component is never followed (the call
fails with FAILED_PRECONDITION naming the path; the link's target is
untouched), and never as a FIFO or device (``O_NONBLOCK``, then checked to be
a regular file).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog

from agent import faults
from agent.adapters.atomic import write_atomic
from agent.domain.errors import FailedPrecondition, PodvisorError

log = structlog.get_logger(__name__)

READ_LIMIT = 1 << 20
# A line without its newline is written as a partial ("P") record after this
# long, or once it is this big, so `kubectl logs -f` shows prompts.
PARTIAL_AFTER_S = 1.0
PARTIAL_MAX = 16 * 1024


def cri_timestamp(ns: int) -> bytes:
    """RFC 3339 with nanoseconds, UTC (what kubelet's parser expects)."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{nanos:09d}Z".encode()


def format_lines(data: bytes, now_ns: int, *, flush_partial: bool) -> tuple[bytes, int]:
    """CRI records for the complete lines in ``data``; (records, bytes consumed).

    CR LF and a trailing CR are dropped; an unfinished line is kept for later
    unless ``flush_partial`` (then it becomes a "P" record).
    """
    stamp = cri_timestamp(now_ns)
    out = []
    consumed = 0
    while True:
        nl = data.find(b"\n", consumed)
        if nl < 0:
            break
        line = data[consumed:nl].rstrip(b"\r")
        out.append(stamp + b" stdout F " + line + b"\n")
        consumed = nl + 1
    rest = data[consumed:]
    if rest and (flush_partial or len(rest) >= PARTIAL_MAX):
        out.append(stamp + b" stdout P " + rest.rstrip(b"\r") + b"\n")
        consumed = len(data)
    return b"".join(out), consumed


def open_cri_log(path: Path, flags: int = os.O_WRONLY | os.O_APPEND | os.O_CREAT) -> int:
    """Open (by default create, for appending) a CRI log file without
    following a symlink at its last component; FailedPrecondition naming the
    path for a symlink or anything but a regular file."""
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = os.open(path.name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o640, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise FailedPrecondition(f"container log {path} is a symbolic link or not a regular file; "
                                     "refusing to write through it") from None
        raise
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FailedPrecondition(f"container log {path} is not a regular file; refusing to write to it")
    return fd


@dataclass
class _Follower:
    container_id: str
    raw: Path
    cri: Path
    state_file: Path
    offset: int = 0  # raw bytes consumed (written as records)
    log_size: int = 0  # CRI log size after our last write
    inode: int = 0  # of the raw file ``offset`` refers to (virtlogd rotates it)
    pending_since: float = 0.0
    last_error: str = ""  # logged once, not at every pass
    lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self) -> None:
        try:
            doc = json.loads(self.state_file.read_text())
            self.offset, self.log_size = int(doc["offset"]), int(doc["log_size"])
            self.inode = int(doc.get("inode", 0))
            recorded = True
        except (OSError, ValueError, KeyError):
            self.offset = self.log_size = 0
            recorded = False
        if not self.cri.name:
            return
        self.cri.parent.mkdir(parents=True, exist_ok=True)
        # Created now (StartContainer fails here, clearly, on a planted link).
        fd = open_cri_log(self.cri)
        try:
            if recorded and os.fstat(fd).st_size > self.log_size:
                # Written but not recorded before a crash: undo, it will be redone.
                os.ftruncate(fd, self.log_size)
        finally:
            os.close(fd)

    def save(self) -> None:
        state = {"offset": self.offset, "log_size": self.log_size, "inode": self.inode}
        write_atomic(self.state_file, json.dumps(state).encode())

    def _read(self) -> bytes:
        try:
            st = self.raw.stat()
        except FileNotFoundError:
            return b""
        if not self.inode:
            self.inode = st.st_ino
        if st.st_ino != self.inode or st.st_size < self.offset:
            # virtlogd rotated the raw file (to <name>.0): finish the old one,
            # then continue from the start of the new one.
            rotated = self.raw.with_name(self.raw.name + ".0")
            try:
                with open(rotated, "rb") as f:
                    if os.fstat(f.fileno()).st_ino == self.inode:
                        f.seek(self.offset)
                        rest = f.read(READ_LIMIT)
                        if rest:
                            return rest
            except OSError:
                pass
            self.offset = 0
            self.inode = st.st_ino
        with open(self.raw, "rb") as f:
            f.seek(self.offset)
            return f.read(READ_LIMIT)

    def pump(self, now_ns: int, final: bool = False) -> int:
        """Move new console output into the CRI log; bytes of records written."""
        with self.lock:
            start_offset = self.offset
            data = self._read()
            if not data:
                return 0
            now = time.monotonic()
            if not self.pending_since:
                self.pending_since = now
            flush = final or now - self.pending_since >= PARTIAL_AFTER_S
            records, consumed = format_lines(data, now_ns, flush_partial=flush)
            if consumed:
                self.pending_since = 0.0 if consumed == len(data) else now
            if not records:
                if self.offset != start_offset:
                    self.save()
                return 0
            if self.cri.name:
                self.cri.parent.mkdir(parents=True, exist_ok=True)
                fd = open_cri_log(self.cri)
                try:
                    os.write(fd, records)
                    self.log_size = os.fstat(fd).st_size
                finally:
                    os.close(fd)
            self.offset += consumed
            self.save()
            return len(records)


class ConsoleLogs:
    """Follows the raw consoles of all running VMs from one thread."""

    def __init__(self, interval: float = 0.2, now_ns: Callable[[], int] = time.time_ns) -> None:
        self._interval = interval
        self._now_ns = now_ns
        self._followers: dict[str, _Follower] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress = time.monotonic()

    def progress(self) -> float:
        """When (monotonic) the follower's loop last went round: it turns while this moves."""
        return self._progress

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="console-logs", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for f in list(self._followers.values()):
            self._last_pump(f, final=False)

    def follow(self, container_id: str, raw: str, cri: str, state_file: str) -> None:
        """Start following; the CRI log is created now. FailedPrecondition
        naming the path when it cannot be (a symlink planted there, say)."""
        with self._lock:
            if container_id in self._followers:
                return
            f = _Follower(container_id, Path(raw), Path(cri) if cri else Path(""), Path(state_file))
            try:
                f.load()
            except OSError as exc:
                raise FailedPrecondition(f"cannot open the container log {cri}: {exc.strerror}") from None
            self._followers[container_id] = f

    def unfollow(self, container_id: str) -> None:
        """Write what is left (also an unfinished last line) and stop following."""
        with self._lock:
            f = self._followers.pop(container_id, None)
        if f is not None:
            self._last_pump(f, final=True)

    def _last_pump(self, f: _Follower, *, final: bool) -> None:
        # A log that cannot be written must not stop the VM's stop or removal.
        try:
            f.pump(self._now_ns(), final=final)
        except (OSError, PodvisorError) as exc:
            log.warning("console log copy failed", container_id=f.container_id,
                        error=exc.message if isinstance(exc, PodvisorError) else str(exc))

    def flush(self, container_id: str) -> None:
        with self._lock:
            f = self._followers.get(container_id)
        if f is not None:
            f.pump(self._now_ns())

    def reopen(self, container_id: str, cri: str) -> None:
        """ReopenContainerLog: kubelet moved the file away; start a new one now."""
        with self._lock:
            f = self._followers.get(container_id)
        try:
            os.close(open_cri_log(Path(cri)))
        except OSError as exc:
            raise FailedPrecondition(f"cannot reopen the container log {cri}: {exc.strerror}") from None
        if f is not None:
            with f.lock:
                f.log_size = 0
                f.save()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            faults.wedge("console-logs")  # tests only: a copy that never returns
            self._progress = time.monotonic()
            with self._lock:
                followers = list(self._followers.values())
            for f in followers:
                try:
                    f.pump(self._now_ns())
                    f.last_error = ""
                except (OSError, PodvisorError) as exc:
                    error = exc.message if isinstance(exc, PodvisorError) else str(exc)
                    if error != f.last_error:
                        log.warning("console log copy failed", container_id=f.container_id, error=error)
                    f.last_error = error
