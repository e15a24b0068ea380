"""The wire contract, independent of transport: request parsing and reply events as plain dicts.

Both transports carry the same messages. A request is a JSON-like dict with a `type`; every reply
is a dict with a `type` and, where it answers a request, that request's client-chosen `id`.
`docs/protocol.md` is the human version of this module; keep them in step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.clip import BAR_SNAP_BEATS, Arrangement, Clip, ClipError, Note
from engine.constraints import Constraints
from engine.manifest import SearchDefaults
from engine.request import ContinuationRequest, RequestError
from plugin_bridge.note_list import NoteListError, notes_of

PROTOCOL_VERSION = 1
MAX_NOTES_PER_CLIP = 20_000
MAX_ID_LENGTH = 64
MAX_CLIP_BEATS = 4096
MAX_TRACKS = 16
MAX_MESSAGE_CHARS = 300  # an error message never echoes more of the client's input than this


class ProtocolError(ValueError):
    """A request that cannot be served: `code` for programs, `message` for musicians."""

    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


# Error codes (documented in docs/protocol.md).
BAD_REQUEST = "bad_request"  # malformed message or parameter out of range
BAD_CLIP = "bad_clip"  # the clip cannot be used (no notes, impossible meter, ...)
UNKNOWN_MODEL = "unknown_model"
UNKNOWN_TYPE = "unknown_type"
TOO_LARGE = "too_large"
BUSY = "busy"
INTERNAL = "internal"


def decode_json(data: bytes, request_id: str | None = None, what: str = "the request") -> dict:
    """One request's UTF-8 JSON bytes -> a dict, for both transports.

    JSON has no NaN or Infinity (Python's json accepts them; the protocol does not); a payload
    nested too deeply for the parser is refused like any other invalid JSON."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(BAD_REQUEST, f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})", request_id) from None
    try:
        payload = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(BAD_REQUEST, f"{what} is not valid JSON ({str(exc)[:120]})", request_id) from None
    if not isinstance(payload, dict):
        raise ProtocolError(BAD_REQUEST, f"{what} must be a JSON object, not {type(payload).__name__}", request_id)
    return payload


def decode_osc_continue(data: bytes, request_id: str, address: str = "/segue/continue", kind: str = "continue") -> dict:
    """The JSON body of an OSC continue or prepare (one message or reassembled chunks) -> the same dict
    ZeroMQ carries, of type `kind`.

    The OSC message already names the request id; the JSON may repeat it but must not contradict it."""
    payload = decode_json(data, request_id, f"the {kind} request")
    if payload.get("type", kind) != kind:
        raise ProtocolError(BAD_REQUEST, f"the JSON says type {str(payload.get('type'))[:40]!r} but was sent to {address}",
                            request_id)
    if "id" in payload and str(payload["id"]) != request_id:
        raise ProtocolError(BAD_REQUEST, f"the JSON id {str(payload['id'])[:MAX_ID_LENGTH]!r} differs from the OSC id "
                            f"{request_id!r}; leave it out or make them equal", request_id)
    payload["type"], payload["id"] = kind, request_id
    return payload


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


@dataclass(frozen=True)
class ContinueRequest:
    """A continue message, decoded and validated: what the Service queues and the engine runs."""

    id: str
    clip: Clip | Arrangement  # an Arrangement when the message carried `tracks`
    model: str | None  # None: the server's default model
    request: ContinuationRequest  # the client's options over the model's `search` defaults


@dataclass(frozen=True)
class PrepareRequest:
    """A prepare message, decoded and validated: a clip to tokenize and prefill before it is continued."""

    id: str
    clip: Clip | Arrangement
    model: str | None  # None: the server's default model
    # The continue the prepare carries (the very request a shell will send as its continue), with the
    # model's defaults for what it leaves out: the server begins it (plugin_bridge/head_start.py). None
    # where its options would not pass as a continue's: the clip is prepared all the same.
    continuation: ContinuationRequest | None = None


SearchFor = Callable[[str | None], SearchDefaults]  # model name -> its generation defaults (KeyError: no such model)

# Continue options a message may carry, with their wire types (defaults live in the model's `search`).
OPTION_TYPES: dict[str, type] = {"bars": int, "variations": int, "temperature": float, "top_k": int, "top_p": float,
                                 "seed": int, "beam_width": int, "stay_with_clip": float}


def _number(payload: dict, key: str, kind: type, default: float | None, request_id: str | None) -> Any:
    """A JSON number of the given kind, or `default` when absent or null. Refuses booleans, strings,
    non-finite values (1e999 parses as infinity) and fractions where a whole number is needed."""
    value = payload.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(BAD_REQUEST, f"{key} must be a number, not {type(value).__name__}", request_id)
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError(BAD_REQUEST, f"{key} must be a finite number", request_id)
    if kind is int:
        if isinstance(value, float):  # exact for any JSON integer written with a fraction part or exponent
            if not value.is_integer():
                raise ProtocolError(BAD_REQUEST, f"{key} must be a whole number, not {value:g}", request_id)
            value = int(value)
        return value
    try:
        return float(value)
    except OverflowError:  # an integer too large for a float (JSON allows 400 digits; found by bench/fuzz_long.py)
        raise ProtocolError(BAD_REQUEST, f"{key} must be a finite number", request_id) from None


def request_id_of(payload: Any) -> str:
    if not isinstance(payload, dict):
        raise ProtocolError(BAD_REQUEST, "a request must be a JSON object")
    rid = payload.get("id", "")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or len(str(rid)) > MAX_ID_LENGTH:
        raise ProtocolError(BAD_REQUEST, f"id must be a string of at most {MAX_ID_LENGTH} characters")
    return str(rid)


def parse_clip(data: Any, request_id: str | None) -> Clip | Arrangement:
    """The `clip` object of a continue request -> Clip (notes as [pitch, velocity, start, duration, channel?]),
    or an Arrangement when it carries `tracks` (each with its notes, program, drum flag, name and `continue`)."""
    if not isinstance(data, dict):
        raise ProtocolError(BAD_REQUEST, "clip must be an object with notes, tempo and time_signature", request_id)
    if "tracks" in data:
        return _parse_tracks(data, request_id)
    return _parse_track(data, data, request_id, MAX_NOTES_PER_CLIP)


def _parse_tracks(data: dict, request_id: str | None) -> Arrangement:
    tracks_in = data["tracks"]
    if not isinstance(tracks_in, list) or not tracks_in or not all(isinstance(t, dict) for t in tracks_in):
        raise ProtocolError(BAD_REQUEST, "clip.tracks must be a non-empty list of track objects", request_id)
    if len(tracks_in) > MAX_TRACKS:
        raise ProtocolError(TOO_LARGE, f"the clip has {len(tracks_in)} tracks; at most {MAX_TRACKS} are accepted", request_id)
    total = sum(len(t["notes"]) for t in tracks_in if isinstance(t.get("notes"), list))
    if total > MAX_NOTES_PER_CLIP:
        raise ProtocolError(TOO_LARGE, f"the clip has {total} notes; at most {MAX_NOTES_PER_CLIP} are accepted", request_id)
    tracks, continued = [], []
    for index, track in enumerate(tracks_in):
        flag = track.get("continue", True)
        if not isinstance(flag, bool):
            raise ProtocolError(BAD_REQUEST, f"clip.tracks[{index}].continue must be true or false", request_id)
        name = track.get("name", "")
        if not isinstance(name, str) or len(name) > MAX_ID_LENGTH:
            raise ProtocolError(BAD_REQUEST, f"clip.tracks[{index}].name must be a string of at most {MAX_ID_LENGTH} characters",
                                request_id)
        tracks.append(_parse_track(data, track, request_id, MAX_NOTES_PER_CLIP, allow_empty=True, name=name))
        if flag:
            continued.append(index)
    arrangement = Arrangement(tuple(tracks), tuple(continued))
    try:
        arrangement.validate()
    except ClipError as exc:
        raise ProtocolError(BAD_CLIP, str(exc)[:MAX_MESSAGE_CHARS], request_id) from exc  # it may quote a 300-digit number
    if not arrangement.notes:
        raise ProtocolError(BAD_CLIP, "the clip has no notes to continue", request_id)
    return arrangement


def _parse_track(data: dict, track: dict, request_id: str | None, max_notes: int, allow_empty: bool = False,
                 name: str = "") -> Clip:
    """One track's notes and instrument (from `track`) with the clip's tempo, meter and length (from `data`)."""
    notes_in = track.get("notes")
    if not isinstance(notes_in, list):
        raise ProtocolError(BAD_REQUEST, "clip.notes must be a list of [pitch, velocity, start, duration] notes", request_id)
    if len(notes_in) > max_notes:
        raise ProtocolError(TOO_LARGE, f"the clip has {len(notes_in)} notes; at most {max_notes} are accepted", request_id)
    try:
        notes = notes_of(notes_in)
    except NoteListError as exc:
        raise ProtocolError(BAD_REQUEST, str(exc), request_id) from None
    meter = data.get("time_signature", [4, 4])
    if not (isinstance(meter, (list, tuple)) and len(meter) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in meter)):
        raise ProtocolError(BAD_REQUEST, "clip.time_signature must be [numerator, denominator]", request_id)
    tempo = _number(data, "tempo", float, 120.0, request_id)
    length = _number(data, "length", float, None, request_id)
    program = _number(track, "program", int, 0, request_id)
    is_drum = track.get("is_drum", False)
    if not isinstance(is_drum, bool):
        raise ProtocolError(BAD_REQUEST, "clip.is_drum must be true or false", request_id)
    clip = Clip((), tempo, (meter[0], meter[1]), length, program, is_drum, name).with_notes(notes)
    try:
        clip.validate()
    except ClipError as exc:
        raise ProtocolError(BAD_CLIP, str(exc)[:MAX_MESSAGE_CHARS], request_id) from exc  # it may quote a 300-digit number
    if not clip.notes and not allow_empty:
        raise ProtocolError(BAD_CLIP, "the clip has no notes to continue", request_id)
    end = max(clip.length or 0.0, max((n.end for n in clip.notes), default=0.0))
    if end > MAX_CLIP_BEATS + BAR_SNAP_BEATS:  # a tick past the last bar line is that bar line (Clip.bars)
        raise ProtocolError(TOO_LARGE, f"the clip is {end:g} beats long; at most {MAX_CLIP_BEATS} are accepted", request_id)
    return clip


def clip_payload(clip: Clip | Arrangement) -> dict:
    """A Clip (or Arrangement) -> the protocol's clip object (notes in beats; length null = whole bars);
    `parse_clip` reads it back. A one-track arrangement is sent as a plain clip."""
    if isinstance(clip, Arrangement) and len(clip.tracks) == 1 and clip.continued == (0,):
        clip = clip.tracks[0]
    if isinstance(clip, Clip):
        return {"notes": _notes(clip), "tempo": clip.tempo, "time_signature": list(clip.time_signature),
                "length": clip.length, "program": clip.program, "is_drum": clip.is_drum}
    return {"tempo": clip.tempo, "time_signature": list(clip.time_signature), "length": clip.length_beats,
            "tracks": [{"notes": _notes(t), "program": t.program, "is_drum": t.is_drum, "name": t.name[:MAX_ID_LENGTH],
                        "continue": i in clip.continued} for i, t in enumerate(clip.tracks)]}


def _notes(clip: Clip) -> list[list]:
    return [[n.pitch, n.velocity, n.start, n.duration, n.channel] for n in clip.notes]


def _model_of(payload: dict, request_id: str, search_for: SearchFor) -> tuple[str | None, SearchDefaults]:
    """The model a request names (None: the default) and its generation defaults; UNKNOWN_MODEL when there is none."""
    model = payload.get("model")
    if model is not None and (not isinstance(model, str) or len(model) > MAX_ID_LENGTH):
        raise ProtocolError(BAD_REQUEST, f"model must be a model name of at most {MAX_ID_LENGTH} characters", request_id)
    try:
        return model, search_for(model)
    except KeyError as exc:
        raise ProtocolError(UNKNOWN_MODEL, str(exc.args[0]) if exc.args else f"there is no model named {model!r}",
                            request_id) from None


def parse_prepare(payload: Any, search_for: SearchFor) -> PrepareRequest:
    """A decoded prepare message -> a validated PrepareRequest (the clip checked exactly as a continue's).

    The clip and the model must pass; a shell may send the very object it will send as its continue,
    whose other fields, when it has any and they pass as a continue's options, are the continuation
    begun ahead (`continuation`), and are otherwise ignored: never an error for a prepare."""
    request_id = request_id_of(payload)
    if not request_id:
        raise ProtocolError(BAD_REQUEST, "a prepare request needs an id")
    model, search = _model_of(payload, request_id, search_for)
    clip = parse_clip(payload.get("clip"), request_id)
    continuation: ContinuationRequest | None = None
    if any(name in payload for name in (*OPTION_TYPES, "mode", "constraints")):  # a bare prepare asks for no continuation
        try:
            continuation = _continuation(payload, search, request_id)
        except ProtocolError:
            pass  # not a continue's options: the clip is prepared all the same
    return PrepareRequest(request_id, clip, model, continuation)


def parse_continue(payload: Any, search_for: SearchFor) -> ContinueRequest:
    """A decoded continue message -> a validated ContinueRequest, or ProtocolError saying what is wrong.

    `search_for(model)` gives the named (or default) model's generation defaults, which fill the
    options the message leaves out; it raises KeyError for a model the server does not have."""
    request_id = request_id_of(payload)
    if not request_id:
        raise ProtocolError(BAD_REQUEST, "a continue request needs an id")
    model, search = _model_of(payload, request_id, search_for)
    clip = parse_clip(payload.get("clip"), request_id)
    return ContinueRequest(request_id, clip, model, _continuation(payload, search, request_id))


def _continuation(payload: dict, search: SearchDefaults, request_id: str) -> ContinuationRequest:
    """A continue message's options over the model's `search` defaults, validated (ProtocolError: which is wrong)."""
    options: dict[str, Any] = {name: _number(payload, name, kind, None, request_id) for name, kind in OPTION_TYPES.items()}
    mode = payload.get("mode")
    if mode is not None and not isinstance(mode, str):
        raise ProtocolError(BAD_REQUEST, "mode must be a string", request_id)
    constraints = payload.get("constraints")
    try:
        if constraints is not None:
            options["constraints"] = Constraints.from_dict(constraints)
        request = ContinuationRequest.from_options(search, mode=mode, **options)
    except (RequestError, ValueError, TypeError) as exc:
        raise ProtocolError(BAD_REQUEST, str(exc)[:MAX_MESSAGE_CHARS], request_id) from None
    return request


# --- reply events ---------------------------------------------------------------------------------

def note_event(request_id: str, variation: int, note: Note, track: int = 0) -> dict:
    return {"type": "note", "id": request_id, "variation": variation, "pitch": note.pitch, "velocity": note.velocity,
            "start": round(note.start, 6), "duration": round(note.duration, 6), "channel": note.channel, "track": track}


def done_event(request_id: str, variation: int, path: str, notes: int, first_note_ms: float | None, total_ms: float) -> dict:
    return {"type": "done", "id": request_id, "variation": variation, "path": path, "notes": notes,
            "first_note_ms": None if first_note_ms is None else round(first_note_ms, 2), "total_ms": round(total_ms, 2)}


def finished_event(request_id: str, variations: int, total_ms: float) -> dict:
    return {"type": "finished", "id": request_id, "variations": variations, "total_ms": round(total_ms, 2)}


def error_event(request_id: str | None, code: str, message: str) -> dict:
    return {"type": "error", "id": request_id or "", "code": code, "message": message}


def prepared_event(request_id: str, model: str, tokens: int, cached: bool, prefill_ms: float, total_ms: float) -> dict:
    return {"type": "prepared", "id": request_id, "model": model, "tokens": tokens, "cached": cached,
            "prefill_ms": round(prefill_ms, 2), "total_ms": round(total_ms, 2)}


def cancelled_event(request_id: str) -> dict:
    return {"type": "cancelled", "id": request_id}


def pong_event(request_id: str) -> dict:
    return {"type": "pong", "id": request_id}
