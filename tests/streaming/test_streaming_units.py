"""The streaming server's parts on their own: the token cache, protocol
negotiation, resize and status documents, and the SPDY session's frame
handling driven by our own codec over a socket pair."""

from __future__ import annotations

import json
import re
import socket
import threading

import pytest

from agent.domain.errors import ResourceExhausted
from agent.domain.streaming import AttachRequest, ExecRequest
from agent.streaming import spdy
from agent.streaming.backend import ExitStatus, TermSize
from agent.streaming.command import ResizeQueue
from agent.streaming.remotecommand import V1, V2, V3, V4, expected_streams
from agent.streaming.server import _Reject, negotiate, offered
from agent.streaming.session import Session, Stream
from agent.streaming.status import status_json, status_text
from agent.streaming.tokens import RequestCache

REQ = ExecRequest("c", ("true",), tty=False, stdin=False, stdout=True, stderr=True)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_tokens_are_8_url_safe_characters_and_single_use():
    cache = RequestCache()
    tokens = {cache.insert(REQ) for _ in range(200)}
    assert len(tokens) == 200
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{8}", t) for t in tokens)
    t = tokens.pop()
    assert cache.consume(t) == REQ
    assert cache.consume(t) is None
    assert cache.consume("AAAAAAAA") is None


def test_tokens_expire_after_a_minute():
    clock = Clock()
    cache = RequestCache(clock=clock)
    early, late = cache.insert(REQ), None
    clock.now += 59.9
    late = cache.insert(REQ)
    assert cache.consume(early) == REQ
    clock.now += 60
    assert cache.consume(late) is None


def test_at_most_max_outstanding_and_expired_ones_make_room():
    clock = Clock()
    cache = RequestCache(max_outstanding=3, clock=clock)
    for _ in range(3):
        cache.insert(REQ)
    with pytest.raises(ResourceExhausted):
        cache.insert(REQ)
    clock.now += 61
    assert len(cache) == 0
    cache.insert(REQ)
    assert len(cache) == 1


def test_offered_protocols_repeated_and_comma_separated():
    assert offered([b"v4.channel.k8s.io, v3.channel.k8s.io", b"channel.k8s.io"]) == [
        "v4.channel.k8s.io", "v3.channel.k8s.io", "channel.k8s.io"]


def test_negotiation_picks_the_clients_first_supported():
    assert negotiate(["v5.channel.k8s.io", V3, V4], (V4, V3, V2, V1)) == V3
    with pytest.raises(_Reject) as err:
        negotiate([], (V4,))
    assert err.value.status == 400
    with pytest.raises(_Reject) as err:
        negotiate(["v9"], (V4, V3))
    assert err.value.status == 403
    assert err.value.headers == [("X-Accepted-Stream-Protocol-Versions", V4),
                                 ("X-Accepted-Stream-Protocol-Versions", V3)]


@pytest.mark.parametrize(("tty", "stdin", "stderr", "protocol", "want"), [
    (False, False, True, V4, {"error", "stdout", "stderr"}),
    (False, True, False, V2, {"error", "stdin", "stdout"}),
    (True, True, True, V4, {"error", "stdin", "stdout", "resize"}),  # a tty has no stderr stream
    (True, True, False, V3, {"error", "stdin", "stdout", "resize"}),
    (True, True, False, V2, {"error", "stdin", "stdout"}),  # resize came with v3
    (True, False, False, V1, {"error", "stdout"}),
])
def test_expected_streams(tty: bool, stdin: bool, stderr: bool, protocol: str, want: set[str]):
    req = AttachRequest("c", tty=tty, stdin=stdin, stdout=True, stderr=stderr)
    assert expected_streams(req, protocol) == want


def test_resize_documents_split_anywhere_and_garbage_skipped():
    q = ResizeQueue()
    q.feed(b'{"Width":80,"Hei')
    assert q.get(timeout=0.01) is None
    q.feed(b'ght":24}\n{"Width":-1,"Height":2}["x"]{"Width":70000,"Height":1} {"Width":100,"Height":30}')
    assert q.get(timeout=1) == TermSize(80, 24)
    assert q.get(timeout=1) == TermSize(100, 30)
    q.end()
    assert q.get(timeout=1) is None
    assert q.get() is None  # the end is seen again, without blocking


def test_status_documents():
    assert json.loads(status_json(ExitStatus(0))) == {"metadata": {}, "status": "Success"}
    doc = json.loads(status_json(ExitStatus(3)))
    assert doc["status"] == "Failure" and doc["reason"] == "NonZeroExitCode"
    assert doc["details"] == {"causes": [{"reason": "ExitCode", "message": "3"}]}
    doc = json.loads(status_json(ExitStatus(1, "no guest agent")))
    assert (doc["status"], doc["message"], doc["reason"], doc["code"]) == (
        "Failure", "no guest agent", "InternalError", 500)
    assert status_text(ExitStatus(0)) == b""
    assert status_text(ExitStatus(2)) == b"command terminated with non-zero exit code: exit status 2"
    assert status_text(ExitStatus(1, "boom")) == b"boom"


class Peer:
    """The client side of a SPDY session, on our own codec."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.enc, self.dec = spdy.Encoder(), spdy.Decoder()
        self.frames: list[spdy.Frame] = []
        sock.settimeout(10)

    def send(self, *frames: spdy.Frame) -> None:
        self.sock.sendall(b"".join(self.enc.encode(f) for f in frames))

    def until(self, done: object) -> None:
        while not done():  # type: ignore[operator]
            chunk = self.sock.recv(65536)
            assert chunk, f"closed; got {self.frames}"
            self.dec.feed(chunk)
            self.frames.extend(self.dec)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    accepted: list[Stream] = []

    def on_stream(s: Stream) -> bool:
        if s.header("streamtype") == "refuse":
            return False
        accepted.append(s)
        return True

    session = Session(a, on_stream, idle_timeout=30)
    t = threading.Thread(target=session.serve, daemon=True)
    t.start()
    yield Peer(b), session, accepted
    session.close()
    t.join(5)
    a.close()
    b.close()


def test_session_replies_echoes_pings_refuses_and_carries_data(pair):
    peer, session, accepted = pair
    peer.send(spdy.SynStream(1, (("streamtype", "stdin"),)), spdy.SynStream(3, (("streamtype", "refuse"),)),
              spdy.Ping(1), spdy.Ping(2))
    peer.until(lambda: spdy.Ping(1) in peer.frames and any(isinstance(f, spdy.RstStream) for f in peer.frames))
    assert spdy.SynReply(1) in peer.frames
    assert spdy.RstStream(3, spdy.RstStatus.REFUSED_STREAM) in peer.frames
    assert spdy.Ping(2) not in peer.frames  # an even ping is an answer, not a question
    [stream] = accepted
    peer.send(spdy.Data(1, b"hello "), spdy.Data(1, b"world", fin=True))
    assert stream.read_all() == b"hello world"
    writer = threading.Thread(target=lambda: (stream.write(b"x" * 70000), stream.close()))
    writer.start()  # the peer reads while it is written
    peer.until(lambda: any(isinstance(f, spdy.Data) and f.fin for f in peer.frames))
    writer.join(10)
    assert b"".join(f.data for f in peer.frames if isinstance(f, spdy.Data)) == b"x" * 70000
    with pytest.raises(BrokenPipeError):
        stream.write(b"after close")


def test_session_resets_even_and_repeated_stream_ids(pair):
    peer, _, accepted = pair
    peer.send(spdy.SynStream(5), spdy.SynStream(2), spdy.SynStream(3))
    peer.until(lambda: len([f for f in peer.frames if isinstance(f, spdy.RstStream)]) == 2)
    assert [f.stream_id for f in peer.frames if isinstance(f, spdy.RstStream)] == [2, 3]
    assert [s.id for s in accepted] == [5]


def test_client_reset_and_goaway_end_the_streams(pair):
    peer, session, accepted = pair
    peer.send(spdy.SynStream(1), spdy.SynStream(3))
    peer.until(lambda: len([f for f in peer.frames if isinstance(f, spdy.SynReply)]) == 2)
    one, three = accepted
    peer.send(spdy.RstStream(1, spdy.RstStatus.CANCEL))
    assert one.read(timeout=10) == b""
    assert one.reset_received
    peer.send(spdy.GoAway(3))
    assert session.done.wait(10)
    assert three.read(timeout=10) == b""
    with pytest.raises(OSError):
        three.write(b"late")


def test_a_broken_header_block_ends_the_session_with_goaway(pair):
    peer, session, _ = pair
    # a SYN_STREAM whose header block is not zlib at all
    frame = b"\x80\x03\x00\x01\x00\x00\x00\x0e" + b"\x00\x00\x00\x01\x00\x00\x00\x00" + b"\xff" * 6
    peer.sock.sendall(frame)
    peer.until(lambda: any(isinstance(f, spdy.GoAway) for f in peer.frames))
    assert session.done.wait(10)


def test_idle_session_is_closed():
    a, b = socket.socketpair()
    session = Session(a, lambda s: True, idle_timeout=0.3)
    t = threading.Thread(target=session.serve, daemon=True)
    t.start()
    try:
        assert session.done.wait(10)
        b.settimeout(10)
        dec = spdy.Decoder()
        data = b""
        while chunk := b.recv(1000):
            data += chunk
        dec.feed(data)
        assert list(dec) == [spdy.GoAway(0)]
    finally:
        t.join(5)
        a.close()
        b.close()


class _Echo:
    """A one-connection TCP echo server standing for a pod port."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data.upper())


def test_port_forward_pairs_without_request_id_and_lonely_streams():
    from agent.domain.streaming import PortForwardRequest
    from agent.streaming.portforward import PortForwarder
    from tests.streaming.localbackend import LocalBackend

    echo = _Echo()
    a, b = socket.socketpair()
    forwarder = PortForwarder(PortForwardRequest("sb", ()), LocalBackend({7: echo.port}), pair_timeout=0.5)
    session = Session(a, forwarder.on_stream, idle_timeout=30)
    t = threading.Thread(target=session.serve, daemon=True)
    t.start()
    peer = Peer(b)
    try:
        # an old client: no requestID, the data stream's id is the error stream's + 2
        peer.send(spdy.SynStream(1, (("streamtype", "error"), ("port", "7"))),
                  spdy.SynStream(3, (("streamtype", "data"), ("port", "7"))),
                  spdy.SynStream(5, (("streamtype", "data"), ("port", "0"))),  # bad port: refused
                  spdy.SynStream(7, (("streamtype", "error"), ("port", "7"), ("requestid", "9"))))  # never paired
        peer.send(spdy.Data(3, b"hello", fin=True))
        peer.until(lambda: any(isinstance(f, spdy.Data) and f.stream_id == 3 and f.fin for f in peer.frames)
                   and any(isinstance(f, spdy.RstStream) and f.stream_id == 7 for f in peer.frames))
        data = {sid: b"".join(f.data for f in peer.frames if isinstance(f, spdy.Data) and f.stream_id == sid)
                for sid in (1, 3, 7)}
        assert data[3] == b"HELLO"
        assert data[1] == b""  # no error for the pair
        assert data[7] == b"timed out waiting for the data and error streams of request 9"
        assert spdy.RstStream(5, spdy.RstStatus.REFUSED_STREAM) in peer.frames
    finally:
        session.close()
        t.join(5)
        a.close()
        b.close()
