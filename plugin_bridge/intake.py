"""Requests decoded and validated off the transports' I/O threads, in order per client.

    intake = Intake(service_handle)
    intake.submit_bytes(client, raw, protocol.decode_json, emit)   # from a transport's I/O thread
    intake.submit(client, {"type": "cancel", "id": "c1"}, emit)     # an already decoded request

Decoding and checking a 20,000-note request takes about half a second of Python (JSON, then every
note validated); on the I/O thread that delays every other client's ping by as much, six such
requests by seconds. Here a request over `INLINE_BYTES` goes to one background thread, and so does
everything a client sends after it until it is handled, so one client's requests keep their order
(a cancel never overtakes the continue it cancels). Pings and hellos are answered at once whatever
is queued: they change nothing and the protocol promises they are never delayed. Small requests
from a client with nothing queued are handled at once, as before.

The queue is bounded: in bytes for all clients together and in requests per client; beyond either
the request is answered `busy` at once and nothing is kept.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from plugin_bridge import protocol

log = logging.getLogger("segue.intake")

Emit = Callable[[dict], None]
Handle = Callable[[str, object, Emit], None]
Decode = Callable[[bytes], object]

INLINE_BYTES = 4096  # a ping, a cancel or a short clip: decoded at once, microseconds
MAX_QUEUED_BYTES = 64 * 1024 * 1024  # raw requests waiting, all clients together
MAX_QUEUED_PER_CLIENT = 8
_ANSWERED_AT_ONCE = ("ping", "hello")


@dataclass
class _Item:
    client: str
    size: int
    emit: Emit
    raw: bytes | None = None  # still to decode with `decode`
    decode: Decode | None = None
    payload: object = None  # already decoded
    request_id: str | None = None  # for a `busy` answer before the request is decoded (known to OSC)


class Intake:
    def __init__(self, handle: Handle, max_bytes: int = MAX_QUEUED_BYTES, max_per_client: int = MAX_QUEUED_PER_CLIENT):
        self._handle = handle
        self.max_bytes = max_bytes
        self.max_per_client = max_per_client
        self._queue: deque[_Item] = deque()
        self._pending: dict[str, int] = {}  # client -> its requests queued or being handled
        self._bytes = 0
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="segue-intake", daemon=True)
        self._thread.start()

    def submit_bytes(self, client: str, raw: bytes, decode: Decode, emit: Emit, request_id: str | None = None) -> None:
        """A request as the transport received it. Small ones are decoded here; the rest on the intake thread."""
        if len(raw) <= INLINE_BYTES:
            try:
                payload = decode(raw)
            except protocol.ProtocolError as exc:
                _answer_error(emit, exc)
                return
            self.submit(client, payload, emit)
            return
        self._enqueue(_Item(client, len(raw), emit, raw=raw, decode=decode, request_id=request_id))

    def submit(self, client: str, payload: object, emit: Emit) -> None:
        """A decoded request: handled now unless the client has requests queued ahead of it."""
        kind = payload.get("type") if isinstance(payload, dict) else None
        with self._lock:
            behind = self._pending.get(client, 0) > 0
        if kind in _ANSWERED_AT_ONCE or not behind:
            self._handle(client, payload, emit)
        else:
            self._enqueue(_Item(client, 0, emit, payload=payload))

    def queued(self, client: str | None = None) -> int:
        with self._lock:
            return sum(self._pending.values()) if client is None else self._pending.get(client, 0)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._queue.clear()
            self._ready.notify_all()
        self._thread.join(timeout=5)

    # --- internals -----------------------------------------------------------------------------------

    def _enqueue(self, item: _Item) -> None:
        with self._lock:
            refusal = self._refusal(item)
            if refusal is None:
                self._queue.append(item)
                self._pending[item.client] = self._pending.get(item.client, 0) + 1
                self._bytes += item.size
                self._ready.notify()
        if refusal is not None:
            _safe(item.emit, protocol.error_event(_request_id(item), protocol.BUSY, refusal))

    def _refusal(self, item: _Item) -> str | None:
        """Why `item` cannot be queued, or None. Called with the lock held."""
        if self._closing:
            return "the server is shutting down"
        if self._pending.get(item.client, 0) >= self.max_per_client:
            return f"this client already has {self.max_per_client} requests waiting to be read; wait for their replies"
        if self._bytes + item.size > self.max_bytes:
            return "the server is reading too many large requests at once; try again in a moment"
        return None

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._ready.wait()
                if self._closing:
                    return
                item = self._queue.popleft()
            try:
                self._process(item)
            except Exception:  # the service answers its own errors; this guards the thread itself
                log.exception("reading a request from %s failed", item.client)
            finally:
                with self._lock:
                    self._bytes -= item.size
                    left = self._pending[item.client] - 1
                    if left:
                        self._pending[item.client] = left
                    else:
                        del self._pending[item.client]

    def _process(self, item: _Item) -> None:
        payload = item.payload
        if item.raw is not None and item.decode is not None:
            try:
                payload = item.decode(item.raw)
            except protocol.ProtocolError as exc:
                _answer_error(item.emit, exc)
                return
        self._handle(item.client, payload, item.emit)


def _request_id(item: _Item) -> str | None:
    if isinstance(item.payload, dict) and isinstance(item.payload.get("id"), str):
        return item.payload["id"]
    return item.request_id


def _answer_error(emit: Emit, exc: protocol.ProtocolError) -> None:
    _safe(emit, protocol.error_event(exc.request_id, exc.code, exc.message))


def _safe(emit: Emit, event: dict) -> None:
    try:
        emit(event)
    except Exception:  # a transport's emit already never raises; a reply that cannot be sent is lost, not fatal
        log.debug("could not send %.200r", event)
