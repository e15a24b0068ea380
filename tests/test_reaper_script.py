"""The REAPER actions (plugin_bridge/daw_scripts/reaper/) under lua5.4, against a real `segue serve`.

REAPER cannot run here, so tests/fake_reaper.lua plays it: a project with tracks and MIDI items, a
call log, ExtState, and an ExecProcess that really starts the command (`segue client`, through a
wrapper that runs this checkout) in the background; reaper.defer is a real polling loop. The server
is a real `segue serve` on the tiny model, on free loopback ports. Also here: the `segue client
continue` options the script relies on (`--length`, `--result`), tested on their own.

    python3 -m pytest tests/test_reaper_script.py -q
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import symusic
from conftest import clip_payload
from segue_serve import REPO, SegueServe, serve_model

from engine.clip import Clip, Note
from engine.midi_file import read_tracks, write_clip
from plugin_bridge import client as client_module

SCRIPTS = REPO / "plugin_bridge" / "daw_scripts" / "reaper"
CONTINUE = SCRIPTS / "Segue - Continue selected item in style.lua"
VARIATION = SCRIPTS / "Segue - Insert another variation.lua"
SETTINGS = SCRIPTS / "Segue - Settings.lua"
PPQ = 960


@pytest.fixture(scope="module")
def lua() -> str:
    path = shutil.which("lua5.4")
    if path is None:
        pytest.fail("lua5.4 is not installed; the REAPER script tests need it: apt-get install lua5.4 (CI installs it)")
    return path


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    with serve_model(tiny_model, tmp_path_factory.mktemp("reaper-serve")) as serve:
        yield serve


@pytest.fixture
def segue_program(tmp_path) -> Path:
    """What a musician installs as `segue`: here a wrapper that runs this checkout's CLI."""
    path = tmp_path / "bin" / "segue"
    path.parent.mkdir()
    path.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO}" exec "{sys.executable}" -m plugin_bridge.cli "$@"\n')
    path.chmod(0o755)
    return path


def lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


class Reaper:
    """One REAPER session: a Lua scenario (project set-up, then actions) run by lua5.4 in one process,
    so ExtState carries from one action to the next as it does in REAPER. A dump after each action."""

    def __init__(self, lua: str, tmp_path: Path, settings: dict[str, str], tempo: float = 120, meter=(4, 4)):
        self.lua = lua
        self.dir = tmp_path
        self.temp = tmp_path / "temp"
        self.exec_log = tmp_path / "exec.log"
        self.lines = [
            f"package.path = {lua_string(str(REPO / 'tests') + '/?.lua;')} .. package.path",
            'local fake = require("fake_reaper")',
            f"fake.tempo = {tempo}; fake.numerator = {meter[0]}; fake.denominator = {meter[1]}",
            f"fake.exec_log = {lua_string(str(self.exec_log))}",
            f'fake.ext["Segue/temp_dir"] = {lua_string(str(self.temp))}',
        ]
        self.lines += [f'fake.ext["Segue/{k}"] = {lua_string(str(v))}' for k, v in settings.items()]
        self.dumps = 0

    def setup(self, code: str) -> Reaper:
        self.lines.append(code)
        return self

    def action(self, script: Path, limit: float = 60) -> Reaper:
        self.dumps += 1
        self.lines.append(f"fake.run_action({lua_string(str(script))}, {limit})")
        self.lines.append(f"fake.dump({lua_string(str(self.dir / f'dump{self.dumps}.json'))})")
        return self

    def run(self, timeout: float = 120) -> list[dict]:
        scenario = self.dir / "scenario.lua"
        scenario.write_text("\n".join(self.lines) + "\n")
        result = subprocess.run([self.lua, str(scenario)], capture_output=True, text=True, timeout=timeout, cwd=self.dir)
        log = self.exec_log.read_text() if self.exec_log.exists() else ""
        assert result.returncode == 0, f"lua failed:\n{result.stdout}\n{result.stderr}\nclient log:\n{log}"
        return [json.loads((self.dir / f"dump{n}.json").read_text()) for n in range(1, self.dumps + 1)]


def calls(dump: dict, name: str | None = None) -> list[dict]:
    return [c for c in dump["calls"] if name is None or c["name"] == name]


def messages(dump: dict) -> list[str]:
    return [c["args"][0] for c in calls(dump, "ShowMessageBox")]


def items(dump: dict, track: int = 0) -> list[dict]:
    return dump["tracks"][track]["items"]


def answers(reaper: Reaper) -> list[Path]:
    """The answer files `segue client --result` wrote, oldest first."""
    return sorted((reaper.temp / "segue-reaper").glob("answer-*.tsv"), key=lambda p: p.stat().st_mtime_ns)


def done_paths(answer: Path) -> list[Path]:
    """The .mid of each variation, in variation order, from the answer's `done` lines."""
    done = {}
    for line in answer.read_text().splitlines():
        fields = line.split("\t")
        if fields[0] == "done":
            done[int(fields[1])] = Path(fields[2])
    return [done[k] for k in sorted(done)]


def expected_notes(mid: Path, offset: float, span: float) -> list[tuple]:
    """The notes of a variation's .mid as the script must insert them: ppq from the new item's start
    (the clip's beat `offset`), cut at the item's end."""
    score = symusic.Score(str(mid))  # not read_clip: a variation the model left silent is a valid, empty file
    tpq = score.ticks_per_quarter
    notes = []
    for n in (note for track in score.tracks for note in track.notes):
        start = n.time / tpq - offset
        notes.append((n.pitch, n.velocity, round(start * PPQ), round(min(start + n.duration / tpq, span) * PPQ)))
    return sorted(notes)


def inserted_notes(item: dict) -> list[tuple]:
    return sorted((n["pitch"], n["velocity"], round(n["startppq"]), round(n["endppq"])) for n in item["notes"])


def assert_one_undo_block_around_the_insert(dump: dict, blocks: int = 1) -> None:
    names = [c["name"] for c in dump["calls"]]
    assert names.count("Undo_BeginBlock") == names.count("Undo_EndBlock") == blocks
    depth = 0
    for index, name in enumerate(names):
        if name == "Undo_BeginBlock":
            depth += 1
            assert depth == 1, "undo blocks never nest"
        elif name == "Undo_EndBlock":
            depth -= 1
            assert depth == 0
            assert names[index + 1:index + 2] == ["UpdateArrange"], "the arrange view is redrawn after each undo point"
        elif name in ("CreateNewMIDIItemInProj", "MIDI_InsertNote", "MIDI_Sort", "DeleteTrackMediaItem"):
            assert depth == 1, f"{name} ran outside the undo block"
    for begin in (i for i, n in enumerate(names) if n == "Undo_BeginBlock"):
        block = names[begin:names.index("Undo_EndBlock", begin)]
        assert block.count("MIDI_Sort") == 1 and block.index("MIDI_Sort") > max(
            (i for i, n in enumerate(block) if n == "MIDI_InsertNote"), default=0)
    assert all(c["args"][1] == -1 for c in calls(dump, "Undo_EndBlock"))


# A 2-bar item in 4/4 at 100 BPM (a bar is 2.4 s), starting at bar 3 (4.8 s = beat 8). Notes in
# beats from the item start: a C major figure over a bass note, one muted note, one past the item's end.
ITEM = """
local keys = fake.add_track("Keys")
fake.add_track("Bass")
fake.add_item(keys, {position = 0, length = 2.4, notes = {{50, 60, 0, 4}}})
fake.add_item(keys, {position = 4.8, length = 4.8, selected = true, notes = {
  {60, 90, 0, 1}, {64, 80, 1, 1}, {67, 80, 2, 1}, {72, 100, 3, 1.5}, {48, 70, 0, 4},
  {62, 85, 4.5, 0.5}, {65, 85, 6, 2}, {61, 40, 5, 1, 0, true}, {70, 90, 8.5, 1}}})
"""
ITEM_NOTES = [(60, 90, 0, 1), (64, 80, 1, 1), (67, 80, 2, 1), (72, 100, 3, 1.5), (48, 70, 0, 4), (62, 85, 4.5, 0.5),
              (65, 85, 6, 2)]


def settings(server: SegueServe, segue_program: Path, **more: str) -> dict[str, str]:
    return {"segue": str(segue_program), "server": server.zmq_endpoint, "bars": "2", "variations": "2",
            "seed": "11", **more}


def test_continue_inserts_the_continuation_right_after_the_selected_item(lua, server, segue_program, tmp_path):
    reaper = Reaper(lua, tmp_path, settings(server, segue_program), tempo=100).setup(ITEM).action(CONTINUE)
    (dump,) = reaper.run()

    assert messages(dump) == []
    (command,) = calls(dump, "ExecProcess")
    assert command["args"][1] == -1, "the client runs without REAPER waiting for it"
    assert re.search(r"client continue \".*\.mid\" --length 8 --bars 2 --variations 2 ", command["args"][0])

    # The clip the server got: what the item shows, in beats from its start, at the project's tempo and meter.
    (clip_file,) = (reaper.temp / "segue-reaper").glob("clip-*.mid")
    sent = read_tracks(clip_file)
    assert sent.tempo == pytest.approx(100, abs=0.01) and sent.time_signature == (4, 4)
    assert sorted((n.pitch, n.velocity, n.start, n.duration) for n in sent.tracks[0].notes) == sorted(ITEM_NOTES)

    keys = items(dump)
    assert len(keys) == 3
    source, new = keys[1], keys[2]
    assert new["created"] and new["name"] == "Segue 1 of 2"
    assert new["position_qn"] == pytest.approx(source["end_qn"]) == pytest.approx(16)
    assert new["position"] == pytest.approx(9.6) and new["end_qn"] == pytest.approx(16 + 2 * 4)
    assert new["selected"] and not source["selected"] and new["sorted"]
    (create,) = calls(dump, "CreateNewMIDIItemInProj")
    assert create["args"] == ["Keys", 16, 24, True]

    (answer,) = answers(reaper)
    v1, v2 = done_paths(answer)
    inserted = inserted_notes(new)
    assert inserted, "the tiny model wrote notes"
    assert inserted == expected_notes(v1, offset=8, span=8)
    assert all(0 <= start < 2 * 4 * PPQ and start < end <= 2 * 4 * PPQ for _, _, start, end in inserted), \
        "every note lies inside the 2 requested bars"
    assert {n["channel"] for n in new["notes"]} == {0}
    assert_one_undo_block_around_the_insert(dump)
    assert dump["ext"]["Segue/last_index"] == "1" and dump["ext"]["Segue/last_variations"] == "2"


def test_another_variation_replaces_the_last_one_then_asks_for_new_ones(lua, server, segue_program, tmp_path):
    reaper = (Reaper(lua, tmp_path, settings(server, segue_program, seed=""), meter=(3, 4))
              .setup(ITEM.replace("length = 4.8, selected", "length = 4.5, selected"))  # 9 beats: 3 bars of 3/4
              .action(CONTINUE).action(VARIATION).action(VARIATION))
    first, second, third = reaper.run()

    span = 2 * 3  # 2 bars of 3/4
    start_qn = 4.8 * 2  # the item starts at 4.8 s = beat 9.6 at 120 BPM
    one = [i for i in items(first) if i["created"]]
    two = [i for i in items(second) if i["created"]]
    three = [i for i in items(third) if i["created"]]
    assert [i["name"] for i in one] == ["Segue 1 of 2"]
    assert [i["name"] for i in two] == ["Segue 2 of 2"], "the second variation replaced the first"
    assert [i["name"] for i in three] == ["Segue 1 of 2"], "with every variation used, new ones were asked for"
    for item in one + two + three:
        assert item["position_qn"] == pytest.approx(start_qn + 9) and item["end_qn"] == pytest.approx(start_qn + 9 + span)
    deleted = [c["args"][1] for c in calls(second, "DeleteTrackMediaItem")]
    assert deleted == [one[0]["guid"]]

    first_answer, second_answer = answers(reaper)
    v1, v2 = done_paths(first_answer)
    assert inserted_notes(one[0]) == expected_notes(v1, offset=9, span=span)
    assert inserted_notes(two[0]) == expected_notes(v2, offset=9, span=span)
    assert inserted_notes(three[0]) == expected_notes(done_paths(second_answer)[0], offset=9, span=span)
    assert len(calls(second, "ExecProcess")) == 1 and len(calls(third, "ExecProcess")) == 2
    assert_one_undo_block_around_the_insert(third, blocks=3)
    assert messages(third) == []


def test_a_variation_moved_away_is_kept(lua, server, segue_program, tmp_path):
    reaper = (Reaper(lua, tmp_path, settings(server, segue_program)).setup(ITEM).action(CONTINUE)
              .setup("fake.tracks[1].items[3].position = 30  -- the musician drags it elsewhere")
              .action(VARIATION))
    _, after = reaper.run()
    created = [i for i in items(after) if i["created"]]
    assert sorted(i["name"] for i in created) == ["Segue 1 of 2", "Segue 2 of 2"]
    assert calls(after, "DeleteTrackMediaItem") == []


def test_drum_notes_keep_their_channel(lua, server, segue_program, tmp_path):
    drums = """
local drums = fake.add_track("Drums")
fake.add_item(drums, {position = 0, length = 2, selected = true, notes = {
  {36, 100, 0, 0.25, 9}, {42, 80, 0.5, 0.25, 9}, {38, 100, 1, 0.25, 9}, {42, 80, 1.5, 0.25, 9},
  {36, 100, 2, 0.25, 9}, {42, 80, 2.5, 0.25, 9}, {38, 100, 3, 0.25, 9}, {42, 80, 3.5, 0.25, 9}}})
"""
    (dump,) = Reaper(lua, tmp_path, settings(server, segue_program, bars="1")).setup(drums).action(CONTINUE).run()
    assert messages(dump) == []
    (clip_file,) = (tmp_path / "temp" / "segue-reaper").glob("clip-*.mid")
    assert read_tracks(clip_file).tracks[0].is_drum, "notes on MIDI channel 10 reach the server as a drum clip"
    (new,) = [i for i in items(dump) if i["created"]]
    assert new["position_qn"] == pytest.approx(4) and new["notes"]
    assert {n["channel"] for n in new["notes"]} == {9}


def test_a_note_a_hair_before_the_end_moves_the_continuation_a_bar_later_as_on_the_server(lua, server, segue_program,
                                                                                          tmp_path):
    """docs/protocol.md 3.6: the server quantizes onsets first, so a note at 7.97 of an 8-beat item starts a
    third bar; the script places the new item at beat 12 of the item, where the server's notes start."""
    item = """
local keys = fake.add_track("Keys")
fake.add_item(keys, {position = 1, length = 4, selected = true, notes = {{60, 90, 0, 1}, {64, 80, 2, 1}, {67, 80, 7.97, 0.03}}})
"""
    reaper = Reaper(lua, tmp_path, settings(server, segue_program, bars="1")).setup(item).action(CONTINUE)
    (dump,) = reaper.run()
    (new,) = [i for i in items(dump) if i["created"]]
    assert new["position_qn"] == pytest.approx(2 + 12) and new["end_qn"] == pytest.approx(2 + 16)
    (answer,) = answers(reaper)
    v1 = done_paths(answer)[0]
    assert inserted_notes(new) == expected_notes(v1, offset=12, span=4) and new["notes"]


@pytest.mark.parametrize("setup, words", [
    ('fake.add_item(fake.add_track("Keys"), {position = 0, length = 2, notes = {{60, 90, 0, 1}}})', "Select a MIDI item first"),
    ('fake.add_item(fake.add_track("Voice"), {position = 0, length = 2, selected = true, midi = false, audio = true})',
     "is not MIDI"),
    ('fake.add_item(fake.add_track("Keys"), {position = 0, length = 2, selected = true, midi = false})', "is not MIDI"),
    ('fake.add_item(fake.add_track("Keys"), {position = 0, length = 2, selected = true, notes = {{60, 90, 0, 1, 0, true}}})',
     "has no notes to continue"),
    ('fake.add_item(fake.add_track("Keys"), {position = 0, length = 2, selected = true, notes = {{60, 90, 4.5, 1}}})',
     "has no notes to continue"),
    ('fake.denominator = 5; fake.add_item(fake.add_track("Keys"), {position = 0, length = 2, selected = true, '
     'notes = {{60, 90, 0, 1}}})', "lower number is 1, 2, 4, 8, 16 or 32; this item is in 4/5"),
])
def test_what_cannot_be_continued_is_said_before_anything_runs(lua, tmp_path, setup, words):
    (dump,) = Reaper(lua, tmp_path, {"segue": "/nonexistent/segue"}).setup(setup).action(CONTINUE).run()
    (message,) = messages(dump)
    assert words in message
    assert calls(dump, "ExecProcess") == [] and calls(dump, "Undo_BeginBlock") == []


def test_a_server_that_is_not_running_is_named_with_the_command_to_start_it(lua, segue_program, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    (dump,) = Reaper(lua, tmp_path, {"segue": str(segue_program), "server": closed}).setup(ITEM).action(CONTINUE).run()
    (message,) = messages(dump)
    assert "not running" in message and closed in message and "segue serve" in message
    assert calls(dump, "Undo_BeginBlock") == [] and not [i for i in items(dump) if i["created"]]


def test_a_segue_program_that_does_not_start_is_named(lua, tmp_path):
    (dump,) = (Reaper(lua, tmp_path, {"segue": "/nonexistent/bin/segue", "start_timeout": "1"}).setup(ITEM)
               .action(CONTINUE).run())
    (message,) = messages(dump)
    assert "did not start" in message and "/nonexistent/bin/segue" in message and "which segue" in message
    assert calls(dump, "Undo_BeginBlock") == []


def test_the_servers_refusal_is_shown(lua, server, segue_program, tmp_path):
    (dump,) = Reaper(lua, tmp_path, settings(server, segue_program, bars="65")).setup(ITEM).action(CONTINUE).run()
    (message,) = messages(dump)
    assert "could not continue" in message and "bars must be between 1 and 64, not 65" in message
    assert calls(dump, "Undo_BeginBlock") == []


def test_another_variation_before_any_continuation_says_what_to_do(lua, tmp_path):
    (dump,) = Reaper(lua, tmp_path, {}).setup(ITEM).action(VARIATION).run()
    (message,) = messages(dump)
    assert "no Segue continuation to vary yet" in message and "Continue selected item in style" in message


def test_settings_are_kept_and_checked(lua, tmp_path):
    (saved,) = (Reaper(lua, tmp_path, {})
                .setup('fake.user_inputs = "8,1,1.2,42,tcp://127.0.0.1:6000,/opt/segue/bin/segue"')
                .action(SETTINGS).run())
    assert messages(saved) == []
    assert {k: v for k, v in saved["persisted"].items()} == {
        "Segue/bars": "8", "Segue/variations": "1", "Segue/temperature": "1.2", "Segue/seed": "42",
        "Segue/server": "tcp://127.0.0.1:6000", "Segue/segue": "/opt/segue/bin/segue"}
    (dialog,) = calls(saved, "GetUserInputs")
    assert dialog["args"][1] == 6 and dialog["args"][3] == "4,3,0.9,,tcp://127.0.0.1:5555,segue", "the defaults are shown"

    (refused,) = Reaper(lua, tmp_path, {}).setup('fake.user_inputs = "65,1,1,,x,segue"').action(SETTINGS).run()
    (message,) = messages(refused)
    assert '"65" is not a valid value for Bars to add' in message and not refused["persisted"]


def test_scripts_load_and_use_nothing_newer_than_lua_53(lua):
    """REAPER 6 embeds Lua 5.3: nothing 5.4-only (<const>, <close>) in the scripts."""
    for path in SCRIPTS.glob("*.lua"):
        text = path.read_text()
        assert "<const>" not in text and "<close>" not in text, path
        result = subprocess.run([lua, "-e", f"assert(loadfile({lua_string(str(path))}))"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


# --- the client options the script relies on -------------------------------------------------------------

@pytest.fixture
def one_bar_clip(tmp_path) -> Path:
    payload = clip_payload(bars=1)
    clip = Clip((), payload["tempo"], tuple(payload["time_signature"])).with_notes(Note(*n) for n in payload["notes"])
    return write_clip(tmp_path / "riff.mid", clip)


def test_client_result_file_holds_every_event_as_tab_separated_fields(server, one_bar_clip, tmp_path, capsys):
    result = tmp_path / "answer.tsv"
    code = client_module.main(["continue", str(one_bar_clip), "--server", server.zmq_endpoint, "--bars", "1",
                               "--variations", "2", "--seed", "3", "--length", "8", "--result", str(result), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert not result.with_name("answer.tsv.part").exists()
    events = [json.loads(line) for line in out.splitlines()]
    expected = []
    for e in events:
        fields = client_module.RESULT_FIELDS[e["type"]]
        expected.append([e["type"], *("" if e.get(f) is None else str(e[f]) for f in fields)])
    lines = [line.split("\t") for line in result.read_text().splitlines()]
    assert lines == expected
    notes = [e for e in events if e["type"] == "note"]
    assert notes and all(8 <= e["start"] < 12 for e in notes), "--length 8: the continuation starts after beat 8, not 4"
    assert lines[-1][0] == "finished" and [line[0] for line in lines].count("done") == 2


def test_client_result_file_says_why_when_nothing_answers(one_bar_clip, tmp_path, capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    result = tmp_path / "answer.tsv"
    result.write_text("finished\t1\t1.0\n")  # a stale answer must not survive
    code = client_module.main(["continue", str(one_bar_clip), "--server", closed, "--connect-timeout", "0.3",
                               "--result", str(result)])
    capsys.readouterr()
    assert code == 1
    (line,) = result.read_text().splitlines()
    kind, code_name, message = line.split("\t")
    assert (kind, code_name) == ("error", "unreachable") and "segue serve" in message
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"not midi")
    assert client_module.main(["continue", str(bad), "--server", closed, "--result", str(result)]) == 1
    capsys.readouterr()
    assert result.read_text().startswith("error\tbad_clip\t") and "bad.mid" in result.read_text()


def test_client_result_file_in_a_missing_folder_is_one_error_line(one_bar_clip, tmp_path, capsys):
    assert client_module.main(["continue", str(one_bar_clip), "--result", str(tmp_path / "nowhere" / "a.tsv")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the result file ") and err.count("\n") == 1


def test_client_length_must_be_positive(one_bar_clip, tmp_path, capsys):
    result = tmp_path / "answer.tsv"
    assert client_module.main(["continue", str(one_bar_clip), "--length", "0", "--result", str(result)]) == 1
    assert "length" in capsys.readouterr().err
    assert result.read_text().startswith("error\tbad_clip\t")


def test_exec_log_stays_free_of_tracebacks(lua, server, segue_program, tmp_path):
    """The client run by the script ends cleanly (its output goes nowhere in REAPER, so nothing may hide there)."""
    Reaper(lua, tmp_path, settings(server, segue_program)).setup(ITEM).action(CONTINUE).run()
    log = (tmp_path / "exec.log").read_text()
    assert "Traceback" not in log and "finished: 2 variation(s)" in log
