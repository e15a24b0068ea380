"""The layout of a run folder, and the settings that let `--resume` continue it.

    runs/NAME/
      run.json               the command's settings (written at the start; --resume reads them back)
      tokenizer.json         the vocabulary the run trains with
      ingest_report.json/.txt
      train_log.jsonl        one line per logged step and per evaluation
      tensorboard/           event files for `tensorboard --logdir runs`
      best.safetensors       lowest validation loss (weights + metadata; export this)
      last.safetensors       latest state: weights + optimizer + loop state + RNG (resume from this)

A new run refuses a folder that already holds one (`check_fresh_out`); `--resume` reads the
settings back from run.json (`resumed_args`) and the model config and the run's own metadata
from last.safetensors (`resume_point`); the loop restores the rest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.atomic_file import atomic_write
from training.checkpoint import read_metadata
from training.model import GPTConfig

SETTINGS_FILE = "run.json"
LOG_FILE = "train_log.jsonl"
BEST_FILE = "best.safetensors"
LAST_FILE = "last.safetensors"
TENSORBOARD_DIR = "tensorboard"

# Options that steer this invocation rather than define the run: --resume takes them from the
# command line; everything else comes back from run.json so the run continues exactly.
CONTROL_OPTIONS = {"resume", "stop_after", "quiet", "export", "name"}
# Saved and reused, but a value given on the resuming command line wins (their CLI default is None).
# The thread count changes float summation order: keep it for a bit-identical continuation on CPU.
OVERRIDABLE_OPTIONS = {"threads", "device", "precision"}  # the machine's business, not the run's
PATH_OPTIONS = {"data", "out", "base"}  # saved as strings, read back as Paths
# Keys the loop and the checkpoint writer own; everything else in a resumed run's metadata is reused.
LOOP_KEYS = {"config", "format", "train_state", "optimizer", "rng", "step", "val_loss", "val_perplexity",
             "best_val_loss", "base_val_loss", "base_val_perplexity", "elapsed_s"}


class RunFolderError(ValueError):
    """The run folder does not fit the command (a new run over an old one); the message says what to do."""


def check_fresh_out(out: Path) -> None:
    """Refuse to start a new run over an existing one (its checkpoints would be overwritten)."""
    if (Path(out) / LAST_FILE).is_file():
        raise RunFolderError(f"{out} already holds a run ({LAST_FILE}): continue it with --resume, "
                             "or choose another --out")


def resume_point(out: Path) -> tuple[GPTConfig, dict[str, str]]:
    """The model config and the run's own metadata (tokenizer, data fingerprint, base model...)
    from OUT/last.safetensors; the loop restores the rest."""
    meta = read_metadata(Path(out) / LAST_FILE)
    return GPTConfig.from_json(meta["config"]), {k: v for k, v in meta.items() if k not in LOOP_KEYS}


def save_settings(out: Path, command: str, args: argparse.Namespace) -> None:
    def plain(value):
        if isinstance(value, Path):
            return str(value)
        return [plain(v) for v in value] if isinstance(value, list | tuple) else value

    settings = {k: plain(v) for k, v in vars(args).items() if k not in CONTROL_OPTIONS}
    text = json.dumps({"command": command, "settings": settings}, indent=2) + "\n"
    atomic_write(Path(out) / SETTINGS_FILE, lambda tmp: Path(tmp).write_text(text))


def resumed_args(args: argparse.Namespace, command: str) -> argparse.Namespace:
    """`args` with every run-defining option replaced by the one saved in OUT/run.json."""
    path = Path(args.out) / SETTINGS_FILE
    if not path.is_file() or not (Path(args.out) / LAST_FILE).is_file():
        raise SystemExit(f"error: {args.out} holds no run to resume (no {SETTINGS_FILE} or {LAST_FILE}); "
                         f"start it without --resume")
    saved = json.loads(path.read_text())
    if saved.get("command") != command:
        raise SystemExit(f"error: {args.out} was made by `segue {saved.get('command')}`; resume it with that command")
    merged = argparse.Namespace(**vars(args))
    for key, value in saved["settings"].items():
        if key in OVERRIDABLE_OPTIONS and getattr(args, key, None) is not None:
            continue
        if key in PATH_OPTIONS and value is not None:
            value = Path(value)
        if isinstance(value, list) and key == "tempo_scale":
            value = tuple(value)
        setattr(merged, key, value)
    merged.out = Path(args.out)
    return merged


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines after `step`: they are replayed, identically, by the resumed run."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by the interruption
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
