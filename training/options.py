"""The command line of a training run: one table of defaults per command, and the options built from it.

    segue train --help          # RunDefaults for pretraining (training/train.py: PRETRAIN)
    segue finetune --help       # RunDefaults for fine-tuning (training/finetune.py: FINETUNE)

Both commands are the same run (`training.train.run`); as in nanoGPT, where fine-tuning is
`config/finetune_shakespeare.py` (`init_from` plus a lower learning rate) over the one `train.py`,
a command here is a `RunDefaults` table. Its `init_from` decides which starting options the command
has: `scratch` takes a preset shape (`--preset`, `--context`, the built-in corpus by default), `base`
takes a model to start from (`--from`, `--window`, `--export`). Every other option is shared, with the
table's defaults.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from training.augment import AugmentConfig, add_augment_args
from training.loop import PRECISIONS, LoopConfig
from training.model import PRESETS

INIT_FROM = ("scratch", "base")


@dataclass(frozen=True)
class RunDefaults:
    """One command's table of defaults: where its first weights come from, and the loop's settings."""

    command: str  # the subcommand: `segue COMMAND`, run.json's "command", the --resume hint
    init_from: str  # "scratch": a preset's random init; "base": a model folder or checkpoint (--from)
    description: str  # the --help text
    desc: str  # the progress bar's label
    lr: float
    warmup: int
    max_steps: int
    eval_every: int
    val_fraction: float
    patience: int
    augment: AugmentConfig
    batch_size: int = 16
    weight_decay: float = 0.1
    dropout: float = 0.1

    def __post_init__(self):
        if self.init_from not in INIT_FROM:
            raise ValueError(f"init_from must be one of {', '.join(INIT_FROM)}, not {self.init_from!r}")


def build_parser(defaults: RunDefaults) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"segue {defaults.command}", description=defaults.description)
    if defaults.init_from == "scratch":
        _scratch_args(p)
    else:
        _base_args(p)
    _loop_args(p, defaults)
    return p


def _scratch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="folder of MIDI files (default: the built-in corpus, converted once and cached)")
    p.add_argument("--collections", nargs="*", help="music21 collections to use for the built-in corpus")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="run folder for checkpoints and logs")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model shape (default: small)")
    p.add_argument("--context", type=int, help="training window and model context in tokens (default: the preset's)")


def _base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, metavar="DIR", help="folder of MIDI files to learn from (searched recursively)")
    p.add_argument("--from", dest="base", type=Path, default=None, metavar="MODEL",
                   help="model folder (e.g. models/default, the default) or .safetensors checkpoint to start from")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="run folder, e.g. runs/my-band")
    p.add_argument("--window", type=int, metavar="TOKENS", help="training window in tokens (default: the model's context)")
    p.add_argument("--export", type=Path, metavar="MODEL_DIR", help="export the best checkpoint to this model folder at the end")
    p.add_argument("--name", help="model name for --export (default: the folder name)")


def _loop_args(parser: argparse.ArgumentParser, defaults: RunDefaults) -> None:
    """The options every training command has, with the command's own defaults."""
    d = defaults
    p = parser.add_argument_group("training")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"windows per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help=f"warm-up steps, at most a fifth of --max-steps (default {d.warmup})")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help=f"length of the cosine schedule (default {d.max_steps})")
    p.add_argument("--max-minutes", type=float, help="stop after this much wall-clock time (the schedule is fitted to it)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help=f"steps between validations (default {d.eval_every})")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"share of files held out for validation, chosen by content hash (default {d.val_fraction})")
    p.add_argument("--val-windows", type=int, default=64, help="validation windows per evaluation (default 64)")
    p.add_argument("--patience", type=int, default=d.patience,
                   help=f"stop after this many validations without improvement (0: never; default {d.patience})")
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--log-every", type=int, default=10, help="steps between training-loss log lines (default 10)")
    p.add_argument("--seed", type=int, default=1337)
    run = parser.add_argument_group("run control")
    run.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped (its settings are reused)")
    run.add_argument("--stop-after", type=int, metavar="STEP", help="pause after this step; continue later with --resume")
    run.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: all cores)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default auto: a GPU if there is one)")
    run.add_argument("--quiet", action="store_true", help="no progress bars (for scripts and tests)")
    run.add_argument("--precision", choices=PRECISIONS,
                     help="training-step arithmetic: bf16 autocast (about 2x faster where the CPU or GPU has native "
                          "bf16), fp32, or auto (bf16 where native; default). Weights, checkpoints and validation "
                          "stay fp32")
    data = parser.add_argument_group("data")
    data.add_argument("--exclude", type=Path, nargs="+", action="extend", default=[], metavar="DIR",
                      help="leave out every file whose content is also in DIR (for example a test set you will "
                           "evaluate on, so no model learns from it); the manifest records what was left out")
    add_augment_args(parser, d.augment)


def resolve_run_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options whose default depends on the machine (after --resume had its say)."""
    args.threads = args.threads or os.cpu_count() or 1
    args.device = args.device or "auto"
    args.precision = args.precision or "auto"  # also for runs saved before --precision existed
    return args


def loop_config(args: argparse.Namespace, desc: str) -> LoopConfig:
    return LoopConfig(out=args.out, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                      weight_decay=args.weight_decay, eval_every=args.eval_every, val_windows=args.val_windows,
                      patience=args.patience, max_minutes=args.max_minutes, log_every=args.log_every,
                      stop_after=args.stop_after, resume=args.resume, quiet=args.quiet, desc=desc,
                      precision=args.precision)
