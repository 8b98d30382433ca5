"""The SPDY/3.1 codec against github.com/moby/spdystream, the library under
kubectl's and kubelet's exec, attach and port-forward: a Go client on it
talks to an echo server built on our codec, and a Python client built on our
codec talks to a Go echo server. Raw TCP, no HTTP upgrade: this is about the
framing, header compression and stream lifecycle.

Needs Debian's Go toolchain and the library's source package; without them
the test fails (it does not skip) and says what to install."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.streaming import spdy

SOURCE = Path(__file__).parent / "spdyclient"
GOPATH = Path("/usr/share/gocode")
APT = "apt-get install -y golang-go golang-github-docker-spdystream-dev"
BIG = 200_000  # as in main.go


def pattern(n: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(n))


@pytest.fixture(scope="module")
def spdyclient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    if go is None or not (GOPATH / "src/github.com/moby/spdystream").is_dir():
        pytest.fail(f"the Go toolchain and the spdystream library are missing; install them with: {APT}")
    out = tmp_path_factory.mktemp("go") / "spdyclient"
    env = {**os.environ, "GOPATH": str(GOPATH), "GO111MODULE": "off", "GOFLAGS": ""}
    if not ({"GOCACHE", "XDG_CACHE_HOME", "HOME"} & env.keys()):  # go build needs a cache directory
        env["GOCACHE"] = str(out.parent / "cache")
    built = subprocess.run(
        [go, "build", "-o", str(out), "."], cwd=SOURCE, env=env, capture_output=True, text=True, timeout=300
    )
    assert built.returncode == 0, f"go build failed:\n{built.stderr}"
    return out


class EchoServer:
    """One SPDY connection served on a thread: every stream is accepted and
    its data and FIN echoed; pings from the client are answered; the server
    sends SETTINGS and a PING of its own first. `events` records what came in."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.events: list[tuple[object, ...]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.listener.settimeout(60)
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(30)
                self._serve(conn)
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def _serve(self, conn: socket.socket) -> None:
        encoder, decoder = spdy.Encoder(), spdy.Decoder()
        flow = spdy.FlowControl(enforce_receive=False)  # spdystream never looks at windows

        def send(*frames: spdy.Frame) -> None:
            conn.sendall(b"".join(encoder.encode(f) for f in frames))

        send(spdy.Settings((spdy.Setting(spdy.SettingId.INITIAL_WINDOW_SIZE, spdy.INITIAL_WINDOW),)), spdy.Ping(2))
        while chunk := conn.recv(65536):
            decoder.feed(chunk)
            for frame in decoder:
                match frame:
                    case spdy.SynStream(sid, headers):
                        self.events.append(("syn", sid, frozenset(headers)))
                        flow.open(sid)
                        send(spdy.SynReply(sid, (("x-echo", "yes"),)))
                    case spdy.Data(sid, data, fin):
                        self.events.append(("data", sid, len(data), fin))
                        flow.received(sid, len(data))
                        send(spdy.Data(sid, data, fin), *flow.consumed(sid, len(data)))
                    case spdy.Ping(ping_id):
                        self.events.append(("ping", ping_id))
                        if ping_id % 2:
                            send(frame)
                    case spdy.RstStream(sid, status):
                        self.events.append(("rst", sid, status))
                        flow.close(sid)
                    case spdy.GoAway(last, status):
                        self.events.append(("goaway", last, status))
                        return
                    case _:
                        self.events.append((type(frame).__name__,))


def test_go_client_against_python_server(spdyclient: Path):
    server = EchoServer()
    run = subprocess.run(
        [str(spdyclient), "client", f"127.0.0.1:{server.port}"], capture_output=True, text=True, timeout=60
    )
    server.thread.join(10)
    assert server.error is None
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines() == [
        "connected",
        "stream 1 replied",
        "stream 3 replied",
        "echo 1: hello over SPDY",
        f"echo 3: {BIG} bytes equal=true",
        "ping answered",
        "stream 1 half-closed both ways",
        "stream 3 reset",
        "done",
    ]
    ev = server.events
    assert [e for e in ev if e[0] == "syn"] == [
        ("syn", 1, frozenset({("streamtype", "stdout"), ("x-multi", "a"), ("x-multi", "b")})),
        ("syn", 3, frozenset({("streamtype", "data"), ("port", "8080")})),
    ]
    assert ("ping", 2) in ev  # spdystream echoed the server's even ping
    assert ("ping", 1) in ev  # and sent its own odd one
    data = [e for e in ev if e[0] == "data"]
    assert sum(e[2] for e in data if e[1] == 1) == len("hello over SPDY")
    assert sum(e[2] for e in data if e[1] == 3) == BIG
    assert ("data", 1, 0, True) in ev  # Close() is an empty DATA frame with FIN
    assert ("rst", 3, spdy.RstStatus.CANCEL) in ev
    assert ev[-1] == ("goaway", 0, spdy.GoAwayStatus.OK)
    # spdystream sends no SETTINGS and no WINDOW_UPDATE, whatever the windows
    assert not [e for e in ev if e[0] in ("Settings", "WindowUpdate")]


@pytest.fixture
def go_server(spdyclient: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen([str(spdyclient), "server"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().split()
        assert first[:1] == ["listening"], first
        yield proc, int(first[1].rsplit(":", 1)[1])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_python_client_against_go_server(go_server: tuple[subprocess.Popen[str], int]):
    proc, port = go_server
    encoder, decoder = spdy.Encoder(), spdy.Decoder()
    payload = pattern(BIG)
    frames: list[spdy.Frame] = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:

        def send(*out: spdy.Frame) -> None:
            conn.sendall(b"".join(encoder.encode(f) for f in out))

        def until(done: object) -> None:
            while not done():  # type: ignore[operator]
                chunk = conn.recv(65536)
                assert chunk, f"connection closed early after {frames}"
                decoder.feed(chunk)
                frames.extend(decoder)

        send(
            spdy.SynStream(1, (("streamtype", "stdin"), ("x-multi", "a"), ("x-multi", "b"))),
            spdy.SynStream(3, (("streamtype", "error"),), priority=2),
        )
        until(lambda: {1, 3} <= {f.stream_id for f in frames if isinstance(f, spdy.SynReply)})
        assert spdy.SynReply(1, (("x-reply", "yes"),)) in frames
        # a peer that honoured windows would stall here: spdystream sends no WINDOW_UPDATE
        send(spdy.Data(1, b"abc"), spdy.Headers(1, (("resize", "80x24"),)))
        for off in range(0, BIG, 32 * 1024):
            send(spdy.Data(1, payload[off : off + 32 * 1024]))
        send(spdy.Data(1, b"", fin=True), spdy.Ping(1))

        def echoed() -> bytes:
            return b"".join(f.data for f in frames if isinstance(f, spdy.Data) and f.stream_id == 1)

        until(lambda: any(isinstance(f, spdy.Data) and f.fin for f in frames) and spdy.Ping(1) in frames)
        assert echoed() == b"abc" + payload
        assert spdy.Headers(1, (("resize", "80x24"),)) in frames
        send(spdy.RstStream(3, spdy.RstStatus.CANCEL), spdy.GoAway(0))
    out, err = proc.communicate(timeout=30)
    lines = out.splitlines()
    assert proc.returncode == 0, out + err
    assert "stream 1 opened: streamtype=stdin x-multi=a,b" in lines
    assert "stream 3 opened: streamtype=error" in lines
    assert f"stream 1 echoed {3 + BIG} bytes" in lines
    assert lines[-1] == "connection closed"
    assert not any(isinstance(f, spdy.WindowUpdate | spdy.Settings) for f in frames)
