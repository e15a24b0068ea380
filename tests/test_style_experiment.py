"""bench/style_experiment.py end to end in --quick mode: the tiny model fine-tuned on two synthetic
"styles" (4/4 pieces vs 6/8 pieces), every measurement taken, the report and results.json written."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from make_tiny_model import write_piece

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import style_experiment  # noqa: E402


def experiment(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "style_experiment.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def quick_run(tiny_model, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("style-experiment")
    # 20 pieces per "style"; seeds 0..35 are the tiny model's own corpus, so the overlap count has work to do.
    for name, meter in (("four", 0), ("six", 2)):
        (root / name).mkdir()
        for seed in range(meter, 60, 3):
            write_piece(root / name / f"piece_{seed:03d}.mid", seed)
    argv = ["--quick", "--quiet", "--threads", "1", "--base", tiny_model, "--style-a", root / "four",
            "--style-b", root / "six", "--names", "four", "six", "--out", root / "out", "--report", root / "out" / "report.md"]
    done = experiment(*argv)
    return {"done": done, "argv": argv, "out": root / "out"}


def test_quick_run_writes_report_with_every_criterion(quick_run):
    done = quick_run["done"]
    assert done.returncode == 0, done.stderr[-3000:]
    report = (quick_run["out"] / "report.md").read_text()
    for cid in style_experiment.CRITERIA:
        assert re.search(rf"^- \*\*(PASS|FAIL)\*\* {re.escape(cid)} ", report, re.M), cid
        assert re.search(rf"^(PASS|FAIL) {re.escape(cid)} ", done.stdout, re.M), cid
    assert "QUICK MODE" in report and "python3 bench/style_experiment.py --quick" in report
    for section in ("## Data", "### Overlap with the base model's training data", "## Fine-tuning", "## (1) and (5)",
                    "## (2)", "## (3)", "## (4)", "## What this does not show"):
        assert section in report, section


def test_quick_run_results_hold_sane_numbers(quick_run):
    assert quick_run["done"].returncode == 0, quick_run["done"].stderr[-3000:]
    r = json.loads((quick_run["out"] / "results.json").read_text())
    names = r["names"]
    assert names == ["four", "six"] and r["quick"] is True
    models = ["base", "ft_four", "ft_six"]
    assert [c["id"] for c in r["criteria"]] == list(style_experiment.CRITERIA)
    assert all(isinstance(c["passed"], bool) and c["detail"] for c in r["criteria"])
    for style in r["styles"]:
        assert style["held_out"] >= 1 and style["train"] >= 1 and style["files"] == style["train"] + style["held_out"]
        assert len(list((quick_run["out"] / "data" / style["name"]).glob("*.mid"))) == style["files"]
    overlap = r["base"]["overlap"]
    assert r["base"]["data"]["available"] and r["base"]["data"]["fingerprint_matches"]
    assert r["base"]["data"]["fraction_confirmed"] and r["base"]["data"]["val_fraction"] == 0.2  # the tiny model's split
    for s in names:
        ft = r["finetune"][s]
        assert ft["steps"] >= 1 and Path(ft["model"], "model.onnx").is_file()
        assert 0 <= overlap[s]["held_out_in_base_train"] <= overlap[s]["held_out"]
        ppl = r["perplexity"][s]
        assert ppl["tokens"] > 0
        for key in (*models, "ngram"):
            assert math.isfinite(ppl[key]) and ppl[key] > 1, (s, key, ppl[key])
        clips = r["clips"][s]
        assert clips["clips"] >= 1
        assert set(clips["closer_metrics"]) <= set(style_experiment.METRICS)
        for key in ("reference", *models):
            summary = clips["summary"][key]
            assert summary["continuations"] == clips["clips"] * (1 if key == "reference" else r["settings"]["samples"])
            assert math.isclose(sum(summary["labels"].values()), 1.0)
            assert all(0 <= v <= 1 for v in summary["labels"].values())
            assert all(d >= 0 for d in summary["distances"].values())
            for index in ("finetune_data", "base_data"):
                assert 0 <= summary["originality"][index]["copying_fraction"] <= 1
        assert clips["summary"]["reference"]["labels"] and clips["summary"]["reference"]["empty"] == 0
    classifier = r["classifier"]
    assert 0 <= classifier["held_out_accuracy"] <= 1
    assert all(classifier["train_windows"][s] > 0 for s in names)
    assert r["timings"]["total"] > 0


def test_rerun_refuses_to_overwrite_then_reuses(quick_run):
    assert quick_run["done"].returncode == 0, quick_run["done"].stderr[-3000:]
    argv = [a for a in quick_run["argv"]]
    again = experiment(*argv)
    assert again.returncode == 1 and "error:" in again.stderr and "--reuse-models" in again.stderr
    assert "Traceback" not in again.stderr
    reused = experiment(*argv, "--reuse-models")
    assert reused.returncode == 0, reused.stderr[-3000:]
    r = json.loads((quick_run["out"] / "results.json").read_text())
    assert all(r["finetune"][s]["reused"] for s in r["names"])
