"""Train a Segue GPT: the one training run, from a preset's random init or from a base model.

    segue train --preset small --out runs/default --max-minutes 60
    segue train --data ~/midi/lakh --preset small --out runs/lakh
    torchrun --nproc_per_node 4 -m training.train --data ~/midi/lakh --preset seed --out runs/lakh-seed
    segue train --out runs/lakh --resume          # continue an interrupted run exactly

`segue finetune` is this same run with another table of defaults (training/finetune.py: start from
a base model, a lower learning rate, early stopping, more augmentation), as nanoGPT fine-tunes with
its one `train.py` and `config/finetune_shakespeare.py`. A run: read the data (each file checked,
duplicates dropped, split by content hash, an ingest report), take the first weights
(training/start.py), train (training/loop.py), print the summary, then export or say how.

Writes to OUT: `run.json`, `tokenizer.json`, `ingest_report.json`/`.txt`, `train_log.jsonl`,
`tensorboard/`, `best.safetensors` (lowest validation loss), `last.safetensors` (resumable).
Then run `segue export-onnx OUT/best.safetensors --out models/NAME`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from engine.atomic_file import atomic_write
from engine.manifest import TOKENIZER_FILE, Excluded, FinetuneRecord, ModelError
from engine.tokens import ClipTokenizer
from training.augment import AugmentConfig, augment_from_args
from training.checkpoint import CheckpointError
from training.data import Corpus
from training.distributed import Distributed, setup
from training.from_onnx import OnnxImportError
from training.loop import LoopResult, run_loop, summary_lines
from training.model import GPT
from training.options import RunDefaults, build_parser, loop_config, resolve_run_options
from training.run_data import (
    DataError,
    check_same_data,
    exclude_files,
    make_samplers,
    program_counts,
    read_data,
    source_files,
)
from training.run_folder import RunFolderError, check_fresh_out, resume_point, resumed_args, save_settings
from training.start import Start, StartError, default_base, from_base, from_preset

PRETRAIN = RunDefaults(
    command="train", init_from="scratch", desc="training",
    description="Pretrain a model on the built-in music21 corpus (default) or on a folder of MIDI files. "
                "Runs unchanged under `torchrun --nproc_per_node N -m training.train ...`.",
    lr=6e-4, warmup=200, max_steps=20000, eval_every=250, val_fraction=0.05, patience=0,
    # Pretraining keeps augmentation cheap: tempo copies would multiply the tokenizing of a big corpus.
    augment=AugmentConfig(transpose=5, velocity_jitter=0, tempo_copies=0),
)

# The errors a user can cause (bad data, a run folder in the way, a base that cannot be used):
# one line on stderr and exit status 1, never a traceback.
USER_ERRORS = (DataError, RunFolderError, StartError, CheckpointError, ModelError, OnnxImportError)


def main(argv: list[str] | None = None, defaults: RunDefaults = PRETRAIN) -> int:
    args = build_parser(defaults).parse_args(argv)
    if args.resume:
        args = resumed_args(args, defaults.command)
    args = resolve_run_options(args)
    if defaults.init_from == "base":
        if args.data is None:
            print("error: --data is required: the folder of MIDI files to fine-tune on", file=sys.stderr)
            return 2
        args.base = args.base or default_base()
    dist = setup(args.device)
    try:
        return run(args, dist, defaults)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        dist.close()


def run(args: argparse.Namespace, dist: Distributed, defaults: RunDefaults) -> int:
    """The whole run on every rank; rank 0 alone writes files and prints the summary."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.resume:
        cfg, metadata = resume_point(args.out)
    else:
        check_fresh_out(args.out)
    # Fail on a missing or empty folder before any model is loaded or anything is written.
    files, source = source_files(args.data, getattr(args, "collections", None), dist)
    files, excluded = exclude_files(files, args.exclude, dist)
    augment = augment_from_args(args)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer_file = args.out / TOKENIZER_FILE
    start = None
    if args.resume:
        model = GPT(cfg)
    else:
        start = first_weights(args, defaults)
        model = start.model
        if dist.is_main:
            atomic_write(tokenizer_file, lambda tmp: Path(tmp).write_text(start.tokenizer_text))
            save_settings(args.out, defaults.command, args)
        dist.barrier()
        if start.base is not None:
            dist.say(start.describe(args.base))
    tokenizer = ClipTokenizer.from_file(tokenizer_file)
    corpus = read_data(files, source, tokenizer_file, args.out, args.val_fraction, augment, dist, not args.quiet)
    if args.resume:
        check_same_data(corpus, metadata.get("data_fingerprint"), source)
    else:
        metadata = run_metadata(start, corpus, tokenizer, source, args, augment, excluded)
    model = model.to(dist.device)
    window = min(getattr(args, "window", None) or model.cfg.max_context, model.cfg.max_context)
    train, val = make_samplers(corpus, tokenizer, window, args.seed, dist.rank, augment)
    processes = f"{dist.world} process{'es' if dist.world > 1 else ''} on {dist.device.type}"
    if defaults.init_from == "scratch":
        dist.say(f"model: {args.preset}, {model.num_parameters() / 1e6:.2f} M parameters, context {model.cfg.max_context}, "
                 f"{processes}")
    else:
        dist.say(f"fine-tuning: window {window} tokens, {processes}")
    result = run_loop(model, train, val, loop_config(args, defaults.desc), metadata, dist)
    return finish(args, defaults, result) if dist.is_main else 0


def first_weights(args: argparse.Namespace, defaults: RunDefaults) -> Start:
    if defaults.init_from == "scratch":
        return from_preset(args.preset, args.dropout, args.context)
    return from_base(args.base, args.dropout)


def run_metadata(start: Start, corpus: Corpus, tokenizer: ClipTokenizer, source: str, args: argparse.Namespace,
                 augment: AugmentConfig, excluded: Excluded | None) -> dict:
    """What every checkpoint of the run records, and `export-onnx` turns into the manifest: the
    vocabulary, the data, the seen instruments, and for a fine-tune the base and the fine-tune record."""
    metadata = {
        "tokenizer": start.tokenizer_text,
        "programs": program_counts(corpus, tokenizer, start.programs),
        "data_fingerprint": corpus.fingerprint,
        "data_source": source,
        "preset": start.preset,
        "train_tokens": corpus.token_count("train"),
        "augmentation": augment.to_dict(),
    }
    if start.base is not None:
        metadata["base_model"] = _record(start.base)
        metadata["finetune"] = _record(FinetuneRecord(
            data_fingerprint=corpus.fingerprint, data_source=source, files=corpus.files, train_files=len(corpus.train),
            val_files=len(corpus.val), skipped=len(corpus.skipped), duplicates=len(corpus.duplicates),
            val_fraction=args.val_fraction, lr=args.lr, augmentation=augment.to_dict()))
    metadata["val_fraction"] = args.val_fraction
    if excluded:
        metadata["excluded"] = _record(excluded)
    return metadata


def _record(section) -> dict:
    """A manifest section as the checkpoint stores it: its fields, without the unset ones."""
    return {k: v for k, v in asdict(section).items() if v is not None}


def finish(args: argparse.Namespace, defaults: RunDefaults, result: LoopResult) -> int:
    """The summary, then the export (--export) or the command that does it."""
    print("\n".join(summary_lines(result, args.patience)))
    if result.stopped in ("paused", "interrupted"):
        print(f"continue with: segue {defaults.command} --out {args.out} --resume")
        return 0
    target = getattr(args, "export", None)  # only `segue finetune` has --export
    if target is None:
        print(f"next: segue export-onnx {result.best} --out models/"
              + ("NAME" if defaults.init_from == "scratch" else args.out.name))
        return 0
    from export.onnx_export import export_model  # export needs onnx; imported only when asked for

    try:
        manifest = export_model(result.best, target, args.name)
    except (CheckpointError, RuntimeError, OSError) as exc:
        print(f"error: the export failed: {exc}; the checkpoints in {args.out} are intact", file=sys.stderr)
        return 1
    assert manifest.parity and manifest.base_model and manifest.finetune, "export_model records all three for a fine-tune"
    print(f"exported {target} (parity {manifest.parity.max_abs_diff:.1e}, "
          f"base {manifest.base_model.sha256[:12]}, data {manifest.finetune.data_fingerprint[:12]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
