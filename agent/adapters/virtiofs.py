"""The pod volumes on the host: host paths inspected, one virtiofsd per VM.

``inspect`` resolves a container's CRI mounts before anything is written (a
missing host path is the client's mistake, named by its field). ``start``
runs ``virtiofsd`` for a VM right before its domain starts: through
``unshare`` in a private mount namespace, where ``agent.adapters.
virtiofs_launch`` builds the share's root out of bind mounts and becomes
virtiofsd. Its pid is recorded in the container's directory; ``stop`` ends
it (after checking that the pid still is that virtiofsd, by its command
line) and removes its socket and files. A virtiofsd whose pid file a crash
did not let us write is found by its unique socket path in its command line.

libvirt does not start or stop this virtiofsd (the domain's ``<filesystem>``
names only the socket): QEMU connects to it when the domain starts, and
virtiofsd ends by itself when QEMU goes away.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import structlog

from agent.adapters.atomic import write_atomic
from agent.domain.errors import FailedPrecondition, Internal, InvalidArgument, NotFound
from agent.domain.volumes import Mount, Share, shares

log = structlog.get_logger(__name__)

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
SPEC_FILE = "virtiofs.json"
PID_FILE = "virtiofsd.pid"
LOG_FILE = "virtiofsd.log"
ROOT_DIR = "volumes"
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
_POLL_S = 0.05


class VirtiofsHost:
    """The ``VolumeHost`` port. ``socket_owner`` is the (uid, gid) QEMU runs as: the
    socket is handed to it (None leaves it root's, for a QEMU running as root)."""

    def __init__(self, socket_owner: tuple[int, int] | None = None, virtiofsd: str = VIRTIOFSD) -> None:
        self._owner = socket_owner
        self._virtiofsd = virtiofsd
        self._lock = threading.Lock()

    # CreateContainer ----------------------------------------------------------------

    def inspect(self, mounts: tuple[Mount, ...]) -> tuple[Share, ...]:
        """The share's entries; NotFound / InvalidArgument naming ``config.mounts[i].host_path``."""
        dirs = []
        for i, m in enumerate(mounts):
            field = f"config.mounts[{i}].host_path"
            real = os.path.realpath(m.host_path)
            try:
                st = os.stat(real)
            except FileNotFoundError:
                raise NotFound(f"{field}: {m.host_path!r} does not exist on this host") from None
            except OSError as exc:
                raise InvalidArgument(field, f"{m.host_path!r} cannot be read: {exc.strerror}") from None
            if stat.S_ISDIR(st.st_mode):
                dirs.append(True)
            elif stat.S_ISREG(st.st_mode):
                dirs.append(False)
            else:
                raise InvalidArgument(field, f"{m.host_path!r} is neither a directory nor a regular file; "
                                             "a VM gets block devices through config.devices")
        return shares(mounts, tuple(dirs))

    # StartContainer / stop ------------------------------------------------------------

    def start(self, directory: str, socket: str, entries: tuple[Share, ...]) -> int:
        """Run the VM's virtiofsd and wait until its socket is there; its pid.
        FailedPrecondition (nothing left running) when it cannot be served."""
        try:
            return self._start(directory, socket, entries)
        except OSError as exc:
            self.stop(directory, socket)
            raise FailedPrecondition(f"cannot serve the pod volumes: {exc}") from None

    def _start(self, directory: str, socket: str, entries: tuple[Share, ...]) -> int:
        d = Path(directory)
        self.stop(directory, socket)  # what an interrupted start left
        root = d / ROOT_DIR
        root.mkdir(mode=0o700, exist_ok=True)
        spec = {"root": str(root), "socket": socket, "virtiofsd": self._virtiofsd,
                "entries": [{"name": s.name, "source": s.mount.host_path, "dir": s.is_dir,
                             "readonly": s.mount.readonly} for s in entries]}
        spec_path = d / SPEC_FILE
        write_atomic(str(spec_path), json.dumps(spec).encode())
        Path(socket).parent.mkdir(parents=True, exist_ok=True)
        argv = ["unshare", "--mount", "--propagation", "private", "--",
                sys.executable, "-m", "agent.adapters.virtiofs_launch", str(spec_path)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        with open(d / LOG_FILE, "ab") as logf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    start_new_session=True, close_fds=True, env=env)
        write_atomic(str(d / PID_FILE), f"{proc.pid}\n".encode())
        threading.Thread(target=proc.wait, name=f"virtiofsd-{proc.pid}", daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if _is_socket(socket):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop(directory, socket)
                raise FailedPrecondition(
                    f"virtiofsd for the pod volumes did not start: {_last_line(d / LOG_FILE)}")
            time.sleep(_POLL_S)
        if self._owner is not None:
            os.chown(socket, *self._owner)
        log.info("virtiofsd started", pid=proc.pid, socket=socket, mounts=len(entries))
        return proc.pid

    def stop(self, directory: str, socket: str) -> None:
        """End the VM's virtiofsd (if it runs) and remove its socket, pid file and spec."""
        d = Path(directory)
        pids = set(_ours(socket))
        recorded = _read_pid(d / PID_FILE)
        if recorded is not None and _is_ours(recorded, socket):
            pids.add(recorded)
        for pid in pids:
            _end(pid)
        if pids:
            log.info("virtiofsd stopped", pids=sorted(pids), socket=socket)
        for path in (Path(socket), d / PID_FILE, d / SPEC_FILE):
            path.unlink(missing_ok=True)

    def running(self, directory: str, socket: str) -> bool:
        return bool(_ours(socket))

    # Reads -----------------------------------------------------------------------------

    def read_head(self, path: str, limit: int) -> bytes:
        """Up to ``limit`` bytes from the start of a file (b"" when it cannot be read)."""
        try:
            with open(path, "rb") as f:
                return f.read(limit)
        except OSError:
            return b""

    def read_tail(self, path: str, limit: int) -> bytes:
        """Up to ``limit`` bytes from the end of a file (b"" when it cannot be read)."""
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - limit))
                return f.read(limit)
        except OSError:
            return b""


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1][:500] if lines else "no output"


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode("utf-8", "replace").split("\0")


def _is_ours(pid: int, socket: str) -> bool:
    """Whether ``pid`` is the virtiofsd (or its launcher) serving ``socket``."""
    args = _cmdline(pid)
    if f"--socket-path={socket}" in args:
        return True
    # The launcher, before it became virtiofsd: its spec sits beside the pid file.
    return "agent.adapters.virtiofs_launch" in args and any(a.endswith("/" + SPEC_FILE) for a in args) and \
        _spec_socket(args[-1]) == socket


def _spec_socket(spec_path: str) -> str:
    try:
        return str(json.loads(Path(spec_path).read_text()).get("socket", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _ours(socket: str) -> list[int]:
    """Processes serving ``socket`` (its path is unique to one VM)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _is_ours(int(entry.name), socket):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z"


def _end(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError as exc:
            raise Internal(f"cannot stop virtiofsd (pid {pid}): {exc}") from None
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(_POLL_S)
