"""Segue in a real DAW: Ardour, headless, plays a recorded MIDI region through the plugin.

    apt-get install ardour            # Debian 12: Ardour 7.3, with ardour7-lua and the VST3 scanner
    python3 -m pytest -m ardour tests/test_ardour_plugin.py -q

Marked `ardour` (deselected by default in pyproject.toml: about 30 s of two real-time passes plus
Ardour's start-up, and CI does not install Ardour; tests/test_juce_plugin.py covers the plugin there
with a minimal host). Asked for explicitly without Ardour installed, it fails and says what to install.

`juce_stub/test_host/ardour/session.lua` drives `ardour7-lua` on the "None (Dummy)" backend: a
"Keys" track (a small Lua DSP playing the notes below) is recorded into a "Clip" track, which gives
a real MIDI region; then Segue is inserted on "Clip", the transport rolls from the start, the region
plays through Segue (its note 0 presses Continue) and a "Result" track records what Segue puts out.
Ardour only knows a VST3 once its scanner has indexed it, so the test runs the scanner on the built
bundle first, with HOME pointing into the test's folder (nothing touches the real home).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from test_juce_plugin import Relay, plugin_build, written_notes  # noqa: F401  (plugin_build is a fixture)
from test_server import Server, free_port

ROOT = Path(__file__).resolve().parents[1]
ARDOUR_DIR = ROOT / "juce_stub" / "test_host" / "ardour"
RATE, BPM = 48000, 120.0
SPB = int(RATE * 60 / BPM)  # samples per beat
TICKS = 1920  # Ardour's ticks per beat

# A bar of eighth notes in bar 2 (beats 4-8; bar 1 stays empty so the first note is not on the
# transport's first sample), and note 0 on beat 7: Segue's MIDI trigger for Continue.
CLIP = [(60 + step, 90, 4 + i * 0.5, 0.45) for i, step in enumerate((0, 2, 4, 5, 7, 9))]
TRIGGER_BEAT = 7.0
CLIP_START, CLIP_END, BARS = 4.0, 8.0, 1
# Segue's parameters, normalized: Clip bars 1, Bars 1, Variations 1, Seed 5 (of 0-9999).
PARAMS = {0: 0.0, 1: 0.0, 2: 0.0, 6: 5 / 9999}


def ardour_lua() -> str | None:
    for version in (9, 8, 7):
        if shutil.which(f"ardour{version}-lua"):
            return f"ardour{version}-lua"
    return None


def vst3_scanner() -> str | None:
    found = sorted(glob.glob("/usr/lib/ardour*/ardour-vst3-scanner") + glob.glob("/usr/lib/*/ardour*/ardour-vst3-scanner"))
    return found[-1] if found else None


def beats(text: str) -> float:
    """Ardour's `beats:ticks` (a note time or length) as beats."""
    whole, ticks = text.split(":")
    return int(whole) + int(ticks) / TICKS


def keys_events() -> list[tuple[int, int, int, int]]:
    events = []
    for pitch, velocity, start, duration in CLIP:
        events += [(round(start * SPB), 0x90, pitch, velocity), (round((start + duration) * SPB), 0x80, pitch, 0)]
    events += [(round(TRIGGER_BEAT * SPB), 0x90, 0, 100), (round(TRIGGER_BEAT * SPB) + 1000, 0x80, 0, 0)]
    return sorted(events)


@pytest.mark.slow
@pytest.mark.ardour
def test_ardour_plays_a_region_through_segue_and_records_the_continuation(plugin_build, models_dir, tmp_path):  # noqa: F811
    lua, scanner = ardour_lua(), vst3_scanner()
    if lua is None or scanner is None:
        pytest.fail("Ardour is not installed (apt-get install ardour): this real-DAW test needs ardour7-lua and its VST3 scanner")
    vst3, _ = plugin_build

    # A private HOME: the plugin where Ardour looks for VST3s, indexed by Ardour's own scanner, and the keys script.
    home = tmp_path / "home"
    (home / ".vst3").mkdir(parents=True)
    (home / ".vst3" / "Segue.vst3").symlink_to(vst3)
    scripts = home / ".config" / Path(lua).stem.replace("-lua", "") / "scripts"
    scripts.mkdir(parents=True)
    body = ", ".join("{" + ", ".join(map(str, e)) + "}" for e in keys_events())
    (scripts / "segue_test_keys.lua").write_text((ARDOUR_DIR / "segue_test_keys.lua").read_text().replace("--EVENTS--", body))
    env = {**os.environ, "HOME": str(home), "LD_LIBRARY_PATH": str(Path(scanner).parent)}
    scan = subprocess.run([scanner, "-f", str(home / ".vst3" / "Segue.vst3")], env=env, capture_output=True, text=True, timeout=120)
    assert scan.returncode == 0 and "Found Plugin: Segue" in scan.stdout + scan.stderr, scan.stdout + scan.stderr

    osc_port = free_port(socket.SOCK_DGRAM)
    server = Server("--models", models_dir, "--osc-port", osc_port, "--zmq-port", free_port(), "--clips-dir",
                    tmp_path / "clips", "--no-watch")
    relay = None
    try:
        server.wait_ready()
        relay = Relay(osc_port)
        env = {**os.environ, "HOME": str(home), "SEGUE_OSC_PORT": str(relay.port), "SEGUE_SERVE_COMMAND": "",
               "SEGUE_ARDOUR_SESSION": str(tmp_path / "session"),
               "SEGUE_RECORD_SAMPLES": str(round((CLIP_END + 0.5) * SPB)),
               "SEGUE_PLAY_SAMPLES": str(round((CLIP_END + BARS * 4 + 0.5) * SPB)),
               "SEGUE_PARAMS": ",".join(f"{i}={v}" for i, v in PARAMS.items())}
        run = subprocess.run([lua, str(ARDOUR_DIR / "session.lua")], env=env, capture_output=True, text=True, timeout=300)
    finally:
        if relay is not None:
            relay.close()
        server.stop()
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "NOTE\tResult" in out, f"ardour-lua failed (exit {run.returncode}):\n{out[-4000:]}"

    lines = [line.split("\t") for line in run.stdout.splitlines()]
    regions = {row[1]: row[2] for row in lines if row[0] == "REGION"}
    assert regions == {"Clip": "b0", "Result": "b0"}, regions
    notes = {track: sorted((beats(row[2]), int(row[3]), int(row[4]), beats(row[5])) for row in lines
                           if row[0] == "NOTE" and row[1] == track) for track in ("Clip", "Result")}
    params = {int(row[1]): (row[2], float(row[3])) for row in lines if row[0] == "PARAM"}
    assert [params[i][0] for i in range(8)] == ["Clip bars", "Bars", "Variations", "Temperature", "Key lock", "Scale",
                                               "Seed", "Continue"]

    # 1. The region Ardour recorded is the clip (and the trigger note).
    played = sorted([*CLIP, (0, 100, TRIGGER_BEAT, 1000 / SPB)], key=lambda n: (n[2], n[0]))
    recorded = [(p, v, s, d) for s, p, v, d in notes["Clip"]]
    assert [(p, v) for p, v, _, _ in recorded] == [(p, v) for p, v, _, _ in played]
    assert all(abs(a[2] - b[2]) <= 1 / TICKS and abs(a[3] - b[3]) <= 2 / TICKS for a, b in zip(recorded, played, strict=True))

    # 2. The server received that clip from Segue inside Ardour: the bar before the trigger, from its start.
    reply_port, request_id, request = relay.continue_request()
    assert request["clip"]["length"] == 4 and request["clip"]["tempo"] == BPM and request["clip"]["time_signature"] == [4, 4]
    assert request["bars"] == BARS and request["variations"] == 1 and request["seed"] == 5
    sent = request["clip"]["notes"]
    assert [(n[0], n[1]) for n in sent] == [(p, v) for p, v, _, _ in CLIP]
    assert all(abs(n[2] - (s - CLIP_START)) <= 2 / TICKS and abs(n[3] - d) <= 3 / TICKS for n, (_, _, s, d) in zip(sent, CLIP, strict=True))

    # 3. Ardour recorded what Segue put out: the clip passed through (without the trigger note), then
    #    the continuation, right after the clip, exactly the notes the server wrote.
    result = notes["Result"]
    through = [n for n in result if n[0] < CLIP_END]
    assert [(p, v) for _, p, v, _ in through] == [(p, v) for p, v, _, _ in CLIP]
    generated = [(round(s * 12), p, v) for s, p, v, _ in result if s >= CLIP_END - 1e-6]
    assert generated, f"no generated note came back through Ardour:\n{out[-3000:]}"
    written = written_notes(tmp_path / "clips", reply_port, request_id)
    expected = [(round((CLIP_START + n.start) * 12), n.pitch, n.velocity) for n in written]
    assert sorted(generated) == sorted(expected)
    assert all(CLIP_END * 12 <= s < (CLIP_END + BARS * 4) * 12 for s, _, _ in generated)
