"""Pretrain a Segue GPT on the built-in corpus or a folder of MIDI files.

    segue train --preset small --out runs/default --max-minutes 60
    segue train --data ~/midi/lakh --preset small --out runs/lakh
    torchrun --nproc_per_node 4 -m training.train --data ~/midi/lakh --preset seed --out runs/lakh-seed
    segue train --out runs/lakh --resume          # continue an interrupted run exactly

Writes to OUT: `run.json`, `tokenizer.json`, `ingest_report.json`/`.txt`, `train_log.jsonl`,
`tensorboard/`, `best.safetensors` (lowest validation loss), `last.safetensors` (resumable).
Then run `segue export-onnx OUT/best.safetensors --out models/NAME`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from engine.tokens import ClipTokenizer
from training.augment import AugmentConfig, augment_from_args
from training.checkpoint import CheckpointError
from training.distributed import setup
from training.loop import lr_at, run_loop, summary_lines, validation_loss  # noqa: F401  (lr_at, validation_loss: public API)
from training.model import GPT, PRESETS, GPTConfig, preset
from training.pipeline import (
    DataError,
    add_loop_args,
    check_fresh_out,
    check_same_data,
    exclude_files,
    folder_files,
    loop_config,
    make_samplers,
    program_counts,
    read_data,
    resolve_run_options,
    resume_point,
    say,
)
from training.run_folder import resumed_args, save_settings

DEFAULTS = dict(batch_size=16, lr=6e-4, weight_decay=0.1, warmup=200, max_steps=20000, eval_every=250,
                val_fraction=0.05, patience=0, dropout=0.1)
# Pretraining keeps augmentation cheap: tempo copies would multiply the tokenizing of a big corpus.
AUGMENT_DEFAULTS = AugmentConfig(transpose=5, velocity_jitter=0, tempo_copies=0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="segue train",
        description="Pretrain a model on the built-in music21 corpus (default) or on a folder of MIDI files. "
                    "Runs unchanged under `torchrun --nproc_per_node N -m training.train ...`.",
    )
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="folder of MIDI files (default: the built-in corpus, converted once and cached)")
    p.add_argument("--collections", nargs="*", help="music21 collections to use for the built-in corpus")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="run folder for checkpoints and logs")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model shape (default: small)")
    p.add_argument("--context", type=int, help="training window and model context in tokens (default: the preset's)")
    add_loop_args(p, DEFAULTS, AUGMENT_DEFAULTS)
    return p


def corpus_files(args, dist) -> tuple[list[Path], str]:
    if args.data:
        return folder_files(args.data), str(args.data)
    from training.corpus import DEFAULT_COLLECTIONS, convert, default_cache_dir, list_sources

    collections = args.collections or list(DEFAULT_COLLECTIONS)
    # Rank 0 converts (or finds the cache); the others wait, then read the cache it wrote.
    if not dist.is_main:
        dist.barrier()
    files = convert(list_sources(collections), default_cache_dir())
    if dist.is_main:
        dist.barrier()
    return files, "music21:" + ",".join(collections)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume:
        args = resumed_args(args, "train", {"data", "out"})
    args = resolve_run_options(args)
    dist = setup(args.device)
    try:
        return _train(args, dist)
    except (DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        dist.close()


def _train(args: argparse.Namespace, dist) -> int:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    augment = augment_from_args(args)
    tokenizer_file = args.out / "tokenizer.json"
    cfg: GPTConfig | None = None
    metadata: dict = {}
    if args.resume:
        cfg, metadata = resume_point(args.out)
    else:
        check_fresh_out(args.out)
        if dist.is_main:
            ClipTokenizer.default().save(args.out)
            save_settings(args.out, "train", args)
        dist.barrier()
    tokenizer = ClipTokenizer.from_file(tokenizer_file)
    files, source = corpus_files(args, dist)
    files, excluded = exclude_files(files, args.exclude, dist)
    corpus = read_data(files, source, tokenizer_file, args.out, args.val_fraction, augment, dist, not args.quiet)
    if args.resume:
        check_same_data(corpus, metadata, source)
    if cfg is None:
        overrides = {"dropout": args.dropout}
        if args.context:
            overrides["max_context"] = args.context
        cfg = preset(args.preset, tokenizer.vocab_size, **overrides)
    model = GPT(cfg).to(dist.device)
    say(f"model: {args.preset}, {model.num_parameters() / 1e6:.2f} M parameters, context {cfg.max_context}, "
        f"{dist.world} process{'es' if dist.world > 1 else ''} on {dist.device.type}", dist)
    train, val = make_samplers(corpus, tokenizer, cfg.max_context, args.seed, dist.rank, augment)
    if not args.resume:
        metadata = {
            "tokenizer": tokenizer_file.read_text(),
            "programs": program_counts(corpus, tokenizer),
            "data_fingerprint": corpus.fingerprint,
            "data_source": source,
            "preset": args.preset,
            "train_tokens": corpus.token_count("train"),
            "augmentation": augment.to_dict(),
            "val_fraction": args.val_fraction,
        }
        if excluded:
            metadata["excluded"] = excluded
    result = run_loop(model, train, val, loop_config(args, "training"), metadata, dist)
    if dist.is_main:
        print("\n".join(summary_lines(result, args.patience)))
        if result.stopped in ("paused", "interrupted"):
            print(f"continue with: segue train --out {args.out} --resume")
        else:
            print(f"next: segue export-onnx {result.best} --out models/NAME")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
