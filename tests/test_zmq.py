"""The ZeroMQ transport and client over real loopback TCP: streams, cancel, concurrency, dead
clients, hostile frames, binding, and `segue client` end to end.

Every socket lives on a random port with linger 0 and every receive has a timeout. Fixtures own
what they open (pyzmq's `sockets` fixture): `peers` closes every raw socket it made, `clients`
every SegueClient (made by the test or by `segue client`), `transports` every transport, and each
fails the test whose code left one open or whose transport did not close its own sockets on stop().
Nothing counts the process's file descriptors: other threads open and close them at any moment.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
from conftest import clip_payload
from zmq.utils.monitor import recv_monitor_message

from engine.clip import Clip, Note
from engine.midi_file import read_clip, write_clip
from plugin_bridge import client as client_module
from plugin_bridge import protocol, zmq_transport
from plugin_bridge.client import ClientError, SegueClient, ServerTimeout, ServerUnreachable, bar_beat, note_name
from plugin_bridge.zmq_transport import ZmqTransport, client_name

TIMEOUT = 10.0  # seconds any single wait may take before the test fails (generous for a busy 2-core machine)
LONG = {"bars": 64, "variations": 16, "temperature": 1.5}  # keeps a worker busy for a while


# --- fixtures ---------------------------------------------------------------------------------------

def _settle(check, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def stop_and_check(transport: ZmqTransport) -> None:
    """stop() must join the I/O thread and close every socket and the context the transport opened."""
    thread, ctx = transport._thread, transport._ctx
    assert thread is not None and ctx is not None, "the transport was not running"
    opened = {"router": transport._router, "monitor": transport._monitor,
              "wake_rx": transport._wake_rx, "wake_tx": transport._wake_tx}
    transport.stop()
    assert not thread.is_alive(), "the I/O thread is still running after stop()"
    left_open = [name for name, sock in opened.items() if not sock.closed]
    assert not left_open and ctx.closed, f"stop() left open: {left_open or 'the context'}"
    assert transport._thread is None and transport._ctx is None and transport._router is None


@pytest.fixture
def clients(monkeypatch):
    """Every SegueClient made during the test (by the test or by `segue client`); fails the test if
    one was not closed, which would leave its socket and context open."""
    made: list[SegueClient] = []
    init = SegueClient.__init__

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(SegueClient, "__init__", tracked_init)
    yield made
    left_open = [c for c in made if not c._sock.closed or (c._own_context and not c._ctx.closed)]
    for client in left_open:
        client.close()
    assert not left_open, f"{len(left_open)} SegueClient(s) left open: {[c.endpoint for c in left_open]}"


@pytest.fixture
def transports(service, clients):
    """A factory of started transports over `service`; each is stopped and checked at teardown."""
    started: list[ZmqTransport] = []

    def start(**kwargs) -> ZmqTransport:
        transport = ZmqTransport(service, **kwargs)
        transport.start()
        started.append(transport)
        return transport

    yield start
    problems = []
    for transport in started:  # every one is stopped, even after another failed its check
        if transport._thread is not None:  # a test that stopped its transport checked that itself
            try:
                stop_and_check(transport)
            except AssertionError as exc:
                problems.append(str(exc))
    assert not problems, problems


@pytest.fixture
def transport(transports) -> ZmqTransport:
    return transports()


class Peers:
    """Raw sockets for byte-level tests on one context, all with linger 0: a socket the test leaves
    open is closed here and fails the test (pyzmq's `sockets` fixture)."""

    def __init__(self):
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket] = []

    def socket(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        self.sockets.append(sock)
        return sock

    def dealer(self, endpoint: str, routing_id: bytes | None = None) -> zmq.Socket:
        sock = self.socket(zmq.DEALER)
        if routing_id is not None:
            sock.routing_id = routing_id
        sock.connect(endpoint)
        return sock

    def close(self) -> list[zmq.Socket]:
        left_open = [s for s in self.sockets if not s.closed]
        self.ctx.destroy(linger=0)  # closes those and anything else made on this context, then terminates it
        return left_open


@pytest.fixture
def peers(clients):
    p = Peers()
    yield p
    left_open = p.close()
    assert not left_open, f"the test left {len(left_open)} socket(s) open"


def send_json(sock: zmq.Socket, payload: dict) -> None:
    sock.send(json.dumps(payload).encode())


def recv_json(sock: zmq.Socket, timeout: float = TIMEOUT) -> dict:
    assert sock.poll(int(timeout * 1000), zmq.POLLIN), f"no reply within {timeout} s"
    return json.loads(sock.recv())


def recv_until(sock: zmq.Socket, kinds: tuple[str, ...] = ("finished", "error", "cancelled")) -> list[dict]:
    events = []
    while True:
        events.append(recv_json(sock))
        if events[-1]["type"] in kinds:
            return events


def connected(client: SegueClient) -> SegueClient:
    client.ping()  # the first request waits for the connection; later timings measure only the server
    return client


def assert_stream_matches_files(events: list[dict], variations: int) -> None:
    """Per variation: notes, then its done (whose count and .mid file hold exactly those notes); finished last."""
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "finished" and kinds.count("finished") == 1 and "error" not in kinds, kinds
    assert events[-1]["variations"] == variations
    for variation in range(variations):
        positions = [i for i, e in enumerate(events) if e.get("variation") == variation]
        done_at = [i for i in positions if events[i]["type"] == "done"]
        assert len(done_at) == 1 and done_at[0] == positions[-1], "notes of a variation must all come before its done"
        notes = [events[i] for i in positions if events[i]["type"] == "note"]
        done = events[done_at[0]]
        assert done["notes"] == len(notes) > 0
        written = read_clip(done["path"])
        on_grid = lambda beats: round(beats * 480)  # the .mid stores ticks at 480 per beat
        # Starts and ends are compared separately: when two notes of one pitch overlap, a MIDI file cannot
        # say which note-off ends which note-on, so a reader may swap their durations (same starts, same ends).
        assert sorted((n.pitch, n.velocity, on_grid(n.start)) for n in written.notes) == \
               sorted((n["pitch"], n["velocity"], on_grid(n["start"])) for n in notes)
        assert sorted((n.pitch, on_grid(n.start) + on_grid(n.duration)) for n in written.notes) == \
               sorted((n["pitch"], on_grid(n["start"]) + on_grid(n["duration"])) for n in notes)


# --- basics ---------------------------------------------------------------------------------------

def test_ping_and_hello_raw_bytes(transport, peers):
    sock = peers.dealer(transport.endpoint)
    sock.send(b'{"type":"ping","id":"p1"}')
    assert sock.poll(int(TIMEOUT * 1000))
    assert sock.recv_multipart() == [b'{"type":"pong","id":"p1"}']  # one frame, compact JSON
    sock.send(b'{"type":"hello","id":7}')
    hello = recv_json(sock)
    assert hello["type"] == "hello" and hello["id"] == "7" and hello["protocol"] == 1
    assert hello["default_model"] == "default" and [m["name"] for m in hello["models"]] == ["default"]
    assert hello["instance"] == transport.service.instance and re.fullmatch(r"[0-9a-f]{16}", hello["instance"])
    assert [4, 4] in hello["models"][0]["meters"] and [6, 8] in hello["models"][0]["meters"]
    sock.close()


def test_client_hello_and_ping(transport):
    with SegueClient(transport.endpoint, timeout=TIMEOUT) as client:
        hello = client.hello()
        assert hello["protocol"] == 1 and hello["models"][0]["name"] == "default"
        seconds = client.ping()
        assert 0 < seconds < TIMEOUT


def test_binds_loopback_only_by_default(transport):
    assert transport.host == "127.0.0.1" and transport.endpoint == f"tcp://127.0.0.1:{transport.port}"
    proc_tcp = Path("/proc/net/tcp")
    if not proc_tcp.is_file():
        pytest.skip("no /proc/net/tcp to read listening addresses from")
    listening = set()
    for path in (proc_tcp, Path("/proc/net/tcp6")):
        if path.is_file():
            for line in path.read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, port = local.split(":")
                if state == "0A" and int(port, 16) == transport.port:
                    listening.add(address)
    assert listening == {"0100007F"}, f"port {transport.port} listens on {listening}, not only 127.0.0.1"


def test_port_in_use_is_a_clear_oserror(transport, service, monkeypatch):
    contexts: list[zmq.Context] = []  # what the failed starts open: each must be closed again
    real_context = zmq.Context

    def recording_context() -> zmq.Context:
        contexts.append(real_context())
        return contexts[-1]

    with monkeypatch.context() as patch:
        patch.setattr(zmq_transport.zmq, "Context", recording_context)
        second = ZmqTransport(service, port=transport.port)
        with pytest.raises(OSError, match=rf"port {transport.port} .*already in use") as caught:
            second.start()
        assert caught.value.errno == errno.EADDRINUSE
        assert second._ctx is None and second._thread is None
        with socket.socket() as plain:  # held by something that is not Segue at all
            plain.bind(("127.0.0.1", 0))
            plain.listen()
            taken = plain.getsockname()[1]
            with pytest.raises(OSError, match=str(taken)):
                ZmqTransport(service, port=taken).start()
    assert len(contexts) == 2 and all(ctx.closed for ctx in contexts), "a failed start left its context open"
    with SegueClient(transport.endpoint, timeout=TIMEOUT) as client:
        client.ping()  # the failed binds disturbed nothing


# --- shutdown -------------------------------------------------------------------------------------

def test_stop_after_the_loop_closed_its_end_still_joins_and_closes(transports, caplog):
    """The race that leaked descriptors: the I/O thread sees the stopping flag at a poll timeout and
    closes its end of the wake-up pipe before stop() sends its wake-up, which then fails with
    zmq.Again. Made certain here: the loop ends first, and stop() must still join and close all."""
    transport = transports()
    emit = transport._emitter([b"worker"])
    transport._stopping.set()
    transport._thread.join(TIMEOUT)
    assert not transport._thread.is_alive()

    def peer_closed() -> bool:  # libzmq notices the closed inproc peer asynchronously
        try:
            transport._wake_tx.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            return True
        return False

    assert _settle(peer_closed, timeout=TIMEOUT), "the wake-up pipe still accepts sends after the loop closed its end"
    transport._wake()  # what a worker's emit does; must not raise
    emit(protocol.pong_event("late"))  # a reply after the loop ended is dropped, never raised into the worker
    stop_and_check(transport)
    transport.stop()  # and a second stop() is a no-op


def test_emit_from_workers_while_stopping_never_raises(service):
    """Worker threads emitting replies while stop() runs: every emit returns, and stop() closes all."""
    for attempt in range(20):
        transport = ZmqTransport(service)
        transport.start()
        emit = transport._emitter([b"nobody"])
        go, raised = threading.Event(), []

        def worker(emit=emit, go=go, raised=raised) -> None:
            go.wait(TIMEOUT)
            try:
                for i in range(300):
                    emit(protocol.pong_event(str(i)))
            except BaseException as exc:  # the bug this test is about: emit raising into a worker
                raised.append(exc)

        workers = [threading.Thread(target=worker) for _ in range(2)]
        for thread in workers:
            thread.start()
        go.set()
        stop_and_check(transport)
        for thread in workers:
            thread.join(TIMEOUT)
        assert not raised, f"attempt {attempt}: emit raised {raised[0]!r}"


def test_emit_logs_a_failure_instead_of_raising_and_rate_limits_it(transport, monkeypatch, caplog):
    def broken_wake() -> None:
        raise RuntimeError("simulated")

    emit = transport._emitter([b"worker"])
    with monkeypatch.context() as patch, caplog.at_level("ERROR", logger="segue.zmq"):
        patch.setattr(transport, "_wake", broken_wake)
        for i in range(50):
            emit(protocol.pong_event(str(i)))
    failures = [r for r in caplog.records if "could not queue a reply" in r.getMessage()]
    assert 1 <= len(failures) <= 5, f"{len(failures)} log lines for 50 failures"
    with SegueClient(transport.endpoint, timeout=TIMEOUT) as client:
        assert client.ping() < TIMEOUT  # the transport still serves


# --- streaming ------------------------------------------------------------------------------------

def test_continue_streams_notes_done_finished_in_order(transport):
    with connected(SegueClient(transport.endpoint, timeout=TIMEOUT)) as client:
        events = list(client.continue_stream(clip_payload(), bars=4, variations=2, seed=3, request_id="r1"))
    assert all(e["id"] == "r1" for e in events)
    assert_stream_matches_files(events, variations=2)
    for variation in (0, 1):
        starts = [e["start"] for e in events if e["type"] == "note" and e["variation"] == variation]
        assert all(16.0 <= s < 32.0 for s in starts), "a continuation starts after the 4-bar clip and lasts 4 bars"


def test_cancel_ends_the_stream_and_frees_the_engine(transport):
    with connected(SegueClient(transport.endpoint, timeout=TIMEOUT)) as client:
        stream = client.continue_stream(clip_payload(), **LONG, request_id="slow")
        first = next(stream)
        assert first["type"] == "note" and first["id"] == "slow"
        client.cancel("slow")
        started = time.perf_counter()
        rest = list(stream)
        assert rest[-1] == {"type": "cancelled", "id": "slow"}
        assert time.perf_counter() - started < 2.0
        assert not any(e["type"] in ("finished", "done") for e in rest)
        short = list(client.continue_stream(clip_payload(), bars=1, seed=1))
        assert short[-1]["type"] == "finished"


def test_a_cancel_crossing_finished_is_never_an_error(transport, peers):
    """A cancel sent after `finished` gets no reply (the next frame is the ping's pong); cancels sent
    while short requests end give each request exactly one terminal event, and never an `error`."""
    sock = peers.dealer(transport.endpoint)
    send_json(sock, {"type": "continue", "id": "c5", "clip": clip_payload(1), "bars": 1, "seed": 10})
    assert recv_until(sock)[-1]["type"] == "finished"
    send_json(sock, {"type": "cancel", "id": "c5"})
    send_json(sock, {"type": "ping", "id": "p2"})
    assert recv_json(sock) == {"type": "pong", "id": "p2"}
    events: list[dict] = []

    def read_until(request_id: str, kinds: tuple[str, ...]) -> None:
        while True:
            events.append(recv_json(sock))
            if events[-1]["type"] in kinds and events[-1]["id"] == request_id:
                return

    for n in range(16):
        send_json(sock, {"type": "continue", "id": f"r{n}", "clip": clip_payload(1), "bars": 1, "seed": n})
        if n % 2:  # half the time the cancel chases the `done`, half the time it races the whole request
            read_until(f"r{n}", ("done",))
        time.sleep(0.0005 * (n % 5))
        send_json(sock, {"type": "cancel", "id": f"r{n}"})
        read_until(f"r{n}", ("finished", "cancelled", "error"))
    send_json(sock, {"type": "ping", "id": "barrier"})
    while (event := recv_json(sock))["type"] != "pong":
        events.append(event)
    assert not sock.poll(200), "a reply arrived after the last request's terminal event"
    terminals: dict[str, list[str]] = {}
    for event in events:
        if event["type"] in ("finished", "cancelled", "error"):
            terminals.setdefault(event["id"], []).append(event["type"])
    assert len(terminals) == 16 and all(kinds in (["finished"], ["cancelled"]) for kinds in terminals.values()), terminals
    sock.close()


def test_leaving_a_stream_early_cancels_it_on_the_server(transport, service):
    with connected(SegueClient(transport.endpoint, timeout=TIMEOUT)) as client:
        stream = client.continue_stream(clip_payload(), **LONG, request_id="abandoned")
        next(stream)
        stream.close()  # what `break` or Ctrl-C does
        assert _settle(lambda: not service._jobs, timeout=2.0), "the abandoned request kept the engine"
        assert client.ping() < 1.0  # the cancelled tail is dropped, the next reply is found


def test_two_clients_interleaved_get_exactly_their_own_streams(transport, peers):
    a, b = peers.dealer(transport.endpoint), peers.dealer(transport.endpoint)
    request = {"type": "continue", "id": "same", "clip": clip_payload(), "bars": 4, "variations": 2}
    send_json(a, {**request, "seed": 1})
    send_json(b, {**request, "seed": 2, "clip": clip_payload(meter=(3, 4))})
    streams: dict[str, list[dict]] = {"a": [], "b": []}
    pending = {"a": a, "b": b}
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:  # read both as they come, interleaved
        for name, sock in list(pending.items()):
            if sock.poll(10):
                streams[name].append(json.loads(sock.recv()))
                if streams[name][-1]["type"] in ("finished", "error"):
                    del pending[name]
    assert not pending, f"streams not finished in time: {list(pending)}"
    for name in ("a", "b"):
        assert all(e["id"] == "same" for e in streams[name])
        assert_stream_matches_files(streams[name], variations=2)
    # Each stream is its own: the same request id went to two clients, and the files and meters differ.
    paths_a = {e["path"] for e in streams["a"] if e["type"] == "done"}
    paths_b = {e["path"] for e in streams["b"] if e["type"] == "done"}
    assert paths_a.isdisjoint(paths_b)
    assert {read_clip(p).time_signature for p in paths_a} == {(4, 4)}
    assert {read_clip(p).time_signature for p in paths_b} == {(3, 4)}
    a.close()
    b.close()


# --- dead clients ---------------------------------------------------------------------------------

VICTIM = r"""
import json, sys, zmq
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.linger = 0
sock.routing_id = b"victim-1"
sock.connect(sys.argv[1])
sock.send(json.dumps({"type": "continue", "id": "v", "clip": json.loads(sys.argv[2]),
                      "bars": 64, "variations": 16, "temperature": 1.5}).encode())
while json.loads(sock.recv())["type"] != "note":
    pass
print("streaming", flush=True)
sys.stdin.read()  # stay mid-stream (never reading again) until killed
"""


def logged(caplog, words: str) -> bool:
    return any(words in r.getMessage() for r in caplog.records)


def test_client_killed_mid_stream_frees_the_engine_and_the_next_client_is_served(transport, service, monkeypatch, caplog):
    gone: dict[str, float] = {}
    original = service.client_gone
    monkeypatch.setattr(service, "client_gone", lambda client: (gone.setdefault(client, time.monotonic()), original(client)))
    # DEBUG: the monitor's disconnect and a failed reply race (libzmq orders neither before the other);
    # whichever comes second is logged at debug level as "still gone"
    caplog.set_level("DEBUG", logger="segue.zmq")

    victim = subprocess.Popen([sys.executable, "-c", VICTIM, transport.endpoint, json.dumps(clip_payload())],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "streaming"
        victim_name = client_name(b"victim-1")
        assert victim_name in service._jobs, "the victim's request should be running"
        victim.kill()
        killed = time.monotonic()
        victim.wait(timeout=TIMEOUT)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(timeout=TIMEOUT)
        victim.stdin.close()
        victim.stdout.close()

    with SegueClient(transport.endpoint, timeout=TIMEOUT) as client:
        events = list(client.continue_stream(clip_payload(), bars=1, seed=5))
        served = time.monotonic() - killed
    assert events[-1]["type"] == "finished"
    assert served < 1.0, f"the next client waited {served:.2f} s"
    assert _settle(lambda: victim_name in gone, timeout=1.0), "the dead client was never reported to the Service"
    print(f"\nkilled mid-stream: engine freed after {1000 * (gone[victim_name] - killed):.1f} ms, "
          f"next client's continue finished {1000 * served:.0f} ms after the kill")
    assert gone[victim_name] - killed < 1.0
    # Each check below waits for its own event: the wrapper above records `gone` before the Service
    # drops the job, and the transport logs after it has told the Service.
    assert _settle(lambda: victim_name not in service._jobs, timeout=1.0)
    assert _settle(lambda: logged(caplog, "disconnected"), timeout=TIMEOUT), "the socket monitor saw no disconnect"
    assert b"victim-1" not in transport._client_fd, "the transport still maps the dead connection"


def test_without_the_monitor_a_failed_reply_still_frees_the_engine(transport, service, peers, monkeypatch, caplog):
    """ROUTER_MANDATORY path alone: with fd-to-client mapping off, the first reply to a vanished
    client fails with EHOSTUNREACH and that cancels its request."""
    monkeypatch.setattr(transport, "_srcfd_ok", False)
    caplog.set_level("INFO", logger="segue.zmq")
    sock = peers.dealer(transport.endpoint, routing_id=b"leaver")
    send_json(sock, {"type": "continue", "id": "x", "clip": clip_payload(), **LONG})
    assert recv_json(sock)["type"] == "note"
    sock.close()
    closed = time.monotonic()
    assert _settle(lambda: client_name(b"leaver") not in service._jobs, timeout=1.0), "the engine was not freed"
    print(f"\nengine freed {1000 * (time.monotonic() - closed):.0f} ms after the client closed (reply failure path)")
    # the transport logs after it has told the Service, so the line may come a moment after the engine is free
    assert _settle(lambda: logged(caplog, "unreachable"), timeout=TIMEOUT), "the failed reply was not what freed the engine"


def test_a_client_that_stops_reading_loses_only_its_own_stream(service, transports, peers, monkeypatch, caplog):
    """Its replies pile up to the send high-water mark (made tiny here, with tiny kernel buffers):
    its request is cancelled, the rest of that stream is dropped, and its next request is served."""
    monkeypatch.setattr(zmq_transport, "SEND_HWM", 4)
    configure = ZmqTransport._configure
    monkeypatch.setattr(ZmqTransport, "_configure", lambda self, sock: (configure(self, sock), sock.setsockopt(zmq.SNDBUF, 4096)))
    caplog.set_level("INFO", logger="segue.zmq")
    transport = transports()
    sleeper = peers.socket(zmq.DEALER)
    sleeper.rcvhwm, sleeper.rcvbuf, sleeper.routing_id = 1, 4096, b"sleeper"
    sleeper.connect(transport.endpoint)
    send_json(sleeper, {"type": "continue", "id": "big", "clip": clip_payload(), **LONG})
    assert _settle(lambda: any("not reading" in r.getMessage() for r in caplog.records), timeout=TIMEOUT)
    assert _settle(lambda: client_name(b"sleeper") not in service._jobs, timeout=1.0)
    with SegueClient(transport.endpoint, timeout=TIMEOUT) as other:
        assert other.ping() < 0.1  # everyone else is unaffected
    received = []
    while sleeper.poll(200):
        received.append(json.loads(sleeper.recv()))
    assert received and {e["type"] for e in received} <= {"note", "done"}, "a cut stream has no finished"
    send_json(sleeper, {"type": "ping", "id": "after"})
    assert recv_json(sleeper) == {"type": "pong", "id": "after"}  # its next request gets through
    sleeper.close()


def test_server_going_silent_times_out_the_client(peers):
    mute = peers.socket(zmq.ROUTER)  # accepts connections and never answers
    port = mute.bind_to_random_port("tcp://127.0.0.1")
    with SegueClient(f"tcp://127.0.0.1:{port}", timeout=0.3) as client, pytest.raises(ServerTimeout, match="sent nothing"):
        list(client.continue_stream(clip_payload(), bars=1))
    mute.close()


# --- hostile input ----------------------------------------------------------------------------------

MALFORMED = [  # (frames after the identity, what the error message says)
    ([b"\x00\x01garbage\xff"], "not UTF-8"),
    ([b"\xc3\x28"], "not UTF-8"),
    ([b"not json at all"], "not valid JSON"),
    ([b"[1, 2, 3]"], "JSON object"),
    ([b'"just a string"'], "JSON object"),
    ([b'{"type": "ping", "id": "n", "x": NaN}'], "not valid JSON"),
    ([b"[" * 200_000], "not valid JSON"),  # deep nesting: RecursionError inside json
    ([b""], "empty"),
    ([b"junk", b"more junk", b"\xff"], "exactly one frame"),
]


def test_malformed_frames_answer_bad_request_and_the_server_keeps_serving(transport, peers):
    sock = peers.dealer(transport.endpoint)
    for frames, says in MALFORMED:
        sock.send_multipart(frames)
        reply = recv_json(sock)
        assert reply["type"] == "error" and reply["code"] == "bad_request" and says in reply["message"], (frames[0][:20], reply)
    send_json(sock, {"type": "dance", "id": "d"})
    assert recv_json(sock)["code"] == "unknown_type"
    send_json(sock, {"type": "continue", "id": "c", "clip": {"notes": "nope"}})
    assert recv_json(sock) == {"type": "error", "id": "c", "code": "bad_request",
                               "message": "clip.notes must be a list of [pitch, velocity, start, duration] notes"}
    req = peers.socket(zmq.REQ)  # a REQ socket cannot take a stream; it is told so, in a reply it can read
    req.connect(transport.endpoint)
    req.send(b'{"type":"ping","id":"q"}')
    assert req.poll(int(TIMEOUT * 1000)) and "DEALER" in json.loads(req.recv())["message"]
    req.close()
    sock.close()


def test_oversized_message_disconnects_only_its_sender_and_ping_stays_fast(transport, service, peers):
    good = connected(SegueClient(transport.endpoint, timeout=TIMEOUT))
    stream = good.continue_stream(clip_payload(), **LONG, seed=9, request_id="keep")
    first = next(stream)  # a stream in flight on another connection must survive all of the below

    bad = peers.dealer(transport.endpoint)
    monitor = bad.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    send_json(bad, {"type": "ping", "id": "before"})
    assert recv_json(bad)["type"] == "pong"
    bad.send(b'{"type":"ping","id":"huge","pad":"' + b"x" * (transport.max_message + 1) + b'"}')
    assert monitor.poll(int(TIMEOUT * 1000)), "the oversized sender was not disconnected"
    assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    assert not bad.poll(200), "an oversized message must not be answered"
    bad.disable_monitor()
    monitor.close()
    bad.close()

    with socket.create_connection(("127.0.0.1", transport.port), timeout=TIMEOUT) as raw:  # not even ZMTP
        raw.sendall(os.urandom(4096))
    idle = socket.create_connection(("127.0.0.1", transport.port), timeout=TIMEOUT)  # connects, never handshakes
    try:
        first_ping = good.ping()
        pings = [good.ping() for _ in range(20)]
        generating = bool(service._jobs)
    finally:
        idle.close()
    print(f"\nping after hostile input: first {first_ping * 1000:.2f} ms, median of 20 {statistics.median(pings) * 1000:.2f} ms,"
          f" max {max(pings) * 1000:.2f} ms (64 bars x 16 variations {'still' if generating else 'no longer'} generating)")
    assert first_ping < 0.1 and max(pings) < 0.1

    events = [first, *stream]  # the notes that arrived during the pings were kept for the stream
    good.close()
    assert_stream_matches_files(events, variations=LONG["variations"])


# --- the `segue client` command --------------------------------------------------------------------

@pytest.fixture
def clip_file(tmp_path) -> Path:
    payload = clip_payload(bars=2)
    clip = Clip((), payload["tempo"], tuple(payload["time_signature"])).with_notes(Note(*n) for n in payload["notes"])
    return write_clip(tmp_path / "riff.mid", clip)


NOTE_LINE = re.compile(r"^\s*(\d+)\s+(\d+)\.(\d+)\.(\d\d)\s+([A-G]#?-?\d+)\s+(\d+)\s+(\d+\.\d\d)$")


def test_cli_continue_prints_notes_paths_and_timings(transport, clip_file, capsys):
    code = client_module.main(["continue", str(clip_file), "--server", transport.endpoint, "--bars", "2",
                               "--variations", "2", "--seed", "4", "--timeout", str(TIMEOUT)])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"clip: {clip_file} (") and "2 bars of 4/4 at 110 BPM" in lines[0]
    notes = [m for m in map(NOTE_LINE.match, lines) if m]
    assert notes and all(int(m[1]) in (1, 2) and 3 <= int(m[2]) <= 4 for m in notes), "new notes fill bars 3-4"
    paths = [line.strip() for line in lines if line.strip().endswith(".mid")]
    assert len(paths) == 2 and all(Path(p).is_file() for p in paths)
    assert sum(len(read_clip(p).notes) for p in paths) == len(notes)
    assert re.search(r"^finished: 2 variation\(s\), server total \d+\.\d\d s; time to first note here \d+ ms", out, re.M)


def test_cli_continue_json_lines_match_the_written_files(transport, clip_file, capsys):
    code = client_module.main(["continue", str(clip_file), "--server", transport.endpoint, "--json", "--bars", "1",
                               "--variations", "2", "--seed", "2", "--temperature", "1.0", "--top-k", "8"])
    out, err = capsys.readouterr()
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert_stream_matches_files(events, variations=2)


def test_cli_errors_are_one_line_and_exit_1(transport, clip_file, tmp_path, capsys):
    code = client_module.main(["continue", str(clip_file), "--server", transport.endpoint, "--model", "nope"])
    out, err = capsys.readouterr()
    assert code == 1 and err == "error: there is no model named 'nope' (available: default)\n"
    code = client_module.main(["continue", str(clip_file), "--server", transport.endpoint, "--bars", "500", "--json"])
    out, err = capsys.readouterr()
    assert code == 1 and err.count("\n") == 1 and "bars must be between" in err
    assert json.loads(out)["code"] == "bad_request"
    (tmp_path / "broken.mid").write_bytes(b"MThd\x00\x00\x00\x06garbage")
    code = client_module.main(["continue", str(tmp_path / "broken.mid"), "--server", transport.endpoint])
    out, err = capsys.readouterr()
    assert code == 1 and err.startswith("error: ") and "broken.mid" in err and err.count("\n") == 1


def test_cli_unreachable_server_says_to_start_segue_serve(clip_file, capsys, clients):
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for argv in (["ping"], ["hello"], ["continue", str(clip_file)]):
        started = time.perf_counter()
        code = client_module.main([*argv, "--server", f"tcp://127.0.0.1:{port}", "--connect-timeout", "0.3"])
        out, err = capsys.readouterr()
        assert code == 1 and out == ""
        assert err == f"error: no Segue server answered at tcp://127.0.0.1:{port} within 0.3 s; " \
                      "start one with `segue serve` (or point --server at it)\n"
        assert time.perf_counter() - started < 2.0
    with SegueClient(f"tcp://127.0.0.1:{port}", connect_timeout=0.1) as client, pytest.raises(ServerUnreachable) as caught:
        client.ping()
    assert caught.value.code == "unreachable"


def test_cli_ping_and_hello(transport, capsys):
    assert client_module.main(["ping", "--server", transport.endpoint]) == 0
    assert re.fullmatch(rf"pong from {re.escape(transport.endpoint)} in \d+\.\d ms\n", capsys.readouterr().out)
    assert client_module.main(["hello", "--server", transport.endpoint]) == 0
    out = capsys.readouterr().out
    assert "protocol 1" in out and re.search(r"^  default: \d+\.\d M parameters, context \d+ tokens  \(default\)$", out, re.M)
    assert client_module.main(["hello", "--json", "--server", transport.endpoint]) == 0
    assert json.loads(capsys.readouterr().out)["default_model"] == "default"


def test_cli_options_map_to_request_fields():
    """Only the options given are sent; the server fills the rest from the model's search defaults."""
    from plugin_bridge.options import continuation_options

    args = client_module.build_parser().parse_args(
        ["continue", "x.mid", "--bars", "8", "--mode", "beam", "--beam-width", "3", "--key", "F#", "--scale", "minor",
         "--pitch-min", "48", "--pitch-max", "72", "--max-polyphony", "2", "--max-notes-per-bar", "6",
         "--velocity-min", "30", "--velocity-max", "100", "--model", "bach"])
    assert args.model == "bach"
    assert continuation_options(args) == {
        "bars": 8, "mode": "beam", "beam_width": 3,
        "constraints": {"key": "F#", "scale": "minor", "pitch_min": 48, "pitch_max": 72, "max_polyphony": 2,
                        "max_notes_per_bar": 6, "velocity_min": 30, "velocity_max": 100}}
    assert continuation_options(client_module.build_parser().parse_args(["continue", "x.mid"])) == {}


def test_display_helpers():
    assert [note_name(p) for p in (60, 61, 69, 0, 127)] == ["C4", "C#4", "A4", "C-1", "G9"]
    assert bar_beat(0.0, (4, 4)) == "1.1.00" and bar_beat(17.5, (4, 4)) == "5.2.50"
    assert bar_beat(3.0, (6, 8)) == "2.1.00" and bar_beat(1.0 / 3, (4, 4)) == "1.1.33"
    assert bar_beat(11.999999, (3, 4)) == "5.1.00"  # float noise rounds onto the grid, never "4.4.100"


def test_client_errors_carry_the_server_code(transport):
    with SegueClient(transport.endpoint, timeout=TIMEOUT) as client:
        with pytest.raises(ClientError) as caught:
            list(client.continue_stream({"notes": []}))
        assert caught.value.code == "bad_clip"
        with pytest.raises(TypeError, match="temprature"):
            client.continue_stream(clip_payload(), temprature=1.0)
        assert client.ping() < 1.0


# --- requests read off the I/O thread (plugin_bridge/intake.py) --------------------------------------

def large_continue(request_id: str, notes: int = 20_000, shift: int = 0) -> dict:
    """A valid continue of `notes` notes (about 470 KB of JSON; half a second to decode and check); another
    `shift` is another clip (the server prefills each anew: a clip it has seen would be continued at once)."""
    clip = {"notes": [[40 + ((i + shift) % 48), 80, (i // 8) * 0.25, 0.25] for i in range(notes)], "tempo": 120,
            "time_signature": [4, 4]}
    return {"type": "continue", "id": request_id, "clip": clip, "bars": 1}


def test_large_requests_never_delay_another_clients_ping(transport, peers):
    heavy, light = (peers.dealer(transport.endpoint) for _ in range(2))
    send_json(light, {"type": "ping", "id": "warm"})
    assert recv_json(light)["type"] == "pong"
    raw = [json.dumps(large_continue(f"big{n}", shift=n)).encode() for n in range(6)]
    for data in raw:
        heavy.send(data)
    time.sleep(0.05)  # the transport has the six in hand
    started = time.perf_counter()
    send_json(light, {"type": "ping", "id": "p"})
    reply = recv_json(light)
    waited_ms = (time.perf_counter() - started) * 1000
    assert reply == {"type": "pong", "id": "p"}
    # Read on the I/O thread, the six took seconds to decode and check before this ping was read.
    assert waited_ms < 300, f"a ping waited {waited_ms:.0f} ms behind another client's large requests"
    events = recv_until(heavy, kinds=("finished",))  # the last one, having replaced the others, still runs
    assert events[-1]["id"] == "big5" and {e["id"] for e in events if e["type"] == "cancelled"} <= {f"big{n}" for n in range(5)}
    heavy.close()
    light.close()


def test_a_cancel_right_after_a_large_continue_cancels_that_continue(transport, peers):
    dealer = peers.dealer(transport.endpoint)
    send_json(dealer, large_continue("big"))
    send_json(dealer, {"type": "cancel", "id": "big"})  # small: it must not overtake the continue
    events = recv_until(dealer)
    dealer.close()
    assert events[-1] == {"type": "cancelled", "id": "big"}, events[-1]
    assert not [e for e in events if e["type"] == "error"]


def test_the_intake_queue_is_bounded_per_client_and_in_bytes():
    from plugin_bridge.intake import Intake

    release = threading.Event()
    handled: list[str] = []

    def slow_handle(client, payload, emit):
        if payload["type"] != "ping":  # a continue being read: holds the intake thread until released
            release.wait(10)
        handled.append(payload["id"])

    replies: list[dict] = []
    intake = Intake(slow_handle, max_bytes=61_000, max_per_client=2)
    try:
        big = json.dumps({"type": "continue", "id": "x", "pad": "a" * 20_000}).encode()
        for n in range(3):  # the first is taken by the thread (still counted), the next two wait
            intake.submit_bytes("a", big, json.loads, replies.append, request_id=f"a{n}")
        assert replies == [{"type": "error", "id": "a2", "code": "busy",
                            "message": "this client already has 2 requests waiting to be read; wait for their replies"}]
        intake.submit_bytes("b", big, json.loads, replies.append, request_id="b0")
        intake.submit_bytes("c", big, json.loads, replies.append, request_id="c0")  # 4 x 20 KB > 61 KB
        assert replies[-1]["id"] == "c0" and replies[-1]["code"] == "busy" and "too many large requests" in replies[-1]["message"]
        intake.submit("a", {"type": "ping", "id": "p"}, lambda e: replies.append({"answered": e}))  # never queued
        release.set()
        assert _settle(lambda: intake.queued() == 0)
        assert handled == ["p", "x", "x", "x"]  # the ping first; a's two, then b's, in order
    finally:
        release.set()
        intake.close()


def test_connections_over_the_limit_are_shut_and_the_connected_keep_being_served(transports, peers, caplog):
    """At the connection limit new connections are shut on arrival (libzmq would otherwise spin at the
    descriptor limit and starve everyone); the connected clients are served throughout, and a waiting
    client gets in by itself (ZeroMQ reconnects) once others leave."""
    transport = transports(max_connections=4)
    first = [peers.dealer(transport.endpoint) for _ in range(4)]
    late: list[zmq.Socket] = []
    try:
        for n, dealer in enumerate(first):
            send_json(dealer, {"type": "ping", "id": f"f{n}"})
            assert recv_json(dealer)["id"] == f"f{n}"
        late = [peers.dealer(transport.endpoint) for _ in range(3)]
        for n, dealer in enumerate(late):
            send_json(dealer, {"type": "ping", "id": f"late{n}"})
        time.sleep(1.0)
        assert all(not dealer.poll(0) for dealer in late)  # refused: nothing read from them
        for n, dealer in enumerate(first):  # while the connected are answered as usual
            send_json(dealer, {"type": "ping", "id": f"again{n}"})
            assert recv_json(dealer, timeout=1)["id"] == f"again{n}"
        assert logged(caplog, "refused a ZeroMQ connection")
        for dealer in first[:3]:
            dealer.close()
        # A ping sent on a connection that was then shut is lost; once there is room, asking again is answered.
        for n, dealer in enumerate(late):
            deadline, answered = time.monotonic() + 10, False
            while not answered and time.monotonic() < deadline:
                send_json(dealer, {"type": "ping", "id": f"retry{n}"})
                answered = bool(dealer.poll(500)) and any(json.loads(dealer.recv())["type"] == "pong" for _ in [0])
            assert answered, f"late client {n} was never let in"
    finally:
        for dealer in first + late:
            dealer.close()


def test_start_up_raises_the_open_file_limit_where_it_can():
    """A thousand idle local connections exhaust the common soft limit of 1,024 descriptors."""
    code = ("import resource\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
            "from plugin_bridge.zmq_transport import connection_cap, raise_descriptor_limit\n"
            "limit = raise_descriptor_limit()\n"
            "print(limit, resource.getrlimit(resource.RLIMIT_NOFILE)[0], connection_cap(limit))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    limit, soft, cap = map(int, out)
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    expected = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    assert limit == soft == expected
    assert cap == min(4096, expected - 128)
