"""The framing-independent half of exec and attach: run the request on the
backend with the session's streams and turn how it ended into an
`ExitStatus`; plus `ResizeQueue`, the terminal sizes a client sends as a
sequence of JSON objects ``{"Width": W, "Height": H}``."""

from __future__ import annotations

import json
import queue
import threading

import structlog

from agent.domain.errors import PodvisorError
from agent.domain.streaming import AttachRequest, ExecRequest
from agent.streaming.backend import ExitStatus, StreamBackend, Streams, TermSize

log = structlog.get_logger(__name__)

MAX_RESIZE_DOC = 4096


class ResizeQueue:
    """`Resizes` fed with raw bytes; `end` when the client's resize channel ends."""

    def __init__(self) -> None:
        self._q: queue.Queue[TermSize | None] = queue.Queue()
        self._buf = ""
        self._ended = threading.Event()
        self._decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> None:
        self._buf += data.decode(errors="replace")
        while True:
            text = self._buf.lstrip()
            if not text:
                self._buf = ""
                return
            try:
                doc, end = self._decoder.raw_decode(text)
            except json.JSONDecodeError:
                if len(text) > MAX_RESIZE_DOC:
                    log.info("resize channel carries no JSON; ignored")
                    self._buf = ""
                else:
                    self._buf = text
                return
            self._buf = text[end:]
            size = _term_size(doc)
            if size is not None:
                self._q.put(size)

    def end(self) -> None:
        self._ended.set()
        self._q.put(None)

    def get(self, timeout: float | None = None) -> TermSize | None:
        if self._ended.is_set() and self._q.empty():
            return None
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is None:
            self._q.put(None)  # every later call sees the end too
        return item


def _term_size(doc: object) -> TermSize | None:
    if not isinstance(doc, dict):
        return None
    w, h = doc.get("Width"), doc.get("Height")
    if not isinstance(w, int) or not isinstance(h, int) or not (0 <= w <= 0xFFFF and 0 <= h <= 0xFFFF):
        return None
    return TermSize(width=w, height=h)


def run(backend: StreamBackend, request: ExecRequest | AttachRequest, streams: Streams) -> ExitStatus:
    """What the client's error channel should report."""
    try:
        if isinstance(request, ExecRequest):
            return backend.exec(request.container_id, list(request.cmd), request.tty, streams)
        backend.attach(request.container_id, request.tty, streams)
        return ExitStatus(0)
    except PodvisorError as exc:
        return ExitStatus(code=1, message=exc.message)
    except OSError as exc:  # the client went away mid-session
        log.info("streaming session ended by the client", error=str(exc))
        return ExitStatus(code=1, message=f"stream closed: {exc}")
    except Exception:
        log.exception("streaming backend failed")
        return ExitStatus(code=1, message="internal error while running the command (see the agent's log)")
