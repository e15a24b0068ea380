"""bench/style_experiment.py: its verdicts, and the whole experiment in --quick mode on the tiny model.

The tiny model fine-tuned for a few steps on two synthetic "styles" (4/4 pieces vs 6/8 pieces)
cannot be expected to pass or fail any criterion on its merits, so the quick run is checked for
what it does guarantee: every number behind a verdict is the measurement it claims to be (held-out
perplexity re-measured here, clip summaries recomputed from the per-clip rows, the clips the ones
`segue eval` would choose), every verdict follows from its numbers, and the report says exactly
that. `criteria` itself is checked on hand-made numbers, flipping one criterion at a time.
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from make_tiny_model import write_piece

from engine.generate import Generator
from engine.tokens import ClipTokenizer
from training.eval_measures import model_perplexity
from training.held_out import capped, held_out_examples, split_folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import style_experiment  # noqa: E402
from style_experiment import COPY_THRESHOLD_BARS, LABEL_TARGET, METRICS, SANITY_TARGET  # noqa: E402

MODELS = ("base", "ft_four", "ft_six")


def experiment(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "style_experiment.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# --- the verdicts, on hand-made numbers ------------------------------------------------------------

def passing_results() -> dict:
    """The fields `criteria` reads, with numbers that pass all six criteria."""
    names = ["a", "b"]
    clips = {}
    for s in names:
        other = "b" if s == "a" else "a"
        clips[s] = {"closer_metrics": list(METRICS[: len(METRICS) // 2 + 1]), "summary": {
            f"ft_{s}": {"labels": {s: 0.95, other: 0.05}, "originality": {"finetune_data": {"copying_fraction": 0.0}}},
            "base": {"labels": {s: 0.6, other: 0.4}}}}
    return {"names": names, "clips": clips,
            "perplexity": {s: {"base": 3.0, f"ft_{s}": 2.5, "ngram": 4.0} for s in names},
            "classifier": {"held_out_accuracy": 0.95, "held_out": {s: {"accuracy": 0.95, "windows": 10} for s in names}}}


def _set(results: dict, path: str, value) -> None:
    *keys, last = path.split("/")
    target = results
    for key in keys:
        target = target[key]
    target[last] = value


# Each change moves one number just across its criterion's threshold, on one style only.
FLIPS = [
    ("(1)", "perplexity/b/ft_b", 3.0),  # not below the base's (equal)
    ("(2)", "clips/a/closer_metrics", list(METRICS[: len(METRICS) // 2])),  # not more than half
    ("(3a)", "classifier/held_out_accuracy", SANITY_TARGET - 0.001),
    ("(3b)", "clips/b/summary/ft_b/labels/b", LABEL_TARGET - 0.001),
    ("(4)", "clips/a/summary/ft_a/originality/finetune_data/copying_fraction", style_experiment.COPY_TARGET + 0.001),
    ("(5)", "perplexity/a/base", 4.0),  # not below the n-gram's (equal)
]


def test_criteria_pass_on_passing_numbers_and_each_fails_alone():
    verdicts = style_experiment.criteria(passing_results())
    assert [c["id"] for c in verdicts] == list(style_experiment.CRITERIA)
    assert all(c["passed"] for c in verdicts), verdicts
    assert "a: 2.500 vs base 3.000" in verdicts[0]["detail"] and "a: 3.000 vs n-gram 4.000" in verdicts[5]["detail"]
    for cid, path, value in FLIPS:
        results = copy.deepcopy(passing_results())
        _set(results, path, value)
        failed = [c["id"] for c in style_experiment.criteria(results) if not c["passed"]]
        assert failed == [cid], (path, value, failed)


# --- the quick run ------------------------------------------------------------------------------------

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
    assert done.returncode == 0, done.stderr[-3000:]
    # Read now: the re-run test below writes results.json again.
    return {"done": done, "argv": argv, "out": root / "out", "base": tiny_model,
            "results": json.loads((root / "out" / "results.json").read_text()),
            "report": (root / "out" / "report.md").read_text()}


@pytest.mark.slow
def test_report_and_stdout_state_the_computed_verdicts(quick_run):
    r, report, stdout = quick_run["results"], quick_run["report"], quick_run["done"].stdout
    assert [c["id"] for c in r["criteria"]] == list(style_experiment.CRITERIA)
    assert r["criteria"] == style_experiment.criteria(r)  # the stored verdicts are the ones its numbers give
    for c in r["criteria"]:
        verdict = "PASS" if c["passed"] else "FAIL"
        assert f"\n- **{verdict}** {c['id']} {c['criterion']}: {c['detail']}\n" in report, c["id"]
        assert f"\n{verdict} {c['id']} {c['criterion']}: {c['detail']}\n" in stdout, c["id"]
    assert f"\n{sum(c['passed'] for c in r['criteria'])} of {len(r['criteria'])} criteria pass.\n" in report
    for s in r["names"]:  # the headline table shows the measured perplexities
        ppl = r["perplexity"][s]
        assert re.search(rf"^\| {s} \| {ppl['base']:.3f} \| {ppl[f'ft_{s}']:.3f} \| {ppl['ngram']:.3f} \| ", report, re.M)
    assert "QUICK MODE" in report and "python3 bench/style_experiment.py --quick" in report
    for section in ("## Data", "### Overlap with the base model's training data", "## Fine-tuning", "## (1) and (5)",
                    "## (2)", "## (3)", "## (4)", "## What this does not show"):
        assert section in report, section


@pytest.mark.slow
def test_each_verdict_follows_from_the_per_clip_measurements(quick_run):
    """The criteria recomputed here from the raw rows (not from the experiment's summaries)."""
    r = quick_run["results"]
    names, samples = r["names"], r["settings"]["samples"]
    ppl, classifier = r["perplexity"], r["classifier"]
    verdicts = {c["id"]: c["passed"] for c in r["criteria"]}
    closer, labelled, copying = {}, {}, {}
    for s in names:
        clips = r["clips"][s]
        rows = {k: [row for clip in clips["per_clip"] for row in clip["measures"][k]] for k in ("reference", *MODELS)}
        assert len(clips["per_clip"]) == clips["clips"] >= 1
        for key, key_rows in rows.items():
            summary = clips["summary"][key]
            assert summary["continuations"] == len(key_rows) == clips["clips"] * (1 if key == "reference" else samples)
            for m in METRICS:
                assert summary["distances"][m] == pytest.approx(np.mean([row["distances"][m] for row in key_rows]))
            for label in names:
                assert summary["labels"][label] == pytest.approx(np.mean([row["label"] == label for row in key_rows]))
            copies = [row["copy"]["finetune_data"] for row in key_rows]
            assert summary["originality"]["finetune_data"]["copying_fraction"] == pytest.approx(
                np.mean([c >= COPY_THRESHOLD_BARS for c in copies]))
        assert all(d == 0 for row in rows["reference"] for d in row["distances"].values())  # the reference vs itself
        mean = {k: {m: np.mean([row["distances"][m] for row in rows[k]]) for m in METRICS} for k in MODELS}
        closer[s] = [m for m in METRICS if mean[f"ft_{s}"][m] < mean["base"][m]]
        assert clips["closer_metrics"] == closer[s]
        labelled[s] = np.mean([row["label"] == s for row in rows[f"ft_{s}"]])
        copying[s] = np.mean([row["copy"]["finetune_data"] >= COPY_THRESHOLD_BARS for row in rows[f"ft_{s}"]])
    windows = sum(v["windows"] for v in classifier["held_out"].values())
    accuracy = sum(v["accuracy"] * v["windows"] for v in classifier["held_out"].values()) / windows
    assert classifier["held_out_accuracy"] == pytest.approx(accuracy)
    assert verdicts["(1)"] == all(ppl[s][f"ft_{s}"] < ppl[s]["base"] for s in names)
    assert verdicts["(2)"] == all(2 * len(closer[s]) > len(METRICS) for s in names)
    assert verdicts["(3a)"] == (accuracy >= SANITY_TARGET)
    assert verdicts["(3b)"] == all(labelled[s] >= LABEL_TARGET for s in names)
    assert verdicts["(4)"] == all(copying[s] <= style_experiment.COPY_TARGET for s in names)
    assert verdicts["(5)"] == all(ppl[s]["base"] < ppl[s]["ngram"] for s in names)


@pytest.mark.slow
def test_numbers_are_measured_on_the_held_out_pieces_segue_eval_would_choose(quick_run):
    r, out, base = quick_run["results"], quick_run["out"], quick_run["base"]
    settings = r["settings"]
    tokenizer = ClipTokenizer.from_file(base / "tokenizer.json")
    models = {"base": base, **{f"ft_{s}": out / "models" / s for s in r["names"]}}
    decoders = {key: Generator.load(folder, threads=1).decoder for key, folder in models.items()}
    for style in r["styles"]:
        s = style["name"]
        split = split_folder(out / "data" / s, base / "tokenizer.json", settings["val_fraction"])
        assert split.files == style["files"] and len(split.train) == style["train"]
        assert [p.hash for p in split.val] == style["held_out_hashes"]
        # (1) and (5): every model's held-out perplexity, measured again here with the library.
        pieces = capped([p.tokens for p in split.val], settings["max_val_tokens"])
        for key, decoder in decoders.items():
            value, tokens = model_perplexity(decoder, pieces, tokenizer.kinds.bos, tokenizer.kinds.eos)
            assert tokens == r["perplexity"][s]["tokens"] and value == pytest.approx(r["perplexity"][s][key], rel=1e-6), key
            assert math.isfinite(value) and value > 1
        # (2)-(4): the clips are the held-out library's, in its order.
        skipped: list = []
        expected = [(e.name, e.offset_bar) for e in held_out_examples(
            split.val, tokenizer, settings["prompt_bars"], settings["bars"], settings["seed"], skipped)]
        measured = [(c["file"], c["offset_bar"]) for c in r["clips"][s]["per_clip"]]
        assert measured == expected[: settings["clips"]]
        assert [tuple(x) for x in r["clips"][s]["skipped"]] == [tuple(x) for x in skipped]
        # Each fine-tune validated on exactly the held-out pieces (the experiment refuses otherwise).
        ft = r["finetune"][s]
        assert ft["steps"] >= 1 and Path(ft["model"], "model.onnx").is_file()
    data = r["base"]["data"]
    assert data["available"] and data["fingerprint_matches"]
    assert data["fraction_confirmed"] and data["val_fraction"] == 0.2  # the tiny model's split
    for s in r["names"]:
        overlap = r["base"]["overlap"][s]
        assert 0 <= overlap["held_out_in_base_train"] <= overlap["held_out"]


@pytest.mark.slow
def test_rerun_refuses_to_overwrite_then_reuses_and_measures_the_same(quick_run):
    argv = list(quick_run["argv"])
    again = experiment(*argv)
    assert again.returncode == 1 and "error:" in again.stderr and "--reuse-models" in again.stderr
    assert "Traceback" not in again.stderr
    reused = experiment(*argv, "--reuse-models")
    assert reused.returncode == 0, reused.stderr[-3000:]
    r = json.loads((quick_run["out"] / "results.json").read_text())
    assert all(r["finetune"][s]["reused"] for s in r["names"])
    first = quick_run["results"]
    for key in ("perplexity", "classifier", "clips", "criteria"):  # seeded: the same models measure the same
        assert r[key] == first[key], key
