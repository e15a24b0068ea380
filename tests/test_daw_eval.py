"""training/daw_eval.py: held-out multi-track files continued as a band and scored track by track."""

from __future__ import annotations

import dataclasses
import json

from test_multitrack import band

from engine.midi_file import write_tracks
from training import daw_eval, daw_plots
from training.daw_measures import DRUMS, GM_FAMILIES, MODEL, SYSTEMS, SummaryRow, criteria_verdicts, score_example, summarize

NAMES = ["Drums", "Bass", "Keys", "Lead"]
PNG = b"\x89PNG\r\n\x1a\n"  # the first bytes of every PNG file


def band_folder(root, lengths=(12, 13, 16)):
    """Multi-track files long enough for a 4+4 window, one too short for it, and one that is not MIDI."""
    root.mkdir()
    for bars in lengths:
        write_tracks(root / f"band{bars}.mid", band(bars), NAMES)
    write_tracks(root / "short.mid", band(4), NAMES)
    (root / "broken.mid").write_bytes(b"not a MIDI file")
    return root


def test_each_track_is_scored_against_its_own_next_bars(tiny_model, tmp_path, capsys):
    data, out = band_folder(tmp_path / "data"), tmp_path / "out"
    argv = ["--model", str(tiny_model), "--data", str(data), "--out", str(out), "--bars", "4", "--prompt-bars", "4"]
    assert daw_eval.main(argv) == 0

    report = (out / "report.md").read_text()
    metrics = json.loads((out / "daw_metrics.json").read_text())
    assert "segue eval-tracks --model" in report and "| family | system |" in report
    assert len(metrics["files_used"]) == 3
    assert sorted((s["file"].rsplit("/", 1)[-1], s["reason"]) for s in metrics["skipped"]) == [
        ("broken.mid", "unreadable"), ("short.mid", "no 4+4 bars with notes in both")]
    assert "skipped: 2 (" in report

    [model] = metrics["models"]
    rows = {(row["family"], row["system"]): row for row in model["summary"]}
    for family in (DRUMS, "bass", "piano", "pipe"):  # drums, fingered bass, grand piano, flute: each its own track
        for system in SYSTEMS:
            assert rows[family, system]["clips"] == 3, (family, system)
    assert {family for family, _ in rows} <= {*GM_FAMILIES, "all pitched", DRUMS}
    assert model["multitrack"] == {"checked": 3, "passed": 3}  # the engine keeps every track's program and drum flag
    assert "3 of 3 files" in report
    assert "| drums | model |" in capsys.readouterr().out

    # a chart per measure (the band has pitched tracks and drums, so every one has values), each linked from the report
    charts = [chart.filename for chart in daw_plots.CHARTS]
    assert len(charts) == 8 and metrics["plots"] == [f"plots/{name}" for name in charts]
    for name in charts:
        assert (out / "plots" / name).read_bytes().startswith(PNG), name
        assert f"](plots/{name})" in report, name
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(charts)


def test_plot_series_are_the_summary_rows_and_bounds_are_the_criteria(tmp_path):
    """The charts draw the tables' rows (no recomputation) and the thresholds the verdicts use."""
    tracks = band(12)
    rows = []
    for track in tracks:
        prompt, reference = daw_eval.cut_track(track, 0, 4, 4)
        rows += score_example(prompt, reference, 4, {MODEL: daw_eval.cut_track(track, 4, 4, 4)[1]})
    summary = summarize(rows)
    series = daw_plots.chart_series([("a", summary), ("b", summary)])
    assert [(s.label, s.baseline) for s in series] == [("a", False), ("b", False), ("repeat last bar", True),
                                                       ("loop the clip", True)]  # the same baselines are drawn once
    assert all(row in summary for s in series for row in s.rows.values())
    thresholds = {v.threshold for v in criteria_verdicts(summary)}
    fields = {f.name for f in dataclasses.fields(SummaryRow)}
    for chart in daw_plots.CHARTS:
        assert chart.field in fields
        assert not chart.bounds or chart.criterion in thresholds, chart

    pitched = [row for row in summary if row.family != DRUMS]  # no drums: no kit or onset chart, not even a stale one
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "kit_agreement.png").write_bytes(PNG)
    written = daw_plots.write_measure_plots([("a", pitched)], tmp_path / "plots")
    assert [p.name for p in written] == [c.filename for c in daw_plots.CHARTS if c.field.split("_")[0] not in ("kit", "onset")]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in written)


def test_a_track_silent_in_the_prompt_is_heard_but_not_continued(tmp_path):
    tracks = band(12)
    tracks[3] = tracks[3].with_notes(n for n in tracks[3].notes if n.start >= 40)  # the lead enters in bar 11
    path = write_tracks(tmp_path / "late.mid", tracks, NAMES)
    example = daw_eval.cut_example(path, "0" * 64, 4, 4, seed=3)
    assert isinstance(example, daw_eval.Example)
    assert example.prompt.continued == (0, 1, 2) and len(example.prompt.tracks) == 4 and not example.prompt.tracks[3].notes
    for prompt, reference in zip(example.prompt.tracks, example.references, strict=True):
        assert prompt.length == 16 and all(0 <= n.start < 16 for n in prompt.notes)  # the prompt bars from beat 0
        assert reference.length == 32 and all(16 <= n.start < 32 for n in reference.notes)  # the real next bars after them
    assert daw_eval.cut_example(path, "0" * 64, 4, 4, seed=3) == example  # the offset comes from (seed, hash) alone


def test_a_compared_model_runs_the_same_files_under_its_own_heading(tiny_model, tmp_path):
    data, out = band_folder(tmp_path / "data", lengths=(12,)), tmp_path / "out"
    argv = ["--model", str(tiny_model), "--compare-model", str(tiny_model), "--data", str(data), "--out", str(out),
            "--bars", "2", "--max-files", "1"]
    assert daw_eval.main(argv) == 0
    metrics = json.loads((out / "daw_metrics.json").read_text())
    first, second = metrics["models"]
    assert (first["role"], second["role"]) == ("Model", "Compared model")
    assert first["summary"] == second["summary"]  # the same model on the same cuts and seeds scores the same
    report = (out / "report.md").read_text()
    assert "## Compared model" in report and "](plots/copied_bars.png)" in report


def test_user_errors_are_one_line_without_a_traceback(tiny_model, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert daw_eval.main(["--model", str(tiny_model), "--data", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and err.count("\n") == 1 and "Traceback" not in err

    (tmp_path / "empty").mkdir()
    assert daw_eval.main(["--model", str(tiny_model), "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "has no MIDI files" in capsys.readouterr().err

    data = band_folder(tmp_path / "data", lengths=(12,))
    assert daw_eval.main(["--model", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load the model") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
