"""Long-run fuzzer for issue 12: millions of damaged OSC packets and MIDI files, without hypothesis.

    nice -n 15 python3 bench/fuzz_long.py --target osc --executions 1000000 --seed 1 --crashes /tmp/fuzz-crashes
    nice -n 15 python3 bench/fuzz_long.py --target midi --executions 300000 --seed 1 --crashes /tmp/fuzz-crashes
    nice -n 15 python3 bench/fuzz_long.py --target ingest --executions 300000 --seed 1 --crashes /tmp/fuzz-crashes
    python3 bench/fuzz_long.py --target all --executions 300          # a smoke run (tests/test_fuzz_long.py)

It calls the very functions the hypothesis targets of tests/test_fuzz.py call, with the same
accepted refusals, so a long run here is a long run of those tests; what it adds is a plain seeded
RNG (execution i of a run is drawn from `random.Random(f"{seed}:{target}:{i}")`, so `--seed S --only I`
replays it alone), per-execution timing, and the memory of this process, which holds nothing but
the code under test, its inputs and three preallocated arrays (time, path, accepted per execution).

Paths (each execution takes one, drawn by the weights below):
  osc  datagram   `osc_guard.read_datagram(d, 65000)`; what it reads from a datagram it passes must be
                  what python-osc reads from it
                  (test_osc_datagrams_pass_the_guard_or_are_refused)
       body       `protocol.decode_osc_continue(body, "o", CONTINUE)`, then `protocol.parse_continue`;
                  only ProtocolError, whose message is at most MAX_MESSAGE_CHARS
                  (test_osc_continue_bodies_decode_or_are_refused); one in ten as a prepare body
                  through `parse_prepare`
       reply      `osc_client.decode_datagram` (what a client does with whatever reaches its reply
                  port): a dict or None, never an exception. Not a hypothesis target.
       transport  `OscTransport._datagram` of an unstarted transport over a stand-in service that
                  decodes and parses like the real one; the transport catches and logs internal
                  errors, so every ERROR log record or logged traceback counts as an escape. Not a
                  hypothesis target.
  midi read       `engine.midi_file.read_tracks` on a damaged file: only ClipError with a
                  one-line message (test_damaged_midi_is_read_or_refused_with_one_sentence)
  ingest          `training.data.ingest_file` with a model's tokenizer: never raises, and
                  tokens is None exactly when a reason is given
                  (test_damaged_midi_in_a_training_folder_is_skipped_with_a_reason)

Inputs: mutations (bit flips, byte sets, inserts, deletes, duplicated and spliced chunks, int32 and
MIDI chunk-length edits, type-tag edits, MIDI status/VLQ edits, truncation) of valid seeds built
here with the real encoders (OscClient's requests and chunks, `osc_messages.encode_reply`, bundles;
MIDI files written by symusic through `engine.midi_file.write_tracks` and by mido: several tracks,
drums, odd meters, tempo and meter changes, running status, controllers, sysex), plus pure random
bytes and random JSON with the protocol's field names.

An execution over 1 s is timed again three times; it counts as a hang only if every retry is over
1 s too (on a shared machine a process can wait for a core that long; the raw count is reported
too). A watchdog interrupts an execution after --interrupt-s (10 s) and exits after --abort-s (120 s),
having saved the input. Escapes are printed and their inputs saved under --crashes (at most 3 per
distinct exception site). Memory, sampled about 200 times per run after gc.collect() (`memory()`):
RSS, Python's live blocks and glibc malloc in use, reported at 1%, 10%, 50% and the end, with the
slope over the second half; `--memory-csv` writes every sample, `--tracemalloc` adds a snapshot diff
from 10% to the end (slow).

Exit status 0 when no execution escaped or hung, 1 otherwise.
"""

from __future__ import annotations

import _thread
import argparse
import ctypes
import faulthandler
import gc
import hashlib
import io
import json
import logging
import os
import platform
import random
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.clip import ClipError  # noqa: E402
from engine.manifest import SearchDefaults  # noqa: E402
from plugin_bridge import osc_messages as msgs  # noqa: E402
from plugin_bridge import protocol  # noqa: E402

HANG_S = 1.0
KNOWN_MODELS = (None, "default")

# ---------------------------------------------------------------------------------------------------
# small helpers


def rss_bytes() -> int:
    try:  # os.open/os.read, not open(): a text file object's first uses leave codec caches behind (blocks, below)
        fd = os.open("/proc/self/statm", os.O_RDONLY)
        try:
            return int(os.read(fd, 256).split()[1]) * os.sysconf("SC_PAGE_SIZE")
        finally:
            os.close(fd)
    except OSError:  # not Linux: the peak, which can only grow
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        function = ctypes.CDLL(None).mallinfo2  # glibc 2.33 and later
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


MALLINFO2 = _mallinfo2()


MEMORY_KEYS = ("rss", "blocks", "malloc_used", "malloc_free")


def memory() -> dict[str, float]:
    """This process's memory, after gc.collect(): resident set (MiB); Python's live memory blocks
    (sys.getallocatedblocks: grows with any Python object kept alive); and C malloc (glibc; symusic and
    Python's larger objects live there): bytes in use and bytes free but still held, in MiB (NaN when
    not glibc). RSS growing while blocks and malloc-in-use stay flat is the allocators holding freed
    memory (fragmentation), not a leak."""
    gc.collect()
    info = MALLINFO2() if MALLINFO2 is not None else None
    nan = float("nan")
    return {"rss": rss_bytes() / 2**20, "blocks": float(sys.getallocatedblocks()),
            "malloc_used": (info.uordblks + info.hblkhd) / 2**20 if info else nan,
            "malloc_free": info.fordblks / 2**20 if info else nan}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def search_for(model):
    """As in tests/test_fuzz.py, plus an unknown model for the UNKNOWN_MODEL path."""
    if model not in KNOWN_MODELS:
        raise KeyError(f"there is no model named {str(model)[:64]!r}")
    return SearchDefaults()


class BadRefusal(AssertionError):
    """The code refused in its documented way, but not as the contract says (message too long, ...)."""


# ---------------------------------------------------------------------------------------------------
# random values


INTERESTING_8 = (0x00, 0x01, 0x7F, 0x80, 0x81, 0xFE, 0xFF, 0x2F, 0x51, 0x58, 0x59, 0x90, 0x99, 0xF0, 0xF7, 0x2C, 0x2F)
INTERESTING_32 = (0, 1, 2, 3, 4, 5, 8, 12, 16, 20, 255, 256, 1023, 4096, 65000, 65535, 65536, 0x7FFFFFFF, 0x80000000,
                  0xFFFFFFFF, 0xFFFFFFFC, 0xFFFFFFF8, 0x00FFFFFF, 0x01000000)
EDGE_NUMBERS = (0, 1, -1, 2, 4, 16, 127, 128, 255, 4096, 4097, 20000, 20001, 2**31, 2**53 + 1, 2**63, 2**64, -2**63,
                0.5, -0.5, 1e-300, 5e-324, 1e308, -1e308, 1e9, 1e9 - 1, 3.9999999, 4096.000001,
                10**400, -10**400)  # JSON integers too large for a float
KEYS = ("type", "id", "clip", "notes", "tracks", "tempo", "time_signature", "length", "program", "drum", "is_drum", "name",
        "continue", "bars", "variations", "temperature", "top_k", "top_p", "seed", "mode", "beam_width", "model",
        "constraints", "key", "scale", "pitch_min", "pitch_max", "max_polyphony", "max_notes_per_bar",
        "min_notes_per_bar", "velocity_min", "velocity_max", "pitch", "velocity", "start", "duration", "channel")
STRINGS = ("", "continue", "prepare", "ping", "default", "o", "sample", "beam", "greedy", "C", "F#", "Bb", "major",
           "minor", "dorian", "chromatic", "x" * 65, "é", "\u0000", "\ud800", "𝄞", "NaN", "1e999", "-0")


def random_number(rng: random.Random):
    roll = rng.random()
    if roll < 0.3:
        return rng.choice(EDGE_NUMBERS)
    if roll < 0.6:
        return rng.randint(-300, 300)
    if roll < 0.8:
        return rng.uniform(-1000, 1000)
    if roll < 0.9:
        return rng.randint(-2**70, 2**70)
    return rng.choice((1, -1)) * 10.0 ** rng.randint(-320, 308)


def random_string(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(STRINGS)
    return "".join(chr(rng.choice((rng.randint(32, 126), rng.randint(0, 0x2FFF)))) for _ in range(rng.randint(0, 12)))


def random_json(rng: random.Random, depth: int = 0, budget: list[int] | None = None):
    """Like tests/test_fuzz.py's JSON strategy: scalars at the edges, lists and dicts keyed by protocol names."""
    budget = budget if budget is not None else [40]
    budget[0] -= 1
    roll = rng.random()
    if depth >= 4 or budget[0] <= 0 or roll < 0.5:
        kind = rng.randrange(5)
        return (None, rng.random() < 0.5, random_number(rng), random_string(rng), random_number(rng))[kind]
    if roll < 0.7:
        return [random_json(rng, depth + 1, budget) for _ in range(rng.randint(0, 6))]
    return {(rng.choice(KEYS) if rng.random() < 0.8 else random_string(rng)[:8]): random_json(rng, depth + 1, budget)
            for _ in range(rng.randint(0, 8))}


# ---------------------------------------------------------------------------------------------------
# valid seeds: continue/prepare requests as JSON objects


METERS = ((4, 4), (3, 4), (6, 8), (7, 8), (5, 4), (2, 2), (12, 8))


def random_notes(rng: random.Random, count: int, beats: float, drum: bool = False) -> list[list]:
    notes = []
    for _ in range(count):
        start = round(rng.uniform(0, max(0.0, beats - 0.25)) * 4) / 4
        duration = rng.choice((0.25, 0.5, 1.0, 0.9, 2.0, 0.125))
        pitch = rng.choice((36, 38, 42, 46, 49)) if drum else rng.randint(24, 100)
        note = [pitch, rng.randint(1, 127), start, duration]
        if drum or rng.random() < 0.5:
            note.append(9 if drum else 0)
        notes.append(note)
    return notes


def valid_request(rng: random.Random, kind: str = "continue", request_id: str = "o") -> dict:
    meter = rng.choice(METERS)
    bars = rng.randint(1, 4)
    beats = bars * meter[0] * 4 / meter[1]
    clip: dict = {"tempo": rng.choice((60.0, 96.5, 120, 174.0)), "time_signature": list(meter)}
    if rng.random() < 0.7:
        clip["length"] = beats
    if rng.random() < 0.6:
        clip.update(notes=random_notes(rng, rng.randint(1, 24), beats), program=rng.randint(0, 127),
                    is_drum=rng.random() < 0.1)
    else:
        clip["tracks"] = [{"notes": random_notes(rng, rng.randint(0, 12), beats, drum=index == 0),
                           "program": rng.randint(0, 127), "is_drum": index == 0, "name": f"Track {index}",
                           "continue": rng.random() < 0.7 or index == 1}
                          for index in range(rng.randint(1, 5))]
    request: dict = {"clip": clip}
    if rng.random() < 0.5:
        request["type"] = kind
    if rng.random() < 0.5:
        request["id"] = request_id
    if kind == "continue":
        for name, value in (("bars", rng.randint(1, 8)), ("variations", rng.randint(1, 4)),
                            ("temperature", rng.uniform(0.1, 1.5)), ("top_k", rng.randint(0, 64)),
                            ("top_p", rng.uniform(0.5, 1.0)), ("seed", rng.randint(0, 2**40)),
                            ("mode", rng.choice(("sample", "beam"))), ("beam_width", rng.randint(4, 8))):
            if rng.random() < 0.4:
                request[name] = value
        if rng.random() < 0.3:
            request["constraints"] = {"key": rng.choice(("C", "D", "F#", 7)), "scale": rng.choice(("major", "minor", "chromatic")),
                                      "pitch_min": 36, "pitch_max": 96, "max_polyphony": 4, "velocity_min": 20}
    if rng.random() < 0.2:
        request["model"] = rng.choice(("default", "missing"))
    return request


def mutate_structure(rng: random.Random, value, edits: int):
    """Replace, delete or add values at random places inside a JSON object (a copy)."""
    value = json.loads(json.dumps(value))
    for _ in range(edits):
        node, key = value, None
        path: list = []
        for _ in range(rng.randint(0, 5)):
            if isinstance(node, dict) and node:
                key = rng.choice(list(node))
            elif isinstance(node, list) and node:
                key = rng.randrange(len(node))
            else:
                break
            path.append((node, key))
            node = node[key]
        if not path:
            if isinstance(value, dict):
                value[rng.choice(KEYS)] = random_json(rng)
            continue
        parent, key = path[-1]
        roll = rng.random()
        if roll < 0.5:
            parent[key] = random_json(rng) if rng.random() < 0.6 else rng.choice((random_number(rng), None, "", [], {}, True))
        elif roll < 0.7:
            del parent[key]
        elif roll < 0.85 and isinstance(parent, dict):
            parent[rng.choice(KEYS)] = random_json(rng)
        elif isinstance(parent, list):
            parent.extend([parent[key]] * rng.choice((1, 10, 100)))
        else:
            parent[key] = [parent[key]]
    return value


# ---------------------------------------------------------------------------------------------------
# byte mutations


def _aligned_int32_offsets(data: bytes) -> range:
    return range(0, max(0, len(data) - 3), 4)


def _midi_chunks(data: bytes) -> list[int]:
    """Offsets of the chunk headers ("MThd", "MTrk", ...) of a MIDI file, as far as they can be walked."""
    offsets, index = [], 0
    while index + 8 <= len(data) and len(offsets) < 64:
        offsets.append(index)
        (size,) = struct.unpack_from(">I", data, index + 4)
        index += 8 + size
    return offsets


def mutate_bytes(rng: random.Random, seed: bytes, others: list[bytes], kind: str) -> bytes:
    """1-8 stacked mutations of `seed`; kind "osc", "midi" or "text" adds that format's own edits."""
    data = bytearray(seed)
    for _ in range(rng.choice((1, 1, 1, 1, 2, 2, 3, 4, 6, 8))):
        size = len(data)
        op = rng.randrange(16)
        position = rng.randrange(size) if size else 0
        if op == 0 and size:  # flip one bit
            data[position] ^= 1 << rng.randrange(8)
        elif op == 1 and size:  # set a byte
            data[position] = rng.choice(INTERESTING_8) if rng.random() < 0.5 else rng.randrange(256)
        elif op == 2:  # insert bytes
            count = rng.choice((1, 1, 2, 3, 4, 8, 16, 64))
            filler = bytes([rng.randrange(256)]) * count if rng.random() < 0.5 else rng.randbytes(count)
            data[position:position] = filler
        elif op == 3 and size:  # delete a range
            del data[position:position + rng.choice((1, 1, 2, 3, 4, 8, 32, 256))]
        elif op == 4 and size:  # duplicate a chunk of itself somewhere
            end = min(size, position + rng.randint(1, 512))
            chunk = bytes(data[position:end])
            at = rng.randrange(len(data) + 1)
            data[at:at] = chunk * rng.choice((1, 1, 2, 8))
        elif op == 5 and others:  # splice: our head, another seed's tail
            other = rng.choice(others)
            data = data[:position] + other[rng.randrange(len(other) + 1):]
        elif op == 6 and others:  # insert a chunk of another seed
            other = rng.choice(others)
            start = rng.randrange(len(other) + 1)
            data[position:position] = other[start:start + rng.randint(1, 256)]
        elif op == 7 and size >= 4:  # an int32 (big-endian, like OSC sizes and MIDI lengths) set to an edge value
            offsets = _aligned_int32_offsets(data) if kind == "osc" and rng.random() < 0.8 else range(size - 3)
            at = rng.choice(offsets) if offsets else 0
            (old,) = struct.unpack_from(">I", data, at)
            value = rng.choice(INTERESTING_32) if rng.random() < 0.6 else (old + rng.randint(-16, 16)) & 0xFFFFFFFF
            struct.pack_into(">I", data, at, value)
        elif op == 8 and size:  # truncate
            del data[position:]
        elif op == 9:  # append random bytes
            data += rng.randbytes(rng.choice((1, 3, 4, 8, 100)))
        elif op == 10 and size >= 2:  # swap two ranges
            a, b = sorted((rng.randrange(size), rng.randrange(size)))
            width = min(rng.randint(1, 64), b - a, size - b)
            if width > 0:
                data[a:a + width], data[b:b + width] = data[b:b + width], data[a:a + width]
        elif kind == "osc":
            _mutate_osc(rng, data)
        elif kind == "midi":
            _mutate_midi(rng, data, others)
        elif size:  # text: characters that matter to JSON
            data[position:position] = rng.choice((b'"', b"\\", b"{", b"[", b"]", b"}", b",", b":", b"-", b"e999",
                                                  b"NaN", b"Infinity", b"\\ud800", b"\xff", b"\xc3", b"0" * 400))
    if len(data) > 1 << 20:
        del data[1 << 20:]
    if kind == "osc" and rng.random() < 0.6:  # keep many inputs past the guard's first check
        data += b"\x00" * (-len(data) % 4)
    return bytes(data)


OSC_TAGS = b"ifsbTFNdhmcrSt[]I"
FAR_FUTURE = struct.pack(">Q", (2_082_758_400 + 2_208_988_800) << 32)  # an OSC timetag for 2036-01-01: python-osc sleeps till then


def _mutate_osc(rng: random.Random, data: bytearray) -> None:
    comma = data.find(b",")
    roll = rng.random()
    if comma >= 0 and roll < 0.5:  # edit, add or drop a type tag
        end = data.find(b"\x00", comma)
        end = len(data) if end < 0 else end
        at = rng.randint(comma + 1, max(comma + 1, end))
        if rng.random() < 0.5 and at < end:
            data[at] = rng.choice(OSC_TAGS)
        elif rng.random() < 0.5:
            data[at:at] = bytes([rng.choice(OSC_TAGS)])
        elif at < end:
            del data[at]
    elif roll < 0.75:  # a bundle element size or blob size lie at an aligned offset
        offsets = _aligned_int32_offsets(data)
        if offsets:
            at = rng.choice(offsets)
            struct.pack_into(">i", data, at, rng.choice((-4, -1, 0, 1, 3, 4, 8, 2**31 - 1, -2**31, len(data), len(data) - at)))
    else:  # wrap in a bundle, possibly inside another
        for _ in range(rng.randint(1, 6)):
            timetag = rng.choice((b"\x00" * 7 + b"\x01", b"\xff" * 8, FAR_FUTURE))
            data[:] = b"#bundle\x00" + timetag + struct.pack(">i", len(data)) + data


MIDI_STATUS = (0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0, 0xF7, 0xFF, 0x99, 0x89)
META_TYPES = (0x00, 0x01, 0x03, 0x20, 0x21, 0x2F, 0x51, 0x54, 0x58, 0x59, 0x7F)


def _mutate_midi(rng: random.Random, data: bytearray, others: list[bytes]) -> None:
    chunks = _midi_chunks(bytes(data))
    roll = rng.random()
    if roll < 0.25 and chunks:  # a chunk length lie
        at = rng.choice(chunks) + 4
        if at + 4 <= len(data):
            (old,) = struct.unpack_from(">I", data, at)
            value = rng.choice((0, 1, 2, 3, 6, 0xFFFFFFFF, 0x7FFFFFFF, old + 1, old - 1, old * 2, old // 2)) & 0xFFFFFFFF
            struct.pack_into(">I", data, at, value)
    elif roll < 0.4 and len(data) >= 14:  # header: format, track count, division
        field = rng.choice((8, 10, 12))
        struct.pack_into(">H", data, field, rng.choice((0, 1, 2, 3, 0x7FFF, 0x8000, 0xE728, 0xFFFF, 1, 24, 96, 480, 960, 65535)))
    elif roll < 0.55 and data:  # a status byte or meta type
        at = rng.randrange(14, len(data)) if len(data) > 14 else 0
        data[at] = rng.choice(MIDI_STATUS) if rng.random() < 0.6 else rng.choice(META_TYPES)
    elif roll < 0.7 and data:  # a variable-length quantity run (delta time or length), possibly unterminated
        at = rng.randrange(len(data))
        data[at:at] = rng.choice((b"\xff\xff\xff\x7f", b"\x8f\xff\xff\xff\x7f", b"\x81\x80\x80\x80\x80\x00", b"\xff" * 9, b"\x80"))
    elif roll < 0.85 and others:  # splice a whole track chunk of another file in, maybe bumping the track count
        other = rng.choice(others)
        tracks = [o for o in _midi_chunks(other) if other[o:o + 4] == b"MTrk"]
        if tracks:
            start = rng.choice(tracks)
            (size,) = struct.unpack_from(">I", other, start + 4)
            piece = other[start:start + 8 + size]
            at = rng.choice(chunks + [len(data)]) if chunks else len(data)
            data[at:at] = piece * rng.choice((1, 1, 3, 50))
            if len(data) >= 12 and rng.random() < 0.7:
                (count,) = struct.unpack_from(">H", data, 10)
                struct.pack_into(">H", data, 10, min(0xFFFF, count + 1))
    elif data:  # a meta event with a lying length
        at = rng.randrange(len(data))
        length = rng.choice((0, 1, 2, 3, 4, 5, 0x7F, 0x81))
        data[at:at] = bytes([0x00, 0xFF, rng.choice(META_TYPES), length]) + rng.randbytes(rng.randint(0, 6))


# ---------------------------------------------------------------------------------------------------
# OSC seeds, built with the real encoders


def osc_seeds(rng: random.Random) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """(requests and bundles, replies, JSON bodies), each valid."""
    from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
    from pythonosc.osc_message import OscMessage
    from pythonosc.osc_message_builder import OscMessageBuilder

    from plugin_bridge.osc_client import OscClient

    class Capture(OscClient):
        """The real client's encoding, captured instead of sent; chunk acks are answered at once."""

        def __init__(self, max_datagram: int):
            super().__init__("127.0.0.1", 9, max_datagram=max_datagram, window=4, ack_timeout=0.01, retries=0)
            self.sent: list[bytes] = []
            self._acks: deque[dict] = deque()

        def send_raw(self, data: bytes) -> None:
            self.sent.append(bytes(data))
            message = OscMessage(data)
            if message.address.endswith("/chunk"):
                _, request_id, index, count, _ = message.params
                self._acks.append({"type": "chunk_ack", "id": request_id, "index": index, "received": index + 1, "count": count})

        def _read(self, timeout: float) -> dict | None:
            return self._acks.popleft() if self._acks else None

        @property
        def reply_port(self) -> int:  # fixed, so that the seeds (and every input) are the same in every run
            return 9001

    requests: list[bytes] = []
    bodies: list[bytes] = []
    for max_datagram in (8000, 700):
        client = Capture(max_datagram)
        try:
            client.ping("p1")
            client.hello("h1")
            client.cancel("")
            client.cancel("c1")
            for index in range(6):
                request = valid_request(rng, "continue", f"r{index}")
                client.continue_clip(request, f"r{index}")
                client.prepare_clip(valid_request(rng, "prepare", f"q{index}"), f"q{index}")
                bodies.append(json.dumps({**request, "type": "continue", "id": "o"}).encode())
                bodies.append(json.dumps(request).encode())
        finally:
            client.close()
        requests += client.sent
    raw = json.dumps(valid_request(rng)).encode()
    requests.append(msgs.build_message(msgs.CONTINUE, "isb", [9000, "b1", raw]))  # the JSON as a blob
    requests.append(msgs.build_message(msgs.CONTINUE_CHUNK, "isiib", [9000, "b2", 0, 1, raw]))
    requests.append(msgs.build_message(msgs.PING, "fs", [9000.0, "f1"]))  # Pd sends floats
    messages = list(requests)
    for _ in range(4):  # bundles of requests, one nested
        inner = OscBundleBuilder(IMMEDIATELY)
        for data in rng.sample(messages, 2):
            inner.add_content(OscMessage(data))
        outer = OscBundleBuilder(IMMEDIATELY)
        outer.add_content(OscMessage(rng.choice(messages)))
        outer.add_content(inner.build())
        requests.append(outer.build().dgram)
    every = OscMessageBuilder("/segue/ping")  # every tag the guard accepts
    for tag, value in (("i", 9000), ("s", "t1"), ("f", 1.5), ("b", b"xyz"), ("T", True), ("F", False), ("N", None),
                       ("d", 2.5), ("h", 2**40)):
        every.add_arg(value, tag)
    requests.append(every.build().dgram)
    requests.append(b"#bundle\x00" + b"\x00" * 7 + b"\x01" + struct.pack(">i", -4))  # the python-osc hang bundle

    replies = [
        msgs.encode_reply({"type": "hello", "id": "h1", "protocol": 1, "server": "segue 0.1", "default_model": "default",
                           "instance": "abc", "models": [{"name": "default", "meters": [[4, 4], [3, 4]], "vocab": 300}]}),
        msgs.encode_reply(protocol.pong_event("p1")),
        msgs.encode_reply({"type": "note", "id": "r1", "variation": 0, "pitch": 60, "velocity": 90, "start": 4.0,
                           "duration": 0.5, "channel": 0, "track": 1}),
        msgs.encode_reply(protocol.done_event("r1", 0, "/tmp/x.mid", 12, 8.5, 120.0)),
        msgs.encode_reply(protocol.done_event("r1", 1, "/tmp/y.mid", 0, None, 90.0)),
        msgs.encode_reply(protocol.finished_event("r1", 2, 200.0)),
        msgs.encode_reply(protocol.error_event("r1", protocol.BAD_CLIP, "the clip has no notes to continue")),
        msgs.encode_reply(protocol.cancelled_event("r1")),
        msgs.encode_reply(protocol.prepared_event("q1", "default", 120, True, 5.0, 6.0)),
        msgs.chunk_ack("r2", 3, 4, 9),
    ]
    return requests, [r for r in replies if r is not None], bodies


# ---------------------------------------------------------------------------------------------------
# MIDI seeds, written by symusic (through the engine) and by mido


def midi_seeds(folder: Path) -> list[bytes]:
    import mido
    import symusic

    from engine.clip import Arrangement, Clip, Note
    from engine.midi_file import write_tracks

    seeds: list[bytes] = []

    def band(bars: int, meter=(4, 4), tempo=100.0) -> list[Clip]:  # tests/test_multitrack.py's band, any meter
        beats = meter[0] * 4 / meter[1]
        drums, bass, chords, melody = [], [], [], []
        for bar in range(bars):
            start = bar * beats
            for beat in range(int(beats)):
                drums.append(Note(36 if beat % 2 == 0 else 38, 100 - 8 * (beat % 4), start + beat, 0.25, 9))
                drums += [Note(42, 60 + 10 * (e % 2), start + e / 2, 0.25, 9) for e in (2 * beat, 2 * beat + 1)]
                bass.append(Note(40 + (bar % 2) * 5, 90, start + beat, 0.9))
            chords += [Note(p, 70, start, beats - 0.1) for p in (60, 64, 67)]
            melody += [Note(72 + (step + bar) % 5, 80 + step * 5, start + step, 0.9) for step in range(int(beats))]
        common = {"tempo": tempo, "time_signature": meter, "length": bars * beats}
        return [Clip((), **common, program=0, is_drum=True, name="Drums").with_notes(drums),
                Clip((), **common, program=33, name="Bass").with_notes(bass),
                Clip((), **common, program=0, name="Keys").with_notes(chords),
                Clip((), **common, program=73, name="Lead").with_notes(melody)]

    # symusic, as the engine writes: the tests' seed (2 bars of a 4-track band) and other meters
    seeds.append(write_tracks(folder / "band.mid", band(2), ["Drums", "Bass", "Keys", "Lead"]).read_bytes())
    seeds.append(write_tracks(folder / "band34.mid", band(3, (3, 4), 132.0)[1:], ["Bass", "Keys", "Lead"]).read_bytes())
    seeds.append(write_tracks(folder / "drums78.mid", band(2, (7, 8), 90.0)[:1], ["Drums"]).read_bytes())

    # symusic directly: tempo and meter changes, key signature, controllers, pitch bends, pedals, markers
    score = Arrangement(tuple(band(4, (4, 4), 120.0)), (0, 1, 2, 3)).to_score()
    tpq = score.ticks_per_quarter
    score.tempos.append(symusic.Tempo(4 * tpq, 90.0))
    score.tempos.append(symusic.Tempo(9 * tpq, 150.0))
    score.time_signatures.append(symusic.TimeSignature(8 * tpq, 3, 4))
    score.key_signatures.append(symusic.KeySignature(0, 2, 0))
    score.markers.append(symusic.TextMeta(0, "verse"))
    lead = score.tracks[-1]
    lead.controls.append(symusic.ControlChange(0, 7, 100))
    lead.pitch_bends.append(symusic.PitchBend(tpq, 1200))
    lead.pedals.append(symusic.Pedal(0, 2 * tpq))
    seeds.append(score.dumps_midi())

    # mido: type 1 with running status, tempo and meter changes, sysex, text, aftertouch, 6/8 then 5/4
    mid = mido.MidiFile(type=1, ticks_per_beat=480)
    meta = mido.MidiTrack([mido.MetaMessage("track_name", name="meta"), mido.MetaMessage("set_tempo", tempo=500000),
                           mido.MetaMessage("time_signature", numerator=6, denominator=8),
                           mido.MetaMessage("key_signature", key="Eb"), mido.MetaMessage("marker", text="A", time=0),
                           mido.MetaMessage("set_tempo", tempo=400000, time=1440),
                           mido.MetaMessage("time_signature", numerator=5, denominator=4, time=1440)])
    mid.tracks.append(meta)
    for channel, program, base in ((0, 0, 60), (1, 33, 40), (9, 0, 36)):
        track = mido.MidiTrack([mido.MetaMessage("track_name", name=f"ch{channel}"),
                                mido.Message("program_change", channel=channel, program=program),
                                mido.Message("control_change", channel=channel, control=64, value=127)])
        if channel == 0:
            track.append(mido.Message("sysex", data=[0x7E, 0x7F, 0x09, 0x01]))
        for step in range(16):
            track.append(mido.Message("note_on", channel=channel, note=base + step % 7, velocity=90, time=0 if step == 0 else 60))
            track.append(mido.Message("polytouch", channel=channel, note=base + step % 7, value=40, time=60))
            track.append(mido.Message("pitchwheel", channel=channel, pitch=step * 100, time=0))
            track.append(mido.Message("note_on", channel=channel, note=base + step % 7, velocity=0, time=120))  # running status
        mid.tracks.append(track)
    seeds.append(_mido_bytes(mid))

    # mido: type 0, drums only at 96 ticks per beat, with dangling and zero-length notes
    mid = mido.MidiFile(type=0, ticks_per_beat=96)
    track = mido.MidiTrack([mido.MetaMessage("time_signature", numerator=12, denominator=8)])
    for step in range(24):
        track.append(mido.Message("note_on", channel=9, note=(36, 38, 42)[step % 3], velocity=100, time=48))
        track.append(mido.Message("note_off", channel=9, note=(36, 38, 42)[step % 3], velocity=0, time=0 if step % 5 else 24))
    track.append(mido.Message("note_on", channel=9, note=49, velocity=100, time=10))  # never released
    mid.tracks.append(track)
    seeds.append(_mido_bytes(mid))

    # mido: many small tracks (16 chunks), 2/2 and a long note
    mid = mido.MidiFile(type=1, ticks_per_beat=960)
    for index in range(16):
        track = mido.MidiTrack([mido.MetaMessage("time_signature", numerator=2, denominator=2)] if index == 0 else [])
        track.append(mido.Message("note_on", channel=index, note=30 + index * 5, velocity=1 + index * 8, time=index * 10))
        track.append(mido.Message("note_off", channel=index, note=30 + index * 5, time=960 * (1 + index)))
        mid.tracks.append(track)
    seeds.append(_mido_bytes(mid))
    return seeds


def _mido_bytes(mid) -> bytes:
    buffer = io.BytesIO()
    mid.save(file=buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------
# the targets


class Target:
    def __init__(self, name: str):
        self.name = name
        # (name, weight, make an input, run it: True when the input was accepted, False when refused as documented)
        self.paths: list[tuple[str, float, Callable[[random.Random], bytes], Callable[[bytes], bool]]] = []
        self.write_input: Callable[[bytes], object] | None = None  # MIDI: the input goes to a file first (untimed)
        self.seed_report: list[str] = []

    def draw(self, rng: random.Random) -> int:
        roll, total = rng.random() * sum(p[1] for p in self.paths), 0.0
        for index, path in enumerate(self.paths):
            total += path[1]
            if roll < total:
                return index
        return len(self.paths) - 1

    def periodic(self) -> None:
        """Called every 1,000 executions (the OSC transport's receive loop expires uploads every 0.2 s)."""


class ErrorRecords(logging.Handler):
    """Counts log records that mean an internal error was caught and logged (the transport path)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.errors.append(record)


def osc_target(rng: random.Random) -> Target:
    from pythonosc.osc_bundle import OscBundle
    from pythonosc.osc_message import OscMessage

    from plugin_bridge.osc_client import decode_datagram
    from plugin_bridge.osc_guard import OscGuardError, read_datagram
    from plugin_bridge.osc_transport import OscTransport

    requests, replies, bodies = osc_seeds(rng)
    heads = (b"", b"/segue/continue\x00", b"#bundle\x00")  # tests/test_fuzz.py's heads for random bytes
    target = Target("osc")

    def datagram_input(rng: random.Random) -> bytes:
        roll = rng.random()
        if roll < 0.75:
            return mutate_bytes(rng, rng.choice(requests), requests, "osc")
        if roll < 0.9:
            return rng.choice(heads) + rng.randbytes(rng.randint(0, 600))
        data = rng.choice(heads) + rng.randbytes(rng.randint(0, 150))  # random but aligned, and a real request tail
        return data + b"\x00" * (-len(data) % 4) + (rng.choice(requests) if rng.random() < 0.3 else b"")

    def python_osc(item) -> list[tuple[str, list]]:
        if isinstance(item, OscBundle):
            return [message for content in item for message in python_osc(content)]
        return [(item.address, list(item.params))]

    def run_datagram(datagram: bytes) -> bool:
        try:
            messages = read_datagram(datagram, 65000)
        except OscGuardError:
            return False
        read = [(message.address, list(message.params)) for message in messages]
        # What the server read is what python-osc reads from a datagram the guard passed (without surprises).
        expected = python_osc(OscBundle(datagram) if OscBundle.dgram_is_bundle(datagram) else OscMessage(datagram))
        if repr(read) != repr(expected):  # repr: a NaN argument is read alike but is not equal to itself
            raise BadRefusal(f"the guard read {read!r:.200} where python-osc reads {expected!r:.200}")
        return True

    def parse(payload) -> bool:
        kind = payload.get("type") if isinstance(payload, dict) else None
        try:
            (protocol.parse_prepare if kind == "prepare" else protocol.parse_continue)(payload, search_for)
        except protocol.ProtocolError as exc:
            if len(exc.message) > protocol.MAX_MESSAGE_CHARS:
                raise BadRefusal(f"a {len(exc.message)}-character error message echoes the input") from exc
            return False
        return True

    def body_input(rng: random.Random) -> bytes:
        roll = rng.random()
        if roll < 0.35:
            request = valid_request(rng, rng.choice(("continue",) * 9 + ("prepare",)), "o")
            return json.dumps(mutate_structure(rng, request, rng.randint(1, 4))).encode()
        if roll < 0.65:
            return mutate_bytes(rng, rng.choice(bodies), bodies, "text")
        if roll < 0.85:
            value = random_json(rng)
            if rng.random() < 0.5 and isinstance(value, dict):
                value = {"type": "continue", "id": "o", "clip": value}
            return json.dumps(value).encode()
        if roll < 0.95:
            return rng.randbytes(rng.randint(0, 500))
        depth = rng.choice((10, 1000, 100_000))  # nesting deeper than the parser's recursion limit
        return b'{"clip":' + b"[" * depth + b"]" * depth + b"}"

    def run_body(body: bytes) -> bool:
        prepare = body[-1:] == b"}" and hashlib.blake2b(body, digest_size=1).digest()[0] < 26  # one in ten, stable per input
        try:
            if prepare:
                payload = protocol.decode_osc_continue(body, "o", msgs.PREPARE, "prepare")
            else:
                payload = protocol.decode_osc_continue(body, "o", msgs.CONTINUE)
        except protocol.ProtocolError:
            return False
        return parse(payload)

    def reply_input(rng: random.Random) -> bytes:
        if rng.random() < 0.85:
            return mutate_bytes(rng, rng.choice(replies), replies + requests, "osc")
        return rng.choice(heads + (b"/segue/done\x00",)) + rng.randbytes(rng.randint(0, 200))

    def run_reply(data: bytes) -> bool:
        event = decode_datagram(data)
        if event is not None and not (isinstance(event, dict) and isinstance(event.get("type"), str)):
            raise BadRefusal(f"decode_datagram returned {event!r:.100}")
        return event is not None and event["type"] != "unknown"

    served: list[str] = []  # requests the stand-in service accepted during the current execution

    class StandInService:
        """Decodes and validates like plugin_bridge.service, without a model: parse errors become error replies."""

        def handle(self, client: str, payload: object, emit: Callable[[dict], None]) -> None:
            served.append("ping")
            emit(protocol.pong_event(protocol.request_id_of(payload)))

        def handle_bytes(self, client: str, raw: bytes, decode: Callable[[bytes], object], emit: Callable[[dict], None],
                         request_id: str | None = None) -> None:
            try:
                payload = decode(raw)
                kind = payload.get("type") if isinstance(payload, dict) else None
                (protocol.parse_prepare if kind == "prepare" else protocol.parse_continue)(payload, search_for)
                served.append(kind)
            except protocol.ProtocolError as exc:
                emit(protocol.error_event(exc.request_id or request_id, exc.code, exc.message))

    transport = OscTransport(StandInService())  # never started: no socket; replies are encoded, then dropped
    records = ErrorRecords()
    osc_log = logging.getLogger("segue.osc")
    osc_log.addHandler(records)
    osc_log.setLevel(logging.WARNING)
    osc_log.propagate = False
    logging.getLogger("segue.osc.client").propagate = False  # the reply path logs every malformed reply
    logging.getLogger("segue.osc.client").addHandler(logging.NullHandler())

    def run_transport(datagram: bytes) -> bool:
        records.errors.clear()
        served.clear()
        transport._datagram(datagram, ("127.0.0.1", 50000 + len(datagram) % 7))
        if records.errors:
            record = records.errors[0]
            records.errors.clear()
            detail = "".join(traceback.format_exception(*record.exc_info)) if record.exc_info else ""
            raise BadRefusal(f"the transport logged an internal error: {record.getMessage()[:300]}\n{detail}")
        return bool(served)

    target.paths = [("datagram", 45, datagram_input, run_datagram), ("body", 35, body_input, run_body),
                    ("reply", 10, reply_input, run_reply), ("transport", 10, datagram_input, run_transport)]
    target.periodic = transport._expire_uploads  # type: ignore[method-assign]
    return target


def midi_target(rng: random.Random, work: Path, ingest: bool, tokenizer: Path | None) -> Target:
    from engine.midi_file import read_tracks

    seeds = midi_seeds(work)
    target = Target("ingest" if ingest else "midi")
    path = work / "fuzzed.mid"

    def midi_input(rng: random.Random) -> bytes:
        roll = rng.random()
        if roll < 0.9:
            return mutate_bytes(rng, rng.choice(seeds), seeds, "midi")
        if roll < 0.95:
            return b"MThd\x00\x00\x00\x06" + rng.randbytes(rng.randint(0, 400))
        return rng.randbytes(rng.randint(0, 400))

    def run_read(data: bytes) -> bool:
        try:
            read_tracks(path)
        except ClipError as exc:
            if not str(exc) or "\n" in str(exc):
                raise BadRefusal(f"the refusal is not one sentence: {str(exc)!r:.300}") from exc
            return False
        return True

    if not ingest:
        target.paths = [("read", 1, midi_input, run_read)]
    else:
        from training.data import ingest_file

        def run_ingest(data: bytes) -> bool:
            result = ingest_file(path, str(tokenizer))  # never raises, by contract
            if (result.tokens is None) != bool(result.reason):
                raise BadRefusal(f"tokens {'missing' if result.tokens is None else 'present'} with reason {result.reason!r}")
            return result.tokens is not None

        target.paths = [("ingest", 1, midi_input, run_ingest)]
    target.write_input = path.write_bytes
    for index, seed in enumerate(seeds):  # the seeds themselves must be read (else the fuzzing starts shallow)
        path.write_bytes(seed)
        try:
            read_tracks(path)
            target.seed_report.append(f"seed {index}: {len(seed)} bytes, read")
        except ClipError as exc:
            target.seed_report.append(f"seed {index}: {len(seed)} bytes, refused: {exc}")
    return target


# ---------------------------------------------------------------------------------------------------
# the run


class Watchdog(threading.Thread):
    """Interrupts an execution that runs past `interrupt_s` and ends the process past `abort_s`, saving its input."""

    def __init__(self, interrupt_s: float, abort_s: float, save: Callable[[str, bytes, str], Path]):
        super().__init__(name="fuzz-watchdog", daemon=True)
        self.interrupt_s, self.abort_s, self.save = interrupt_s, abort_s, save
        self.started: float | None = None
        self.current: tuple[int, str, bytes] = (0, "", b"")
        self.interrupted = False

    def run(self) -> None:
        while True:
            time.sleep(0.25)
            started = self.started
            if started is None:
                continue
            elapsed = time.perf_counter() - started
            index, path, data = self.current
            if elapsed > self.abort_s:
                where = self.save(f"hang-{path}", data, f"execution {index} still running after {elapsed:.0f} s")
                print(f"ABORT: execution {index} ({path}) ran {elapsed:.0f} s; input saved to {where}", flush=True)
                faulthandler.dump_traceback(all_threads=True)
                os._exit(3)
            if elapsed > self.interrupt_s and not self.interrupted:
                self.interrupted = True
                self.save(f"hang-{path}", data, f"execution {index} interrupted after {elapsed:.1f} s")
                _thread.interrupt_main()


class Run:
    def __init__(self, target: Target, args: argparse.Namespace):
        self.target, self.args = target, args
        self.crashes = Path(args.crashes)
        self.escapes: Counter[str] = Counter()
        self.saved: Counter[str] = Counter()
        self.slow_raw = 0  # executions over HANG_S the first time
        self.hangs: list[tuple[int, str, float, Path]] = []  # (execution, path, fastest of the retries, input)

    def save(self, label: str, data: bytes, note: str) -> Path:
        self.crashes.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(data).hexdigest()[:12]
        where = self.crashes / f"{self.target.name}-{label}-{digest}.bin"
        where.write_bytes(data)
        where.with_suffix(".txt").write_text(f"seed {self.args.seed}, target {self.target.name}\n{note}\n")
        return where

    def execute(self, index: int, path_index: int, data: bytes, watchdog: Watchdog) -> tuple[float, bool]:
        """(seconds, accepted) for one input; an escape is recorded here, a hang by the caller."""
        name, _, _, run = self.target.paths[path_index]
        accepted = False
        if self.target.write_input is not None:
            self.target.write_input(data)
        watchdog.current, watchdog.interrupted = (index, name, data), False
        started = time.perf_counter()
        watchdog.started = started
        try:
            accepted = run(data)
        except KeyboardInterrupt:
            watchdog.started = None
            if not watchdog.interrupted:
                raise
            elapsed = time.perf_counter() - started
            print(f"execution {index} ({name}) interrupted after {elapsed:.1f} s", flush=True)
            return elapsed, False  # the caller times it again and counts the hang
        except Exception as exc:
            watchdog.started = None
            self.escape(index, name, data, exc)
        finally:
            watchdog.started = None
        return time.perf_counter() - started, accepted

    def escape(self, index: int, path: str, data: bytes, exc: BaseException) -> None:
        frames = traceback.extract_tb(exc.__traceback__)
        site = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        signature = f"{path} {type(exc).__name__} at {site}"
        self.escapes[signature] += 1
        if self.saved[signature] < 3:
            self.saved[signature] += 1
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            where = self.save(f"{path}-{type(exc).__name__}", data, f"execution {index}\n{text}")
            if self.saved[signature] == 1:
                print(f"ESCAPE: execution {index} ({signature}): {str(exc)[:300]}\n  input: {where}\n{text}", flush=True)

    def confirm_hang(self, index: int, path_index: int, data: bytes, watchdog: Watchdog, first: float) -> None:
        """Time a slow input again three times; a hang only if it is slow every time."""
        self.slow_raw += 1
        name = self.target.paths[path_index][0]
        retries = [self.execute(index, path_index, data, watchdog)[0] for _ in range(3)]
        if min(retries) > HANG_S:
            where = self.save(f"hang-{name}", data, f"execution {index}: {first:.2f} s, then {retries}")
            self.hangs.append((index, name, min(retries), where))
            print(f"HANG: execution {index} ({name}) took {first:.2f} s, retries {[round(r, 2) for r in retries]}; "
                  f"input: {where}", flush=True)
        else:
            print(f"slow once: execution {index} ({name}) took {first:.2f} s, retries took "
                  f"{max(retries) * 1000:.1f} ms at most (the machine, not the input)", flush=True)


def run_target(target: Target, args: argparse.Namespace) -> dict:
    total = args.executions
    run = Run(target, args)
    watchdog = Watchdog(args.interrupt_s, args.abort_s, run.save)
    watchdog.start()
    rng = random.Random()
    times = np.zeros(total, dtype=np.float64)  # preallocated: the run itself allocates nothing that stays
    paths = np.zeros(total, dtype=np.uint8)
    accepted = np.zeros(total, dtype=bool)  # the input got through every check (parsed, read), not refused
    for array in (times, paths, accepted):  # np.zeros pages become resident only when written: write them all now,
        array.fill(1)  # before the first memory sample, or 10 bytes per execution show up as "growth"
        array.fill(0)
    checkpoints = {max(1, total * p // 100): f"{p}%" for p in (1, 10, 50, 100)}
    sample_every = max(100, total // 200)  # gc.collect() takes tens of ms: at most about 200 samples
    # (execution, *MEMORY_KEYS) rows, preallocated so that sampling itself keeps no Python objects alive
    samples = np.full((total // sample_every + len(checkpoints) + 3, 1 + len(MEMORY_KEYS)), np.nan)
    count = 0
    marks: dict[str, dict[str, float]] = {}

    def sample(done: int) -> dict[str, float]:
        nonlocal count
        values = memory()
        samples[count] = (done, *(values[key] for key in MEMORY_KEYS))
        count += 1
        return values

    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(10)
    snapshot_10 = None
    marks["start"] = sample(0)
    started = last_report = time.monotonic()
    report_every = max(1, total // 20)
    indices = [args.only] if args.only is not None else range(total)
    done = 0
    try:
        for slot, index in enumerate(indices):
            rng.seed(f"{args.seed}:{target.name}:{index}")
            path_index = target.draw(rng)
            data = target.paths[path_index][2](rng)
            elapsed, accepted[slot] = run.execute(index, path_index, data, watchdog)
            if elapsed > HANG_S and args.only is None:
                run.confirm_hang(index, path_index, data, watchdog, elapsed)
            times[slot], paths[slot] = elapsed, path_index
            done = slot + 1
            if done % 1000 == 0:
                target.periodic()
            if done % sample_every == 0 or done in checkpoints:
                values = sample(done)
                if done in checkpoints:
                    marks[checkpoints[done]] = values
                if args.tracemalloc and done == max(1, total // 10):
                    import tracemalloc

                    snapshot_10 = tracemalloc.take_snapshot()
            now = time.monotonic()
            if done % report_every == 0 or now - last_report > 60:
                last_report = now
                rate = done / max(now - started, 1e-9)
                print(f"[{target.name}] {done:,}/{total:,} ({done * 100 / total:.0f}%)  {rate:,.0f}/s  "
                      f"escapes {sum(run.escapes.values())}  hangs {len(run.hangs)}  rss {rss_bytes() / 2**20:.1f} MiB  "
                      f"eta {(total - done) / max(rate, 1e-9) / 60:.1f} min", flush=True)
    except KeyboardInterrupt:
        print(f"[{target.name}] stopped by the user after {done:,} executions", flush=True)
    wall = time.monotonic() - started
    marks["end"] = sample(done)
    rows = samples[:count]
    if args.memory_csv:
        where = Path(str(args.memory_csv).replace("{target}", target.name))
        np.savetxt(where, rows, delimiter=",", fmt="%.6g", header="execution," + ",".join(MEMORY_KEYS), comments="")
        print(f"[{target.name}] memory samples written to {where}", flush=True)
    if args.tracemalloc and snapshot_10 is not None:
        import tracemalloc

        print(f"[{target.name}] tracemalloc, 10% -> end, top 10 by growth:")
        for stat in tracemalloc.take_snapshot().compare_to(snapshot_10, "lineno")[:10]:
            print(f"    {stat}")
    times, paths, accepted = times[:done], paths[:done], accepted[:done]
    per_path = []
    for path_index, (name, *_rest) in enumerate(target.paths):
        chosen = times[paths == path_index]
        per_path.append({"path": name, "executions": int(chosen.size),
                         "accepted": int(accepted[paths == path_index].sum()),
                         "max_ms": float(chosen.max() * 1000) if chosen.size else 0.0,
                         "p99_ms": float(np.percentile(chosen, 99) * 1000) if chosen.size else 0.0,
                         "mean_ms": float(chosen.mean() * 1000) if chosen.size else 0.0})
    second_half = rows[rows[:, 0] >= done // 2]
    slopes: dict[str, float] | None = None  # growth per 100,000 executions over the second half (a least-squares line)
    if len(second_half) >= 10 and second_half[-1, 0] > second_half[0, 0]:  # too few samples say nothing
        slopes = {key: float(np.polyfit(second_half[:, 0], second_half[:, 1 + MEMORY_KEYS.index(key)], 1)[0]) * 100_000
                  for key in ("rss", "blocks", "malloc_used") if not np.isnan(second_half[:, 1 + MEMORY_KEYS.index(key)]).any()}
    return {"target": target.name, "executions": done, "escapes": sum(run.escapes.values()),
            "escape_kinds": dict(run.escapes), "hangs": len(run.hangs), "slow_raw": run.slow_raw,
            "max_ms": float(times.max() * 1000) if done else 0.0,
            "p99_ms": float(np.percentile(times, 99) * 1000) if done else 0.0,
            "per_path": per_path, "memory": marks, "rss_max": float(rows[:, 1].max()), "slopes": slopes,
            "wall_s": wall,
            "seed_report": target.seed_report}


def print_summary(results: list[dict], args: argparse.Namespace) -> None:
    print()
    print(f"## fuzz_long summary: seed {args.seed}, {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print()
    print("| target | path | executions | accepted | escapes | hangs > 1 s | max ms | p99 ms | mean ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        for path in result["per_path"]:
            print(f"| {result['target']} | {path['path']} | {path['executions']:,} | {path['accepted']:,} | | | {path['max_ms']:.2f} | "
                  f"{path['p99_ms']:.3f} | {path['mean_ms']:.3f} |")
        print(f"| **{result['target']}** | all | **{result['executions']:,}** | | **{result['escapes']}** | "
              f"**{result['hangs']}** | {result['max_ms']:.2f} | {result['p99_ms']:.3f} | |")
    print()
    print("| target | memory (after gc) | start | 1% | 10% | 50% | end | per 100k, 2nd half |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for result in results:
        marks, slopes = result["memory"], result["slopes"]
        for key, label, unit in (("rss", "RSS (MiB)", "{:.1f}"), ("blocks", "Python blocks", "{:,.0f}"),
                                 ("malloc_used", "C malloc in use (MiB)", "{:.1f}"),
                                 ("malloc_free", "C malloc free, held (MiB)", "{:.1f}")):
            cells = " | ".join(unit.format(marks[m][key]) if m in marks else "-" for m in ("start", "1%", "10%", "50%", "end"))
            slope = "" if slopes is None or key not in slopes else ("{:+,.0f}" if key == "blocks" else "{:+.2f}").format(slopes[key])
            print(f"| {result['target']} | {label} | {cells} | {slope} |")
        print(f"| {result['target']} | peak RSS sampled (MiB) | | | | | {result['rss_max']:.1f} | |")
    print()
    for result in results:
        print(f"[{result['target']}] wall time {result['wall_s'] / 60:.1f} min")
    for result in results:
        for line in result["seed_report"]:
            print(f"[{result['target']}] {line}")
        for kind, count in result["escape_kinds"].items():
            print(f"[{result['target']}] escape x{count}: {kind}")
        if result["slow_raw"]:
            print(f"[{result['target']}] {result['slow_raw']} execution(s) took over 1 s once; "
                  f"{result['hangs']} were slow again on all three retries")
    for result in results:
        print(f"SUMMARY target={result['target']} executions={result['executions']} escapes={result['escapes']} "
              f"hangs={result['hangs']} max_ms={result['max_ms']:.2f} p99_ms={result['p99_ms']:.3f} "
              f"rss_start_mib={result['memory']['start']['rss']:.1f} rss_end_mib={result['memory']['end']['rss']:.1f} "
              f"wall_s={result['wall_s']:.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("osc", "midi", "ingest", "all"), default="all",
                        help="all = osc, then midi, then ingest (when a tokenizer is found)")
    parser.add_argument("--executions", type=int, default=10_000, help="per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crashes", default="fuzz-crashes", help="where escaping and hanging inputs are saved")
    parser.add_argument("--only", type=int, default=None, help="replay execution I of this seed alone")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "models" / "default" / "tokenizer.json",
                        help="tokenizer.json for the ingest target")
    parser.add_argument("--work", type=Path, default=None, help="where fuzzed MIDI files are written (default: /dev/shm)")
    parser.add_argument("--interrupt-s", type=float, default=10.0)
    parser.add_argument("--abort-s", type=float, default=120.0)
    parser.add_argument("--tracemalloc", action="store_true", help="snapshot diff 10%% -> end (slow)")
    parser.add_argument("--memory-csv", default=None,
                        help="write every memory sample to this CSV ({target} is replaced by the target's name)")
    args = parser.parse_args(argv)
    if args.executions < 1:
        parser.error("--executions must be at least 1")
    faulthandler.enable()
    logging.getLogger().addHandler(logging.NullHandler())  # no stderr flood from refused inputs (lastResort)
    logging.getLogger().setLevel(logging.CRITICAL)
    base = args.work or (Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None)
    names = ["osc", "midi", "ingest"] if args.target == "all" else [args.target]
    print(f"fuzz_long: {' + '.join(names)}, {args.executions:,} executions each, seed {args.seed}, "
          f"crashes -> {args.crashes}, {cpu_name()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="segue-fuzz-", dir=base) as work:
        for name in names:
            seed_rng = random.Random(f"{args.seed}:{name}:seeds")
            if name == "osc":
                target = osc_target(seed_rng)
            elif name == "ingest" and not args.tokenizer.is_file():
                print(f"[ingest] skipped: no tokenizer at {args.tokenizer} (--tokenizer)", flush=True)
                continue
            else:
                target = midi_target(seed_rng, Path(work), name == "ingest", args.tokenizer)
            results.append(run_target(target, args))
    print_summary(results, args)
    return 0 if all(r["escapes"] == 0 and r["hangs"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
