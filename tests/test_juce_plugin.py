"""The JUCE plugin end to end: built with cmake, loaded by a minimal VST3 host, talking to a real `segue serve`.

    python3 -m pytest tests/test_juce_plugin.py -q

The first run builds juce_stub/ into juce_stub/build/ (the `default` preset: Debug VST3 plus the
test host; a few minutes on 2 cores); later runs only rebuild what changed. Needs JUCE 7, cmake and
a C++17 compiler (Debian: `apt-get install juce-modules-source cmake g++ pkg-config`); when they are
missing the tests fail and say so (CI installs them).

`juce_stub/test_host` is a small C++ program on `juce::VST3PluginFormat`: it gives the plugin a
steady play head, feeds it a scripted clip at exact sample positions, presses Continue (a MIDI CC
or the Continue parameter), keeps playing in real time, and writes every MIDI event the plugin put
out. Between the plugin and the server sits a UDP relay that records what the plugin sent, so the
tests read the request exactly as the server received it. The server is the real `segue serve`
on the tiny test model; its `.mid` files are the reference the played notes are checked against.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import NamedTuple

import mido
import pytest
from pythonosc.osc_message import OscMessage
from test_server import Server, free_port

from plugin_bridge.osc_client import OscClient

ROOT = Path(__file__).resolve().parents[1]
STUB = ROOT / "juce_stub"
BUILD = STUB / "build"
VST3 = BUILD / "Segue_artefacts" / "Debug" / "VST3" / "Segue.vst3"
HOST = BUILD / "test_host" / "segue_test_host_artefacts" / "Debug" / "segue_test_host"
INSTALL_HINT = "apt-get install juce-modules-source cmake g++ pkg-config (see docs/hosts-plugin.md)"

RATE, BLOCK, BPM = 48000, 256, 240.0
SPB = RATE * 60.0 / BPM  # samples per beat
BAR = 4.0  # beats per bar in 4/4
TRIGGER_CC = [0xB0, 102, 127]


# --- building -------------------------------------------------------------------------------------

def run_step(command: list[str], what: str, timeout: float) -> None:
    try:
        result = subprocess.run(["nice", "-n", "10", *command], cwd=STUB, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        pytest.fail(f"{what}: {exc}. Install the build tools: {INSTALL_HINT}")
    if result.returncode != 0:
        pytest.fail(f"{what} failed (exit {result.returncode}); is JUCE 7 installed? {INSTALL_HINT}\n"
                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")


@pytest.fixture(scope="session")
def plugin_build() -> tuple[Path, Path]:
    """The Debug VST3 and the test host, built (or brought up to date) with the `default` preset."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: the JUCE plugin cannot be built. Install: {INSTALL_HINT}")
    run_step(["cmake", "--preset", "default"], "configuring juce_stub (cmake --preset default)", timeout=600)
    run_step(["cmake", "--build", "--preset", "default", "--target", "Segue_VST3", "segue_test_host"],
             "building juce_stub (cmake --build --preset default)", timeout=3600)
    assert (VST3 / "Contents").is_dir(), f"the build did not produce {VST3}"
    assert HOST.is_file(), f"the build did not produce {HOST}"
    return VST3, HOST


# --- the server and a relay in front of it ---------------------------------------------------------

class Relay:
    """A UDP port that forwards every datagram to the server and keeps a copy. The plugin is pointed
    here; replies go straight from the server to the plugin's reply port (named in each message)."""

    def __init__(self, server_port: int, hold_continue_s: float = 0.0, drop_continues: int = 0):
        self.server = ("127.0.0.1", server_port)
        self.hold_continue_s = hold_continue_s  # > 0: a slow server, as the plugin sees it
        self.drop_continues = drop_continues  # the first N continues are lost (a server that died with them)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.received: list[tuple[float, OscMessage]] = []
        self.largest = 0  # bytes of the largest datagram seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="udp-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            message = OscMessage(data)
            self.received.append((time.monotonic(), message))
            self.largest = max(self.largest, len(data))
            if message.address == "/segue/continue" and self.drop_continues > 0:
                self.drop_continues -= 1
            elif self.hold_continue_s > 0 and message.address == "/segue/continue":
                threading.Timer(self.hold_continue_s, self.sock.sendto, (data, self.server)).start()
            else:
                self.sock.sendto(data, self.server)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def messages(self, address: str) -> list[list]:
        return [m.params for _, m in self.received if m.address == address]

    def continue_request(self) -> tuple[int, str, dict]:
        """(reply port, id, JSON) of the one continue the plugin sent, whole or reassembled from chunks."""
        whole = self.messages("/segue/continue")
        if whole:
            assert len(whole) == 1, f"expected one continue, got {len(whole)}"
            port, request_id, text = whole[0]
            return port, request_id, json.loads(text)
        chunks = self.messages("/segue/continue/chunk")
        assert chunks, f"the plugin sent no continue; it sent {[m.address for _, m in self.received]}"
        port, request_id, _, count, _ = chunks[0]
        pieces = {index: data for _, _, index, _, data in chunks}
        assert sorted(pieces) == list(range(count))
        return port, request_id, json.loads("".join(pieces[i] for i in range(count)))


@pytest.fixture
def server(models_dir, tmp_path, request):
    """`segue serve` on the tiny model, free ports, its own clips folder; a relay in front of its OSC port
    (holding each continue back for `hold_continue_s` seconds when a test is marked with that parameter)."""
    hold = getattr(request, "param", 0.0)
    osc_port = free_port(socket.SOCK_DGRAM)
    serve = Server("--models", models_dir, "--osc-port", osc_port, "--zmq-port", free_port(), "--clips-dir",
                   tmp_path / "clips", "--no-watch")
    relay = None
    try:
        serve.wait_ready()
        relay = Relay(osc_port, hold_continue_s=hold)
        yield serve, relay, tmp_path / "clips"
    finally:
        if relay is not None:
            relay.close()
        serve.stop()


# --- driving the host ------------------------------------------------------------------------------

def clip_events(bars: int = 2, step: float = 0.5, chord: int = 1, rest: float = 2.0) -> tuple[list[dict], list[list]]:
    """A rising figure over `bars` bars, leaving the last `rest` beats empty: the Continue press goes
    there, half a second (at 240 BPM) before the continuation is due, so even a busy server is in time.
    Returns the host events and the notes in protocol form ([pitch, velocity, start, duration, channel])."""
    events, notes = [], []
    scale = [0, 2, 4, 5, 7, 9, 11]
    beat, i = 0.0, 0
    while beat < bars * BAR - rest - 1e-9:
        for voice in range(chord):
            pitch = 60 + scale[(i + 2 * voice) % 7] + 12 * ((i + 2 * voice) // 7 % 2)
            velocity = 60 + (i * 7 + voice * 5) % 60
            duration = round(step * 0.9, 4)
            events += [{"beat": beat, "midi": [0x90, pitch, velocity]}, {"beat": beat + duration, "midi": [0x80, pitch, 0]}]
            notes.append([pitch, velocity, beat, duration, 0])
        beat, i = beat + step, i + 1
    return events, notes


def play(host: Path, vst3: Path, relay: Relay, tmp_path: Path, *, events: list[dict], params: list[dict], beats: float,
         realtime_from: float, stop_at: float | None = None) -> dict:
    """Run the test host over the script. `stop_at`: the host beat where the transport stops (it stays
    there, not playing, while the host's blocks, events and parameters go on)."""
    script = {"plugin": str(vst3), "sample_rate": RATE, "block_size": BLOCK, "bpm": BPM, "time_signature": [4, 4],
              "beats": beats, "realtime_from_beat": realtime_from, "events": events, "params": params}
    if stop_at is not None:
        script["stop_at_beat"] = stop_at
    (tmp_path / "play.json").write_text(json.dumps(script))
    env = {**os.environ, "SEGUE_OSC_PORT": str(relay.port), "SEGUE_SERVE_COMMAND": ""}
    result = subprocess.run([str(host), "--script", "play.json", "--out", "out.json"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"the test host failed (exit {result.returncode}):\n{result.stderr[-3000:]}"
    time.sleep(0.3)  # the plugin's last datagram (cancel on close) reaches the relay
    assert relay.largest <= 8000, f"the plugin sent a {relay.largest}-byte datagram; shells keep them under 8000"
    return json.loads((tmp_path / "out.json").read_text())


def note_ons(output: dict, from_beat: float = 0.0) -> list[tuple[int, int, int]]:
    """(sample, pitch, velocity) of every note-on the plugin put out at or after `from_beat`."""
    return [(e["sample"], e["midi"][1], e["midi"][2]) for e in output["events"]
            if e["midi"][0] & 0xF0 == 0x90 and e["midi"][2] > 0 and e["sample"] >= from_beat * SPB - 1]


def note_offs(output: dict, from_beat: float = 0.0) -> list[tuple[int, int]]:
    return [(e["sample"], e["midi"][1]) for e in output["events"]
            if (e["midi"][0] & 0xF0 == 0x80 or (e["midi"][0] & 0xF0 == 0x90 and e["midi"][2] == 0))
            and e["sample"] >= from_beat * SPB - 1]


class WrittenNote(NamedTuple):
    pitch: int
    velocity: int
    start: float  # beats from the clip start
    duration: float


def written_notes(clips: Path, reply_port: int, request_id: str, variation: int = 1) -> list[WrittenNote]:
    """The notes of the .mid the server wrote for this request (the `done` path), in beats from the clip
    start; read with mido, so a variation the model left empty reads as no notes."""
    path = clips / f"osc_127.0.0.1_{reply_port}-{request_id}-v{variation}.mid"
    assert path.is_file(), f"the server wrote no {path.name}; it has {sorted(p.name for p in clips.glob('*'))}"
    midi = mido.MidiFile(str(path))
    notes, held = [], {}
    for track in midi.tracks:
        tick = 0
        for message in track:
            tick += message.time
            if message.type == "note_on" and message.velocity > 0:
                held[(message.channel, message.note)] = (tick, message.velocity)
            elif message.type in ("note_on", "note_off") and (message.channel, message.note) in held:
                start, velocity = held.pop((message.channel, message.note))
                notes.append(WrittenNote(message.note, velocity, start / midi.ticks_per_beat, (tick - start) / midi.ticks_per_beat))
    return sorted(notes, key=lambda n: (n.start, n.pitch))


def assert_played_in_time(output: dict, notes: list[WrittenNote], clip_end: float, bars: int, run_beats: float,
                          whole: bool = True) -> None:
    """The continuation came out of the plugin: exactly the server's notes, each note-on on the sample
    where its beat falls (the play head runs from beat 0), after the clip, within the bars asked for."""
    generated = note_ons(output, clip_end)
    assert generated, "no generated note came out of the plugin"
    samples = [s for s, _, _ in generated]
    assert samples == sorted(samples), "the plugin's output is not in time order"

    due = [n for n in notes if n.start < run_beats - 0.01]
    assert due, "the server's continuation has no notes inside the time the host played"
    expected = sorted((round(n.start * SPB), n.pitch, n.velocity) for n in due)
    assert len(generated) == len(expected), f"played {len(generated)} notes, the server wrote {len(expected)}"
    for (got_sample, got_pitch, got_velocity), (want_sample, want_pitch, want_velocity) in \
            zip(sorted(generated), expected, strict=True):
        assert (got_pitch, got_velocity) == (want_pitch, want_velocity)
        assert abs(got_sample - want_sample) <= 1, f"pitch {got_pitch} at sample {got_sample}, due at {want_sample}"

    offs = note_offs(output, clip_end)
    for n in due:
        end = n.start + n.duration
        if end < run_beats - 0.01:
            assert any(abs(s - end * SPB) <= 1 and p == n.pitch for s, p in offs), \
                f"no note-off for pitch {n.pitch} at beat {end:.3f}"

    starts = [n.start for n in notes]
    assert min(starts) >= clip_end - 1e-6, "a generated note starts inside the clip"
    assert max(starts) < clip_end + bars * BAR, "a generated note starts after the bars asked for"
    if whole:
        assert max(starts) >= clip_end + (bars - 1) * BAR, "the continuation does not reach its last bar"


# --- the tests -------------------------------------------------------------------------------------

def test_a_played_clip_is_continued_in_time_after_a_midi_trigger(plugin_build, server, tmp_path):
    vst3, host = plugin_build
    _, relay, clips = server
    events, played = clip_events(bars=2)
    events.append({"beat": 6.0, "midi": TRIGGER_CC})  # CC 102 presses Continue in the clip's last bar
    params = [{"beat": 0, "name": "Bars", "text": "2"}, {"beat": 0, "name": "Clip bars", "text": "2"},
              {"beat": 0, "name": "Variations", "text": "2"}, {"beat": 0, "name": "Seed", "text": "7"}]
    output = play(host, vst3, relay, tmp_path, events=events, params=params, beats=17, realtime_from=6)

    assert output["plugin"] == "Segue"
    names = {p["name"] for p in output["parameters"]}
    assert {"Clip bars", "Bars", "Variations", "Temperature", "Key lock", "Scale", "Seed", "Continue"} <= names

    # The clip passes through untouched; the trigger CC is swallowed.
    thru = [(round(n[2] * SPB), n[0], n[1]) for n in played]
    assert sorted(note_ons(output)[:len(thru)]) == sorted(thru)
    assert not any(e["midi"][0] & 0xF0 == 0xB0 for e in output["events"]), "the trigger CC was passed on"

    # What the server received: hello first, then the clip exactly as played, placed in bars 1-2.
    assert relay.received[0][1].address == "/segue/hello"
    reply_port, request_id, request = relay.continue_request()
    assert 0 < reply_port < 65536 and request_id
    clip = request["clip"]
    assert [[n[0], n[1], n[2], n[3], n[4]] for n in clip["notes"]] == \
           [[p, v, pytest.approx(s, abs=1e-5), pytest.approx(d, abs=1e-5), c] for p, v, s, d, c in played]
    assert clip["tempo"] == BPM and clip["time_signature"] == [4, 4] and clip["length"] == 8
    assert request["bars"] == 2 and request["variations"] == 2 and request["seed"] == 7

    # What came out: the first variation, sample-accurate, after the clip, across both bars.
    assert_played_in_time(output, written_notes(clips, reply_port, request_id), clip_end=8.0, bars=2, run_beats=17)
    assert (clips / f"osc_127.0.0.1_{reply_port}-{request_id}-v2.mid").is_file()

    # Closing the plugin tells the server (OSC cannot notice that a client left).
    last = relay.received[-1][1]
    assert (last.address, last.params) == ("/segue/cancel", [reply_port, ""])


def test_the_clip_is_prepared_at_each_bar_line_and_continue_starts_from_that_prefill(plugin_build, server, tmp_path):
    """Zero-wait Continue (docs/protocol.md 3.9): at each bar line the playing transport crosses, the
    plugin sends `prepare` with the request a Continue pressed right there would send, when its clip
    changed. Pressed just after the clip's last bar line, the Continue sends that very request, and
    the server starts it from the kept prefill. The server counts prefills by prompt: the plugin's
    prepare computed this prompt (its log says cached=no), and the cache holds exactly one prompt per
    prefill the plugin's prepares computed, so the continue added none: it found the prepared one."""
    vst3, host = plugin_build
    serve, relay, clips = server
    events, played = clip_events(bars=2)  # notes in beats 0-6; bar lines at 4 and 8
    events.append({"beat": 8.9, "midi": TRIGGER_CC})  # in the first beat after the clip, nothing played: the clip ends at 8
    params = [{"beat": 0, "name": "Bars", "text": "2"}, {"beat": 0, "name": "Clip bars", "text": "2"},
              {"beat": 0, "name": "Variations", "text": "2"}, {"beat": 0, "name": "Seed", "text": "5"}]
    output = play(host, vst3, relay, tmp_path, events=events, params=params, beats=17, realtime_from=6)

    reply_port, continue_id, request = relay.continue_request()
    sent = [(at, m.address, m.params) for at, m in relay.received if m.address.startswith(("/segue/prepare", "/segue/continue"))]
    assert not relay.messages("/segue/prepare/chunk"), "a 2-bar clip fits one datagram"
    prepares = [(at, params) for at, address, params in sent if address == "/segue/prepare"]
    assert prepares, f"the plugin sent no prepare; it sent {[m.address for _, m in relay.received]}"
    for _, (port, prepare_id, _) in prepares:
        assert port == reply_port and prepare_id != continue_id
    bodies = [json.loads(text) for _, (_, _, text) in prepares]
    clips_prepared = [json.dumps(body["clip"], sort_keys=True) for body in bodies]
    assert len(set(clips_prepared)) == len(clips_prepared), "the plugin prepared the same clip twice"

    # Bar line 4: a press there would send the clip's first bar (the 2 bars before it: beats -4..4).
    first = bodies[0]["clip"]
    assert first["length"] == 8 and [n[:2] for n in first["notes"]] == [n[:2] for n in played if n[2] < 4]
    assert [n[2] for n in first["notes"]] == [pytest.approx(n[2] + 4, abs=1e-5) for n in played if n[2] < 4]

    # Bar line 8: the very request the Continue sent, sent before it; nothing after it repeats that clip.
    continue_at = next(at for at, address, _ in sent if address == "/segue/continue")
    matching = [k for k, body in enumerate(bodies) if body == request]
    assert len(matching) == 1, f"no prepare carried the continue's request; prepared clips: {clips_prepared}"
    prepared_at, (_, prepare_id, _) = prepares[matching[0]]
    assert prepared_at < continue_at
    assert len(request["clip"]["notes"]) == len(played) and request["clip"]["length"] == 8

    assert_the_continue_started_from_its_prepare(serve, relay, prepares, prepare_id, continue_id, request)

    # And the continuation plays: the server's notes, each on its sample once the press was a beat past.
    notes = written_notes(clips, reply_port, continue_id)
    out = note_ons(output, 8.0)
    assert out and {(p, v) for _, p, v in out} <= {(n.pitch, n.velocity) for n in notes}
    for n in notes:
        if 10.0 <= n.start < 16.99:
            assert any(abs(s - round(n.start * SPB)) <= 1 and p == n.pitch for s, p, _ in out), \
                f"pitch {n.pitch} due at beat {n.start} did not play on its sample"


def assert_the_continue_started_from_its_prepare(serve, relay: Relay, prepares: list, prepare_id: str, continue_id: str,
                                                 request: dict) -> None:
    """The server: the plugin's prepare `prepare_id` ran the prefill of the continue's clip, every prepare of
    the plugin ended, and the continue added no prefill of its own."""
    prepared_line = re.compile(r"id=(\S+) model=\S+ prepared tokens=(\d+) cached=(yes|no) .*\(cache: (\d+) prompts")
    for _, (_, some_id, _) in prepares:
        assert serve.wait_for_log(f"id={some_id} model="), f"the server never prepared {some_id}:\n{serve.log}"
    assert serve.wait_for_log(f"id={continue_id} model="), f"the continue did not finish:\n{serve.log}"
    lines = {m[1]: m for m in prepared_line.finditer(serve.log)}
    assert lines[prepare_id][3] == "no", "the Continue overtook its prepare: the prepare found the prefill done"
    computed = sum(lines[some_id][3] == "no" for _, (_, some_id, _) in prepares)

    # Ask the server about the continue's clip: it is kept (cached), and no prompt beyond the plugin's
    # prepares is: the continue was served from the prepared prefill instead of adding its own.
    with OscClient(port=relay.server[1], timeout=10.0) as probe:
        probe_id = probe.prepare_clip(request, "probe")
        reply = next(e for e in probe.stream(probe_id) if e["type"] in ("prepared", "error"))
    assert reply["type"] == "prepared" and reply["cached"] is True, reply
    assert reply["tokens"] == int(lines[prepare_id][2])
    assert serve.wait_for_log("id=probe model=")
    probe_line = {m[1]: m for m in prepared_line.finditer(serve.log)}["probe"]
    assert int(probe_line[4]) == computed, \
        f"the server holds {probe_line[4]} prompts, the plugin's prepares computed {computed}: the continue prefilled its own"


def test_a_transport_stopped_mid_bar_prepares_the_clip_a_continue_then_sends(plugin_build, server, tmp_path):
    """Played into the plugin, stopped in the middle of a bar that has notes, then Continue: the bar-line
    prepare (at beat 4) missed the notes after it, so the plugin prepares again where the transport
    stops, with the request a Continue pressed there sends (the clip ends at the next bar line, 8),
    and the Continue pressed later, still stopped, starts from that prefill."""
    vst3, host = plugin_build
    serve, relay, _ = server
    events, played = clip_events(bars=2)  # notes in beats 0-6
    params = [{"beat": 0, "name": "Bars", "text": "2"}, {"beat": 0, "name": "Clip bars", "text": "2"},
              {"beat": 0, "name": "Seed", "text": "5"}, {"beat": 9.0, "name": "Continue", "value": 1.0}]
    play(host, vst3, relay, tmp_path, events=events, params=params, beats=12, realtime_from=5, stop_at=6.5)

    reply_port, continue_id, request = relay.continue_request()
    sent = [(at, m.address, m.params) for at, m in relay.received if m.address.startswith(("/segue/prepare", "/segue/continue"))]
    prepares = [(at, params) for at, address, params in sent if address == "/segue/prepare"]
    bodies = [json.loads(text) for _, (_, _, text) in prepares]
    assert len(request["clip"]["notes"]) == len(played) and request["clip"]["length"] == 8
    assert any(len(body["clip"]["notes"]) < len(played) for body in bodies), "the bar line at 4 prepared the first bar"
    matching = [k for k, body in enumerate(bodies) if body == request]
    assert len(matching) == 1, f"no prepare carried the continue's request; prepared: {[b['clip'] for b in bodies]}"
    continue_at = next(at for at, address, _ in sent if address == "/segue/continue")
    prepared_at, (port, prepare_id, _) = prepares[matching[0]]
    assert prepared_at < continue_at and port == reply_port and prepare_id != continue_id
    assert_the_continue_started_from_its_prepare(serve, relay, prepares, prepare_id, continue_id, request)


def test_the_continue_parameter_triggers_with_key_lock(plugin_build, server, tmp_path):
    vst3, host = plugin_build
    _, relay, clips = server
    events, _ = clip_events(bars=2)
    params = [{"beat": 0, "name": "Bars", "text": "2"}, {"beat": 0, "name": "Clip bars", "text": "2"},
              {"beat": 0, "name": "Variations", "text": "1"}, {"beat": 0, "name": "Key lock", "text": "D"},
              {"beat": 0, "name": "Scale", "text": "dorian"}, {"beat": 0, "name": "Seed", "text": "4"},
              {"beat": 6.0, "name": "Continue", "value": 1.0}, {"beat": 6.5, "name": "Continue", "value": 0.0}]
    output = play(host, vst3, relay, tmp_path, events=events, params=params, beats=17, realtime_from=6)

    reply_port, request_id, request = relay.continue_request()
    assert request["constraints"] == {"key": 2, "scale": "dorian"}
    assert request["clip"]["length"] == 8 and request["bars"] == 2 and request["seed"] == 4
    notes = written_notes(clips, reply_port, request_id)
    assert_played_in_time(output, notes, clip_end=8.0, bars=2, run_beats=17, whole=False)
    d_dorian = {(2 + step) % 12 for step in (0, 2, 3, 5, 7, 9, 10)}
    assert {pitch % 12 for _, pitch, _ in note_ons(output, 8.0)} <= d_dorian


def test_a_large_clip_goes_up_in_chunks(plugin_build, server, tmp_path):
    vst3, host = plugin_build
    _, relay, clips = server
    events, played = clip_events(bars=16, step=0.5, chord=4)  # about 500 notes: over 8,000 bytes of JSON
    events.append({"beat": 62.0, "midi": TRIGGER_CC})
    params = [{"beat": 0, "name": "Bars", "text": "2"}, {"beat": 0, "name": "Clip bars", "text": "16"},
              {"beat": 0, "name": "Variations", "text": "1"}, {"beat": 0, "name": "Seed", "text": "2"}]
    output = play(host, vst3, relay, tmp_path, events=events, params=params, beats=73, realtime_from=61)

    chunks = relay.messages("/segue/continue/chunk")
    assert len({c[2] for c in chunks}) >= 2 and not relay.messages("/segue/continue")
    reply_port, request_id, request = relay.continue_request()
    assert len(request["clip"]["notes"]) == len(played) and request["clip"]["length"] == 64
    notes = written_notes(clips, reply_port, request_id)  # the server answered the reassembled request
    if notes:
        assert_played_in_time(output, notes, clip_end=64.0, bars=2, run_beats=73, whole=False)
    else:  # the model may leave a short continuation of so dense a clip empty: then nothing may come out
        assert not note_ons(output, 64.0)


def test_without_a_server_midi_passes_through_and_the_plugin_keeps_asking(plugin_build, tmp_path):
    vst3, host = plugin_build
    nobody = free_port(socket.SOCK_DGRAM)  # the relay forwards into a port where no server listens
    relay = Relay(nobody)
    try:
        events, played = clip_events(bars=1)
        events.append({"beat": 3.0, "midi": TRIGGER_CC})
        output = play(host, vst3, relay, tmp_path, events=events, params=[], beats=16, realtime_from=0)
    finally:
        relay.close()
    assert sorted(note_ons(output)) == sorted((round(n[2] * SPB), n[0], n[1]) for n in played)
    assert len(relay.messages("/segue/hello")) >= 2, "the plugin stopped looking for a server"
    assert relay.messages("/segue/continue"), "Continue sent nothing"


@pytest.mark.parametrize("server", [0.5], indirect=True)
def test_notes_that_arrive_late_follow_the_late_note_rule(plugin_build, server, tmp_path):
    """The relay holds the request back half a second (two beats here), so the first notes reach the
    plugin after their time. The rule: a note whose written end is still ahead plays at once, at
    the first sample of the next block, and ends at its written end; a note whose end has passed
    too is skipped. Everything that arrives before its time plays on its exact sample."""
    vst3, host = plugin_build
    _, relay, clips = server
    events, _ = clip_events(bars=2, rest=1.0)
    events.append({"beat": 7.75, "midi": TRIGGER_CC})
    params = [{"beat": 0, "name": "Bars", "text": "2"}, {"beat": 0, "name": "Clip bars", "text": "2"},
              {"beat": 0, "name": "Variations", "text": "1"}, {"beat": 0, "name": "Seed", "text": "12"}]
    output = play(host, vst3, relay, tmp_path, events=events, params=params, beats=17, realtime_from=7)
    reply_port, request_id, _ = relay.continue_request()
    notes = sorted((n for n in written_notes(clips, reply_port, request_id) if n.start < 16.99),
                   key=lambda n: (n.start, n.pitch))  # the order the server sent them in
    held_until = (7.75 + 0.5 * BPM / 60) * SPB  # no note can have reached the plugin before this sample
    assert any(n.start * SPB < held_until for n in notes), "precondition: the continuation starts with a note in its first beats"
    assert any(n.start * SPB > held_until + SPB for n in notes), \
        "precondition: the continuation has notes after the held time too (a skipped note is judged against them); try another seed"

    ons, offs = note_ons(output, 8.0), note_offs(output, 8.0)
    played: list[int | None] = []  # each note's note-on sample, None when skipped
    for n in notes:
        due = round(n.start * SPB)
        match = next((o for o in ons if o[1:] == (n.pitch, n.velocity) and o[0] >= due - 1), None)
        if match is not None:
            ons.remove(match)
        played.append(None if match is None else match[0])
    assert not ons, f"notes came out that the server never wrote: {ons}"

    late_seen = 0
    for k, (n, at) in enumerate(zip(notes, played, strict=True)):
        due, end = round(n.start * SPB), round((n.start + n.duration) * SPB)
        if at is not None and abs(at - due) <= 1:
            continue  # arrived in time, played on its sample
        late_seen += 1
        # It was late, so it cannot have arrived before a note the server sent after it was played.
        assert not any(p is not None and p < due - BLOCK for p in played[k + 1:]), \
            f"pitch {n.pitch} at beat {n.start} was treated as late although it had arrived in time"
        if at is not None:  # played late: at once, on a block's first sample, still sounding, ending as written
            assert at >= held_until - 1 and at % BLOCK == 0 and end > at, (n, at)
            if end < 17 * SPB:
                assert any(abs(s - end) <= 1 and p == n.pitch for s, p in offs), f"late pitch {n.pitch} did not end at {end}"
        else:  # skipped: its end had passed when it arrived, i.e. before any note sent after it was played
            later = [p for p in played[k + 1:] if p is not None]
            assert later and end <= min(later) + BLOCK, f"pitch {n.pitch} (ends at sample {end}) was skipped but still sounding"
    assert late_seen, "no note arrived late: the relay did not hold the request back"


def test_a_restarted_server_gets_the_request_again(plugin_build, models_dir, tmp_path):
    """The request is lost with the server that had it; the relay then forwards to another server
    (what a restart on the same port looks like to the plugin: a new `instance` in hello). The
    plugin notices while the stream is quiet and sends the same clip again; the new server's notes play."""
    vst3, host = plugin_build
    first_port, second_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    first = Server("--models", models_dir, "--osc-port", first_port, "--zmq-port", free_port(), "--clips-dir",
                   tmp_path / "clips1", "--no-watch")
    second = Server("--models", models_dir, "--osc-port", second_port, "--zmq-port", free_port(), "--clips-dir",
                    tmp_path / "clips2", "--no-watch")
    relay = None
    try:
        first.wait_ready()
        second.wait_ready()
        relay = Relay(first_port, drop_continues=1)

        def restart_when_the_request_is_lost() -> None:
            deadline = time.monotonic() + 60
            while not relay.messages("/segue/continue") and time.monotonic() < deadline:
                time.sleep(0.01)
            relay.server = ("127.0.0.1", second_port)

        switcher = threading.Thread(target=restart_when_the_request_is_lost, daemon=True)
        switcher.start()
        events, _ = clip_events(bars=2)
        events.append({"beat": 6.0, "midi": TRIGGER_CC})
        params = [{"beat": 0, "name": "Bars", "text": "4"}, {"beat": 0, "name": "Clip bars", "text": "2"},
                  {"beat": 0, "name": "Variations", "text": "1"}, {"beat": 0, "name": "Seed", "text": "11"}]
        output = play(host, vst3, relay, tmp_path, events=events, params=params, beats=24, realtime_from=6)
        switcher.join(timeout=5)
    finally:
        if relay is not None:
            relay.close()
        first.stop()
        second.stop()

    continues = relay.messages("/segue/continue")
    assert len(continues) == 2, f"the plugin sent {len(continues)} continues; expected the lost one and one again"
    (port1, id1, json1), (port2, id2, json2) = continues
    assert port1 == port2 and id1 != id2 and json.loads(json1) == json.loads(json2)
    assert not list((tmp_path / "clips1").glob("*.mid")), "the first server never had the request"
    notes = [n for n in written_notes(tmp_path / "clips2", port2, id2) if n.start < 23.99]
    played = note_ons(output, 8.0)
    assert played, "nothing played after the restart"
    written = {(n.pitch, n.velocity) for n in notes}
    assert {(p, v) for _, p, v in played} <= written, "notes came out that the new server never wrote"
    first_sample = min(s for s, _, _ in played)
    for n in notes:  # everything due a beat after the first note arrived plays on its sample
        if n.start * SPB > first_sample + SPB:
            assert any(abs(s - round(n.start * SPB)) <= 1 and p == n.pitch for s, p, _ in played), \
                f"pitch {n.pitch} due at beat {n.start} did not play on time after the restart"
