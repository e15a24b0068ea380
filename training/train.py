"""Pretrain a Segue GPT on the built-in corpus or a folder of MIDI files.

    segue train --preset small --out runs/default --max-minutes 60
    segue train --data ~/midi/lakh --preset small --out runs/lakh

Writes to OUT: `tokenizer.json`, `best.safetensors` (lowest validation loss), `last.safetensors`,
`train_log.jsonl`, `ingest_report.txt`. Then run `segue export-onnx OUT/best.safetensors --out models/NAME`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine.tokens import ClipTokenizer
from training.checkpoint import save_checkpoint
from training.data import WindowSampler, find_midi_files, load_corpus
from training.model import GPT, PRESETS, preset


def lr_at(step: int, max_steps: int, warmup: int, peak: float, floor_ratio: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `floor_ratio * peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def validation_loss(model: GPT, sampler: WindowSampler, batch_size: int, max_windows: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in sampler.sequential_batches(batch_size, max_windows):
        loss = model.loss(torch.from_numpy(x), torch.from_numpy(y))
        total += loss.item() * x.shape[0]
        count += x.shape[0]
    model.train()
    return total / max(1, count)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="segue train",
        description="Pretrain a model on the built-in music21 corpus (default) or on a folder of MIDI files.",
    )
    p.add_argument("--data", type=Path, help="folder of MIDI files (default: the built-in corpus, converted once and cached)")
    p.add_argument("--collections", nargs="*", help="music21 collections to use for the built-in corpus")
    p.add_argument("--out", type=Path, required=True, help="run folder for checkpoints and logs")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model shape (default: small)")
    p.add_argument("--context", type=int, help="training window and model context in tokens (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=6e-4, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=200, help="warm-up steps")
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--max-minutes", type=float, help="stop after this much wall-clock time (the schedule is fitted to it)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--val-windows", type=int, default=64, help="validation windows per evaluation")
    p.add_argument("--transpose", type=int, default=5, help="random transposition up to +-N semitones (0: off)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--quiet", action="store_true", help="no progress bars (for scripts and tests)")
    return p


def corpus_files(args) -> tuple[list[Path], str]:
    if args.data:
        if not args.data.is_dir():
            raise SystemExit(f"error: data folder {args.data} does not exist")
        return find_midi_files(args.data), str(args.data)
    from training.corpus import DEFAULT_COLLECTIONS, convert, default_cache_dir, list_sources

    collections = args.collections or list(DEFAULT_COLLECTIONS)
    return convert(list_sources(collections), default_cache_dir()), "music21:" + ",".join(collections)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    tokenizer = ClipTokenizer.default()
    tokenizer_file = tokenizer.save(args.out)
    files, source = corpus_files(args)
    if not files:
        raise SystemExit(f"error: no MIDI files found in {source}")
    corpus = load_corpus(files, tokenizer_file, args.val_fraction, progress=not args.quiet)
    report = args.out / "ingest_report.txt"
    report.write_text(
        f"source: {source}\nfiles: {len(files)}\ningested: {len(corpus.train) + len(corpus.val)}\n"
        f"duplicates dropped: {len(corpus.duplicates)}\nskipped: {len(corpus.skipped)}\n"
        + "".join(f"  {path}: {reason}\n" for path, reason in corpus.skipped)
    )
    print(f"data: {len(corpus.train)} train / {len(corpus.val)} validation pieces, "
          f"{corpus.token_count('train'):,} / {corpus.token_count('val'):,} tokens, "
          f"{len(corpus.skipped)} skipped (see {report})", file=sys.stderr)

    overrides = {"dropout": args.dropout}
    if args.context:
        overrides["max_context"] = args.context
    cfg = preset(args.preset, tokenizer.vocab_size, **overrides)
    model = GPT(cfg)
    print(f"model: {args.preset}, {model.num_parameters() / 1e6:.2f} M parameters, context {cfg.max_context}", file=sys.stderr)
    train = WindowSampler(corpus.train, tokenizer, cfg.max_context, seed=args.seed, transpose=args.transpose)
    val = WindowSampler(corpus.val, tokenizer, cfg.max_context, seed=args.seed)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    program_ids = np.array(sorted(tokenizer.kinds.program))
    counts = np.bincount(np.concatenate(corpus.train), minlength=tokenizer.vocab_size)[program_ids]
    programs = {str(tokenizer.kinds.program[int(i)]): int(c) for i, c in zip(program_ids, counts, strict=True) if c}
    metadata = {
        "tokenizer": tokenizer_file.read_text(),
        "programs": programs,  # notes per program in training: lets the engine map unseen instruments
        "data_fingerprint": corpus.fingerprint,
        "data_source": source,
        "preset": args.preset,
        "train_tokens": corpus.token_count("train"),
    }
    budget = args.max_minutes * 60 if args.max_minutes else None
    max_steps = args.max_steps
    best = float("inf")
    started = time.time()
    log = open(args.out / "train_log.jsonl", "a")
    from tqdm import tqdm

    bar = tqdm(total=max_steps, desc="training", unit="step", disable=args.quiet)
    step = 0
    while step < max_steps:
        lr = lr_at(step, max_steps, args.warmup, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = train.batch(args.batch_size)
        loss = model.loss(torch.from_numpy(x), torch.from_numpy(y))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
        if budget and step >= 20 and step % 10 == 0:
            # Fit the cosine schedule to the time budget, again and again: the step time changes
            # when something else (a DAW, a test run) shares the CPU.
            elapsed = time.time() - started
            per_step = elapsed / step
            max_steps = min(args.max_steps, max(step + 1, int(step + (budget * 0.97 - elapsed) / per_step)))
            bar.total = max_steps
        if step % args.eval_every == 0 or step == max_steps:
            val_loss = validation_loss(model, val, args.batch_size, args.val_windows)
            record = {"step": step, "train_loss": loss.item(), "val_loss": val_loss,
                      "val_perplexity": math.exp(val_loss), "lr": lr, "elapsed_s": round(time.time() - started, 1)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            meta = {**metadata, "step": step, "val_loss": val_loss, "val_perplexity": math.exp(val_loss),
                    "elapsed_s": record["elapsed_s"]}
            save_checkpoint(args.out / "last.safetensors", model, meta)
            if val_loss < best:
                best = val_loss
                save_checkpoint(args.out / "best.safetensors", model, meta)
            if not args.quiet:
                tqdm.write(f"step {step}: train loss {loss.item():.3f}, validation perplexity {math.exp(val_loss):.2f}"
                           f"{' (best)' if val_loss == best else ''}")
    bar.close()
    elapsed = time.time() - started
    print(f"done: {step} steps in {elapsed / 60:.1f} min, best validation perplexity {math.exp(best):.2f}\n"
          f"next: segue export-onnx {args.out / 'best.safetensors'} --out models/NAME")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
