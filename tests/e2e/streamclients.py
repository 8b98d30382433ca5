"""Real clients of the agent's streaming URLs for the e2e tests: the Go
client (tests/streaming/kubeclient, spdystream as client-go), the
``kubernetes`` Python client's WebSocket stream client, and podvisorctl, each
run against a real agent."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes.client import Configuration
from kubernetes.stream.ws_client import WSClient, get_websocket_url

from tests.streaming.gobuild import go_build

ROOT = Path(__file__).resolve().parents[2]


def build_kubeclient(out_dir: Path) -> Path:
    return go_build(ROOT / "tests" / "streaming" / "kubeclient", out_dir / "kubeclient")


def outcome(result: Path) -> dict[str, str]:
    """What ``kubeclient exec -result FILE`` wrote: protocol, exit, error."""
    return dict(line.split("=", 1) for line in result.read_text().splitlines())


class Proc:
    """A client subprocess whose stdout is collected by a thread, with
    stdin kept open for the test to type into."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self.out = bytearray()
        self.err = bytearray()
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=self._pump, args=(s, b), daemon=True)
                        for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.threads:
            t.start()

    def _pump(self, stream: Any, into: bytearray) -> None:
        while chunk := os.read(stream.fileno(), 65536):
            with self.cond:
                into += chunk
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def type(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def seen(self) -> str:
        with self.cond:
            return self.out.decode(errors="replace")

    def wait_for(self, text: str, timeout: float = 60) -> str:
        with self.cond:
            ok = self.cond.wait_for(lambda: text.encode() in self.out or self.proc.poll() is not None, timeout)
            ok = text.encode() in self.out
            out, err = self.out.decode(errors="replace"), self.err.decode(errors="replace")
        assert ok, (f"{text!r} not in the output of {self.argv[:3]} in {timeout}s:\n{out[-3000:]}\n"
                    f"stderr:\n{err[-3000:]}")
        return out

    def line(self, timeout: float = 60) -> str:
        """The next whole stdout line not read by ``line`` before."""
        with self.cond:
            start = getattr(self, "_pos", 0)
            ok = self.cond.wait_for(lambda: b"\n" in self.out[start:] or self.proc.poll() is not None, timeout)
            if not ok or b"\n" not in self.out[start:]:
                raise AssertionError(f"no line from {self.argv[:3]}: {self.out[start:]!r} "
                                     f"stderr: {self.err.decode(errors='replace')[-2000:]}")
            end = self.out.index(b"\n", start)
            self._pos = end + 1
            return self.out[start:end].decode(errors="replace")

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{self.argv[:3]} did not end: {self.out[-2000:]!r} {self.err[-2000:]!r}") from None
        for t in self.threads:
            t.join(30)
        return rc, self.out.decode(errors="replace"), self.err.decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        for t in self.threads:
            t.join(30)


def ctl_argv(socket_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli.main", "--socket", str(socket_path), "--timeout", "60", *args]


def ctl_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PODVISOR_SOCKET"}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def ctl(socket_path: Path, *args: str, stdin: bytes | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(ctl_argv(socket_path, *args), input=stdin if stdin is not None else b"",
                          capture_output=True, timeout=timeout, env=ctl_env())


def ws_client(url: str) -> WSClient:
    return WSClient(Configuration(), get_websocket_url(url), None, capture_all=True)


def ws_read_until(ws: WSClient, text: str, channel: int = 1, timeout: float = 120,
                  retype: str | None = None) -> str:
    """Reads ``channel`` until ``text`` came (typing ``retype`` on stdin
    every few seconds when given, for a console that needs a nudge)."""
    seen = ""
    deadline = time.monotonic() + timeout
    next_type = 0.0
    while text not in seen:
        assert time.monotonic() < deadline, f"{text!r} never came on channel {channel}; got {seen[-3000:]!r}"
        assert ws.is_open(), f"the session ended before {text!r}; got {seen[-3000:]!r}"
        if retype is not None and time.monotonic() >= next_type:
            ws.write_stdin(retype)
            next_type = time.monotonic() + 5
        ws.update(timeout=1)
        seen += ws.read_channel(channel)
    return seen


def ws_finish(ws: WSClient, timeout: float = 120) -> None:
    ws.run_forever(timeout=timeout)
    assert not ws.is_open(), "the session did not end"


def http_get_local(port: int, expect: str, timeout: float = 60) -> str:
    """GET / through a local forwarded port; the whole reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    reply = data.decode(errors="replace")
    assert reply.startswith("HTTP/1.") and expect in reply, reply
    return reply


def wait_tcp(host: str, port: int, timeout: float = 120) -> None:
    """Until something accepts on ``host:port`` (a guest's server starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
