"""The Segue OSC protocol over UDP, for Live's embedded Python: standard library only, never blocking.

Live's Python cannot load compiled extensions (no pyzmq) and does not ship python-osc, so this is
a small self-contained OSC 1.0 codec (int32, float32, string, blob; the types Segue's replies
use) plus `SegueLink`, a client whose `poll()` reads whatever replies are waiting and returns at
once. It follows docs/protocol.md section 6: the reply port goes first in every request, replies
may come from any source port, a request over `max_datagram` bytes travels as
`/segue/continue/chunk` (or `/segue/prepare/chunk`) pieces paced by `/segue/chunk_ack`. The reply table mirrors
`plugin_bridge/osc_messages.py`; tests/test_live_script.py checks both against each other.

Written for Python 3.7 (Live 11) and later.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: Live 11's Python 3.7 cannot evaluate these at run time
    from collections.abc import Callable, Sequence

    Arg = int | float | str | bytes
    Event = dict[str, Any]

HELLO = "/segue/hello"
PING = "/segue/ping"
CANCEL = "/segue/cancel"
CONTINUE = "/segue/continue"
CONTINUE_CHUNK = "/segue/continue/chunk"
PREPARE = "/segue/prepare"
PREPARE_CHUNK = "/segue/prepare/chunk"

# Replies (server -> us): address -> (type tags, field names); docs/protocol.md 6.2.
REPLIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "/segue/hello": ("sisss", ("id", "protocol", "server", "models", "default_model")),
    "/segue/pong": ("s", ("id",)),
    "/segue/note": ("siiiffii", ("id", "variation", "pitch", "velocity", "start", "duration", "channel", "track")),
    "/segue/done": ("sisiff", ("id", "variation", "path", "notes", "first_note_ms", "total_ms")),
    "/segue/finished": ("sif", ("id", "variations", "total_ms")),
    "/segue/error": ("sss", ("id", "code", "message")),
    "/segue/cancelled": ("s", ("id",)),
    "/segue/chunk_ack": ("siii", ("id", "index", "received", "count")),
    "/segue/prepared": ("ssiiff", ("id", "model", "tokens", "cached", "prefill_ms", "total_ms")),
}
TERMINAL = frozenset({"finished", "error", "cancelled"})


class OscError(ValueError):
    """A datagram that is not an OSC message this client understands."""


# --- the codec -------------------------------------------------------------------------------------

def _osc_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return raw + b"\x00" * (4 - len(raw) % 4)  # at least one NUL, padded to 4 bytes


def encode_message(address: str, tags: str, args: Sequence[Arg]) -> bytes:
    """One OSC message with explicit type tags (i, f, s, b)."""
    if len(tags) != len(args):
        raise ValueError(f"{address}: {len(tags)} type tags for {len(args)} arguments")
    parts = [_osc_string(address), _osc_string("," + tags)]
    for tag, value in zip(tags, args):  # noqa: B905 (lengths checked above; no strict= in Python 3.7)
        if tag == "i" and isinstance(value, int):
            parts.append(struct.pack(">i", value))
        elif tag == "f" and isinstance(value, (int, float)):
            parts.append(struct.pack(">f", float(value)))
        elif tag == "s" and isinstance(value, str):
            parts.append(_osc_string(value))
        elif tag == "b" and isinstance(value, bytes):
            parts.append(struct.pack(">i", len(value)) + value + b"\x00" * (-len(value) % 4))
        else:
            raise ValueError(f"{address}: cannot send {value!r} as OSC type {tag!r}")
    return b"".join(parts)


def _read_string(data: bytes, index: int) -> tuple[str, int]:
    end = data.find(b"\x00", index)
    if end < 0:
        raise OscError(f"a string at byte {index} has no NUL terminator")
    try:
        text = data[index:end].decode("utf-8")
    except UnicodeDecodeError:
        raise OscError(f"a string at byte {index} is not UTF-8") from None
    return text, end + 1 + (-(end + 1) % 4)


def decode_message(data: bytes) -> tuple[str, list[Arg]]:
    """An OSC message -> (address, arguments); OscError for anything else (bundles included)."""
    if not data.startswith(b"/") or len(data) % 4:
        raise OscError("not an OSC message")
    address, index = _read_string(data, 0)
    if index >= len(data):
        return address, []
    tags, index = _read_string(data, index)
    if not tags.startswith(","):
        raise OscError("the type-tag string does not start with ','")
    args: list[Arg] = []
    for tag in tags[1:]:
        size = {"i": 4, "f": 4, "h": 8, "d": 8}.get(tag, 0)
        if index + size > len(data):
            raise OscError(f"argument {tag!r} runs past the end of the datagram")
        if tag == "i":
            args.append(struct.unpack_from(">i", data, index)[0])
        elif tag == "f":
            args.append(struct.unpack_from(">f", data, index)[0])
        elif tag == "h":
            args.append(struct.unpack_from(">q", data, index)[0])
        elif tag == "d":
            args.append(struct.unpack_from(">d", data, index)[0])
        elif tag == "s":
            text, index = _read_string(data, index)
            args.append(text)
            continue
        elif tag == "b":
            if index + 4 > len(data):
                raise OscError("a blob size runs past the end of the datagram")
            (length,) = struct.unpack_from(">i", data, index)
            if length < 0 or index + 4 + length > len(data):
                raise OscError("a blob runs past the end of the datagram")
            args.append(data[index + 4:index + 4 + length])
            index += 4 + length + (-length % 4)
            continue
        elif tag in "TFN":
            args.append(int(tag == "T"))
        else:
            raise OscError(f"unsupported type tag {tag!r}")
        index += size
    return address, args


def decode_reply(data: bytes) -> Event | None:
    """A reply datagram -> the protocol's reply dict (as the ZeroMQ transport carries it), or None.

    None for a datagram that is not an OSC message. Arguments beyond the table's are ignored (a newer
    server may append some, as it appended `instance` to hello); an unknown address or fewer
    arguments than the table's becomes {"type": "unknown", ...}, to be logged and ignored."""
    try:
        address, args = decode_message(data)
    except OscError:
        return None
    spec = REPLIES.get(address)
    if spec is None or len(args) < len(spec[0]):
        return {"type": "unknown", "address": address, "args": args}
    event: Event = {"type": address[len("/segue/"):]}
    for name, value in zip(spec[1], args):  # noqa: B905 (lengths checked above; no strict= in Python 3.7)
        event[name] = value
    if event["type"] == "done" and isinstance(event["first_note_ms"], float) and event["first_note_ms"] < 0:
        event["first_note_ms"] = None
    if event["type"] == "hello":
        try:
            models = json.loads(str(event["models"]))
        except (ValueError, RecursionError):  # damaged, or nested past the parser's limit: no models
            models = []
        event["models"] = models if isinstance(models, list) else []
        event["default_model"] = event["default_model"] or None
    return event


# --- the client ------------------------------------------------------------------------------------

class _Upload:
    """A continue (or prepare) request travelling as chunks: at most `window` unacknowledged at a time."""

    def __init__(self, request_id: str, chunks: list[str], now: float, address: str = CONTINUE_CHUNK):
        self.request_id = request_id
        self.address = address
        self.chunks = chunks
        self.next_index = 0
        self.unacked: set[int] = set()
        self.acked: set[int] = set()
        self.last_progress = now
        self.stalls = 0


class SegueLink:
    """Requests to a Segue server's OSC port; replies arrive on our own UDP socket (127.0.0.1, port 0).

    Nothing here blocks: sends are UDP, `poll()` reads with a non-blocking socket. One link is one
    client for the server (its reply port is its identity), so a new `send_continue` replaces
    the previous request on the server.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 9100, max_datagram: int = 8000, window: int = 8,
                 ack_timeout: float = 1.0, retries: int = 3, clock: Callable[[], float] = time.monotonic):
        self.server = (host, port)
        self.max_datagram = max_datagram
        self.window = window
        self.ack_timeout = ack_timeout
        self.retries = retries
        self._clock = clock
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.setblocking(False)
        self._prefix = "live-" + os.urandom(3).hex()
        self._counter = 0
        self._uploads: dict[str, _Upload] = {}
        self.dropped = 0  # datagrams that were not Segue replies
        self.chunks_sent = 0

    @property
    def reply_port(self) -> int:
        port: int = self._sock.getsockname()[1]
        return port

    def new_id(self) -> str:
        self._counter += 1
        return f"{self._prefix}-{self._counter}"

    def close(self) -> None:
        self._sock.close()

    # --- requests ----------------------------------------------------------------------------------

    def _send(self, address: str, tags: str, args: Sequence[Arg]) -> None:
        data = encode_message(address, "i" + tags, [self.reply_port] + list(args))
        try:
            self._sock.sendto(data, self.server)
        except OSError:  # e.g. Windows reports an earlier ICMP "port unreachable" here; the caller's timeout tells
            pass

    def hello(self) -> str:
        request_id = self.new_id()
        self._send(HELLO, "s", [request_id])
        return request_id

    def ping(self) -> str:
        request_id = self.new_id()
        self._send(PING, "s", [request_id])
        return request_id

    def cancel(self, request_id: str = "") -> None:
        """Stop `request_id` on the server ("" = whatever this link has running or uploading)."""
        self._uploads.pop(request_id, None)
        if not request_id:
            self._uploads.clear()
        self._send(CANCEL, "s", [request_id])

    def send_continue(self, request: dict[str, Any]) -> str:
        """Send a continue request (the JSON object of docs/protocol.md 3.2); returns its id.
        A request too large for one datagram is uploaded in chunks by the following `poll()` calls."""
        return self._request("continue", CONTINUE, CONTINUE_CHUNK, request)

    def send_prepare(self, request: dict[str, Any]) -> str:
        """Send a prepare request (docs/protocol.md 3.9): the continue request itself, sent before the
        musician asks for it, so the server prefills the clip and draws the continuation up to its first
        note; the continue that follows with the same request starts at once. Answered `prepared`."""
        return self._request("prepare", PREPARE, PREPARE_CHUNK, request)

    @property
    def uploading(self) -> bool:
        """Whether a request is still travelling in chunks (`poll()` sends the rest as acks come)."""
        return bool(self._uploads)

    def _request(self, kind: str, address: str, chunk_address: str, request: dict[str, Any]) -> str:
        request_id = self.new_id()
        body = dict(request, type=kind, id=request_id)
        text = json.dumps(body, separators=(",", ":"))  # ASCII (\\u escapes): chunks may split it anywhere
        single = encode_message(address, "iss", [self.reply_port, request_id, text])
        if len(single) <= self.max_datagram:
            self._send(address, "ss", [request_id, text])
            return request_id
        overhead = len(encode_message(chunk_address, "isiis", [self.reply_port, request_id, 0, 0, ""]))
        piece = self.max_datagram - overhead - 4
        chunks = [text[i:i + piece] for i in range(0, len(text), piece)]
        self._uploads[request_id] = _Upload(request_id, chunks, self._clock(), chunk_address)
        self._pump()
        return request_id

    # --- replies -----------------------------------------------------------------------------------

    def poll(self) -> list[Event]:
        """Every reply waiting now (chunk acks are consumed here), without blocking."""
        events: list[Event] = []
        while True:
            try:
                data, _ = self._sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # Windows: ConnectionResetError after sending to a port nobody listens on
                break
            event = decode_reply(data)
            if event is None or event["type"] == "unknown":
                self.dropped += 1
                continue
            if event["type"] == "chunk_ack":
                self._acked(event)
                continue
            self._uploads.pop(str(event.get("id")), None)  # the server answered the request itself
            events.append(event)
        events.extend(self._pump())
        return events

    def _acked(self, event: Event) -> None:
        upload = self._uploads.get(str(event.get("id")))
        index = event.get("index")
        if upload is not None and isinstance(index, int) and index in upload.unacked:
            upload.unacked.discard(index)
            upload.acked.add(index)
            upload.stalls, upload.last_progress = 0, self._clock()
            if len(upload.acked) == len(upload.chunks):
                del self._uploads[upload.request_id]

    def _pump(self) -> list[Event]:
        """Send the chunks the windows allow; resend stalled ones; give up (an error event) after `retries`."""
        failed: list[Event] = []
        now = self._clock()
        for upload in list(self._uploads.values()):
            count = len(upload.chunks)
            while upload.next_index < count and len(upload.unacked) < self.window:
                self._send_chunk(upload, upload.next_index)
                upload.unacked.add(upload.next_index)
                upload.next_index += 1
            if upload.unacked and now - upload.last_progress >= self.ack_timeout:
                upload.stalls += 1
                if upload.stalls > self.retries:
                    del self._uploads[upload.request_id]
                    failed.append({"type": "error", "id": upload.request_id, "code": "timeout",
                                   "message": "the Segue server did not acknowledge the clip's upload"})
                    continue
                for index in sorted(upload.unacked):
                    self._send_chunk(upload, index)
                upload.last_progress = now
        return failed

    def _send_chunk(self, upload: _Upload, index: int) -> None:
        self.chunks_sent += 1
        self._send(upload.address, "siis", [upload.request_id, index, len(upload.chunks), upload.chunks[index]])
