"""Fine-tune a Segue model on a folder of MIDI files (your catalogue, an artist's).

    segue finetune --data ~/midi/my-band --from models/default --out runs/my-band
    segue finetune --data ~/midi/my-band --from runs/default/best.safetensors --out runs/my-band --export models/my-band
    segue finetune --out runs/my-band --resume        # continue an interrupted fine-tune exactly

`--from` takes a model folder (its hashes are verified, the PyTorch model is rebuilt from its ONNX
weights and checked against ONNX Runtime; see training/from_onnx.py) or a `.safetensors` checkpoint.
The vocabulary always comes from the base model. Files are checked one by one, duplicates dropped,
80/20 split by content hash (the same file always lands on the same side). The summary compares the
best validation perplexity with the base model's on the same validation files. With `--export` the
best checkpoint becomes a model folder whose manifest names the base model's sha256 and the
fine-tune data fingerprint; without it, the `export-onnx` command to run is printed.
Also runs under `torchrun --nproc_per_node N -m training.finetune ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.atomic_file import atomic_write
from engine.manifest import MODEL_FILE, TOKENIZER_FILE, ModelError, sha256_file
from engine.tokens import ClipTokenizer
from training.augment import AugmentConfig, augment_from_args
from training.checkpoint import CheckpointError, load_checkpoint
from training.distributed import Distributed, setup
from training.from_onnx import OnnxImportError, load_model_folder
from training.loop import LoopResult, run_loop, summary_lines
from training.model import GPT
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

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = dict(batch_size=16, lr=1e-4, weight_decay=0.1, warmup=100, max_steps=3000, eval_every=100,
                val_fraction=0.2, patience=5, dropout=0.1)
AUGMENT_DEFAULTS = AugmentConfig(transpose=5, velocity_jitter=8, tempo_low=0.8, tempo_high=1.2, tempo_copies=2)


def default_base() -> Path:
    return Path(os.environ.get("SEGUE_MODEL", REPO_ROOT / "models" / "default"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="segue finetune",
        description="Fine-tune a model on a folder of MIDI files, starting from a model folder or a checkpoint. "
                    "Writes checkpoints and logs to --out; --export turns the best one into a model folder.",
    )
    p.add_argument("--data", type=Path, metavar="DIR", help="folder of MIDI files to learn from (searched recursively)")
    p.add_argument("--from", dest="base", type=Path, default=None, metavar="MODEL",
                   help="model folder (e.g. models/default, the default) or .safetensors checkpoint to start from")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="run folder, e.g. runs/my-band")
    p.add_argument("--window", type=int, metavar="TOKENS", help="training window in tokens (default: the model's context)")
    p.add_argument("--export", type=Path, metavar="MODEL_DIR", help="export the best checkpoint to this model folder at the end")
    p.add_argument("--name", help="model name for --export (default: the folder name)")
    add_loop_args(p, DEFAULTS, AUGMENT_DEFAULTS)
    return p


@dataclass
class Base:
    """The model a fine-tune starts from, and what the new model's manifest says about it."""

    model: GPT
    tokenizer_text: str
    info: dict  # kind, path, sha256, name, data fingerprint...
    programs: dict[str, int]
    preset: str | None


def load_base(path: Path, dropout: float) -> Base:
    """A verified model folder (rebuilt from ONNX, parity-checked) or a Segue checkpoint."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--from {path} does not exist: give a model folder (such as models/default) or a .safetensors checkpoint")
    if path.is_dir():
        model, manifest, gap = load_model_folder(path, dropout=dropout)
        info = {"kind": "model_folder", "path": str(path), "name": manifest.name,
                "sha256": manifest.files[MODEL_FILE], "source_checkpoint_sha256": manifest.source_checkpoint_sha256,
                "data_fingerprint": manifest.training.data_fingerprint, "onnx_parity_max_abs_diff": gap}
        return Base(model, (path / TOKENIZER_FILE).read_text(), info, dict(manifest.training.programs), manifest.model.preset)
    if path.suffix != ".safetensors":
        raise DataError(f"--from {path} is neither a model folder nor a .safetensors checkpoint")
    saved, meta, _ = load_checkpoint(path)
    if "tokenizer" not in meta:
        raise CheckpointError(f"{path} does not carry its tokenizer; it was not written by `segue train` or `segue finetune`")
    model = GPT(replace(saved.cfg, dropout=dropout))
    model.load_state_dict(saved.state_dict())
    info = {"kind": "checkpoint", "path": str(path), "sha256": sha256_file(path),
            "data_fingerprint": meta.get("data_fingerprint")}
    programs = json.loads(meta["programs"]) if "programs" in meta else {}
    return Base(model, meta["tokenizer"], info, programs, meta.get("preset"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume:
        args = resumed_args(args, "finetune", {"data", "out", "base"})
    args = resolve_run_options(args)
    if args.data is None:
        print("error: --data is required: the folder of MIDI files to fine-tune on", file=sys.stderr)
        return 2
    args.base = args.base or default_base()
    dist = setup(args.device)
    try:
        return _finetune(args, dist)
    except (DataError, CheckpointError, ModelError, OnnxImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        dist.close()


def _finetune(args: argparse.Namespace, dist: Distributed) -> int:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    files = folder_files(args.data)  # fail on a missing or empty folder before loading any model
    files, excluded = exclude_files(files, args.exclude, dist)
    augment = augment_from_args(args)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer_file = args.out / TOKENIZER_FILE
    if args.resume:
        cfg, metadata = resume_point(args.out)
        model = GPT(cfg)
    else:
        check_fresh_out(args.out)
        base = load_base(args.base, args.dropout)
        model = base.model
        if dist.is_main:
            atomic_write(tokenizer_file, lambda tmp: Path(tmp).write_text(base.tokenizer_text))
            save_settings(args.out, "finetune", args)
        dist.barrier()
        say(f"base: {args.base} ({base.info['kind'].replace('_', ' ')}, sha256 {base.info['sha256'][:12]}, "
            f"{model.num_parameters() / 1e6:.2f} M parameters"
            + (f", ONNX parity {base.info['onnx_parity_max_abs_diff']:.1e}" if "onnx_parity_max_abs_diff" in base.info else "")
            + ")", dist)
    tokenizer = ClipTokenizer.from_file(tokenizer_file)
    corpus = read_data(files, str(args.data), tokenizer_file, args.out, args.val_fraction, augment, dist, not args.quiet)
    if args.resume:
        check_same_data(corpus, metadata, str(args.data))
    else:
        metadata = {
            "tokenizer": base.tokenizer_text,
            "programs": program_counts(corpus, tokenizer, base.programs),
            "data_fingerprint": corpus.fingerprint,
            "data_source": str(args.data),
            "preset": base.preset,
            "train_tokens": corpus.token_count("train"),
            "augmentation": augment.to_dict(),
            "base_model": base.info,
            "finetune": {"data_fingerprint": corpus.fingerprint, "data_source": str(args.data), "files": corpus.files,
                         "train_files": len(corpus.train), "val_files": len(corpus.val), "skipped": len(corpus.skipped),
                         "duplicates": len(corpus.duplicates), "val_fraction": args.val_fraction, "lr": args.lr,
                         "augmentation": augment.to_dict()},
            "val_fraction": args.val_fraction,
        }
        if excluded:
            metadata["excluded"] = excluded
    model = model.to(dist.device)
    window = min(args.window or model.cfg.max_context, model.cfg.max_context)
    train, val = make_samplers(corpus, tokenizer, window, args.seed, dist.rank, augment)
    say(f"fine-tuning: window {window} tokens, {dist.world} process{'es' if dist.world > 1 else ''} on {dist.device.type}", dist)
    result = run_loop(model, train, val, loop_config(args, "fine-tuning"), metadata, dist)
    return _finish(args, result) if dist.is_main else 0


def _finish(args: argparse.Namespace, result: LoopResult) -> int:
    """The summary, then the export (or the command that does it)."""
    print("\n".join(summary_lines(result, args.patience)))
    if result.stopped in ("paused", "interrupted"):
        print(f"continue with: segue finetune --out {args.out} --resume")
        return 0
    if args.export is None:
        print(f"next: segue export-onnx {result.best} --out models/{args.out.name}")
        return 0
    from export.onnx_export import export_model  # export needs onnx; imported only when asked for

    try:
        manifest = export_model(result.best, args.export, args.name)
    except (CheckpointError, RuntimeError, OSError) as exc:
        print(f"error: the export failed: {exc}; the checkpoints in {args.out} are intact", file=sys.stderr)
        return 1
    assert manifest.parity and manifest.base_model and manifest.finetune, "export_model records all three for a fine-tune"
    print(f"exported {args.export} (parity {manifest.parity.max_abs_diff:.1e}, "
          f"base {manifest.base_model.sha256[:12]}, data {manifest.finetune.data_fingerprint[:12]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
