"""The OSC/UDP transport: the guard on raw bytes, chunk reassembly, and a live server on loopback.

Protocol parsing is tested with byte literals; the transport with real UDP sockets on random
ports, a timeout on every receive, and a fixture that fails a test leaking a socket or a thread.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import clip_payload

from plugin_bridge import osc_messages as msgs
from plugin_bridge import protocol
from plugin_bridge.osc_chunks import ChunkAssembler, ChunkError, ChunkIgnored, UploadLimits
from plugin_bridge.osc_client import OscClient, decode_datagram
from plugin_bridge.osc_guard import MAX_DEPTH, OscGuardError, check_datagram, peek_head
from plugin_bridge.osc_transport import OscTransport

# --- byte literals ---------------------------------------------------------------------------------

# /segue/ping ,is 9000 "p1"
PING = b"/segue/ping\x00,is\x00" + b"\x00\x00\x23\x28" + b"p1\x00\x00"
HANG_BUNDLE = b"#bundle\x00" + b"\x00\x00\x00\x00\x00\x00\x00\x01" + b"\xff\xff\xff\xfc"  # python-osc loops forever


def bundle(*elements: bytes, timetag: bytes = b"\x00" * 7 + b"\x01") -> bytes:
    return b"#bundle\x00" + timetag + b"".join(struct.pack(">i", len(e)) + e for e in elements)


def future_timetag(seconds: float) -> bytes:
    ntp = time.time() + 2208988800 + seconds
    return struct.pack(">Q", int(ntp * 2**32))


VALID = {
    "ping": PING,
    "no arguments": b"/segue/ping\x00,\x00\x00\x00",
    "every supported type": b"/x\x00\x00,ifsbTFNdh\x00\x00" + b"\x00\x00\x00\x01" + b"\x3f\x80\x00\x00" + b"ab\x00\x00"
                            + b"\x00\x00\x00\x03abc\x00" + b"\x00" * 8 + b"\x00" * 8,
    "utf-8 string argument": b"/x\x00\x00,s\x00\x00" + "é".encode() + b"\x00\x00",
    "empty blob": b"/x\x00\x00,b\x00\x00\x00\x00\x00\x00",
    "bundle of a ping": bundle(PING),
    "empty bundle": bundle(),
    "bundle dated an hour ahead": bundle(PING, timetag=future_timetag(3600)),
    f"bundles nested {MAX_DEPTH} deep": bundle(bundle(bundle(bundle(PING)))),
}

INVALID = {
    "hang bundle (element size -4)": (HANG_BUNDLE, "not positive"),
    "zero element size": (bundle() + b"\x00\x00\x00\x00", "not positive"),
    "element size not a multiple of 4": (bundle() + b"\x00\x00\x00\x06" + PING[:8], "multiple of 4"),
    "element past the end": (bundle() + b"\x00\x00\x01\x00" + PING, "past the end"),
    "element neither message nor bundle": (bundle(b"abcd"), "neither"),
    "bundle without timetag": (b"#bundle\x00\x00\x00\x00\x00", "timetag"),
    f"bundles nested {MAX_DEPTH + 1} deep": (bundle(bundle(bundle(bundle(bundle(PING))))), "nested"),
    "too many messages": (bundle(*[PING] * 257), "more than 256"),
    "non-UTF-8 address": (b"/\xff\xfe\x00,\x00\x00\x00", "non-ASCII"),
    "UTF-8 but non-ASCII address": ("/é\x00,\x00\x00\x00".encode(), "non-ASCII"),
    "address with a space": (b"/a b\x00\x00\x00\x00,\x00\x00\x00", "non-ASCII"),
    "address without NUL": (b"/abc", "NUL"),
    "non-NUL padding": (b"/a\x00x,\x00\x00\x00", "padding"),
    "missing type tags": (b"/segue/ping\x00", "no type-tag"),
    "type tags without comma": (b"/a\x00\x00is\x00\x00\x00\x00\x00\x01", "','"),
    "unsupported tag r": (b"/a\x00\x00,r\x00\x00\x00\x00\x00\x00", "unsupported"),
    "too many arguments": (b"/a\x00\x00," + b"T" * 65 + b"\x00\x00", "at most 64"),
    "array tags": (b"/a\x00\x00,[i]\x00\x00\x00\x00\x00\x00\x00\x01", "unsupported"),
    "truncated int": (PING[:-8], "past the end"),
    "truncated string": (PING[:-4], "NUL"),
    "non-UTF-8 string": (b"/a\x00\x00,s\x00\x00\xff\xfe\x00\x00", "UTF-8"),
    "negative blob size": (b"/a\x00\x00,b\x00\x00\xff\xff\xff\xfc", "negative"),
    "blob past the end": (b"/a\x00\x00,b\x00\x00\x00\x00\x01\x00", "past the end"),
    "trailing bytes": (PING + b"\x00\x00\x00\x00", "unexpected bytes"),
    "length not a multiple of 4": (PING + b"\x00", "multiple of 4"),
    "empty": (b"", "empty"),
    "garbage": (b"\x00\x01\x02\x03", "neither"),
    "over the size limit": (PING + b"\x00" * 60_000, "over the limit"),
}


@pytest.mark.parametrize("data", VALID.values(), ids=VALID.keys())
def test_guard_accepts_well_formed_packets(data):
    check_datagram(data, 65000)


@pytest.mark.parametrize("data, reason", INVALID.values(), ids=INVALID.keys())
def test_guard_refuses_before_python_osc_parses(data, reason):
    with pytest.raises(OscGuardError) as info:
        check_datagram(data, 32768)
    assert reason in info.value.reason


def test_peek_head_reads_only_an_intact_head():
    assert peek_head(PING) == ("/segue/ping", 9000, "p1")
    assert peek_head(PING + b"\x00" * 70_000) == ("/segue/ping", 9000, "p1")
    assert peek_head(HANG_BUNDLE) is None
    assert peek_head(b"/other\x00\x00,is\x00" + PING[16:]) is None  # not our namespace
    assert peek_head(b"/segue/ping\x00,is\x00\x00\x00\x00\x00p1\x00\x00") is None  # port 0
    assert peek_head(b"/segue/ping\x00,is\x00\x00\x00\x23\x28\xff\xff\x00\x00") == ("/segue/ping", 9000, "")
    for n in range(len(PING)):
        peek_head(PING[:n])  # never raises


# --- the reply table -------------------------------------------------------------------------------

REPLIES = [
    {"type": "pong", "id": "a"},
    {"type": "note", "id": "a", "variation": 1, "pitch": 60, "velocity": 90, "start": 16.5, "duration": 0.25, "channel": 9,
     "track": 2},
    {"type": "done", "id": "a", "variation": 0, "path": "/tmp/clips/é.mid", "notes": 12, "first_note_ms": 3.5, "total_ms": 40.25},
    {"type": "done", "id": "a", "variation": 0, "path": "/tmp/x.mid", "notes": 0, "first_note_ms": None, "total_ms": 4.0},
    {"type": "finished", "id": "a", "variations": 2, "total_ms": 80.5},
    {"type": "error", "id": "a", "code": "bad_clip", "message": "the clip has no notes to continue"},
    {"type": "cancelled", "id": "a"},
    {"type": "prepared", "id": "a", "model": "default", "tokens": 260, "cached": True, "prefill_ms": 0.0, "total_ms": 0.5},
    {"type": "prepared", "id": "a", "model": "default", "tokens": 21, "cached": False, "prefill_ms": 12.5, "total_ms": 30.25},
    {"type": "hello", "id": "h", "protocol": 1, "server": "0.1.0",
     "models": [{"name": "default", "parameters": 5, "meters": [[3, 4], [4, 4], [6, 8]]}], "default_model": "default",
     "instance": "519bbff272909eeb"},
]


@pytest.mark.parametrize("event", REPLIES, ids=[f"{e['type']}-{i}" for i, e in enumerate(REPLIES)])
def test_every_reply_round_trips_through_osc(event):
    data = msgs.encode_reply(event)
    check_datagram(data, msgs.MAX_REPLY_BYTES)
    assert decode_datagram(data) == event


def test_replies_stay_small():
    many = [{"name": f"model-{i}", "parameters": i, "data_fingerprint": "f" * 64, "created": "2026"} for i in range(200)]
    hello = decode_datagram(msgs.encode_reply({"type": "hello", "id": "h", "protocol": 1, "server": "0.1.0",
                                               "models": many, "default_model": None}))
    assert hello["models"][3] == {"name": "model-3"} and hello["default_model"] is None
    meters = [[n, d] for d in (2, 4, 8) for n in range(1, 13)]
    several = [{**m, "meters": meters, "search": {"bars": 4, "mode": "sample"}} for m in many[:24]]
    dgram = msgs.encode_reply({"type": "hello", "id": "h", "protocol": 1, "server": "0.1.0", "models": several,
                               "default_model": "model-0", "instance": "0123456789abcdef"})
    hello = decode_datagram(dgram)  # the full list would not fit: each model keeps its name and its meters
    assert len(dgram) <= msgs.MAX_REPLY_BYTES and hello["models"][23] == {"name": "model-23", "meters": meters}
    assert hello["instance"] == "0123456789abcdef"
    error = msgs.encode_reply({"type": "error", "id": "e", "code": "internal", "message": "x" * 100_000})
    assert len(error) <= msgs.MAX_REPLY_BYTES
    assert msgs.encode_reply({"type": "mystery", "id": "m"}) is None


def test_arguments_a_newer_server_appends_are_ignored_and_missing_ones_are_not_guessed():
    pong = msgs.build_message("/segue/pong", "ss", ["a", "something new"])
    assert decode_datagram(pong) == {"type": "pong", "id": "a"}
    old_hello = msgs.build_message("/segue/hello", "sisss", ["h", 1, "0.1.0", "[]", ""])  # before `instance`
    assert decode_datagram(old_hello)["type"] == "unknown"


# --- chunk reassembly (no sockets, a fake clock) ----------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_chunks_reassemble_in_any_order_and_tolerate_retransmission():
    chunks = ChunkAssembler()
    assert chunks.add("c", "r", 2, 3, b"ef") == (None, 1)
    assert chunks.add("c", "r", 0, 3, b"ab") == (None, 2)
    assert chunks.add("c", "r", 0, 3, b"ab") == (None, 2)  # a resent chunk is harmless
    assert chunks.add("c", "r", 1, 3, b"cd") == (b"abcdef", 3)
    assert chunks.pending == 0 and chunks.held_bytes == 0


@pytest.mark.parametrize("steps, code, words", [
    ([(0, 2, b"a"), (5, 2, b"b")], "bad_request", "out of range"),
    ([(0, 2, b"a"), (1, 3, b"b")], "bad_request", "started with 2"),
    ([(0, 2, b"a"), (0, 2, b"z")], "bad_request", "twice with different data"),
    ([(0, 0, b"a")], "bad_request", "at least 1"),
    ([(0, 5000, b"a")], "too_large", "at most 16 chunks"),
    ([(0, 3, b"x" * 60), (1, 3, b"x" * 60)], "too_large", "over 100 bytes"),
])
def test_bad_chunking_is_refused_and_forgotten(steps, code, words):
    chunks = ChunkAssembler(UploadLimits(max_bytes=100, max_chunks=16))
    with pytest.raises(ChunkError) as info:
        for index, count, data in steps:
            chunks.add("c", "r", index, count, data)
    assert info.value.code == code and words in info.value.message
    assert chunks.pending == 0 and chunks.held_bytes == 0


def test_late_chunks_of_a_refused_upload_are_ignored_until_it_starts_again():
    clock = Clock()
    chunks = ChunkAssembler(UploadLimits(max_bytes=10, timeout_s=5), clock=clock)
    chunks.add("c", "r", 0, 4, b"x" * 6)
    with pytest.raises(ChunkError):
        chunks.add("c", "r", 1, 4, b"x" * 6)  # over 10 bytes
    with pytest.raises(ChunkIgnored):
        chunks.add("c", "r", 2, 4, b"x")  # was in flight: the client has been told once already
    assert chunks.add("c", "r", 0, 2, b"ab") == (None, 1)  # index 0 starts a corrected upload at once
    assert chunks.add("c", "r", 1, 2, b"cd") == (b"abcd", 2)
    chunks.add("c", "s", 0, 3, b"a")
    clock.now = 6.0
    assert [e.request_id for e in chunks.expire()] == ["s"]
    with pytest.raises(ChunkIgnored):
        chunks.add("c", "s", 1, 3, b"b")
    clock.now = 12.0
    chunks.expire()
    assert chunks.add("c", "s", 1, 3, b"b") == (None, 1)  # the marker lapsed with the timeout


def test_uploads_are_limited_per_client_and_expire():
    clock = Clock()
    chunks = ChunkAssembler(UploadLimits(max_per_client=2, timeout_s=5), clock=clock)
    chunks.add("c", "r1", 0, 2, b"a", dest="here")
    chunks.add("c", "r2", 0, 2, b"a")
    with pytest.raises(ChunkError, match="2 unfinished uploads") as info:
        chunks.add("c", "r3", 0, 2, b"a")
    assert info.value.code == "busy"
    chunks.add("other", "r3", 0, 2, b"a")  # another client is not affected
    clock.now = 4.0
    chunks.add("c", "r2", 0, 2, b"a")  # a retransmission keeps r2 alive
    clock.now = 6.0
    expired = chunks.expire()
    assert sorted(e.request_id for e in expired) == ["r1", "r3"]
    assert next(e for e in expired if e.request_id == "r1").dest == "here"
    assert chunks.cancel("c", None) == ["r2"] and chunks.pending == 0 and chunks.held_bytes == 0


def test_unfinished_uploads_are_bounded_in_total_however_many_reply_ports():
    """One local process can claim thousands of reply ports, each a 'client' of its own: the total
    is bounded too, and the count per client is kept, not recounted by scanning every upload."""
    chunks = ChunkAssembler(UploadLimits(max_uploads=8, max_per_client=4))
    for port in range(8):
        chunks.add(f"osc:127.0.0.1:{port}", "r", 0, 2, b"a")
    with pytest.raises(ChunkError, match="holding 8 unfinished uploads, its limit") as info:
        chunks.add("osc:127.0.0.1:9999", "r", 0, 2, b"a")
    assert info.value.code == "busy" and chunks.pending == 8
    assert chunks.cancel("osc:127.0.0.1:3", None) == ["r"]
    chunks.add("osc:127.0.0.1:9999", "r", 0, 2, b"a")  # a freed slot is usable at once
    assert chunks._per_client == {f"osc:127.0.0.1:{p}": 1 for p in (0, 1, 2, 4, 5, 6, 7, 9999)}


def test_a_flood_of_unfinished_uploads_from_many_ports_neither_stalls_nor_floods_the_log(service, caplog):
    limits = UploadLimits(timeout_s=0.3)
    with OscTransport(service, upload_limits=limits) as transport, OscClient(port=transport.port, timeout=5) as client:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flooder:
            for n in range(3000):  # 3,000 first chunks, each naming another reply port
                datagram = msgs.build_message(msgs.CONTINUE_CHUNK, "isiis", [20000 + n, f"u{n}", 0, 2, '{"clip":'])
                flooder.sendto(datagram, ("127.0.0.1", transport.port))
        assert ping_ms(client, timeout=2) < 1000
        assert transport._uploads.pending <= limits.max_uploads
        time.sleep(1.0)  # they all expire
        assert ping_ms(client) < 200
    expiry_lines = [r for r in caplog.records if "dropped the unfinished upload" in r.getMessage()]
    assert 0 < len(expiry_lines) <= 10  # throttled: the rest are counted in one line, not logged one by one


# --- a live server on loopback ---------------------------------------------------------------------

def stop_and_check(transport: OscTransport) -> None:
    """stop() must join the receive thread and close both sockets the transport opened."""
    thread, opened = transport._thread, (transport._sock, transport._send_sock)
    transport.stop()
    assert thread is not None and not thread.is_alive(), "the receive thread is still running after stop()"
    assert all(sock is not None and sock.fileno() == -1 for sock in opened), "stop() left a socket open"
    assert transport._sock is None and transport._send_sock is None


@pytest.fixture
def osc(service):
    """A started transport over the real service and a client factory; the fixture closes every
    client it made and checks that the transport closed its own sockets (ownership, not a count of
    the process's descriptors, which other threads open and close at any moment)."""
    transport = OscTransport(service).start()
    clients: list[OscClient] = []

    def connect(**kwargs) -> OscClient:
        client = OscClient("127.0.0.1", transport.port, timeout=30, **kwargs)
        clients.append(client)
        return client

    yield SimpleNamespace(transport=transport, connect=connect)
    for client in clients:
        client.close()
    stop_and_check(transport)


def ping_ms(client: OscClient, timeout: float = 1.0) -> float:
    """Round trip of one ping, in ms; fails if no pong comes within `timeout`."""
    started = time.perf_counter()
    request_id = client.ping()
    deadline = started + timeout
    while time.perf_counter() < deadline:
        event = client.receive(deadline - time.perf_counter())
        if event is not None and event["type"] == "pong" and event["id"] == request_id:
            return (time.perf_counter() - started) * 1000
    raise AssertionError(f"no pong within {timeout} s")


def collect(client: OscClient, request_id: str, timeout: float = 60) -> list[dict]:
    return list(client.stream(request_id, timeout=timeout))


def assert_complete_stream(events: list[dict], variations: int) -> None:
    """notes then done per variation, then finished; every done matches its notes and its .mid file."""
    from engine.midi_file import read_clip

    kinds = [e["type"] for e in events]
    assert kinds[-1] == "finished" and "error" not in kinds, kinds[-5:]
    assert kinds.count("done") == variations and events[-1]["variations"] == variations
    for variation in range(variations):
        done_at = next(i for i, e in enumerate(events) if e["type"] == "done" and e["variation"] == variation)
        done = events[done_at]
        positions = [i for i, e in enumerate(events) if e["type"] == "note" and e["variation"] == variation]
        notes = [events[i] for i in positions]
        assert all(i < done_at for i in positions), "a note arrived after its variation's done"
        assert done["notes"] == len(notes)
        written = sorted((n.pitch, n.start, n.duration) for n in read_clip(done["path"]).notes)
        streamed = sorted((n["pitch"], n["start"], n["duration"]) for n in notes)
        assert len(written) == len(streamed)
        for (p1, s1, d1), (p2, s2, d2) in zip(written, streamed, strict=True):
            assert p1 == p2 and abs(s1 - s2) < 1e-3 and abs(d1 - d2) < 1e-2
    assert kinds.count("note") > 0, "the model generated no notes at all"


def test_ping_and_hello(osc, service):
    client = osc.connect()
    assert client.request("ping")["type"] == "pong"
    hello = client.request("hello")
    assert hello["protocol"] == protocol.PROTOCOL_VERSION and hello["server"]
    assert [m["name"] for m in hello["models"]] == ["default"] and hello["default_model"] == "default"
    assert hello["instance"] == service.instance and hello["models"][0]["meters"] == service.registry.get(None).meters
    assert ping_ms(client) < 100


def test_continue_streams_notes_then_done_per_variation_then_finished(osc):
    client = osc.connect()
    request_id = client.continue_clip({"clip": clip_payload(), "bars": 4, "variations": 2, "seed": 3})
    events = collect(client, request_id)
    assert_complete_stream(events, 2)
    assert all(16.0 <= e["start"] < 32.0 for e in events if e["type"] == "note")


def test_a_large_clip_travels_in_chunks(osc):
    clip = clip_payload(bars=64)
    for bar in range(64):  # make it dense: a chord on every eighth note
        for step in range(8):
            clip["notes"] += [[64 + k * 3, 70, bar * 4 + step * 0.5, 0.4, 0] for k in range(4)]
    client = osc.connect()
    request = {"clip": clip, "bars": 4, "variations": 2, "seed": 1}
    assert len(json.dumps(request)) > 5 * client.max_datagram  # really chunked
    events = collect(client, client.continue_clip(request))
    assert_complete_stream(events, 2)
    assert all(e["start"] >= 256.0 for e in events if e["type"] == "note")


def test_cancel_stops_a_running_request(osc):
    client = osc.connect()
    request_id = client.continue_clip({"clip": clip_payload(), "bars": 64, "variations": 16, "temperature": 1.5})
    client.receive(10)  # the stream has begun (or the request was accepted)
    client.cancel(request_id)
    events = collect(client, request_id, timeout=10)
    assert events[-1]["type"] == "cancelled"
    assert ping_ms(client) < 100


def test_a_cancel_crossing_finished_is_never_an_error(osc):
    """OSC as ZeroMQ: a cancel after `finished` is not answered (the next reply is the ping's pong), and
    cancels sent while short requests end give each exactly one terminal reply, never an `error`."""
    client = osc.connect()
    request_id = client.continue_clip({"clip": clip_payload(1), "bars": 1, "seed": 10}, request_id="c5")
    assert collect(client, request_id)[-1]["type"] == "finished"
    client.cancel("c5")
    ping = client.ping()
    assert client.receive(10) == {"type": "pong", "id": ping}
    events: list[dict] = []

    def read_until(rid: str, kinds: tuple[str, ...]) -> None:
        while True:
            event = client.receive(10)
            assert event is not None, f"nothing more for {rid}"
            events.append(event)
            if event["type"] in kinds and event["id"] == rid:
                return

    for n in range(16):
        client.continue_clip({"clip": clip_payload(1), "bars": 1, "seed": n}, request_id=f"r{n}")
        if n % 2:
            read_until(f"r{n}", ("done",))
        time.sleep(0.0005 * (n % 5))
        client.cancel(f"r{n}")
        read_until(f"r{n}", ("finished", "cancelled", "error"))
    ping = client.ping()
    read_until(ping, ("pong",))
    assert client.receive(0.2) is None, "a reply arrived after the last request's terminal event"
    terminals: dict[str, list[str]] = {}
    for event in events:
        if event["type"] in ("finished", "cancelled", "error"):
            terminals.setdefault(event["id"], []).append(event["type"])
    assert len(terminals) == 16 and all(kinds in (["finished"], ["cancelled"]) for kinds in terminals.values()), terminals


def test_two_interleaved_clients_each_get_their_own_complete_stream(osc):
    first, second = osc.connect(), osc.connect()
    id1 = first.continue_clip({"clip": clip_payload(), "bars": 2, "variations": 2, "seed": 1}, request_id="same")
    id2 = second.continue_clip({"clip": clip_payload(meter=(3, 4)), "bars": 2, "variations": 2, "seed": 2},
                               request_id="same")  # same id, different client: separate requests
    results: dict[str, list[dict]] = {}
    threads = [threading.Thread(target=lambda c=c, k=k: results.__setitem__(k, collect(c, "same")))
               for c, k in ((first, "first"), (second, "second"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert id1 == id2 == "same" and set(results) == {"first", "second"}
    for events in results.values():
        assert_complete_stream(events, 2)
    assert {e["path"] for e in results["first"] if e["type"] == "done"}.isdisjoint(
        e["path"] for e in results["second"] if e["type"] == "done")


HAZARDS = {
    "hang bundle": HANG_BUNDLE,
    "non-UTF-8 address": b"/\xff\xfe\x00,is\x00" + PING[16:],
    "non-UTF-8 string": b"/segue/ping\x00,is\x00\x00\x00\x23\x28\xff\xfe\x00\x00",
    "truncated message": PING[:-6],
    "random garbage": bytes(random.Random(7).getrandbits(8) for _ in range(1000)),
    "unsupported tags": b"/segue/ping\x00,ir\x00\x00\x00\x23\x28\x00\x00\x00\x00",
    "deep bundle": bundle(bundle(bundle(bundle(bundle(PING))))),
    "bundle of garbage": bundle(b"\x00" * 16),
}


@pytest.mark.parametrize("hazard", HAZARDS.values(), ids=HAZARDS.keys())
def test_after_a_hostile_datagram_ping_is_answered_within_100_ms(osc, hazard):
    client = osc.connect()
    hazard = hazard.replace(PING[16:20], struct.pack(">i", client.reply_port))  # replies come here, not to port 9000
    client.send_raw(hazard)
    client.send_raw(hazard)
    if peek_head(hazard) is not None:  # the head names a reply port: the client is told why
        for _ in range(2):
            error = client.receive(1.0)
            assert error["type"] == "error" and error["code"] == "bad_request" and "malformed" in error["message"]
    assert ping_ms(client) < 100


def test_a_bundle_dated_an_hour_ahead_acts_at_once(osc):
    client = osc.connect()
    ping = msgs.build_message(msgs.PING, "is", [client.reply_port, "later"])
    started = time.perf_counter()
    client.send_raw(bundle(ping, timetag=future_timetag(3600)))
    event = client.receive(1.0)
    assert event == {"type": "pong", "id": "later"}
    assert (time.perf_counter() - started) * 1000 < 100
    assert ping_ms(client) < 100


def test_an_oversized_datagram_is_refused_with_too_large(osc):
    client = osc.connect()
    head = msgs.build_message(msgs.CONTINUE, "iss", [client.reply_port, "big", "{}"])
    big = head[:-4] + b"{" * (65_504 - len(head)) + b"\x00\x00\x00\x00"  # near the UDP maximum of 65,507 bytes
    assert len(big) == 65_504
    assert len(big) > osc.transport.max_datagram
    client.send_raw(big)
    error = client.receive(2.0)
    assert error["type"] == "error" and error["id"] == "big" and error["code"] == "too_large"
    assert "/segue/continue/chunk" in error["message"]
    with pytest.raises(OSError):  # 70,000 bytes cannot even be sent as one UDP datagram
        client.send_raw(b"/segue/ping\x00,\x00\x00\x00" + b"\x00" * 70_000)
    assert ping_ms(client) < 100


def test_smaller_datagram_limit_and_malformed_requests_answer_errors(service):
    with OscTransport(service, max_datagram=4096) as transport, OscClient(port=transport.port, timeout=5) as client:
        client.send_raw(msgs.build_message(msgs.CONTINUE, "iss", [client.reply_port, "x", "y" * 5000]))
        assert client.receive(2)["code"] == "too_large"
        cases = [
            ("/segue/dance", "s", ["d"], "unknown_type"),
            (msgs.PING, "ss", ["p", "extra"], "bad_request"),
            (msgs.CONTINUE, "ss", ["c", "{not json"], "bad_request"),
            (msgs.CONTINUE, "ss", ["c", "[1, 2]"], "bad_request"),
            (msgs.CONTINUE, "ss", ["c", json.dumps({"id": "other", "clip": clip_payload()})], "bad_request"),
            (msgs.CONTINUE, "ss", ["c", json.dumps({"clip": {"notes": []}})], "bad_clip"),
            (msgs.CONTINUE, "ss", ["c", "[" * 1500 + "]" * 1500], "bad_request"),  # deep JSON nesting
            (msgs.CONTINUE_CHUNK, "siis", ["k", 3, 2, "ab"], "bad_request"),
            (msgs.CONTINUE_CHUNK, "siis", ["k", 0, 100_000, "ab"], "too_large"),
            (msgs.CONTINUE_CHUNK, "sfis", ["k", 0.5, 2, "ab"], "bad_request"),
        ]
        for address, tags, args, code in cases:
            client.send(address, tags, args)
            event = client.receive(2)
            assert event is not None and event["type"] == "error", (address, args[:1], event)
            assert event["code"] == code, (address, args[:1], event)
            if address != "/segue/dance":
                assert event["id"] == args[0]
        # Without a reply port nothing can answer; the server logs it and keeps serving.
        client.send_raw(msgs.build_message(msgs.PING, "ss", ["no", "port"]))
        assert ping_ms(client) < 100


def test_a_stalled_upload_expires_with_an_error(service):
    limits = UploadLimits(timeout_s=0.3)
    with OscTransport(service, upload_limits=limits) as transport, OscClient(port=transport.port, timeout=5) as client:
        client.send(msgs.CONTINUE_CHUNK, "siis", ["slow", 0, 3, '{"clip":'])
        assert client.receive(2) == {"type": "chunk_ack", "id": "slow", "index": 0, "received": 1, "count": 3}
        error = client.receive(3)
        assert error["type"] == "error" and error["id"] == "slow" and "1 of 3 chunks" in error["message"]
        client.send(msgs.CONTINUE_CHUNK, "siis", ["gone", 0, 2, "{"])
        client.receive(2)
        client.cancel("gone")  # cancelling an unfinished upload drops it
        assert client.receive(2) == {"type": "cancelled", "id": "gone"}


class DecodingService:
    """A stand-in service's `handle_bytes`: decode at once, then `handle` (the real Service may defer it)."""

    def handle_bytes(self, client, raw, decode, emit, request_id=None):
        try:
            payload = decode(raw)
        except protocol.ProtocolError as exc:
            emit(protocol.error_event(exc.request_id, exc.code, exc.message))
            return
        self.handle(client, payload, emit)


class UploadService(DecodingService):
    """Answers a continue with how many notes arrived, so uploads can be checked without a model."""

    def handle(self, client, payload, emit):
        if payload.get("type") == "continue":
            emit(protocol.finished_event(payload["id"], 0, float(len(payload["clip"]["notes"]))))
        elif payload.get("type") == "ping":
            emit(protocol.pong_event(payload["id"]))


def test_a_1_mib_upload_is_paced_by_acks_through_a_small_receive_buffer():
    notes = [[60 + i % 12, 80, i * 0.25, 0.2, 0] for i in range(45_000)]
    with OscTransport(UploadService()) as transport, OscClient(port=transport.port, timeout=5) as client:
        transport._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 100_000)  # like a default Linux buffer
        started = time.perf_counter()
        events = collect(client, client.continue_clip({"clip": {"notes": notes}}), timeout=5)
        elapsed = time.perf_counter() - started
        assert events[-1]["type"] == "finished" and events[-1]["total_ms"] == 45_000
        assert elapsed < 10, f"a 1 MiB upload took {elapsed:.1f} s"


def test_an_upload_over_the_limit_gets_one_error(service):
    limits = UploadLimits(max_bytes=5_000, timeout_s=0.3)
    with OscTransport(service, upload_limits=limits) as transport, OscClient(port=transport.port, timeout=5) as client:
        request_id = client.continue_clip({"clip": clip_payload(bars=64), "bars": 1})
        events = collect(client, request_id, timeout=5)
        assert events[-1]["code"] == "too_large" and "over 5000 bytes" in events[-1]["message"]
        time.sleep(0.6)  # longer than the upload timeout: late chunks must not produce a second error
        assert [e for e in client.poll() if e["type"] != "chunk_ack"] == []
        assert ping_ms(client) < 100


def test_a_port_in_use_is_a_clear_error():
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    stub = SimpleNamespace(handle=lambda *a: None)
    try:
        with pytest.raises(OSError, match=f"UDP port {port} on 127.0.0.1 is already in use"):
            OscTransport(stub, port=port).start()
    finally:
        holder.close()
    with OscTransport(stub) as first:  # and a second server can never share a port with a running one
        with pytest.raises(OSError, match=f"UDP port {first.port}"):
            OscTransport(stub, port=first.port).start()
        for option in ("SO_REUSEADDR", "SO_REUSEPORT"):
            if hasattr(socket, option):
                assert first._sock.getsockopt(socket.SOL_SOCKET, getattr(socket, option)) == 0


def test_binds_loopback_by_default():
    with OscTransport(SimpleNamespace(handle=lambda *a: None)) as transport:
        assert transport._sock.getsockname()[0] == "127.0.0.1"


def _queued_bytes(port: int) -> int:
    """Bytes waiting unread on the local UDP socket bound to `port` (Linux: /proc/net/udp rx_queue)."""
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"no UDP socket on port {port}")


def test_replies_leave_from_loopback_and_nothing_piles_up_there(osc):
    """The reply socket is bound to loopback before the first reply (never to every interface), and
    datagrams sent to it are discarded instead of sitting unread in kernel memory."""
    client = osc.connect()
    reply_host, reply_port = osc.transport._send_sock.getsockname()
    assert reply_host == "127.0.0.1" and reply_port != 0  # bound at start, before any reply
    assert client.request("ping")["type"] == "pong"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as intruder:
        for _ in range(200):
            intruder.sendto(b"x" * 512, ("127.0.0.1", reply_port))
    deadline = time.monotonic() + 5
    while _queued_bytes(reply_port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _queued_bytes(reply_port) == 0
    assert ping_ms(client) < 1000  # still serving


# --- fuzzing ---------------------------------------------------------------------------------------

class RecordingService(DecodingService):
    """Answers ping at once and records everything else: fuzzing must not start generations."""

    def __init__(self):
        self.requests = 0

    def handle(self, client, payload, emit):
        self.requests += 1
        if payload.get("type") == "ping":
            emit(protocol.pong_event(payload["id"]))



def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and out:  # flip bits
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        elif op == 1 and out:  # truncate
            del out[rng.randrange(len(out)):]
        elif op == 2:  # insert random bytes
            at = rng.randrange(len(out) + 1)
            out[at:at] = rng.randbytes(rng.choice([1, 3, 4, 8]))
        elif op == 3 and len(out) >= 4:  # overwrite a word with an extreme int32
            at = rng.randrange(0, len(out) - 3)
            out[at:at + 4] = struct.pack(">i", rng.choice([0, -1, -4, 4, 2**31 - 1, -(2**31), 65536]))
        elif op == 4 and out:  # duplicate a slice
            a = rng.randrange(len(out))
            out[a:a] = out[a:a + rng.randrange(1, 32)]
        elif op == 5 and out:  # set a byte to a special value
            out[rng.randrange(len(out))] = rng.choice([0, 0x2C, 0x2F, 0x23, 0xFF, 0x80])
    return bytes(out)


def test_fuzzed_datagrams_never_escape_and_never_stall(caplog):
    seeds = [
        PING, bundle(PING), bundle(bundle(PING), PING), HANG_BUNDLE,
        msgs.build_message(msgs.CONTINUE, "iss", [9000, "c", json.dumps({"clip": clip_payload(1), "bars": 0})]),
        msgs.build_message(msgs.CONTINUE_CHUNK, "isiis", [9000, "k", 0, 2, '{"clip":']),
        msgs.build_message(msgs.CANCEL, "is", [9000, ""]),
        VALID["every supported type"],
    ]
    rng = random.Random(1234)
    service = RecordingService()
    sent: list[bytes] = []
    with OscTransport(service, max_datagram=8192) as transport, OscClient(port=transport.port, timeout=5) as client:
        real_send = transport._send
        transport._send = lambda data, dest: sent.append(data)  # replies to fuzzed ports go nowhere
        started = time.perf_counter()
        with caplog.at_level("ERROR", logger="segue.osc"):
            for _ in range(2000):
                data = mutate(rng, rng.choice(seeds))
                transport.handle_datagram(data, ("127.0.0.1", 40000))  # directly: any escape would raise here
                client.send_raw(data if len(data) < 8000 else data[:8000])  # and through the socket
        elapsed = time.perf_counter() - started
        transport._send = real_send
        assert not [r for r in caplog.records if "internal error" in r.getMessage() or "guard accepted" in r.getMessage()]
        assert elapsed < 20, f"2,000 fuzzed datagrams took {elapsed:.1f} s"
        client.poll()
        time.sleep(0.2)  # let the receive loop drain what was sent through the socket
        client.poll()
        assert ping_ms(client) < 100
        assert all(decode_datagram(d) is not None for d in sent)  # every reply it built is well-formed


# --- JSON rules and replies that never raise -----------------------------------------------------

# /segue/continue ,iss 9000 "n1" '{"clip":{"notes":[[60,80,0,1]],"tempo":NaN}}'  (JSON has no NaN)
CONTINUE_NAN = (b"/segue/continue\x00" + b",iss\x00\x00\x00\x00" + b"\x00\x00\x23\x28" + b"n1\x00\x00"
                + b'{"clip":{"notes":[[60,80,0,1]],"tempo":NaN}}\x00\x00\x00\x00')
# /segue/continue ,iss 9000 "n2" '{"clip":{"notes":[[60,80,0,Infinity]]}}'  (nor Infinity)
CONTINUE_INFINITY = (b"/segue/continue\x00" + b",iss\x00\x00\x00\x00" + b"\x00\x00\x23\x28" + b"n2\x00\x00"
                     + b'{"clip":{"notes":[[60,80,0,Infinity]]}}\x00')


def with_reply_port(datagram: bytes, port: int) -> bytes:
    """A request literal above (reply port 9000 at bytes 24-27) addressed to `port` instead."""
    return datagram[:24] + struct.pack(">i", port) + datagram[28:]


@pytest.mark.parametrize("datagram, request_id, constant", [(CONTINUE_NAN, "n1", "NaN"), (CONTINUE_INFINITY, "n2", "Infinity")],
                         ids=["NaN", "Infinity"])
def test_nan_in_continue_json_is_refused_like_over_zeromq(datagram, request_id, constant):
    check_datagram(datagram, 65000)  # well-formed OSC: the refusal is the protocol's, not the guard's
    assert peek_head(datagram) == (msgs.CONTINUE, 9000, request_id)
    service = RecordingService()
    with OscTransport(service) as transport, OscClient(port=transport.port, timeout=5) as client:
        client.send_raw(with_reply_port(datagram, client.reply_port))
        error = client.receive(5)
        assert error is not None and error["type"] == "error", error
        assert error["id"] == request_id and error["code"] == "bad_request"
        assert "not valid JSON" in error["message"] and constant in error["message"], error["message"]
        assert service.requests == 0, "a request with NaN reached the service"
        assert ping_ms(client) < 100


def test_emit_never_raises_into_a_worker_even_after_stop(monkeypatch, caplog):
    transport = OscTransport(RecordingService()).start()
    try:
        emit = transport._emitter(("127.0.0.1", 9))

        def broken_send(data: bytes, dest: tuple) -> None:
            raise RuntimeError("simulated")

        with monkeypatch.context() as patch, caplog.at_level("ERROR", logger="segue.osc"):
            patch.setattr(transport, "_send", broken_send)
            for i in range(50):
                emit(protocol.pong_event(str(i)))
        failures = [r for r in caplog.records if "could not send the reply" in r.getMessage()]
        assert 1 <= len(failures) <= 5, f"{len(failures)} log lines for 50 failures"
        stop_and_check(transport)
        emit(protocol.pong_event("late"))  # a worker finishing after stop(): dropped, not raised
        emit({"type": "pong"})  # a malformed reply: logged, not raised
    finally:
        transport.stop()  # a no-op after stop_and_check: stop() is safe to call twice
