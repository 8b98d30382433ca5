"""The request cache behind streaming URLs: each Exec, Attach or PortForward
call leaves its request here under a random token; the first HTTP request
for that token takes it out. Tokens are 8 characters of URL-safe base64
(6 random bytes), valid for ``ttl`` seconds, used once; at most
``max_outstanding`` wait at a time (expired ones are dropped to make room)."""

from __future__ import annotations

import base64
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from agent.domain.errors import ResourceExhausted
from agent.domain.streaming import StreamRequest

TOKEN_TTL = 60.0
MAX_OUTSTANDING = 1000


def new_token() -> str:
    return base64.urlsafe_b64encode(os.urandom(6)).decode()


class RequestCache:
    def __init__(self, ttl: float = TOKEN_TTL, max_outstanding: int = MAX_OUTSTANDING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._max = max_outstanding
        self._clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[str, tuple[float, StreamRequest]] = OrderedDict()  # oldest first

    def _expire(self, now: float) -> None:
        while self._items:
            token, (deadline, _) = next(iter(self._items.items()))
            if deadline > now:
                return
            del self._items[token]

    def insert(self, request: StreamRequest) -> str:
        with self._lock:
            now = self._clock()
            self._expire(now)
            if len(self._items) >= self._max:
                raise ResourceExhausted(
                    f"{self._max} streaming requests are already waiting for their client; try again later")
            token = new_token()
            while token in self._items:
                token = new_token()
            self._items[token] = (now + self._ttl, request)
            return token

    def consume(self, token: str) -> StreamRequest | None:
        """The request of a valid token, once; None when unknown, used or expired."""
        with self._lock:
            item = self._items.pop(token, None)
            if item is None or item[0] <= self._clock():
                return None
            return item[1]

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._items)
