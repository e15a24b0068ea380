"""The OSC skin of the protocol: addresses, argument layouts, and reply dict <-> OSC message.

Both ends import this module: the server (`osc_transport`) encodes the Service's reply dicts, and
the pure-Python client (`osc_client`, also usable inside Ableton Live) decodes them back into the
same dicts the ZeroMQ transport carries. It therefore depends only on the standard library and
python-osc's pure message builder/parser, never on the engine.

Arguments use only the OSC 1.0 types every sender and receiver has (int32 `i`, float32 `f`,
string `s`, blob `b`), so a JUCE `OSCSender`/`OSCReceiver` or Max's `udpsend`/`udpreceive` can
speak it. Strings are UTF-8. docs/protocol.md holds the table; keep them in step.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from pythonosc.osc_message_builder import OscMessageBuilder

log = logging.getLogger("segue.osc")

PREFIX = "/segue/"

# Requests (client -> server). Every request starts with the client's reply port (int) and the request id.
HELLO = "/segue/hello"  # ,is  reply_port id
PING = "/segue/ping"  # ,is  reply_port id
CANCEL = "/segue/cancel"  # ,is  reply_port id ("" cancels whatever this client has running)
CONTINUE = "/segue/continue"  # ,iss reply_port id json  (or ,isb with the JSON as UTF-8 bytes)
CONTINUE_CHUNK = "/segue/continue/chunk"  # ,isiis reply_port id index count data  (or ...b)
PREPARE = "/segue/prepare"  # ,iss reply_port id json  (or ,isb): a clip to prefill before it is continued
PREPARE_CHUNK = "/segue/prepare/chunk"  # ,isiis reply_port id index count data  (or ...b)

# Replies (server -> client host : reply_port): address -> (type tags, field names). A newer server may
# append arguments to a reply (never insert or reorder them), so a reader takes these by position and
# ignores any beyond them: `instance` was appended to hello this way.
REPLIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "/segue/hello": ("sissss", ("id", "protocol", "server", "models", "default_model", "instance")),
    "/segue/pong": ("s", ("id",)),
    "/segue/note": ("siiiffii", ("id", "variation", "pitch", "velocity", "start", "duration", "channel", "track")),
    "/segue/done": ("sisiff", ("id", "variation", "path", "notes", "first_note_ms", "total_ms")),
    "/segue/finished": ("sif", ("id", "variations", "total_ms")),
    "/segue/error": ("sss", ("id", "code", "message")),
    "/segue/cancelled": ("s", ("id",)),
    "/segue/chunk_ack": ("siii", ("id", "index", "received", "count")),
    "/segue/prepared": ("ssiiff", ("id", "model", "tokens", "cached", "prefill_ms", "total_ms")),
}

# Every reply stays under this size: macOS refuses to send UDP datagrams over 9216 bytes by default
# (net.inet.udp.maxdgram), and some OSC receivers read into small buffers.
MAX_REPLY_BYTES = 8192
MAX_ERROR_MESSAGE_CHARS = 1000


def build_message(address: str, tags: str, args: Sequence[Any]) -> bytes:
    """One OSC message with explicit type tags (never guessed: a Python int must not become int64)."""
    if len(tags) != len(args):
        raise ValueError(f"{address}: {len(tags)} type tags for {len(args)} arguments")
    builder = OscMessageBuilder(address)
    for tag, value in zip(tags, args, strict=True):
        if tag == "b" and not value:
            raise ValueError(f"{address}: python-osc cannot send an empty blob; send an empty string instead")
        builder.add_arg(value, tag)
    return builder.build().dgram


def encode_reply(event: dict) -> bytes | None:
    """A Service reply dict -> one OSC datagram, or None (logged) for a type this skin does not know.

    Long error messages are cut and a hello whose model list would not fit in `MAX_REPLY_BYTES`
    falls back to each model's name and meters, then to names only, so every reply fits one
    datagram a DAW-side receiver accepts.
    """
    kind = event.get("type")
    address = PREFIX + str(kind)
    spec = REPLIES.get(address)
    if spec is None or kind == "chunk_ack":
        log.error("no OSC encoding for a reply of type %r; it was not sent: %r", kind, event)
        return None
    tags, names = spec
    values = dict(event)
    values["id"] = str(values.get("id") or "")
    if kind == "prepared":
        values["cached"] = 1 if values.get("cached") else 0
    if kind == "done" and values.get("first_note_ms") is None:
        values["first_note_ms"] = -1.0  # no note was generated: OSC has no nil that JUCE/Max understand
    if kind == "error":
        message = str(values.get("message", ""))
        if len(message) > MAX_ERROR_MESSAGE_CHARS:
            message = message[: MAX_ERROR_MESSAGE_CHARS - 3] + "..."
        values["message"] = message
    if kind == "hello":
        values["default_model"] = values.get("default_model") or ""
        values["models"] = json.dumps(values.get("models") or [], separators=(",", ":"), default=str)
    dgram = build_message(address, tags, [_coerce(tag, values.get(name)) for tag, name in zip(tags, names, strict=True)])
    if len(dgram) > MAX_REPLY_BYTES and kind == "hello":
        models = [m for m in (event.get("models") or []) if isinstance(m, dict)]
        for keep in (("name", "meters"), ("name",)):
            shorter = [{key: m[key] for key in keep if key in m} for m in models]
            values["models"] = json.dumps(shorter, separators=(",", ":"), default=str)
            dgram = build_message(address, tags, [_coerce(tag, values.get(name)) for tag, name in zip(tags, names, strict=True)])
            if len(dgram) <= MAX_REPLY_BYTES:
                break
    if len(dgram) > MAX_REPLY_BYTES:
        log.error("reply %s for id %r is %d bytes, over the %d-byte limit; sending an error instead",
                  address, values["id"], len(dgram), MAX_REPLY_BYTES)
        return build_message("/segue/error", "sss", [values["id"][:64], "too_large",
                                                       f"the {kind} reply was too large for one OSC datagram"])
    return dgram


def chunk_ack(request_id: str, index: int, received: int, count: int) -> bytes:
    """The acknowledgement of one chunk of an upload: lets a client pace a large upload over UDP."""
    return build_message("/segue/chunk_ack", "siii", [request_id, index, received, count])


def _coerce(tag: str, value: Any) -> Any:
    if tag == "i":
        return int(value or 0)
    if tag == "f":
        return float(value or 0.0)
    return "" if value is None else str(value)


def decode_reply(address: str, args: Sequence[Any]) -> dict:
    """An OSC reply -> the same dict the Service emitted (floats are float32-precise).

    Arguments beyond the table's (appended by a newer server) are ignored. Unknown addresses and
    argument lists shorter than the table's become a dict of type "unknown" carrying the raw
    address and arguments, so a client can log them.
    """
    spec = REPLIES.get(address)
    if spec is None or len(args) < len(spec[0]):
        return {"type": "unknown", "address": address, "args": list(args)}
    event: dict[str, Any] = {"type": address[len(PREFIX):]}
    for name, value in zip(spec[1], args[:len(spec[1])], strict=True):
        event[name] = value
    # Whatever reaches a client's port is decoded here, so argument types are checked before use: a string
    # where first_note_ms belongs, or models as an int32 or nested 100,000 deep, raised out of decode_datagram
    # (found by bench/fuzz_long.py).
    if event["type"] == "done" and isinstance(event["first_note_ms"], (int, float)) and event["first_note_ms"] < 0:
        event["first_note_ms"] = None
    if event["type"] == "prepared":
        event["cached"] = bool(event["cached"])  # int32 1/0 on the wire: OSC 1.0 has no boolean argument
    if event["type"] == "hello":
        try:
            event["models"] = json.loads(event["models"])
        except (ValueError, TypeError, RecursionError):
            event["models"] = []
        event["default_model"] = event["default_model"] or None
    return event
