"""The Ableton Live Remote Script (plugin_bridge/daw_scripts/ableton/Segue) against a real `segue serve`.

Live cannot run here, so the script is type-checked with `mypy --strict` against the PyPI package
ableton-live-stubs, and driven with fake Live objects (song, view, tracks, clip slots, clips, the
`Live` module) that record what the script does: its tick (`update_display`) is called as Live
calls it, and it talks OSC over real UDP to a real `segue serve` on the tiny model.

    python3 -m pytest tests/test_live_script.py -q
"""

from __future__ import annotations

import ast
import importlib
import json
import shutil
import socket
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from segue_serve import REPO, SegueServe, serve_model

from engine.midi_file import read_clip
from plugin_bridge import osc_messages

ABLETON = REPO / "plugin_bridge" / "daw_scripts" / "ableton"
PACKAGE = ABLETON / "Segue"
CONTINUE = (0xBF, 102, 127)  # CC 102 on channel 16: the default continue trigger
VARIATION = (0xBF, 103, 127)


# --- fake Live ------------------------------------------------------------------------------------------

@dataclass
class NoteSpec:
    pitch: int
    start_time: float
    duration: float
    velocity: float = 100.0
    mute: bool = False


@dataclass
class FakeNote:
    pitch: int
    start_time: float
    duration: float
    velocity: float
    mute: bool = False


LISTENED = ("notes", "loop_start", "loop_end", "looping", "start_marker", "end_marker", "signature_numerator",
            "signature_denominator", "name", "color")  # some of Live's: the script need not listen to all


class FakeClip:
    def __init__(self, length: float, notes=(), name="", numerator=4, denominator=4, looping=True, loop_start=0.0,
                 start_marker=0.0, midi=True, arrangement=False, start_time=0.0, end_time=None):
        self.name = name
        self.length = length
        self.looping = looping
        self.loop_start = loop_start
        self.loop_end = loop_start + length
        self.start_marker = start_marker
        self.end_marker = start_marker + length
        self.signature_numerator = numerator
        self.signature_denominator = denominator
        self.is_midi_clip = midi
        self.is_arrangement_clip = arrangement
        self.start_time = start_time
        self.end_time = start_time + length if end_time is None else end_time
        self.notes = [FakeNote(*n) for n in notes]
        self.added: list[NoteSpec] = []
        self.listeners = {name: Listeners() for name in LISTENED}

    def __getattr__(self, name: str):
        """add_X_listener, remove_X_listener, X_has_listener for the properties Live tells listeners about."""
        for prop, listeners in self.__dict__.get("listeners", {}).items():
            if name == f"add_{prop}_listener":
                return listeners.add
            if name == f"remove_{prop}_listener":
                return listeners.remove
            if name == f"{prop}_has_listener":
                return lambda callback, callbacks=listeners.callbacks: callback in callbacks
        raise AttributeError(name)

    def listened(self) -> int:
        """Callbacks registered on this clip, all properties together."""
        return sum(len(listeners.callbacks) for listeners in self.listeners.values())

    def edit(self, notes) -> None:
        """The musician edits the notes in the Clip View: Live tells the notes listeners."""
        self.notes = [FakeNote(*n) for n in notes]
        self.listeners["notes"].fire()

    def set_loop(self, start: float, end: float) -> None:
        """The musician drags the loop brace: Live tells the loop_start and loop_end listeners."""
        self.loop_start, self.loop_end, self.length = start, end, end - start
        self.listeners["loop_start"].fire()
        self.listeners["loop_end"].fire()

    def get_notes_extended(self, from_pitch, pitch_span, from_time, time_span):
        return [n for n in self.notes + [FakeNote(s.pitch, s.start_time, s.duration, s.velocity, s.mute) for s in self.added]
                if from_pitch <= n.pitch < from_pitch + pitch_span and from_time <= n.start_time < from_time + time_span]

    def add_new_notes(self, specs):
        assert isinstance(specs, tuple) and all(isinstance(s, NoteSpec) for s in specs)
        self.added.extend(specs)
        self.listeners["notes"].fire()
        return list(range(len(specs)))


class FakeSlot:
    def __init__(self, clip: FakeClip | None = None):
        self.clip = clip

    @property
    def has_clip(self) -> bool:
        return self.clip is not None

    def create_clip(self, length: float) -> FakeClip:
        assert self.clip is None, "Live refuses to create a clip in a slot that has one"
        self.clip = FakeClip(length)
        return self.clip

    def delete_clip(self) -> None:
        self.clip = None


@dataclass
class FakeDevice:
    can_have_drum_pads: bool = False


class FakeTrack:
    def __init__(self, name: str, slots: int = 4, drums: bool = False):
        self.name = name
        self.clip_slots = [FakeSlot() for _ in range(slots)]
        self.arrangement_clips: list[FakeClip] = []
        self.devices = [FakeDevice(can_have_drum_pads=drums)]
        self.calls: list[tuple] = []

    def create_midi_clip(self, start_time: float, length: float) -> FakeClip:
        self.calls.append(("create_midi_clip", start_time, length))
        clip = FakeClip(length, arrangement=True, start_time=start_time, looping=False)
        self.arrangement_clips.append(clip)
        return clip

    def delete_clip(self, clip: FakeClip) -> None:
        self.calls.append(("delete_clip", clip.name))
        self.arrangement_clips.remove(clip)


class FakeLive11Track(FakeTrack):
    create_midi_clip = property()  # Live 11 has no Track.create_midi_clip: reading it raises AttributeError


class Listeners:
    """One of Live's listener lists: Live refuses a callback added twice or removed when absent."""

    def __init__(self):
        self.callbacks: list = []

    def add(self, callback) -> None:
        assert callback not in self.callbacks, "Live raises on a listener added twice"
        self.callbacks.append(callback)

    def remove(self, callback) -> None:
        assert callback in self.callbacks, "Live raises on removing a listener that is not there"
        self.callbacks.remove(callback)

    def fire(self) -> None:
        for callback in list(self.callbacks):
            callback()


class FakeView:
    """Song.View: `detail_clip` tells its listeners when another clip is shown."""

    def __init__(self, detail_clip: FakeClip | None = None):
        self._detail_clip = detail_clip
        self.detail_clip_listeners = Listeners()

    @property
    def detail_clip(self) -> FakeClip | None:
        return self._detail_clip

    @detail_clip.setter
    def detail_clip(self, clip: FakeClip | None) -> None:
        changed = clip is not self._detail_clip
        self._detail_clip = clip
        if changed:
            self.detail_clip_listeners.fire()

    def add_detail_clip_listener(self, callback) -> None:
        self.detail_clip_listeners.add(callback)

    def remove_detail_clip_listener(self, callback) -> None:
        self.detail_clip_listeners.remove(callback)

    def detail_clip_has_listener(self, callback) -> bool:
        return callback in self.detail_clip_listeners.callbacks


@dataclass
class FakeSong:
    tracks: list[FakeTrack]
    tempo: float = 120.0
    view: FakeView = field(default_factory=FakeView)
    scenes_created: int = 0

    def create_scene(self, index: int):
        assert index == -1
        self.scenes_created += 1
        for track in self.tracks:
            track.clip_slots.append(FakeSlot())


class FakeCInstance:
    def __init__(self, song: FakeSong):
        self._song = song
        self.messages: list[str] = []
        self.logged: list[str] = []

    def song(self) -> FakeSong:
        return self._song

    def show_message(self, message: str) -> None:
        self.messages.append(message)

    def log_message(self, message: str) -> None:
        self.logged.append(message)

    def handle(self) -> int:
        return 7

    def request_rebuild_midi_map(self) -> None:
        pass


def fake_live_module(forwarded: list) -> types.ModuleType:
    live = types.ModuleType("Live")
    live.Clip = types.SimpleNamespace(MidiNoteSpecification=NoteSpec)
    live.MidiMap = types.SimpleNamespace(
        forward_midi_cc=lambda *args: forwarded.append(("cc", *args)) or True,
        forward_midi_note=lambda *args: forwarded.append(("note", *args)) or True,
        MapMode=types.SimpleNamespace(absolute=0))
    return live


@pytest.fixture
def segue(monkeypatch):
    """The Remote Script package, imported as Live imports it, with a fake `Live` module."""
    forwarded: list = []
    monkeypatch.setitem(sys.modules, "Live", fake_live_module(forwarded))
    monkeypatch.syspath_prepend(str(ABLETON))
    for name in [m for m in sys.modules if m == "Segue" or m.startswith("Segue.")]:
        monkeypatch.delitem(sys.modules, name)
    package = importlib.import_module("Segue")
    package.forwarded = forwarded
    yield package
    for name in [m for m in sys.modules if m == "Segue" or m.startswith("Segue.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    with serve_model(tiny_model, tmp_path_factory.mktemp("live-serve")) as serve:
        yield serve


class Session:
    """A Live set, the script running in it, and Live's tick."""

    def __init__(self, segue, song: FakeSong, port: int, **settings):
        self.song = song
        self.c = FakeCInstance(song)
        options = {"port": port, "bars": 2, "variations": 2, "seed": 5, "hello_timeout": 1.0, **settings}
        self.surface = segue.create_instance(self.c)
        self.surface.disconnect()  # the settings of a test replace config.py's
        self.surface = segue.surface.SegueSurface(self.c, settings=segue.surface.Settings(**options))
        self.reply_port = self.surface.link.reply_port  # the script's identity on the server, in its file names

    def trigger(self, midi: tuple, timeout: float = 30.0) -> None:
        """Send a trigger and tick as Live does (every ~10 ms here) until the script is idle."""
        self.surface.receive_midi(midi)
        deadline = time.monotonic() + timeout
        ticks = 0
        while self.surface.running or self.surface._scheduled:
            assert time.monotonic() < deadline, "the script kept working past the timeout"
            self.surface.update_display()
            ticks += 1
            time.sleep(0.01)
        self.ticks = ticks

    def close(self) -> None:
        self.surface.disconnect()


def clips_of(server: SegueServe, session: Session) -> list[list[Path]]:
    """The server's .mid files for this script's requests, per request in order, variations in order."""
    files = sorted(server.clips_dir.glob(f"osc_127.0.0.1_{session.reply_port}-*.mid"))
    requests: dict[str, list[Path]] = {}
    for path in files:
        request = path.stem.rsplit("-v", 1)[0]
        requests.setdefault(request, []).append(path)
    order = sorted(requests, key=lambda r: int(r.rsplit("-", 1)[1]))
    return [sorted(requests[r], key=lambda p: int(p.stem.rsplit("-v", 1)[1])) for r in order]


def expected(mid: Path, offset: float, length: float) -> list[tuple]:
    """A variation's notes as the new clip must hold them: from the continuation's first beat, cut at the clip end."""
    notes = []
    for n in read_clip(mid).notes:
        start = n.start - offset
        notes.append((n.pitch, n.velocity, round(start, 4), round(min(n.duration, length - start), 4)))
    return sorted(notes)


def written(clip: FakeClip) -> list[tuple]:
    return sorted((s.pitch, int(s.velocity), round(s.start_time, 4), round(s.duration, 4)) for s in clip.added)


RIFF = [(60, 0.0, 1.0, 90), (64, 1.0, 1.0, 80), (67, 2.0, 1.0, 80), (72, 3.0, 1.5, 100), (48, 0.0, 4.0, 70),
        (62, 4.5, 0.5, 85), (65, 6.0, 2.0, 85.4)]


# --- type checking and syntax ----------------------------------------------------------------------------

def test_mypy_strict_against_ableton_live_stubs():
    pytest.importorskip("mypy", reason="mypy is in the dev extra")
    stubs = subprocess.run([sys.executable, "-m", "pip", "show", "ableton-live-stubs"], capture_output=True, text=True)
    assert stubs.returncode == 0, "ableton-live-stubs is not installed: pip install -e '.[dev]'"
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(PACKAGE)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found in 4 source files" in result.stdout


def test_the_script_is_python_37_syntax():
    """Live 11 embeds Python 3.7: no newer syntax (walrus, match, ...) anywhere in the script."""
    for path in PACKAGE.glob("*.py"):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 7))


def python37() -> str | None:
    """A Python 3.7 interpreter (Live 11's), if this machine has one."""
    candidates = [shutil.which("python3.7"), *map(str, sorted(Path.home().glob(".pyenv/versions/3.7*/bin/python3.7")))]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    return None


def test_the_script_continues_a_clip_in_python_37_as_in_live_11(server):
    """The whole path, imported and run by Python 3.7 (tests/live_script_driver.py, standard library only)."""
    interpreter = python37()
    if interpreter is None:
        pytest.skip("no Python 3.7 here; the syntax check above still covers Live 11's Python")
    result = subprocess.run([interpreter, str(REPO / "tests" / "live_script_driver.py"), str(ABLETON), str(server.osc_port)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["python"] == [3, 7]
    assert any("the server prepared the shown clip" in line for line in out["logged"]), out["logged"]
    assert out["clip"] and out["clip"]["name"] == "Segue 1/1 Riff" and out["clip"]["length"] == 8.0, out["messages"]
    (mid,) = sorted(server.clips_dir.glob(f"osc_127.0.0.1_{out['reply_port']}-*-v1.mid"))
    got = sorted((p, int(v), round(s, 4), round(d, 4)) for p, v, s, d in out["clip"]["notes"])
    assert got == expected(mid, offset=8.0, length=8.0) and got
    request_id = mid.stem.rsplit("-v", 1)[0].split("-", 1)[1]  # osc_127.0.0.1_<port>-<id>-v1
    line = continue_line(server, request_id)
    assert "head_start=yes" in line, line  # the prepare's drawn first note served the trigger's continue
    assert out["listeners"] == 0  # disconnect let go of Live's listeners


# --- the OSC codec against the server's own ---------------------------------------------------------------

def test_requests_encode_byte_for_byte_like_the_server_side_builder(segue):
    osc = segue.osc
    cases = [("/segue/hello", "is", [51000, "h1"]), ("/segue/cancel", "is", [51000, ""]),
             ("/segue/continue", "iss", [51000, "c1", json.dumps({"clip": {"notes": [[60, 90, 0, 1]]}, "bars": 2})]),
             ("/segue/continue/chunk", "isiis", [51000, "c2", 3, 7, "{\"cl"]), ("/x", "ifsb", [-5, 0.25, "é", b"\x01\x02\x03"])]
    for address, tags, args in cases:
        assert osc.encode_message(address, tags, args) == osc_messages.build_message(address, tags, args)


@pytest.mark.parametrize("event", [
    {"type": "hello", "id": "h", "protocol": 1, "server": "0.1.0", "models": [{"name": "default", "parameters": 5}],
     "default_model": "default"},
    {"type": "hello", "id": "h", "protocol": 1, "server": "0.1.0", "models": [], "default_model": None},
    {"type": "pong", "id": "p"},
    {"type": "note", "id": "c", "variation": 1, "pitch": 61, "velocity": 80, "start": 4.5, "duration": 0.25, "channel": 0,
     "track": 0},
    {"type": "done", "id": "c", "variation": 0, "path": "/tmp/é.mid", "notes": 3, "first_note_ms": None, "total_ms": 9.5},
    {"type": "done", "id": "c", "variation": 0, "path": "/tmp/x.mid", "notes": 3, "first_note_ms": 1.5, "total_ms": 9.5},
    {"type": "finished", "id": "c", "variations": 2, "total_ms": 12.25},
    {"type": "error", "id": "", "code": "bad_request", "message": "bars must be between 1 and 64, not 65"},
    {"type": "cancelled", "id": "c"},
    {"type": "prepared", "id": "p", "model": "default", "tokens": 260, "cached": False, "prefill_ms": 11.5, "total_ms": 13.25},
])
def test_replies_decode_like_the_server_side_decoder(segue, event):
    """Field for field as plugin_bridge/osc_messages.py decodes them; fields a newer server appends
    (hello's `instance`) are ignored by the script, which does not need them."""
    data = osc_messages.encode_reply(event)
    address, params = segue.osc.decode_message(data)
    mine, theirs = segue.osc.decode_reply(data), osc_messages.decode_reply(address, params)
    assert mine == {name: theirs[name] for name in mine}
    assert set(theirs) - set(mine) <= {"instance"}
    assert set(mine) == {"type", *segue.osc.REPLIES[address][1]}
    longer = osc_messages.build_message(address, osc_messages.REPLIES[address][0] + "s",
                                        [*params, "appended by a newer server"])
    assert segue.osc.decode_reply(longer) == mine
    assert segue.osc.decode_reply(osc_messages.chunk_ack("c", 2, 3, 4)) == {
        "type": "chunk_ack", "id": "c", "index": 2, "received": 3, "count": 4}


def test_malformed_datagrams_are_dropped_not_raised(segue):
    for data in (b"", b"garbage!", b"#bundle\x00" + b"\x00" * 8, b"/segue/note\x00,s\x00\x00ab", b"/a\x00\x00,q\x00\x00"):
        assert segue.osc.decode_reply(data) is None
    assert segue.osc.decode_reply(osc_messages.build_message("/segue/dance", "s", ["x"]))["type"] == "unknown"
    # a hello whose model list is nested past the JSON parser's limit, or not a list: no models, no exception
    for models in ("[" * 30000, "7"):
        hello = segue.osc.decode_reply(osc_messages.build_message("/segue/hello", "sisss", ["h", 1, "0.1", models, "d"]))
        assert hello is not None and hello["models"] == []


# --- continuing against a real server ----------------------------------------------------------------------

def session_song(drums: bool = False):
    keys = FakeTrack("Keys", drums=drums)
    source = FakeClip(8.0, RIFF, name="Riff")
    keys.clip_slots[0].clip = source
    keys.clip_slots[1].clip = FakeClip(4.0, [(50, 0.0, 1.0, 90)], name="Taken")
    song = FakeSong([FakeTrack("Drums"), keys], tempo=96.0)
    song.view.detail_clip = source
    return song, keys, source


def test_session_clip_continues_into_the_next_empty_slot_below(segue, server):
    song, keys, source = session_song()
    session = Session(segue, song, server.osc_port)
    try:
        request, target = session.surface.read_selected()
        assert request["clip"] == {"notes": sorted([[p, round(v), s, d] for p, s, d, v in RIFF], key=lambda n: (n[2], n[0])),
                                   "tempo": 96.0, "time_signature": [4, 4], "length": 8.0, "is_drum": False}
        assert {k: v for k, v in request.items() if k != "clip"} == {"bars": 2, "variations": 2, "temperature": 0.9,
                                                                   "seed": 5}
        session.trigger(CONTINUE)
    finally:
        session.close()

    new = keys.clip_slots[2].clip
    assert keys.clip_slots[1].clip.name == "Taken" and new is not None, "the occupied slot was skipped"
    assert new.length == 8.0 and new.name == "Segue 1/2 Riff"
    assert (new.signature_numerator, new.signature_denominator) == (4, 4)
    ((v1, v2),) = clips_of(server, session)
    assert written(new) == expected(v1, offset=8.0, length=8.0) and new.added
    assert all(0 <= s.start_time < 8.0 and s.start_time + s.duration <= 8.0 + 1e-9 for s in new.added)
    assert session.c.messages[-1].startswith("Segue: variation 1 of 2 (") and "in slot 3 of track 'Keys'" in \
        session.c.messages[-1]
    assert song.tracks[0].clip_slots[2].clip is None and source.added == []


def test_variations_stack_below_then_new_ones_are_asked_for(segue, server):
    song, keys, source = session_song()
    session = Session(segue, song, server.osc_port)
    try:
        session.trigger(CONTINUE)
        session.trigger(VARIATION)
        assert song.scenes_created == 0
        session.trigger(VARIATION)  # both variations used: a new request; no empty slot left: a new scene
    finally:
        session.close()
    first, second = clips_of(server, session)
    names = [slot.clip.name if slot.clip else None for slot in keys.clip_slots]
    assert names == ["Riff", "Taken", "Segue 1/2 Riff", "Segue 2/2 Riff", "Segue 1/2 Riff"]
    assert song.scenes_created == 1
    assert written(keys.clip_slots[3].clip) == expected(first[1], 8.0, 8.0)
    assert written(keys.clip_slots[4].clip) == expected(second[0], 8.0, 8.0)


def test_arrangement_clip_continues_right_after_itself(segue, server):
    """Live 12: a looped 3/4 arrangement clip (a 3-beat loop played for 2 bars) at beat 12."""
    bass = FakeTrack("Bass", drums=True)
    source = FakeClip(3.0, [(36, 0.0, 0.5, 100), (38, 1.0, 0.5, 90), (42, 2.0, 0.25, 70), (40, 5.0, 1.0, 60)], name="Loop",
                      numerator=3, denominator=4, looping=True, arrangement=True, start_time=12.0, end_time=18.0)
    blocker = FakeClip(3.0, name="Later", arrangement=True, start_time=30.0)
    bass.arrangement_clips += [source, blocker]
    song = FakeSong([bass], tempo=140.0)
    song.view.detail_clip = source
    session = Session(segue, song, server.osc_port, bars=3, variations=2)
    try:
        request, target = session.surface.read_selected()
        assert request["clip"]["notes"] == [[36, 100, 0.0, 0.5], [38, 90, 1.0, 0.5], [42, 70, 2.0, 0.25],
                                            [36, 100, 3.0, 0.5], [38, 90, 4.0, 0.5], [42, 70, 5.0, 0.25]], \
            "the loop is heard as it plays in the arrangement; a note outside the loop is not"
        assert request["clip"]["length"] == 6.0 and request["clip"]["is_drum"] is True
        session.trigger(CONTINUE)
        first = [c for c in bass.arrangement_clips if c.name.startswith("Segue")]
        session.trigger(VARIATION)
        second = [c for c in bass.arrangement_clips if c.name.startswith("Segue")]
        blocker.start_time, blocker.end_time = 20.0, 23.0  # something moves into the way
        session.trigger(VARIATION)
    finally:
        session.close()
    assert bass.calls[0] == ("create_midi_clip", 18.0, 9.0), "right after the clip: beat 12 + 2 bars of 3/4, 3 bars long"
    (one,), (two,) = first, second
    assert one.name == "Segue 1/2 Loop" and two.name == "Segue 2/2 Loop"
    assert bass.calls[1:3] == [("delete_clip", "Segue 1/2 Loop"), ("create_midi_clip", 18.0, 9.0)], \
        "the second variation replaced the first"
    (v1, v2), _ = clips_of(server, session)
    assert written(one) == expected(v1, offset=6.0, length=9.0)
    assert written(two) == expected(v2, offset=6.0, length=9.0)
    assert "'Later' is in the way right after 'Loop'" in session.c.messages[-1]
    assert [c.name for c in bass.arrangement_clips] == ["Loop", "Later", "Segue 2/2 Loop"], \
        "with something in the way nothing is added, and nothing removed"
    assert len(bass.calls) == 3


def test_a_large_clip_is_uploaded_in_chunks(segue, server):
    keys = FakeTrack("Keys")
    notes = [(40 + i % 48, float(i), 0.5, 60 + i % 40) for i in range(1200)]  # 300 bars of quarter notes
    source = FakeClip(1200.0, notes, name="Long")
    keys.clip_slots[0].clip = source
    song = FakeSong([keys])
    song.view.detail_clip = source
    session = Session(segue, song, server.osc_port, bars=1, variations=1)
    try:
        request, _ = session.surface.read_selected()
        assert len(json.dumps(request, separators=(",", ":"))) > 2 * session.surface.link.max_datagram
        session.trigger(CONTINUE)
        assert session.surface.link.chunks_sent >= 3
    finally:
        session.close()
    new = keys.clip_slots[1].clip
    assert new is not None, session.c.messages
    ((v1,),) = clips_of(server, session)
    assert new is not None and written(new) == expected(v1, offset=1200.0, length=4.0)


# --- what the musician is told -------------------------------------------------------------------------------

@pytest.mark.parametrize("detail, words", [
    (None, "select a MIDI clip first"),
    (FakeClip(4.0, [], name="Vox", midi=False), "'Vox' is an audio clip"),
    (FakeClip(4.0, [(60, 0.0, 1.0, 90, True)], name="Muted"), "'Muted' has no notes to continue"),
    (FakeClip(4.0, [(60, 5.0, 1.0, 90)], name="Outside", looping=False), "'Outside' has no notes to continue"),
])
def test_what_cannot_be_continued_is_said_at_once(segue, detail, words):
    keys = FakeTrack("Keys")
    keys.clip_slots[0].clip = detail
    song = FakeSong([keys])
    song.view.detail_clip = detail
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as nobody:
        nobody.bind(("127.0.0.1", 0))
        session = Session(segue, song, nobody.getsockname()[1])
        session.trigger(CONTINUE)
        session.close()
        nobody.settimeout(0.05)
        with pytest.raises(TimeoutError):
            nobody.recvfrom(65536)  # nothing was sent
    (message,) = session.c.messages
    assert message.startswith("Segue: ") and words in message
    assert keys.clip_slots[1].clip is None


def test_arrangement_needs_live_12(segue):
    track = FakeLive11Track("Keys")
    source = FakeClip(4.0, [(60, 0.0, 1.0, 90)], name="Old", arrangement=True, start_time=0.0)
    track.arrangement_clips.append(source)
    song = FakeSong([track])
    song.view.detail_clip = source
    session = Session(segue, song, 9)
    session.trigger(CONTINUE)
    session.close()
    assert "needs Live 12" in session.c.messages[-1]


def test_a_server_that_is_not_running_is_named_with_the_command_to_start_it(segue):
    song, keys, _ = session_song()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # a port that never answers
        silent.bind(("127.0.0.1", 0))
        session = Session(segue, song, silent.getsockname()[1], hello_timeout=0.5)
        started = time.monotonic()
        session.trigger(CONTINUE)
        session.close()
    assert time.monotonic() - started < 5
    assert "no server answers at 127.0.0.1:" in session.c.messages[-1] and "segue serve" in session.c.messages[-1]
    assert keys.clip_slots[2].clip is None


def test_the_servers_refusal_is_shown(segue, server):
    song, keys, _ = session_song()
    session = Session(segue, song, server.osc_port, bars=65)
    session.trigger(CONTINUE)
    session.close()
    assert session.c.messages[-1] == "Segue: bars must be between 1 and 64, not 65"
    assert keys.clip_slots[2].clip is None


def test_another_variation_before_any_continuation_says_what_to_do(segue, server):
    song, keys, _ = session_song()
    session = Session(segue, song, server.osc_port)
    session.trigger(VARIATION)
    session.close()
    assert session.c.messages == ["Segue: continue a clip first (select it and send the continue trigger)"]


# --- Live's side of the control surface --------------------------------------------------------------------

def test_triggers_are_forwarded_from_the_midi_map_and_filtered_by_channel(segue):
    song, _, _ = session_song()
    session = Session(segue, song, 9, continue_note=36)
    session.surface.build_midi_map(99)
    assert segue.forwarded == [("cc", 7, 99, 15, 102), ("cc", 7, 99, 15, 103), ("note", 7, 99, 15, 36)]
    fired: list[str] = []
    session.surface.continue_selected = lambda: fired.append("continue")
    session.surface.another_variation = lambda: fired.append("variation")
    for midi in [(0xBF, 102, 127), (0xB0, 102, 127), (0xBF, 102, 0), (0x9F, 36, 100), (0x9F, 36, 0), (0xBF, 103, 1),
                 (0x8F, 36, 0), (0xBF, 104, 127)]:
        session.surface.receive_midi(midi)
    session.close()
    assert fired == ["continue", "continue", "variation"]


def test_closing_the_set_cancels_what_the_server_is_generating(segue, server):
    song, _, _ = session_song()
    session = Session(segue, song, server.osc_port, bars=64, variations=16)
    session.surface.receive_midi(CONTINUE)
    deadline = time.monotonic() + 20
    while not session.surface.job.notes:  # generation has begun
        assert time.monotonic() < deadline
        session.surface.update_display()
        time.sleep(0.01)
    request_id = session.surface.job.request_id
    session.close()  # Live calls disconnect() when the set closes or the surface is deselected
    assert server.wait_for_log(f"id={request_id} "), server.log
    (line,) = [line for line in server.log.splitlines() if f"id={request_id} " in line]
    assert "cancelled" in line, line


def test_schedule_message_runs_callbacks_on_later_ticks_and_survives_errors(segue):
    song, _, _ = session_song()
    session = Session(segue, song, 9, prepare=False)  # nothing scheduled but what the test schedules
    surface = session.surface
    ran: list[str] = []
    surface.schedule_message(1, lambda: ran.append("next tick"))
    surface.schedule_message(3, lambda: ran.append("third tick"))
    surface.schedule_message(2, lambda: 1 / 0)
    surface.update_display()
    assert ran == ["next tick"]
    surface.update_display()
    assert "ZeroDivisionError" in session.c.messages[-1] and "Log.txt" in session.c.messages[-1]
    surface.update_display()
    assert ran == ["next tick", "third tick"] and not surface._scheduled
    session.close()


@pytest.mark.parametrize("length, meter, onset, start", [
    (4, (4, 4), 0, 4), (2, (4, 4), 0, 4), (5, (4, 4), 0, 8), (8, (4, 4), 0, 8), (4 + 1 / 96, (4, 4), 0, 4),
    (16.002, (4, 4), 0, 16), (16.03, (4, 4), 0, 20), (15.998, (4, 4), 0, 16), (4.5, (4, 4), 0, 8), (3, (6, 8), 0, 3),
    (1, (6, 8), 0, 3), (6, (3, 2), 0, 6), (7, (7, 8), 0, 7),
    (16, (4, 4), 15.97, 20), (16, (4, 4), 15.95, 16), (3, (6, 8), 2.99, 6)])
def test_the_new_clip_starts_where_the_server_starts_the_continuation(segue, length, meter, onset, start):
    """docs/protocol.md 3.6: the first bar line at or after the clip's end (a 1/48 beat overhang is forgiven),
    or the bar after the last onset on the model's grid (a note a hair before the bar line starts a new bar)."""
    keys = FakeTrack("Keys")
    source = FakeClip(length, [(60, 0.0, 0.5, 90), (62, onset, 0.01, 90)], numerator=meter[0], denominator=meter[1])
    keys.clip_slots[0].clip = source
    song = FakeSong([keys])
    song.view.detail_clip = source
    session = Session(segue, song, 9, bars=2)
    request, target = session.surface.read_selected()
    session.close()
    assert target.offset == pytest.approx(start)
    assert target.length == pytest.approx(2 * meter[0] * 4 / meter[1])
    assert request["clip"]["time_signature"] == list(meter) and request["clip"]["length"] == pytest.approx(length)


# --- prepare: the shown clip sent ahead of the trigger (docs/protocol.md 3.9) --------------------------------

def tick_until(session: Session, done, timeout: float = 20.0) -> None:
    """Live's tick (every ~10 ms here) until `done()`."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the script did not get there in time"
        session.surface.update_display()
        time.sleep(0.01)


def tick(session: Session, ticks: int) -> None:
    for _ in range(ticks):
        session.surface.update_display()
        time.sleep(0.01)


def prepares_of(server: SegueServe, session: Session, at_least: int = 0) -> list[str]:
    """The server's log lines for this script's prepares, in order; after waiting (10 s at most) for
    `at_least` of them: the server logs a prepare just after answering it."""
    client = f"client=osc:127.0.0.1:{session.reply_port} "
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in server.log.splitlines() if client in line and " prepared tokens=" in line]
        if len(lines) >= at_least or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def continue_line(server: SegueServe, request_id: str) -> str:
    """The server's log line for a continue, once written (just after its `finished`)."""
    assert server.wait_for_log(f"id={request_id} model="), server.log
    (line,) = [line for line in server.log.splitlines() if f"id={request_id} " in line and "head_start=" in line]
    return line


def answered(session: Session, count: int):
    return lambda: sum("the server prepared the shown clip" in line for line in session.c.logged) >= count


def test_the_shown_clip_is_prepared_and_the_trigger_starts_from_its_head_start(segue, server):
    """Selecting a clip sends its continue request as a prepare; the server draws it up to its first note,
    and the trigger's continue is served from there: the same notes as the .mid, head_start=yes."""
    song, keys, source = session_song()
    song.view.detail_clip = None
    session = Session(segue, song, server.osc_port)  # a seed, so that the tiny model's notes are known to be some
    try:
        tick(session, 6)
        assert not session.surface.prepare_ids and prepares_of(server, session) == []  # nothing shown, nothing sent
        song.view.detail_clip = source  # the musician clicks the clip
        assert source.listened(), "the shown clip's notes are listened to"
        tick_until(session, answered(session, 1))
        (line,) = prepares_of(server, session, 1)
        assert "head_start=1 note(s)" in line or "head_start=2 note(s)" in line, line
        assert session.surface.prepared == session.surface.read_selected()[0]
        session.trigger(CONTINUE)
        request_id = session.surface.job.request_id
    finally:
        session.close()
    assert not source.listened() and not song.view.detail_clip_listeners.callbacks
    continued = continue_line(server, request_id)
    assert "head_start=yes" in continued, continued
    ((v1, v2),) = clips_of(server, session)
    assert written(keys.clip_slots[2].clip) == expected(v1, offset=8.0, length=8.0)
    assert session.c.messages[-1].startswith("Segue: variation 1 of 2 (")


def test_edits_are_prepared_once_they_settle_and_the_same_request_not_again(segue, server):
    song, keys, source = session_song()
    session = Session(segue, song, server.osc_port)
    try:
        tick_until(session, answered(session, 1))
        first = session.surface.prepared
        for k in range(6):  # a drag: Live tells the listener at every move, a tick or two apart
            source.edit(RIFF[:-1] + [(65 + k, 6.0, 2.0, 85)])
            tick(session, 1)
        tick_until(session, answered(session, 2))
        tick(session, 8)
        lines = prepares_of(server, session, 2)
        assert len(lines) == 2, lines  # the selection's and one for the whole drag
        assert session.surface.prepared["clip"]["notes"][-1][:2] == [70, 85] != first["clip"]["notes"][-1][:2]
        source.edit(RIFF[:-1] + [(70, 6.0, 2.0, 85)])  # the same notes again: nothing new to prepare
        song.view.detail_clip = keys.clip_slots[1].clip  # another clip: listened to instead
        assert not source.listened() and keys.clip_slots[1].clip.listened()
        song.view.detail_clip = source  # and back, unchanged since its prepare
        tick(session, 12)
        assert len(session.surface.prepare_ids) == 2 and len(prepares_of(server, session)) == 2, prepares_of(server, session)
        source.set_loop(0.0, 4.0)  # the loop brace dragged to the first bar
        tick_until(session, answered(session, 3))
        assert len(prepares_of(server, session, 3)) == 3 and session.surface.prepared["clip"]["length"] == 4.0
        session.trigger(CONTINUE)
        request_id = session.surface.job.request_id
    finally:
        session.close()
    continued = continue_line(server, request_id)
    assert "head_start=yes" in continued, continued


@pytest.mark.parametrize("shown", ["audio", "empty"])
def test_a_clip_that_cannot_be_continued_is_not_prepared_and_nothing_is_shown(segue, server, shown):
    song, keys, _ = session_song()
    keys.clip_slots[3].clip = FakeClip(4.0, [], name="Empty") if shown == "empty" else FakeClip(4.0, name="Vox", midi=False)
    song.view.detail_clip = keys.clip_slots[3].clip
    session = Session(segue, song, server.osc_port)
    try:
        tick(session, 12)
        assert not session.surface.prepare_ids and session.surface.prepared is None and session.c.messages == []
        assert prepares_of(server, session) == []
    finally:
        session.close()


def test_a_continue_is_not_prepared_again_and_an_edit_while_it_runs_is_kept_for_the_next(segue, server):
    song, keys, source = session_song()
    session = Session(segue, song, server.osc_port, bars=8, variations=1)
    try:
        session.surface.receive_midi(CONTINUE)  # before the selection's prepare went out: the continue is that request
        first_id = session.surface.job.request_id
        tick_until(session, lambda: not session.surface.running)
        tick(session, 12)
        assert not session.surface.prepare_ids  # the server draws it again itself (Generate again)
        session.surface.receive_midi(VARIATION)  # its one variation is in: new ones for the same request
        assert session.surface.running
        source.edit(RIFF[:-1] + [(67, 6.0, 2.0, 85)])  # the musician edits while it generates
        tick_until(session, lambda: not session.surface.running)
        tick_until(session, answered(session, 1))
        (line,) = prepares_of(server, session, 1)
        assert session.surface.prepared["clip"]["notes"][-1][:2] == [67, 85]
        session.trigger(CONTINUE)
        third_id = session.surface.job.request_id
    finally:
        session.close()
    assert server.wait_for_log(f"id={first_id}+again "), server.log  # the server drew the unchanged request again itself
    continued = continue_line(server, third_id)
    assert "head_start=yes" in continued, continued


def test_prepare_off_listens_to_nothing_and_sends_nothing(segue, server):
    song, _, source = session_song()
    session = Session(segue, song, server.osc_port, prepare=False)
    try:
        assert not song.view.detail_clip_listeners.callbacks and not source.listened()
        source.edit(RIFF[:-1])
        tick(session, 10)
        assert not session.surface.prepare_ids and not session.surface._scheduled and prepares_of(server, session) == []
    finally:
        session.close()
