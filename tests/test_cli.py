"""`segue continue` end to end as a musician runs it, and its one-line errors on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.midi_file import read_clip


def segue(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plugin_bridge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_continue_writes_one_file_per_variation(tiny_model, example_midi, tmp_path):
    clip_path = example_midi[0]
    out = tmp_path / "out"
    result = segue("continue", clip_path, "--bars", 8, "--variations", 3, "--temperature", 0.9, "--seed", 7,
                   "--out", out, "--model", tiny_model)
    assert result.returncode == 0, result.stderr
    files = sorted(out.glob("*.mid"))
    assert [f.name for f in files] == [f"{clip_path.stem}-continuation-{i}.mid" for i in (1, 2, 3)]
    for f in files:
        assert str(f) in result.stdout
    assert "time to first note" in result.stdout and str(tiny_model) in result.stdout
    prompt = read_clip(clip_path)
    clip_end = prompt.bars * prompt.beats_per_bar
    for number, f in enumerate(files, start=1):
        continuation = read_clip(f)
        assert continuation.time_signature == prompt.time_signature
        assert continuation.tempo == pytest.approx(prompt.tempo, abs=0.01)
        assert continuation.notes and all(clip_end <= n.start < clip_end + 8 * prompt.beats_per_bar
                                          for n in continuation.notes)
        assert _track_name(f) == f"Segue continuation {number} of 3 (seed 7)"
    again = segue("continue", clip_path, "--bars", 8, "--variations", 3, "--temperature", 0.9, "--seed", 7,
                  "--out", tmp_path / "again", "--model", tiny_model)
    assert again.returncode == 0, again.stderr
    assert [(tmp_path / "again" / f.name).read_bytes() for f in files] == [f.read_bytes() for f in files]


def _track_name(path: Path) -> str:
    import mido

    for message in mido.MidiFile(str(path)).tracks[-1]:
        if message.type == "track_name":
            return message.name
    return ""


def _one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 or lines[-1].startswith("segue"), result.stderr
    assert fragment in result.stderr, result.stderr


def test_not_a_midi_file(tiny_model, tmp_path):
    bad = tmp_path / "notes.mid"
    bad.write_text("these are not notes")
    _one_line_error(segue("continue", bad, "--model", tiny_model, "--out", tmp_path), "is not a MIDI file")


def test_corrupt_midi_file(tiny_model, example_midi, tmp_path):
    data = example_midi[0].read_bytes()
    bad = tmp_path / "broken.mid"
    bad.write_bytes(data[:30] + b"\xff\xff\xff\xff" + data[34:60])
    result = segue("continue", bad, "--model", tiny_model, "--out", tmp_path)
    _one_line_error(result, "broken.mid")


def test_empty_clip(tiny_model, tmp_path):
    import mido

    mid = mido.MidiFile()
    mid.tracks.append(mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=500000, time=0)]))
    mid.save(str(tmp_path / "empty.mid"))
    _one_line_error(segue("continue", tmp_path / "empty.mid", "--model", tiny_model, "--out", tmp_path), "no notes")


def test_missing_file(tiny_model, tmp_path):
    _one_line_error(segue("continue", tmp_path / "nope.mid", "--model", tiny_model), "does not exist")


@pytest.mark.parametrize("bars", [0, 10000])
def test_bar_count_out_of_range(tiny_model, example_midi, tmp_path, bars):
    _one_line_error(segue("continue", example_midi[0], "--bars", bars, "--model", tiny_model, "--out", tmp_path),
                    "bars must be between 1 and 64")


def test_tampered_model_folder(model_copy, example_midi, tmp_path):
    path = model_copy / "model.onnx"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x40
    path.write_bytes(bytes(data))
    result = segue("continue", example_midi[0], "--model", model_copy, "--out", tmp_path / "o")
    _one_line_error(result, "model.onnx does not match the sha256")
    assert not (tmp_path / "o").exists()


def test_help_reads_like_a_manual():
    result = segue("continue", "--help")
    assert result.returncode == 0
    for option in ("--bars", "--variations", "--temperature", "--seed", "--out", "--model"):
        assert option in result.stdout
    top = segue("--help")
    assert "continue" in top.stdout and "train" in top.stdout and "export-onnx" in top.stdout


def test_eval_tracks_is_a_segue_subcommand():
    """`segue eval-tracks` runs training/daw_eval.py: listed in `segue --help`, with its own options' help."""
    assert "eval-tracks" in segue("--help").stdout
    result = segue("eval-tracks", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: segue eval-tracks")
    for option in ("--model", "--data", "--out", "--prompt-bars", "--bars", "--compare-model"):
        assert option in result.stdout


def test_continue_without_onnx_runtime_names_the_install_command(example_midi, tmp_path):
    """`pip install -e .` without the [cpu] extra: one line with the command that fixes it, no traceback."""
    code = ("import sys; sys.modules['onnxruntime'] = None\n"  # as if it were not installed
            "from plugin_bridge.cli import main\n"
            f"raise SystemExit(main(['continue', {str(example_midi[0])!r}, '--out', {str(tmp_path)!r}]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    _one_line_error(result, "needs onnxruntime, which is not installed: pip install -e '.[cpu]'")


def test_search_defaults_of_the_model_apply_when_options_are_left_out(tiny_model, example_midi, tmp_path):
    """The model's manifest `search` section is the default for options not given on the command line."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["search"] = {**manifest["search"], "bars": 2, "variations": 2}
    (model / "manifest.json").write_text(json.dumps(manifest))
    result = segue("continue", example_midi[0], "--seed", 3, "--out", tmp_path / "out", "--model", model)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out").glob("*.mid"))) == 2 and "for 2 bars x 2" in result.stdout
