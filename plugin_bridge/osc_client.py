"""A small pure-Python OSC client for the Segue server: scripts, tests, benchmarks, Ableton Live.

    with OscClient("127.0.0.1", 9100) as client:
        request_id = client.continue_clip({"clip": clip, "bars": 4})
        for event in client.stream(request_id):
            print(event)          # {"type": "note", ...}, ..., {"type": "done", ...}, {"type": "finished", ...}

        client.prepare_clip({"clip": clip, "bars": 4})   # when the musician selects the clip: the continue
                                                         # of that very request sends its first note at once

Live's embedded Python cannot load compiled extensions, so this module uses only the standard
library, python-osc's pure message builder/parser and the two pure modules beside it
(`osc_guard`, `osc_messages`); copy those four into a Remote Script folder and it works there.
For Live's scheduled tick, use `poll()` (never blocks) instead of `stream()`.

Large requests are split into `/segue/continue/chunk` messages of at most `max_datagram` bytes
(8000 by default: macOS refuses to send UDP datagrams over 9216 bytes) and sent through a sliding
window paced by the server's `/segue/chunk_ack`, so a 1 MiB clip does not overflow a UDP receive buffer.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from pythonosc.osc_message import OscMessage

from plugin_bridge import osc_messages as msgs
from plugin_bridge.osc_guard import OscGuardError, check_datagram

log = logging.getLogger("segue.osc.client")

TERMINAL = frozenset({"finished", "error", "cancelled", "prepared"})  # "prepared" ends a prepare request


class OscClient:
    """Talks to a Segue OSC server at host:port; replies arrive on its own socket bound to bind_host:0."""

    def __init__(self, host: str = "127.0.0.1", port: int = 9100, timeout: float = 10.0, max_datagram: int = 8000,
                 window: int = 8, ack_timeout: float = 1.0, retries: int = 3, bind_host: str = "127.0.0.1"):
        family, _, _, _, server = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        self.server: tuple = server
        if family == socket.AF_INET6 and bind_host == "127.0.0.1":
            bind_host = "::1"
        self.timeout = timeout
        self.max_datagram = max_datagram
        self.window = window
        self.ack_timeout = ack_timeout
        self.retries = retries
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        except OSError as exc:  # the OS may cap it; replies are small, this only helps long streams
            log.debug("could not enlarge the reply buffer: %s", exc)
        self._sock.bind((bind_host, 0))
        self._backlog: deque[dict] = deque()  # replies read while waiting for something else

    @property
    def reply_port(self) -> int:
        return self._sock.getsockname()[1]

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> OscClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- requests ----------------------------------------------------------------------------------

    def send(self, address: str, tags: str, args: Sequence[Any]) -> None:
        """Send one request: the reply port is put in front of `args` (tags without the leading 'i')."""
        self.send_raw(msgs.build_message(address, "i" + tags, [self.reply_port, *args]))

    def send_raw(self, data: bytes) -> None:
        self._sock.sendto(data, self.server)

    def ping(self, request_id: str | None = None) -> str:
        request_id = request_id or _new_id()
        self.send(msgs.PING, "s", [request_id])
        return request_id

    def hello(self, request_id: str | None = None) -> str:
        request_id = request_id or _new_id()
        self.send(msgs.HELLO, "s", [request_id])
        return request_id

    def cancel(self, request_id: str = "") -> None:
        """Cancel `request_id` (or, with "", whatever this client has running or uploading)."""
        self.send(msgs.CANCEL, "s", [request_id])

    def continue_clip(self, request: dict, request_id: str | None = None) -> str:
        """Send a continue request (the same JSON object as over ZeroMQ); split it when it is large. Returns its id."""
        return self._request("continue", request, request_id)

    def prepare_clip(self, request: dict, request_id: str | None = None) -> str:
        """Send a prepare request ({"clip": ..., "model": ...}; the continue object itself will do, and then the
        server also draws that continuation up to its first note, a head start): the server prefills the clip in
        the background and answers `prepared`. Split when large. Returns its id."""
        return self._request("prepare", request, request_id)

    def _request(self, kind: str, request: dict, request_id: str | None) -> str:
        request_id = str(request_id or request.get("id") or _new_id())
        body = {**request, "type": kind, "id": request_id}
        raw = json.dumps(body, separators=(",", ":")).encode("ascii")  # ASCII JSON can be split anywhere
        address, chunk_address = (msgs.PREPARE, msgs.PREPARE_CHUNK) if kind == "prepare" else (msgs.CONTINUE, msgs.CONTINUE_CHUNK)
        single = msgs.build_message(address, "iss", [self.reply_port, request_id, raw.decode("ascii")])
        if len(single) <= self.max_datagram:
            self.send_raw(single)
        else:
            self._upload(request_id, raw, chunk_address)
        return request_id

    def _upload(self, request_id: str, raw: bytes, address: str = msgs.CONTINUE_CHUNK) -> None:
        """Send `raw` as numbered chunks with at most `window` unacknowledged at a time (a sliding window).

        UDP drops what a full receive buffer cannot hold, so a 1 MiB burst loses chunks on a system
        with small default buffers (Linux: 208 KiB); the window keeps about window x max_datagram
        bytes in flight, and chunks not acknowledged within `ack_timeout` are sent again (`retries` times).
        """
        overhead = len(msgs.build_message(address, "isiis", [self.reply_port, request_id, 0, 0, ""]))
        piece = self.max_datagram - overhead - 4
        if piece < 64:
            raise ValueError(f"max_datagram {self.max_datagram} is too small for chunks of request {request_id!r}")
        chunks = [raw[i:i + piece].decode("ascii") for i in range(0, len(raw), piece)]
        count = len(chunks)
        unacked: set[int] = set()
        next_index, done, stalls = 0, 0, 0
        last_progress = time.monotonic()
        while done < count:
            while next_index < count and len(unacked) < self.window:
                self.send(address, "siis", [request_id, next_index, count, chunks[next_index]])
                unacked.add(next_index)
                next_index += 1
            event = self._read(max(0.0, last_progress + self.ack_timeout - time.monotonic()))
            if event is not None and event["type"] == "chunk_ack" and event["id"] == request_id:
                if event["index"] in unacked:
                    unacked.discard(event["index"])
                    done += 1
                    stalls, last_progress = 0, time.monotonic()
            elif event is not None:
                self._backlog.append(event)
                if event.get("id") == request_id:
                    return  # the server answered the request itself: an error, or the stream has begun
            elif time.monotonic() - last_progress >= self.ack_timeout:
                stalls += 1
                if stalls > self.retries:
                    raise TimeoutError(f"the server did not acknowledge chunks {sorted(unacked)} of request {request_id!r}")
                for index in sorted(unacked):
                    self.send(address, "siis", [request_id, index, count, chunks[index]])
                last_progress = time.monotonic()

    # --- replies -----------------------------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> dict | None:
        """The next reply as a protocol dict (chunk acks included), or None after `timeout` seconds."""
        if self._backlog:
            return self._backlog.popleft()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            event = self._read(left)
            if event is not None:
                return event

    def poll(self) -> list[dict]:
        """Every reply already waiting, without blocking (for a DAW script's scheduled tick)."""
        events = list(self._backlog)
        self._backlog.clear()
        while True:
            event = self._read(0.0)
            if event is None:
                return events
            events.append(event)

    def stream(self, request_id: str, timeout: float | None = None) -> Iterator[dict]:
        """Replies for `request_id` until finished, error or cancelled; other requests' replies wait in the backlog.

        Raises TimeoutError when the server stays silent for `timeout` seconds (default: the client's).
        """
        timeout = self.timeout if timeout is None else timeout
        others: list[dict] = []
        try:
            while True:
                event = self.receive(timeout)
                if event is None:
                    raise TimeoutError(f"no reply for request {request_id!r} within {timeout} s")
                if event["type"] == "chunk_ack":
                    continue  # only meaningful while uploading
                if event.get("id") != request_id:
                    others.append(event)
                    continue
                yield event
                if event["type"] in TERMINAL:
                    return
        finally:
            self._backlog.extend(others)

    def request(self, kind: str, timeout: float | None = None) -> dict:
        """Send ping or hello and wait for its answer (the pong/hello dict, or an error dict)."""
        request_id = self.ping() if kind == "ping" else self.hello()
        for event in self.stream(request_id, timeout):
            if event["type"] in ("pong", "hello", "error"):
                return event
        raise TimeoutError(f"no answer to {kind}")

    def _read(self, timeout: float) -> dict | None:
        """One datagram from the socket, decoded; None on timeout or for a datagram that is not a valid reply."""
        self._sock.settimeout(max(timeout, 0.0))  # 0 = non-blocking
        try:
            data, _ = self._sock.recvfrom(65536)
        except (BlockingIOError, TimeoutError):
            return None
        except ConnectionResetError:  # Windows: an earlier request found no server listening
            log.warning("the Segue server at %s:%s is not reachable", *self.server[:2])
            return None
        return decode_datagram(data)


def decode_datagram(data: bytes) -> dict | None:
    """A reply datagram -> protocol dict; None (logged) for anything malformed or not a message."""
    try:
        check_datagram(data, 65536)
        if not data.startswith(b"/"):
            raise OscGuardError("replies are single messages, not bundles")
        message = OscMessage(data)
    except Exception as exc:  # guarded first, but a client must survive anything that reaches its port
        log.warning("ignored a malformed reply (%s)", exc)
        return None
    return msgs.decode_reply(message.address, message.params)


def _new_id() -> str:
    return uuid.uuid4().hex[:12]
