"""What `segue train` and `segue finetune` share around the loop: options, data, samplers, summary.

Both commands: read a folder (each file guarded and checked, duplicates dropped, split by content
hash), write and print the ingest report, build the training and validation samplers, run
`training.loop.run_loop`, and print the summary. They differ only in where the first weights come
from (a preset's random init, or a base model) and in their defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from engine.tokens import ClipTokenizer
from training.augment import AugmentConfig, TokenAugmenter, add_augment_args
from training.checkpoint import read_metadata
from training.data import Corpus, WindowSampler, content_hash, data_fingerprint, find_midi_files, load_corpus
from training.distributed import Distributed
from training.ingest_report import REPORT_TEXT, build_report, print_report, write_report
from training.loop import PRECISIONS, LoopConfig
from training.model import GPTConfig
from training.run_folder import LAST_FILE


class DataError(ValueError):
    """The data cannot be trained on; the message says why and what to do, in one line."""


def add_loop_args(parser: argparse.ArgumentParser, defaults: dict, augment: AugmentConfig) -> None:
    """The options every training command has; `defaults` holds the command's own defaults."""
    p = parser.add_argument_group("training")
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"], help=f"windows per step (default {defaults['batch_size']})")
    p.add_argument("--lr", type=float, default=defaults["lr"], help=f"peak learning rate (default {defaults['lr']:g})")
    p.add_argument("--weight-decay", type=float, default=defaults["weight_decay"])
    p.add_argument("--warmup", type=int, default=defaults["warmup"],
                   help=f"warm-up steps, at most a fifth of --max-steps (default {defaults['warmup']})")
    p.add_argument("--max-steps", type=int, default=defaults["max_steps"],
                   help=f"length of the cosine schedule (default {defaults['max_steps']})")
    p.add_argument("--max-minutes", type=float, help="stop after this much wall-clock time (the schedule is fitted to it)")
    p.add_argument("--eval-every", type=int, default=defaults["eval_every"],
                   help=f"steps between validations (default {defaults['eval_every']})")
    p.add_argument("--val-fraction", type=float, default=defaults["val_fraction"],
                   help=f"share of files held out for validation, chosen by content hash (default {defaults['val_fraction']})")
    p.add_argument("--val-windows", type=int, default=64, help="validation windows per evaluation (default 64)")
    p.add_argument("--patience", type=int, default=defaults["patience"],
                   help=f"stop after this many validations without improvement (0: never; default {defaults['patience']})")
    p.add_argument("--dropout", type=float, default=defaults["dropout"])
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
    add_augment_args(parser, augment)


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


def check_fresh_out(out: Path) -> None:
    """Refuse to start a new run over an existing one (its checkpoints would be overwritten)."""
    if (Path(out) / LAST_FILE).is_file():
        raise DataError(f"{out} already holds a run ({LAST_FILE}): continue it with --resume, "
                        "or choose another --out")


def folder_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist")
    files = find_midi_files(folder)
    if not files:
        raise DataError(f"no MIDI files (.mid, .midi, .smf) in {folder}")
    return files


EXCLUDED_HASHES_KEPT = 5000  # the manifest lists the left-out hashes up to this many (else only their fingerprint)


def exclude_files(files: list[Path], exclude: list[Path], dist: Distributed) -> tuple[list[Path], dict | None]:
    """`files` without those whose bytes equal a file's in the --exclude folders, and what was left out.

    Keyed on content, as the split is: a held-out piece stays out under any name or folder."""
    if not exclude:
        return files, None
    excluded: set[str] = set()
    for folder in exclude:
        if not Path(folder).is_dir():
            raise DataError(f"--exclude folder {folder} does not exist")
        excluded.update(content_hash(path.read_bytes()) for path in find_midi_files(Path(folder)))
    kept, left_out = [], set()
    for path in files:
        file_hash = content_hash(Path(path).read_bytes())
        if file_hash in excluded:
            left_out.add(file_hash)
        else:
            kept.append(path)
    say(f"--exclude: {len(files) - len(kept)} files left out ({len(left_out)} distinct contents; "
        f"{len(excluded)} distinct contents in {', '.join(map(str, exclude))})", dist)
    info = {"folders": [str(f) for f in exclude], "files_left_out": len(files) - len(kept),
            "fingerprint": data_fingerprint(left_out)}
    if len(left_out) <= EXCLUDED_HASHES_KEPT:
        info["hashes"] = sorted(left_out)
    return kept, info


def read_data(files: list[Path], source: str, tokenizer_file: Path, out: Path, val_fraction: float,
              augment: AugmentConfig, dist: Distributed, progress: bool) -> Corpus:
    """Ingest, report (written and printed by rank 0), and refuse data that cannot train anything."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1, not {val_fraction}")
    # Each rank ingests on its share of the cores: the result is deterministic, so all ranks agree.
    workers = max(1, (os.cpu_count() or 1) // dist.world)
    corpus = load_corpus(files, tokenizer_file, val_fraction, workers=workers, progress=progress and dist.is_main,
                         tempo_factors=augment.tempo_factors)
    if dist.is_main:
        report = build_report(corpus, source, val_fraction, augment.to_dict())
        write_report(report, out)
        print_report(report)
    if not corpus.train and not corpus.val:
        raise DataError(f"none of the {len(files)} MIDI files in {source} could be used "
                        f"(every reason is in {Path(out) / REPORT_TEXT})")
    if not corpus.train or not corpus.val:
        part = "training" if not corpus.train else "validation"
        raise DataError(f"the {part} part is empty ({len(corpus.train)} train / {len(corpus.val)} validation files): "
                        f"add files or change --val-fraction")
    return corpus


def make_samplers(corpus: Corpus, tokenizer: ClipTokenizer, window: int, seed: int, rank: int,
                  augment: AugmentConfig) -> tuple[WindowSampler, WindowSampler]:
    """(training sampler: augmented, one seed per rank; validation sampler: plain, sequential)."""
    try:
        val = WindowSampler(corpus.val, tokenizer, window, seed=seed)
        if val.window_count() == 0:
            raise ValueError("no window")
    except ValueError as exc:
        raise DataError(f"the validation part ({len(corpus.val)} files, {corpus.token_count('val'):,} tokens) is shorter "
                        f"than one window of {window} tokens: add files, raise --val-fraction or lower --window") from exc
    try:
        train = WindowSampler(corpus.train, tokenizer, window, seed=seed + rank, augment=TokenAugmenter(tokenizer, augment),
                              variants=corpus.train_variants, variant_prob=augment.tempo_prob)
    except ValueError as exc:
        raise DataError(f"the training part ({len(corpus.train)} files, {corpus.token_count('train'):,} tokens) is shorter "
                        f"than one window of {window} tokens: add files or lower --window") from exc
    return train, val


def program_counts(corpus: Corpus, tokenizer: ClipTokenizer, base: dict[str, int] | None = None) -> dict[str, int]:
    """Notes per program in the training part (plus `base`'s): lets the engine map unseen instruments."""
    kinds = tokenizer.kinds
    program_ids = np.array(sorted(kinds.program))
    counts = np.bincount(np.concatenate(corpus.train), minlength=tokenizer.vocab_size)[program_ids]
    programs = {str(p): int(n) for p, n in (base or {}).items()}
    for token, count in zip(program_ids, counts, strict=True):
        if count:
            key = str(kinds.program[int(token)])
            programs[key] = programs.get(key, 0) + int(count)
    return programs


# Keys the loop and the checkpoint writer own; everything else in a resumed run's metadata is reused.
_LOOP_KEYS = {"config", "format", "train_state", "optimizer", "rng", "step", "val_loss", "val_perplexity",
              "best_val_loss", "base_val_loss", "base_val_perplexity", "elapsed_s"}


def resume_point(out: Path) -> tuple[GPTConfig, dict]:
    """The model config and the run's own metadata (tokenizer, data fingerprint, base model...)
    from OUT/last.safetensors; the loop restores the rest."""
    meta = read_metadata(Path(out) / LAST_FILE)
    return GPTConfig.from_json(meta["config"]), {k: v for k, v in meta.items() if k not in _LOOP_KEYS}


def check_same_data(corpus: Corpus, metadata: dict, source: str) -> None:
    if metadata.get("data_fingerprint") != corpus.fingerprint:
        raise DataError(f"the files in {source} changed since this run started (data fingerprint "
                        f"{corpus.fingerprint[:12]} vs {str(metadata.get('data_fingerprint'))[:12]}); "
                        "an exact resume needs the same data: start a new run")


def say(message: str, dist: Distributed) -> None:
    if dist.is_main:
        print(message, file=sys.stderr)
