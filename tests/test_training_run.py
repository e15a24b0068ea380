"""The one training run: `segue train` and `segue finetune` as two tables of defaults over it, and
the loop's budget rules (time budget, schedule end, early stopping) as plain functions.

tests/test_finetune.py runs fine-tunes end to end; here a preset run from scratch is paused,
resumed and stopped by its time budget, on the tiny corpus.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.checkpoint import load_checkpoint
from training.finetune import FINETUNE
from training.finetune import main as finetune_main
from training.loop import LoopConfig, LoopState, checkpoint_meta, finish_reason, fitted_max_steps, record_evaluation
from training.options import build_parser
from training.run_folder import read_log
from training.train import PRETRAIN
from training.train import main as train_main


def _run(main, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


# --- two tables over one run ----------------------------------------------------------------------

def _options(defaults) -> dict[str, object]:
    parser = build_parser(defaults)
    return {action.dest: action.default for action in parser._actions if action.dest != "help"}


def test_finetune_is_the_training_run_with_its_own_defaults_and_start():
    train, finetune = _options(PRETRAIN), _options(FINETUNE)
    start_only = {"scratch": {"collections", "preset", "context"}, "base": {"base", "window", "export", "name"}}
    assert set(train) - set(finetune) == start_only["scratch"]
    assert set(finetune) - set(train) == start_only["base"]
    # Fine-tuning's table: a lower rate, shorter schedule, more held out, early stopping, more augmentation.
    assert (train["lr"], finetune["lr"]) == (6e-4, 1e-4)
    assert (train["max_steps"], finetune["max_steps"]) == (20000, 3000)
    assert (train["val_fraction"], finetune["val_fraction"]) == (0.05, 0.2)
    assert (train["patience"], finetune["patience"]) == (0, 5)
    assert (train["tempo_copies"], finetune["tempo_copies"]) == (0, 2)
    assert (train["velocity_jitter"], finetune["velocity_jitter"]) == (0, 8)
    shared = set(train) & set(finetune) - {"lr", "max_steps", "val_fraction", "patience", "tempo_copies",
                                           "velocity_jitter", "warmup", "eval_every", "data", "out"}
    assert {k: train[k] for k in shared} == {k: finetune[k] for k in shared}
    assert build_parser(PRETRAIN).prog == "segue train" and build_parser(FINETUNE).prog == "segue finetune"


# --- the budget rules -------------------------------------------------------------------------------

def test_the_schedule_is_fitted_to_the_time_left():
    # 30 s used of a 60 s budget at 0.3 s a step: 94 more steps fit in 97 % of the budget.
    assert fitted_max_steps(100, configured=1000, budget_s=60, elapsed_s=30, per_step_s=0.3) == 194
    assert fitted_max_steps(100, configured=150, budget_s=60, elapsed_s=30, per_step_s=0.3) == 150  # never longer
    assert fitted_max_steps(100, configured=1000, budget_s=60, elapsed_s=90, per_step_s=0.3) == 101  # over: one more


def test_finish_reasons():
    cfg = LoopConfig(out=Path("unused"), max_steps=100, patience=2)
    assert finish_reason(LoopState(step=50, max_steps=100, bad_evals=1), cfg) is None
    assert finish_reason(LoopState(step=50, max_steps=100, bad_evals=2), cfg) == "early_stop"
    assert finish_reason(LoopState(step=100, max_steps=100), cfg) == "max_steps"
    assert finish_reason(LoopState(step=60, max_steps=60), cfg) == "time_budget"  # the fitted schedule ended
    assert finish_reason(LoopState(step=50, max_steps=100, bad_evals=9), LoopConfig(out=Path("x"), max_steps=100)) is None


def test_an_evaluation_improves_only_by_more_than_min_delta():
    state = LoopState(step=4)
    assert record_evaluation(state, 2.0, min_delta=0.1) and (state.best_val_loss, state.best_step) == (2.0, 4)
    state.step = 8
    assert not record_evaluation(state, 1.95, min_delta=0.1) and state.bad_evals == 1 and state.best_step == 4
    state.step = 12
    assert record_evaluation(state, 1.5, min_delta=0.1) and state.bad_evals == 0 and state.best_step == 12
    assert (state.last_val_loss, state.last_val_step) == (1.5, 12)
    meta = checkpoint_meta({"data_fingerprint": "f"}, state)
    assert meta["val_loss"] == 1.5 and meta["data_fingerprint"] == "f" and meta["step"] == 12
    state.step = 13  # weights moved on since the evaluation: no validation numbers for them
    assert checkpoint_meta({}, state)["val_loss"] is None and checkpoint_meta({}, state)["val_perplexity"] is None


# --- a run from scratch -----------------------------------------------------------------------------

def _train_args(tiny_build: Path, out: Path) -> list[str]:
    return ["--data", str(tiny_build / "midi"), "--preset", "tiny", "--out", str(out), "--max-steps", "8",
            "--eval-every", "4", "--log-every", "1", "--batch-size", "4", "--warmup", "2", "--val-fraction", "0.2",
            "--val-windows", "4", "--threads", "1", "--quiet"]


def test_train_from_scratch_pauses_and_resumes_bit_for_bit(tiny_build, tmp_path):
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    code, out, err = _run(train_main, _train_args(tiny_build, straight))
    assert code == 0, err
    assert "model: tiny" in err and "next: segue export-onnx" in out
    code, out, _ = _run(train_main, _train_args(tiny_build, paused) + ["--stop-after", "4"])
    assert code == 0 and f"continue with: segue train --out {paused} --resume" in out
    with pytest.raises(SystemExit, match="made by `segue train`"):
        _run(finetune_main, ["--out", str(paused), "--resume", "--quiet"])
    code, _, err = _run(train_main, ["--out", str(paused), "--resume", "--quiet"])
    assert code == 0, err

    def curve(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in read_log(run / "train_log.jsonl")]

    assert curve(paused) == curve(straight) and len(curve(straight)) == 8 + 3
    a, b = load_file(str(straight / "last.safetensors")), load_file(str(paused / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = load_checkpoint(straight / "best.safetensors")[1]
    assert meta["preset"] == "tiny" and "base_model" not in meta and "finetune" not in meta
    assert json.loads((straight / "run.json").read_text())["command"] == "train"
    assert (straight / "tokenizer.json").read_text() == meta["tokenizer"]


def test_train_stops_at_its_time_budget(tiny_build, tmp_path):
    """After 20 timed steps the schedule is fitted to a budget already spent: one more step, then stop."""
    args = _train_args(tiny_build, tmp_path) + ["--max-minutes", "0.0001", "--max-steps", "500", "--eval-every", "1000"]
    code, out, err = _run(train_main, args)
    assert code == 0, err
    state = json.loads(load_checkpoint(tmp_path / "last.safetensors")[1]["train_state"])
    assert state["finished"] == "time_budget" and state["step"] == state["max_steps"] == 21
    assert [r["step"] for r in read_log(tmp_path / "train_log.jsonl") if r["kind"] == "eval"] == [0, 21]
    assert "stopped at the time budget after 21 steps" in out


def test_a_dangling_symlink_in_a_data_folder_is_reported_not_skipped_silently(tmp_path, tiny_model):
    from training.data import find_midi_files, ingest_file

    folder = tmp_path / "catalogue"
    folder.mkdir()
    (folder / "gone.mid").symlink_to(tmp_path / "moved-away.mid")
    (folder / "notes.txt").write_text("not music")
    assert find_midi_files(folder) == [folder / "gone.mid"]
    result = ingest_file(folder / "gone.mid", str(tiny_model / "tokenizer.json"))
    assert result.tokens is None and "symbolic link" in result.reason and "moved-away.mid" in result.reason


def test_program_counts_are_notes_per_instrument_not_program_tokens():
    """The manifest's `programs` (which instruments the model heard, and how much) counts notes, though
    a Program token now covers every note of its instrument in a bar."""
    from engine.clip import Arrangement, Clip, Note
    from engine.tokens import ClipTokenizer
    from training.data import Corpus
    from training.run_data import program_counts

    tokenizer = ClipTokenizer.default()
    drums = Clip(tuple(Note(42, 80, i * 0.5, 0.25) for i in range(16)), is_drum=True)
    bass = Clip(tuple(Note(36, 90, i * 1.0, 1.0) for i in range(8)), program=33)
    piece = tokenizer.encode_clip(Arrangement((drums, bass), (0, 1)))
    counts = program_counts(Corpus(train=[np.asarray(piece), np.asarray(piece)]), tokenizer, base={"0": 5})
    assert counts == {"-1": 32, "33": 16, "0": 5}


def test_the_data_source_never_carries_the_home_path(tmp_path, monkeypatch):
    from training.run_data import source_name

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "midi" / "band").mkdir(parents=True)
    assert source_name(tmp_path / "midi" / "band") == "~/midi/band"
    assert source_name(Path("/opt/shared-midi")) == "/opt/shared-midi"
