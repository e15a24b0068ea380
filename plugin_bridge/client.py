"""A small ZeroMQ client for a running `segue serve`, and the `segue client` command built on it.

For DAW scripts and shells that cannot keep a model in memory themselves: the server holds the
model warm, this client sends a clip and prints the notes as they are decoded.

    segue client continue riff.mid --bars 8 --variations 2 --seed 7
    segue client continue riff.mid --json          # one JSON event per line, for scripts
    segue client continue riff.mid --length 16 --result out.tsv   # for scripts without a JSON parser
    segue client ping
    segue client hello

In Python:

    with SegueClient("tcp://127.0.0.1:5555") as client:
        for event in client.continue_stream(clip_payload, bars=4, seed=1):
            ...  # note events, then done per variation, then finished

The client is not thread-safe (one DEALER socket); use one per thread.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Generator
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import zmq

from plugin_bridge.options import DEFAULT_ENDPOINT, add_continuation_args, continuation_options, read_arrangement
from plugin_bridge.protocol import clip_payload
from plugin_bridge.zmq_curve import CurveClient, CurveError

log = logging.getLogger("segue.client")

CONTINUE_PARAMS = frozenset({"bars", "variations", "temperature", "top_k", "top_p", "seed", "model", "mode",
                             "beam_width", "stay_with_clip", "constraints"})
MAX_REPLY_BYTES = 64 << 20  # a hello listing many models is the largest reply; anything bigger is not Segue


class ClientError(Exception):
    """The server answered with an error, or could not be reached: `code` for programs, `message` for people."""

    def __init__(self, code: str, message: str, request_id: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        return self.message


class ServerTimeout(ClientError):
    """The server went silent for longer than the client's timeout."""

    def __init__(self, message: str, request_id: str = ""):
        super().__init__("timeout", message, request_id)


class ServerUnreachable(ClientError):
    """No server accepted the connection within the connect timeout."""

    def __init__(self, message: str):
        super().__init__("unreachable", message)


class SegueClient:
    """Requests over one DEALER socket; replies are matched to requests by their `id`.

    `timeout` is how long the server may stay silent while a reply is awaited (a stream resets it
    with every event); `connect_timeout` is how long a request waits for the connection, so a
    missing server is reported quickly instead of the request sitting in a queue.
    """

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 30.0, connect_timeout: float = 3.0,
                 context: zmq.Context | None = None, curve: CurveClient | None = None):
        """`curve`: talk to a server started with CURVE (plugin_bridge/zmq_curve.py); without the right
        keys the handshake never completes and requests fail as `ServerUnreachable`."""
        self.endpoint = endpoint
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing until connected: a missing server fails the send
        self._sock.setsockopt(zmq.SNDTIMEO, max(1, int(connect_timeout * 1000)))
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
        if curve is not None:
            curve.apply(self._sock)
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._prefix = os.urandom(3).hex()
        self._waiting: dict[str, deque[dict]] = {}  # request ids still expecting replies -> replies read early

    # --- requests --------------------------------------------------------------------------------------

    def hello(self) -> dict:
        """The server's protocol version, server version, models (with manifest summaries), default model."""
        return self._call({"type": "hello"}, "hello")

    def ping(self) -> float:
        """Round trip to the server in seconds (answered on the server's I/O path, never queued behind generation)."""
        started = time.perf_counter()
        self._call({"type": "ping"}, "pong")
        return time.perf_counter() - started

    def continue_stream(self, clip: dict, *, request_id: str | None = None, **params) -> Generator[dict, None, None]:
        """Continue `clip` (protocol form): yields note events as they are decoded, a done event per
        variation, and finally the finished event (or the cancelled event, after `cancel`).

        The request is sent when iteration starts. Raises ClientError on an error reply and
        ServerTimeout when the server is silent for `timeout` seconds. Leaving the loop early
        cancels the request on the server, so the engine is freed at once.
        """
        unknown = set(params) - CONTINUE_PARAMS
        if unknown:  # checked now, not on first iteration, so a typo fails where it is written
            raise TypeError(f"unknown continue parameter(s): {', '.join(sorted(unknown))}")
        request = {"type": "continue", "clip": clip, **{k: v for k, v in params.items() if v is not None}}
        return self._stream(request, request_id)

    def prepare(self, clip: dict, *, model: str | None = None, request_id: str | None = None, **params) -> dict:
        """Have the server tokenize and prefill `clip` (protocol form) now, so that a continue of the same
        clip starts decoding at once. Returns the `prepared` reply (`tokens`, `cached`, `prefill_ms`, ...).
        `params` are the continue's that will follow (bars, variations, seed, ...): the server then also draws
        that continuation up to its first note (a head start), which a continue with the same clip and
        parameters takes, its first note at once. Raises ClientError on an error reply, with code "cancelled"
        when a newer prepare of this client replaced it before it started."""
        unknown = set(params) - CONTINUE_PARAMS
        if unknown:
            raise TypeError(f"unknown continue parameter(s): {', '.join(sorted(unknown))}")
        request = {"type": "prepare", "clip": clip, **({"model": model} if model is not None else {}),
                   **{k: v for k, v in params.items() if v is not None}}
        rid = self._send(request, request_id)
        try:
            while True:
                event = self._next(rid)
                kind = event.get("type")
                if kind == "prepared":
                    return event
                if kind == "error":
                    raise ClientError(event.get("code", "error"), event.get("message", "the server reported an error"), rid)
                if kind == "cancelled":
                    raise ClientError("cancelled", "a newer prepare request replaced this one", rid)
        finally:
            self._waiting.pop(rid, None)

    def _stream(self, request: dict, request_id: str | None) -> Generator[dict, None, None]:
        rid = self._send(request, request_id)
        complete = False
        try:
            while True:
                event = self._next(rid)
                kind = event.get("type")
                if kind == "error":
                    complete = True
                    raise ClientError(event.get("code", "error"), event.get("message", "the server reported an error"), rid)
                yield event
                if kind in ("finished", "cancelled"):
                    complete = True
                    return
        except ServerTimeout:
            complete = True  # the server is not listening; a cancel would only sit in a queue
            raise
        finally:
            self._waiting.pop(rid, None)
            if not complete:
                self._cancel_quietly(rid)

    def cancel(self, request_id: str) -> None:
        """Ask the server to stop `request_id`; returns without waiting. Its stream then ends with a
        `cancelled` event, or with the `finished` already on its way (a cancel that finds nothing
        running is not answered)."""
        try:
            self._sock.send(_cancel_frame(request_id))
        except zmq.Again:
            raise ServerUnreachable(f"no Segue server answered at {self.endpoint} within {self.connect_timeout:g} s; "
                                    f"the request cannot be cancelled") from None

    def close(self) -> None:
        """Close the socket at once (linger 0): nothing unsent is kept."""
        self._sock.close(linger=0)
        if self._own_context:
            self._ctx.term()

    def __enter__(self) -> SegueClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals -----------------------------------------------------------------------------------

    def _call(self, request: dict, expect: str) -> dict:
        rid = self._send(request)
        try:
            while True:
                event = self._next(rid)
                if event.get("type") == "error":
                    raise ClientError(event.get("code", "error"), event.get("message", "the server reported an error"), rid)
                if event.get("type") == expect:
                    return event
        finally:
            self._waiting.pop(rid, None)

    def _send(self, request: dict, request_id: str | None = None) -> str:
        rid = request_id or f"{self._prefix}-{next(self._ids)}"
        data = json.dumps({**request, "id": rid}, separators=(",", ":")).encode("utf-8")
        self._waiting[rid] = deque()
        try:
            self._sock.send(data)
        except zmq.Again:
            self._waiting.pop(rid, None)
            raise ServerUnreachable(f"no Segue server answered at {self.endpoint} within {self.connect_timeout:g} s; "
                                    f"start one with `segue serve` (or point --server at it)") from None
        return rid

    def _next(self, rid: str) -> dict:
        """The next reply for `rid`: replies for other requests still awaited are kept for them,
        replies for requests nobody awaits (an abandoned stream's tail) are dropped."""
        early = self._waiting.get(rid)
        if early:
            return early.popleft()
        while True:
            if not self._sock.poll(int(self.timeout * 1000), zmq.POLLIN):
                raise ServerTimeout(f"the Segue server at {self.endpoint} sent nothing for {self.timeout:g} s", rid)
            raw = self._sock.recv()
            try:
                event = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise ClientError("bad_reply", f"the server sent a reply that is not JSON ({exc})", rid) from exc
            if not isinstance(event, dict):
                raise ClientError("bad_reply", "the server sent a reply that is not a JSON object", rid)
            eid = str(event.get("id", ""))
            if eid == rid:
                return event
            if eid in self._waiting:
                self._waiting[eid].append(event)
            elif event.get("type") == "error" and not eid:  # the server could not tell which request it answers
                raise ClientError(event.get("code", "error"), event.get("message", "the server reported an error"), rid)
            else:
                log.debug("dropping a reply for %r, which nothing awaits: %s", eid, event.get("type"))

    def _cancel_quietly(self, rid: str) -> None:
        """Cancel an abandoned stream without waiting (the caller is leaving, possibly on Ctrl-C)."""
        try:
            self._sock.send(_cancel_frame(rid), zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the server also frees the engine when this socket disconnects
            log.debug("could not cancel %s: %s", rid, exc)


def _cancel_frame(request_id: str) -> bytes:
    return json.dumps({"type": "cancel", "id": request_id}, separators=(",", ":")).encode("utf-8")


# --- clip conversion and display ----------------------------------------------------------------------

NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


def note_name(pitch: int) -> str:
    """MIDI pitch -> scientific pitch name (60 = C4, middle C)."""
    return f"{NOTE_NAMES[pitch % 12]}{pitch // 12 - 1}"


def bar_beat(start: float, time_signature: tuple[int, int]) -> str:
    """Beats from the clip start -> "bar.beat.hundredths", counted from 1 in the meter's own beats
    (eighths in 6/8), as REAPER's Measures.Beats display shows it: 5.2.50 = bar 5, half-way through beat 2."""
    numerator, denominator = time_signature
    hundredths = round(start * denominator / 4 * 100)
    bar, within = divmod(hundredths, numerator * 100)
    beat, fraction = divmod(within, 100)
    return f"{bar + 1}.{beat + 1}.{fraction:02d}"


# --- the `segue client` command -----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=os.environ.get("SEGUE_SERVER", DEFAULT_ENDPOINT),
                        help=f"the server's ZeroMQ address (default {DEFAULT_ENDPOINT}, or $SEGUE_SERVER)")
    common.add_argument("--timeout", type=float, default=30.0,
                        help="give up when the server stays silent this many seconds (default 30)")
    common.add_argument("--connect-timeout", type=float, default=3.0,
                        help="give up when no server accepts the connection within this many seconds (default 3)")
    common.add_argument("--json", action="store_true", help="print one JSON event per line (for DAW scripts)")
    common.add_argument("--curve-server-key", type=Path, metavar="KEY",
                        help="a server started with CURVE: its public key file (server.key)")
    common.add_argument("--curve-key", type=Path, metavar="KEY_SECRET",
                        help="with --curve-server-key: this client's secret key file (its public key is on the server)")

    parser = argparse.ArgumentParser(
        prog="segue client",
        description="Talk to a running `segue serve` over ZeroMQ: the model stays loaded in the server, "
                    "so each continuation starts at once.")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("continue", parents=[common], help="continue a MIDI clip on the server, printing notes as they come",
                       description="Send a MIDI clip to the server and print the new notes as they are decoded; the "
                                   "server writes one .mid per variation (placed right after your clip) and prints its path.")
    add_continuation_args(p)
    p.add_argument("--model", help="the server's model to use (default: the server's default model)")
    p.add_argument("--length", type=float, metavar="BEATS",
                   help="the clip's length in beats as your DAW shows it, so the new bars start right after it "
                        "(default: up to the end of the bar in which the last note ends)")
    p.add_argument("--result", type=Path, metavar="FILE",
                   help="also write the events to FILE as tab-separated lines, for scripts without a JSON parser "
                        "(REAPER Lua); FILE appears, complete, when the request ends, FILE.part grows meanwhile")
    p.set_defaults(run=_run_continue)

    p = sub.add_parser("ping", parents=[common], help="check that the server answers, and how fast")
    p.set_defaults(run=_run_ping)
    p = sub.add_parser("hello", parents=[common], help="show the server's version and the models it serves")
    p.set_defaults(run=_run_hello)
    return parser


def _print_json(event: dict) -> None:
    print(json.dumps(event, separators=(",", ":")), flush=True)


# The `--result` file: one event a line, its type then these fields (docs/protocol.md 3.4, `id` left out),
# separated by tabs; null is an empty field; tabs and line breaks inside a text become spaces. Other
# event types are not written. Errors of the client itself (`unreachable`, `timeout`, `bad_clip` for a
# file it cannot read, `interrupted`) are written as `error` lines too, so a script always gets an answer.
RESULT_FIELDS: dict[str, tuple[str, ...]] = {
    "note": ("variation", "pitch", "velocity", "start", "duration", "channel", "track"),
    "done": ("variation", "path", "notes", "first_note_ms", "total_ms"),
    "finished": ("variations", "total_ms"),
    "cancelled": (),
    "error": ("code", "message"),
}


class ResultFile:
    """Events as tab-separated lines in PATH.part (flushed per line); `close()` renames it to PATH, so a
    script polling for PATH only ever sees a complete answer, and PATH.part shows the client started."""

    def __init__(self, path: Path):
        self.path = path
        self.part = path.with_name(path.name + ".part")
        path.unlink(missing_ok=True)  # an answer from an earlier run must not pass for this one
        self._file = open(self.part, "w", encoding="utf-8", newline="\n")

    def write(self, event: dict) -> None:
        fields = RESULT_FIELDS.get(str(event.get("type")))
        if fields is None or self._file.closed:
            return
        values = [_result_field(event.get(name)) for name in fields]
        self._file.write("\t".join([str(event["type"]), *values]) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            os.replace(self.part, self.path)


def _result_field(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(round(value, 6))
    return " ".join(str(value).replace("\t", " ").splitlines())


def _run_continue(args: argparse.Namespace, client: SegueClient) -> int:

    clip = read_arrangement(args.clip, args.track)  # ClipError names the file and the problem
    if args.length is not None:  # the DAW's clip length: the continuation starts at the bar line after it
        clip = replace(clip, tracks=tuple(replace(track, length=args.length) for track in clip.tracks))
        clip.validate()
    result: ResultFile | None = getattr(args, "result_file", None)
    params = continuation_options(args)
    params["model"] = args.model
    client.ping()  # fail with "start segue serve" before printing anything, and keep connecting out of the timings
    if not args.json:
        print(f"clip: {args.clip} ({clip.notes} notes in {len(clip.tracks)} track(s), {clip.bars} bars of {clip.time_signature[0]}/"
              f"{clip.time_signature[1]} at {clip.tempo:g} BPM) -> {args.server}", flush=True)
        print(f"{'var':>3}  {'bar.beat':>9}  {'note':<4}  {'vel':>3}  {'beats':>5}", flush=True)
    started = time.perf_counter()
    first_note = None
    written: list[str] = []
    with closing(client.continue_stream(clip_payload(clip), **params)) as stream:  # Ctrl-C cancels on the server
        for event in stream:
            kind = event["type"]
            if kind == "note" and first_note is None:
                first_note = time.perf_counter() - started
            if result is not None:
                result.write(event)
            if args.json:
                _print_json(event)
            elif kind == "note":
                track = f"  {clip.tracks[event.get('track', 0)].name}" if len(clip.tracks) > 1 else ""
                print(f"{event['variation'] + 1:>3}  {bar_beat(event['start'], clip.time_signature):>9}  "
                      f"{note_name(event['pitch']):<4}  {event['velocity']:>3}  {event['duration']:>5.2f}{track}", flush=True)
            elif kind == "done":
                written.append(event["path"])
                first = "-" if event.get("first_note_ms") is None else f"{event['first_note_ms']:.0f} ms"
                plural = "" if event["notes"] == 1 else "s"
                print(f"variation {event['variation'] + 1}: {event['notes']} note{plural} (first note {first}, "
                      f"done at {event['total_ms']:.0f} ms)", flush=True)
            elif kind == "cancelled":
                print("cancelled by the server", flush=True)
            elif kind == "finished":
                for path in written:
                    print(f"  {path}")
                first = "no notes" if first_note is None else f"{first_note * 1000:.0f} ms"
                print(f"finished: {event['variations']} variation(s), server total {event['total_ms'] / 1000:.2f} s; "
                      f"time to first note here {first}, round trip {time.perf_counter() - started:.2f} s", flush=True)
    return 0


def _run_ping(args: argparse.Namespace, client: SegueClient) -> int:
    seconds = client.ping()
    if args.json:
        _print_json({"type": "pong", "server": args.server, "round_trip_ms": round(seconds * 1000, 3)})
    else:
        print(f"pong from {args.server} in {seconds * 1000:.1f} ms")
    return 0


def _run_hello(args: argparse.Namespace, client: SegueClient) -> int:
    hello = client.hello()
    if args.json:
        _print_json(hello)
        return 0
    print(f"Segue server {hello.get('server')} at {args.server}, protocol {hello.get('protocol')}, "
          f"instance {hello.get('instance') or 'unknown'}")
    for model in hello.get("models") or []:
        params = model.get("parameters")
        size = f"{params / 1e6:.1f} M parameters" if isinstance(params, (int, float)) else "size unknown"
        mark = "  (default)" if model.get("name") == hello.get("default_model") else ""
        meters = ", ".join(f"{n}/{d}" for n, d in model.get("meters") or [])
        print(f"  {model.get('name')}: {size}, context {model.get('max_context')} tokens{mark}")
        if meters:
            print(f"    meters: {meters}")
    if not hello.get("models"):
        print("  no models loaded")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`segue client ACTION ...`: 0 on success; 1 with one `error: ...` line on any failure."""
    from engine.clip import ClipError

    args = build_parser().parse_args(argv)
    try:
        result = args.result_file = ResultFile(args.result) if getattr(args, "result", None) else None
    except OSError as exc:
        print(f"error: cannot write the result file {args.result}: {exc.strerror}", file=sys.stderr)
        return 1
    if (args.curve_server_key is None) != (args.curve_key is None):
        print("error: CURVE needs both --curve-server-key (the server's public key) and --curve-key (yours)", file=sys.stderr)
        return 1
    try:
        curve = CurveClient(args.curve_server_key, args.curve_key) if args.curve_key is not None else None
        with SegueClient(args.server, timeout=args.timeout, connect_timeout=args.connect_timeout, curve=curve) as client:
            return args.run(args, client)
    except CurveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ClientError, ClipError) as exc:
        code = exc.code if isinstance(exc, ClientError) else "bad_clip"
        if args.json:
            _print_json({"type": "error", "code": code, "message": str(exc)})
        if result is not None:
            result.write({"type": "error", "code": code, "message": str(exc)})
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except zmq.ZMQError as exc:  # e.g. a malformed --server address
        if result is not None:
            result.write({"type": "error", "code": "unreachable", "message": f"cannot talk to {args.server}: {exc}"})
        print(f"error: cannot talk to {args.server}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the stream's cleanup has already asked the server to cancel
        if result is not None:
            result.write({"type": "error", "code": "interrupted", "message": "interrupted"})
        print("error: interrupted", file=sys.stderr)
        return 1
    finally:
        if result is not None:
            result.close()


if __name__ == "__main__":
    raise SystemExit(main())
