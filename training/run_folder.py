"""The layout of a run folder, and the settings that let `--resume` continue it.

    runs/NAME/
      run.json               the command's settings (written at the start; --resume reads them back)
      tokenizer.json         the vocabulary the run trains with
      ingest_report.json/.txt
      train_log.jsonl        one line per logged step and per evaluation
      tensorboard/           event files for `tensorboard --logdir runs`
      best.safetensors       lowest validation loss (weights + metadata; export this)
      last.safetensors       latest state: weights + optimizer + loop state + RNG (resume from this)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.atomic_file import atomic_write

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


def save_settings(out: Path, command: str, args: argparse.Namespace) -> None:
    def plain(value):
        if isinstance(value, Path):
            return str(value)
        return [plain(v) for v in value] if isinstance(value, list | tuple) else value

    settings = {k: plain(v) for k, v in vars(args).items() if k not in CONTROL_OPTIONS}
    text = json.dumps({"command": command, "settings": settings}, indent=2) + "\n"
    atomic_write(Path(out) / SETTINGS_FILE, lambda tmp: Path(tmp).write_text(text))


def resumed_args(args: argparse.Namespace, command: str, path_options: set[str]) -> argparse.Namespace:
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
        if key in path_options and value is not None:
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
