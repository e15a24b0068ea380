"""Does fine-tuning move the style? Fine-tune one base model on two contrasting styles and measure it.

    python bench/style_experiment.py                  # the real run: Bach chorales vs Irish/Scottish fiddle tunes
    python bench/style_experiment.py --minutes 12 --clips 24 --samples 4 --base models/default
    python bench/style_experiment.py --quick --base /tmp/se/model --style-a /tmp/A --style-b /tmp/B \\
        --out /tmp/se-exp --report /tmp/se-exp/report.md   # minutes-scale smoke test on a tiny model

Writes docs/style-experiment.md (the report: the command, timings, every number, a PASS/FAIL line per
criterion) and runs/style-experiment/results.json (the same numbers for scripts). On 2 CPU cores the
real run takes about 30 minutes: 2 x (--minutes 12 + ~0.5) of fine-tuning (~110 steps each for the small
preset at context 512), then ~3 minutes of measuring. Fine-tunes, exported models and data links stay
in runs/style-experiment; `--reuse-models` measures them again without training, `--fresh` retrains.

1. Data. Style A (default the music21 `bach` collection from the corpus cache) and style B (default
   `oneills1850` + `ryansMammoth`): the MIDI files of each, one per content, capped at --max-files
   (default: the smaller style's count) by a deterministic choice independent of the split
   (lowest sha256 of the content hash; the split reads the hash's own first digits), linked into
   OUT/data/<style>. 20 % of each is held out by `is_validation(content hash, 0.2)`, the rule
   `segue finetune` splits by: its validation set is the held-out set (checked after it ran).
2. Fine-tune the base model once per style with `segue finetune` (its entry point, in this process):
   --max-minutes per style, lr 1e-4, patience and augmentation as finetune's defaults, a shorter
   warm-up and more frequent validation than its defaults (a 12-minute CPU run is ~110 steps).
   Exported to OUT/models/<style>.
3. Measure, for each style S:
   (1) perplexity on the held-out pieces of S (eval_measures.model_perplexity, the same windows for
       every model): the model fine-tuned on S vs the base (and the other fine-tune, as a control);
   (2) held-out clips (prompt 4 bars, continue 4, --samples seeds each), chosen as `segue eval`
       chooses them (held_out.held_out_examples): style-metric distance of each model's
       continuation to the real continuation (metrics.metric_distances), per metric;
   (3) a style classifier trained only on the real training pieces of A and B
       (metrics.train_style_classifier): its accuracy on held-out real pieces, and the labels it
       gives every model's continuations;
   (4) originality (originality.CopyIndex): continuations copying >= 2 bars from the union of both
       styles' training splits (the fine-tunes' training data), and, for information, from the
       base model's own training split when its data folder is readable;
   (5) the base model's held-out perplexity vs an n-gram model trained on S's training split.
   Overlap: the base's training data is found from its manifest (`training.data_source`); the files
   and the validation fraction it was split with are recovered exactly when they reproduce the
   manifest's data fingerprint and training token count, and the report counts the held-out pieces
   the base trained on (with --base-val-fraction, default 0.05, when they cannot be recovered).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/style_experiment.py` without an installed package
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import symusic  # noqa: E402

from engine.clip import Clip, ClipError  # noqa: E402
from engine.generate import ContinuationRequest, Generator, RequestError  # noqa: E402
from engine.manifest import MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE, Manifest, ModelError, TrainingRecord, load_manifest  # noqa: E402
from training.corpus import default_cache_dir, midi_files  # noqa: E402
from training.data import content_hash, data_fingerprint, find_midi_files, is_validation, load_corpus  # noqa: E402
from training.eval_measures import continuation_tokens, model_perplexity  # noqa: E402
from training.held_out import DataSplit, Example, capped, held_out_examples, read_piece, split_folder  # noqa: E402
from training.metrics import (  # noqa: E402
    HISTOGRAM_METRICS,
    METRIC_UNITS,
    SCALAR_METRICS,
    StyleClassifier,
    clip_windows,
    metric_distances,
    style_metrics,
    train_style_classifier,
)
from training.ngram import NgramModel  # noqa: E402
from training.originality import COPY_THRESHOLD_BARS, CopyIndex, copy_summary  # noqa: E402
from training.run_folder import LAST_FILE, LOG_FILE, read_log  # noqa: E402

METRICS = (*HISTOGRAM_METRICS, *SCALAR_METRICS)
LABEL_TARGET = 0.90  # share of a fine-tuned model's continuations the classifier must give its style
SANITY_TARGET = 0.90  # the classifier's accuracy on held-out real music, or its labels mean little
COPY_TARGET = 0.01  # share of continuations allowed to copy >= COPY_THRESHOLD_BARS bars
CRITERIA = ("(1)", "(2)", "(3a)", "(3b)", "(4)", "(5)")
BASE_TRAIN_VAL_FRACTION = 0.05  # `segue train`'s default split; the manifest does not record it
FRACTION_CANDIDATES = (0.05, 0.1, 0.2, 0.02, 0.01, 0.15, 0.25, 0.3)  # tried when the given one does not fit
QUICK = dict(minutes=0.5, clips=4, samples=2)
QUICK_FINETUNE = {"--max-steps": "8", "--eval-every": "4", "--batch-size": "4", "--val-windows": "4", "--warmup": "2"}


HELD_OUT_DIR = "held-out"


class ExperimentError(RuntimeError):
    """The experiment cannot go on; the message says why and what to do."""


def build_parser() -> argparse.ArgumentParser:
    cache = default_cache_dir()
    p = argparse.ArgumentParser(description="Fine-tune a base model on two contrasting styles and measure whether its "
                                            "continuations move to each style (perplexity, style metrics, a style "
                                            "classifier, originality, an n-gram baseline).")
    p.add_argument("--style-a", nargs="+", type=Path, default=[cache / "bach"], metavar="DIR",
                   help="folders of style A's MIDI files (default: the corpus cache's bach/)")
    p.add_argument("--style-b", nargs="+", type=Path, default=[cache / "oneills1850", cache / "ryansMammoth"], metavar="DIR",
                   help="folders of style B's MIDI files (default: oneills1850/ and ryansMammoth/)")
    p.add_argument("--names", nargs=2, default=["bach", "irish"], metavar=("A", "B"), help="style names (default bach irish)")
    p.add_argument("--max-files", type=int, help="files per style at most (default: the smaller style's count; 0: all)")
    p.add_argument("--base", type=Path, default=ROOT / "models" / "default", help="base model folder (default models/default)")
    p.add_argument("--base-val-fraction", type=float, default=BASE_TRAIN_VAL_FRACTION,
                   help="validation fraction the base was trained with, for the overlap count (default 0.05, segue train's)")
    p.add_argument("--minutes", type=float, default=12.0, help="fine-tuning time budget per style (default 12)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out share of each style, by content hash (default 0.2)")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning peak learning rate (default 1e-4, finetune's)")
    p.add_argument("--warmup", type=int, default=20, help="fine-tuning warm-up steps (default 20)")
    p.add_argument("--eval-every", type=int, default=20, help="fine-tuning steps between validations (default 20)")
    p.add_argument("--finetune-args", metavar="'OPTIONS'",
                   help="more options for every `segue finetune`, e.g. '--velocity-jitter 0 --tempo-copies 0'")
    p.add_argument("--prompt-bars", type=int, default=4, help="bars of real music each model continues (default 4)")
    p.add_argument("--bars", type=int, default=4, help="bars generated and compared with the real ones (default 4)")
    p.add_argument("--clips", type=int, default=24, help="held-out clips per style (default 24)")
    p.add_argument("--samples", type=int, default=4, help="continuations per clip and model, one seed each (default 4)")
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0, help="seeds the clip offsets and the sampling")
    p.add_argument("--ngram-order", type=int, default=6, help="n-gram baseline order (default 6, as segue eval)")
    p.add_argument("--max-val-tokens", type=int, default=200_000, help="cap on held-out tokens scored per style")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default: all cores)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "style-experiment", help="work folder (default runs/style-experiment)")
    p.add_argument("--report", type=Path, default=ROOT / "docs" / "style-experiment.md",
                   help="Markdown report (default docs/style-experiment.md)")
    p.add_argument("--reuse-models", action="store_true", help="measure fine-tunes already in OUT/models instead of training")
    p.add_argument("--fresh", action="store_true", help="delete this experiment's earlier fine-tunes in OUT first")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: 8 fine-tuning steps, {QUICK['clips']} clips, {QUICK['samples']} samples")
    p.add_argument("--quiet", action="store_true", help="no progress bars from the fine-tunes")
    p.add_argument("--prepare-only", action="store_true",
                   help=f"only write the data folders (OUT/data/<style>) and the held-out folders (OUT/{HELD_OUT_DIR}/<style>), "
                        f"e.g. to pretrain a base with `segue train --exclude OUT/{HELD_OUT_DIR}`")
    return p


# --- data -----------------------------------------------------------------------------------------

@dataclass
class Style:
    name: str
    sources: list[Path]
    folder: Path  # OUT/data/<name>: links to the chosen files
    found: int  # distinct contents found in the sources
    dropped_shared: int = 0  # contents also in the other style, left out of this one
    split: DataSplit | None = None
    train_paths: list[Path] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)  # path in folder -> content hash
    fingerprint: str = ""

    @property
    def val_hashes(self) -> list[str]:
        return [piece.hash for piece in self.split.val]


def distinct_files(dirs: list[Path]) -> dict[str, tuple[Path, Path]]:
    """Content hash -> (first file with that content in sorted order, the folder it was found in)."""
    found: dict[str, tuple[Path, Path]] = {}
    for folder in dirs:
        if not Path(folder).is_dir():
            raise ExperimentError(f"style folder {folder} does not exist (convert the corpus with "
                                  f"`python -m training.corpus`, or give --style-a/--style-b folders)")
        for path in find_midi_files(folder):
            found.setdefault(content_hash(path.read_bytes()), (path, Path(folder)))
    if not found:
        raise ExperimentError(f"no MIDI files in {', '.join(map(str, dirs))}")
    return found


def choose(files: dict, cap: int) -> dict:
    """At most `cap` files (0: all): lowest sha256 of the content hash first. That order is unrelated
    to the split (`is_validation` reads the content hash's first digits), so the cap keeps ~20 % held out."""
    if cap <= 0 or len(files) <= cap:
        return dict(files)
    order = sorted(files, key=lambda h: hashlib.sha256(f"style-experiment:{h}".encode()).hexdigest())
    return {h: files[h] for h in order[:cap]}


def link_files(folder: Path, targets: dict[str, Path]) -> None:
    """`folder` rebuilt (it is the experiment's own folder of links) with one symlink per name -> target."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name, target in targets.items():
        (folder / name).symlink_to(Path(target).resolve())


def link_folder(folder: Path, files: dict[str, tuple[Path, Path]]) -> None:
    """OUT/data/<style>: one symlink per chosen file, named after its source folder and its path there."""
    link_files(folder, {"__".join((source.name, *path.relative_to(source).parts)): path for path, source in files.values()})


def prepare_styles(args) -> list[Style]:
    """Both styles' data folders: distinct files, shared contents left to style A, capped, linked."""
    found = [distinct_files(dirs) for dirs in (args.style_a, args.style_b)]
    shared = set(found[0]) & set(found[1])
    found[1] = {h: p for h, p in found[1].items() if h not in shared}
    cap = min(len(f) for f in found) if args.max_files is None else args.max_files
    styles = []
    for name, dirs, files in zip(args.names, (args.style_a, args.style_b), found, strict=True):
        style = Style(name, list(dirs), args.out / "data" / name, len(files), len(shared) if name == args.names[1] else 0)
        link_folder(style.folder, choose(files, cap))
        styles.append(style)
    return styles


def split_style(style: Style, tokenizer_file: Path, val_fraction: float) -> None:
    """Tokenize and split the style's folder exactly as finetune will (held_out.split_folder)."""
    style.split = split_folder(style.folder, tokenizer_file, val_fraction)
    style.train_paths = [piece.path for piece in style.split.train]
    style.hashes = {str(piece.path): piece.hash for piece in style.split.train + style.split.val}
    style.fingerprint = data_fingerprint(style.hashes.values())
    if not style.split.val or not style.split.train:
        shared = f" ({style.dropped_shared} files also in style A were left to A)" if style.dropped_shared else ""
        raise ExperimentError(f"style {style.name}: {len(style.split.train)} training and {len(style.split.val)} held-out "
                              f"pieces in {style.folder}{shared}; both parts need files (add files or change --val-fraction)")


def write_held_out(style: Style, folder: Path) -> None:
    """OUT/held-out/<style>: links to the held-out pieces, for `segue train --exclude OUT/held-out`
    (a base model that never learns from the music it is measured on)."""
    link_files(folder, {piece.path.name: piece.path for piece in style.split.val})


# --- fine-tuning ----------------------------------------------------------------------------------

def finetune_options(args) -> dict[str, str]:
    """The training options every fine-tune of the experiment gets (--quick shrinks them)."""
    options = {"--val-fraction": args.val_fraction, "--max-minutes": f"{args.minutes:g}", "--lr": f"{args.lr:g}",
               "--warmup": args.warmup, "--eval-every": args.eval_every, "--threads": args.threads,
               **(QUICK_FINETUNE if args.quick else {})}
    return {k: str(v) for k, v in options.items()}


def finetune_argv(style: Style, args) -> list[str]:
    paths = {"--data": style.folder, "--from": args.base, "--out": args.out / "finetune" / style.name,
             "--export": args.out / "models" / style.name, "--name": f"{style.name}-finetuned"}
    options = {**{k: str(v) for k, v in paths.items()}, **finetune_options(args)}
    return ([x for item in options.items() for x in item] + shlex.split(args.finetune_args or "")
            + (["--quiet"] if args.quiet else []))


def prepare_run_folders(style: Style, args) -> bool:
    """True when the fine-tune must run; False to reuse the exported model (--reuse-models)."""
    run, model = args.out / "finetune" / style.name, args.out / "models" / style.name
    if args.fresh:
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(model, ignore_errors=True)
        return True
    if args.reuse_models:
        if not (model / MANIFEST_FILE).is_file():
            raise ExperimentError(f"--reuse-models: {model} holds no exported model; run without it")
        return False
    if (run / LAST_FILE).exists() or model.exists():
        raise ExperimentError(f"{run} or {model} already holds a fine-tune: pass --reuse-models to measure it again, "
                              f"or --fresh to delete this experiment's fine-tunes and train again")
    return True


def run_finetune(style: Style, args) -> dict:
    """`segue finetune` for one style (unless reused); what its run and exported manifest say."""
    from training.finetune import main as finetune_main

    argv = finetune_argv(style, args)
    started = time.perf_counter()
    if prepare_run_folders(style, args):
        print(f"\n== fine-tuning on {style.name}: segue finetune {shlex.join(argv)}", file=sys.stderr, flush=True)
        try:
            code = finetune_main(argv)
        except SystemExit as exc:  # argparse and resume errors
            code = exc.code if isinstance(exc.code, int) else 1
        if code != 0:
            raise ExperimentError(f"segue finetune failed on {style.name} (exit {code}); see its messages above and "
                                  f"{args.out / 'finetune' / style.name}")
    model = args.out / "models" / style.name
    if not (model / MANIFEST_FILE).is_file():  # paused or interrupted: finetune exits 0 without exporting
        raise ExperimentError(f"the fine-tune on {style.name} stopped before exporting {model}; finish it with "
                              f"`segue finetune --out {args.out / 'finetune' / style.name} --resume --export {model}`, "
                              "then run the experiment again with --reuse-models (or start over with --fresh)")
    manifest = load_manifest(model)
    if manifest.finetune is None:
        raise ExperimentError(f"{model} holds no fine-tuned model (its manifest has no fine-tune record)")
    log = read_log(args.out / "finetune" / style.name / LOG_FILE)
    evals = [r for r in log if r.get("kind") == "eval"]
    return {"model": model, "command": "segue finetune " + shlex.join(argv), "reused": args.reuse_models,
            "seconds": time.perf_counter() - started, "steps": manifest.training.steps,
            "last_step": max((r["step"] for r in log), default=0),
            "loop_seconds": max((r.get("elapsed_s", 0.0) for r in evals), default=0.0),
            "val_perplexity": manifest.finetune.val_perplexity,
            "base_val_perplexity": manifest.finetune.base_val_perplexity,
            "evals": [(r["step"], r["val_perplexity"]) for r in evals], "manifest": manifest}


def check_finetune(style: Style, info: dict, base_manifest: Manifest, base: Path, args) -> None:
    """The fine-tune's validation set is our held-out set: same files (fingerprint), same fraction, same
    rule (`is_validation`, a pure function of the content hash), same counts; same tokenizer and base."""
    manifest: Manifest = info["manifest"]
    ft = manifest.finetune
    problems = []
    if ft.data_fingerprint != style.fingerprint:
        problems.append(f"data fingerprint {ft.data_fingerprint[:12]} vs ours {style.fingerprint[:12]}")
    if ft.val_fraction is None or abs(ft.val_fraction - args.val_fraction) > 1e-12:
        problems.append(f"validation fraction {ft.val_fraction} vs ours {args.val_fraction}")
    if (ft.train_files, ft.val_files) != (len(style.split.train), len(style.split.val)):
        problems.append(f"{ft.train_files}/{ft.val_files} train/validation files vs ours "
                        f"{len(style.split.train)}/{len(style.split.val)}")
    if manifest.base_model is None or manifest.base_model.sha256 != base_manifest.files[MODEL_FILE]:
        problems.append("it was not fine-tuned from this base model")
    if (info["model"] / TOKENIZER_FILE).read_text() != (base / TOKENIZER_FILE).read_text():
        problems.append("its tokenizer differs from the base's")
    if problems:
        raise ExperimentError(f"the fine-tune on {style.name} ({info['model']}) does not match the experiment's split: "
                              + "; ".join(problems) + (" (--fresh retrains it)" if args.reuse_models else ""))


# --- the base model's own training data -------------------------------------------------------------

def base_training_data(manifest: Manifest, tokenizer_file: Path, val_fraction: float, threads: int) -> dict:
    """The base's training split re-derived from its manifest's data source (a folder, or
    `music21:collections` in the corpus cache): today's reading of the folder, matched to the
    manifest's data fingerprint and training token count by `match_base_split`."""
    training = manifest.training
    source = training.data_source or ""
    info = {"source": source, "val_fraction": val_fraction, "available": False}
    if source.startswith("music21:"):
        files = midi_files(default_cache_dir(), source.split(":", 1)[1].split(","))
    elif source and Path(source).expanduser().is_dir():  # manifests name folders under the home as ~/...
        files = find_midi_files(Path(source).expanduser())
    else:
        info["why"] = "the base's data source is not a readable folder here"
        return info
    # A base trained with `--exclude` names the pieces it left out, and records its split fraction.
    excluded = set(training.excluded.hashes if training.excluded else [])
    if training.val_fraction:
        val_fraction = training.val_fraction
        info["val_fraction"] = val_fraction
    corpus = load_corpus(files, tokenizer_file, val_fraction, workers=threads, progress=False)
    pieces = {h: t for h, t in zip(corpus.train_hashes + corpus.val_hashes, corpus.train + corpus.val, strict=True)
              if h not in excluded}
    match = match_base_split(pieces, skipped_tokens(corpus, tokenizer_file), training, val_fraction)
    pool, fraction = match.pop("pieces"), match["val_fraction"]
    train = sorted(h for h in pool if not is_validation(h, fraction))
    info.update(available=True, files=len(files), duplicates=len(corpus.duplicates), **match, excluded=len(excluded),
                fraction_given=val_fraction, manifest_train_tokens=training.train_tokens,
                skipped_now=[f"{path}: {why}" for path, why in corpus.skipped],
                train_pieces=len(train), val_pieces=len(pool) - len(train),
                train_hashes=set(train), val_hashes=set(pool) - set(train), train=[pool[h] for h in train])
    return info


def skipped_tokens(corpus, tokenizer_file: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Files today's ingest checks skip, tokenized anyway (hash -> (path, tokens)): the checks may have
    been added after the base was trained, and it may have learned from them."""
    from engine.tokens import ClipTokenizer

    tokenizer = ClipTokenizer.from_file(tokenizer_file)
    out = {}
    for path, _ in corpus.skipped:
        try:
            data = Path(path).read_bytes()
            out[content_hash(data)] = (path, np.asarray(tokenizer.encode_score(symusic.Score.from_midi(data))))
        except Exception:  # unreadable then as now
            continue
    return out


def match_base_split(pieces: dict[str, np.ndarray], skipped: dict[str, tuple[str, np.ndarray]],
                     training: TrainingRecord, given: float) -> dict:
    """Which files and which validation fraction the base was trained with. The manifest records neither
    the fraction nor the file list, but its data fingerprint (sha256 of the file hashes) pins the files
    (today's pieces plus some of the files today's checks skip) and its training token count pins the
    fraction (`given` first, then FRACTION_CANDIDATES). Without an exact match: today's pieces and
    `given`, with the token gap of each fraction tried."""
    target_fp, target_tokens = training.data_fingerprint, training.train_tokens
    fractions = list(dict.fromkeys((given, *FRACTION_CANDIDATES)))

    def train_tokens(pool, fraction):
        return sum(len(t) for h, t in pool.items() if not is_validation(h, fraction))

    for size in range(len(skipped) + 1 if len(skipped) <= 8 else 1):
        for restored in combinations(sorted(skipped), size):
            pool = {**pieces, **{h: skipped[h][1] for h in restored}}
            if data_fingerprint(pool) != target_fp:
                continue
            for fraction in fractions:
                if target_tokens and train_tokens(pool, fraction) == int(target_tokens):
                    return {"pieces": pool, "val_fraction": fraction, "fraction_confirmed": True,
                            "fingerprint_matches": True, "restored": [skipped[h][0] for h in restored]}
            return {"pieces": pool, "val_fraction": given, "fraction_confirmed": None if not target_tokens else False,
                    "fingerprint_matches": True, "restored": [skipped[h][0] for h in restored],
                    "fraction_token_gaps": {f: train_tokens(pool, f) / int(target_tokens) - 1 for f in fractions}
                    if target_tokens else {}}
    return {"pieces": pieces, "val_fraction": given, "fraction_confirmed": None if not target_tokens else False,
            "fingerprint_matches": False, "restored": [],
            "fraction_token_gaps": {f: train_tokens(pieces, f) / int(target_tokens) - 1 for f in fractions} if target_tokens else {}}


def overlap(style: Style, base_data: dict) -> dict:
    """How many of the style's held-out and training pieces the base model trained on."""
    if not base_data["available"]:
        return {}
    train = set(style.hashes.values()) - set(style.val_hashes)
    val = set(style.val_hashes)
    seen = base_data["train_hashes"]
    return {"held_out": len(val), "held_out_in_base_train": len(val & seen),
            "held_out_in_base_val": len(val & base_data["val_hashes"]),
            "train": len(train), "train_in_base_train": len(train & seen)}


# --- measuring --------------------------------------------------------------------------------------

def perplexities(style: Style, models: dict[str, Generator], args, base_seen: set[str] | None) -> dict:
    """(1) and (5): every model and an n-gram (trained on the style's training split) on the same held-out
    tokens; again on the held-out pieces the base never trained on either (`unseen`) when that is known."""
    tokenizer = models["base"].tokenizer
    ngram = NgramModel.train([piece.tokens for piece in style.split.train], tokenizer.vocab_size, tokenizer.kinds.bos, tokenizer.kinds.eos,
                             args.ngram_order)
    out = score_pieces([piece.tokens for piece in style.split.val], models, ngram, args.max_val_tokens)
    if base_seen is not None:
        unseen = [piece.tokens for piece in style.split.val if piece.hash not in base_seen]
        out["unseen"] = score_pieces(unseen, models, ngram, args.max_val_tokens) if unseen else None
    return out


def score_pieces(pieces: list[np.ndarray], models: dict[str, Generator], ngram: NgramModel, max_tokens: int) -> dict:
    kinds = models["base"].tokenizer.kinds
    pieces = capped(pieces, max_tokens)
    out: dict = {"pieces": len(pieces)}
    for key, generator in models.items():
        out[key], out["tokens"] = model_perplexity(generator.decoder, pieces, kinds.bos, kinds.eos)
    out["ngram"], scored = ngram.perplexity(pieces)
    if scored != out["tokens"]:
        raise ExperimentError(f"the n-gram scored {scored} tokens and the models {out['tokens']}: not comparable")
    return out


def candidate_examples(style: Style, tokenizer, args) -> tuple[list[Example], list[tuple[str, str]]]:
    """Every held-out piece's clip, chosen as `segue eval` chooses them (held_out.held_out_examples)."""
    skipped: list[tuple[str, str]] = []
    examples = list(held_out_examples(style.split.val, tokenizer, args.prompt_bars, args.bars, args.seed, skipped))
    return examples, skipped


def continue_examples(examples: list[Example], models: dict[str, Generator], args) -> tuple[list[dict], list]:
    """Up to --clips examples, each continued --samples times by every model with the same seeds."""
    done, skipped = [], []
    for example in examples:
        if len(done) >= args.clips:
            break
        request = ContinuationRequest(bars=args.bars, variations=args.samples, temperature=args.temperature,
                                      top_p=args.top_p, seed=args.seed + len(done))
        try:
            outputs = {key: [d.clip for d in generator.generate(example.prompt, request)] for key, generator in models.items()}
        except (RequestError, ClipError) as exc:  # a meter or tempo the vocabulary lacks: skip the clip for every model
            skipped.append((example.name, str(exc)))
            continue
        done.append({"example": example, "outputs": outputs})
    return done, skipped


def measure_clips(clips: list[dict], classifier: StyleClassifier, indexes: dict[str, CopyIndex], tokenizer, args) -> None:
    """Metrics, distance to the real continuation, style label and longest copies of every continuation."""
    for clip in clips:
        example = clip["example"]
        start = args.prompt_bars * example.prompt.beats_per_bar
        reference = style_metrics(example.reference, args.bars, start)
        clip["measures"] = {}
        for key, outputs in {"reference": [example.reference], **clip["outputs"]}.items():
            rows = []
            for continuation in outputs:
                metrics = style_metrics(continuation, args.bars, start)
                tokens = continuation_tokens(tokenizer, continuation, args.prompt_bars, args.bars)
                rows.append({"notes": metrics["notes"], "distances": metric_distances(metrics, reference),
                             "label": classifier.predict(continuation, args.bars, start),
                             "copy": {name: index.longest_copy(tokens) for name, index in indexes.items()}})
            clip["measures"][key] = rows


def summarise_clips(clips: list[dict], labels: tuple[str, ...]) -> dict:
    """Per model (and the real continuation): mean distance per metric, label shares, copy summaries."""
    out = {}
    for key in clips[0]["measures"]:
        rows = [row for clip in clips for row in clip["measures"][key]]
        counts = Counter(row["label"] for row in rows)
        out[key] = {"continuations": len(rows), "empty": sum(1 for row in rows if row["notes"] == 0),
                    "mean_notes": float(np.mean([row["notes"] for row in rows])),
                    "distances": {m: float(np.mean([row["distances"][m] for row in rows])) for m in METRICS},
                    "labels": {label: counts[label] / len(rows) for label in labels},
                    "originality": {name: copy_summary([row["copy"][name] for row in rows]) for name in rows[0]["copy"]}}
    return out


def load_clips(paths: list[Path]) -> tuple[list[Clip], int]:
    """Whole pieces as clips (held_out.read_piece, as held-out clips are cut), and how many could not be read."""
    clips, failed = [], 0
    for path in paths:
        try:
            clips.append(read_piece(path))
        except Exception:  # symusic's parse errors have many types; the file is counted and left out
            failed += 1
    return clips, failed


def train_classifier(styles: list[Style], bars: int) -> tuple[StyleClassifier, dict]:
    """(3) A classifier on real training pieces only; its accuracy on every window of the held-out pieces."""
    train, info = {}, {"unreadable": 0}
    for style in styles:
        train[style.name], failed = load_clips(style.train_paths)
        info["unreadable"] += failed
    try:
        classifier = train_style_classifier(train, window_bars=bars)
    except ValueError as exc:  # a style with no notes to learn from
        raise ExperimentError(f"the style classifier cannot be trained: {exc}") from exc
    info["train_pieces"] = {name: len(clips) for name, clips in train.items()}
    info["train_windows"] = {name: sum(len(clip_windows(c, bars)) for c in clips) for name, clips in train.items()}
    info["held_out"] = {}
    for style in styles:
        clips, failed = load_clips([piece.path for piece in style.split.val])
        info["unreadable"] += failed
        predicted = [classifier.predict(c, bars, start) for c in clips for start in clip_windows(c, bars)]
        info["held_out"][style.name] = {"pieces": len(clips), "windows": len(predicted),
                                        "accuracy": sum(p == style.name for p in predicted) / max(1, len(predicted))}
    windows = sum(v["windows"] for v in info["held_out"].values())
    info["held_out_accuracy"] = sum(v["accuracy"] * v["windows"] for v in info["held_out"].values()) / max(1, windows)
    return classifier, info


# --- criteria, table, report ------------------------------------------------------------------------

def criteria(results: dict) -> list[dict]:
    """One PASS/FAIL line per criterion of the experiment, with its numbers."""
    names = results["names"]
    ppl, clips, cls = results["perplexity"], results["clips"], results["classifier"]

    def line(cid, text, passed, detail):
        return {"id": cid, "criterion": text, "passed": bool(passed), "detail": detail}

    closer = {s: clips[s]["closer_metrics"] for s in names}
    right = {s: clips[s]["summary"][f"ft_{s}"]["labels"][s] for s in names}
    copying = {s: clips[s]["summary"][f"ft_{s}"]["originality"]["finetune_data"]["copying_fraction"] for s in names}
    return [
        line("(1)", "held-out perplexity of each fine-tuned model below the base's on its style",
             all(ppl[s][f"ft_{s}"] < ppl[s]["base"] for s in names),
             "; ".join(f"{s}: {ppl[s][f'ft_{s}']:.3f} vs base {ppl[s]['base']:.3f}" for s in names)),
        line("(2)", "continuations closer to the real ones than the base's on more than half of the style metrics",
             all(len(closer[s]) * 2 > len(METRICS) for s in names),
             "; ".join(f"{s}: {len(closer[s])} of {len(METRICS)} metrics closer" for s in names)),
        line("(3a)", f"style classifier (real training pieces only) right on >= {SANITY_TARGET:.0%} of held-out real windows",
             cls["held_out_accuracy"] >= SANITY_TARGET,
             f"{cls['held_out_accuracy']:.1%} (" + ", ".join(f"{s} {v['accuracy']:.1%} of {v['windows']}"
                                                       for s, v in cls["held_out"].items()) + ")"),
        line("(3b)", f"each fine-tuned model's continuations labelled with its style >= {LABEL_TARGET:.0%}",
             all(right[s] >= LABEL_TARGET for s in names),
             "; ".join(f"{s}: {right[s]:.1%} (base {clips[s]['summary']['base']['labels'][s]:.1%})" for s in names)),
        line("(4)", f"continuations copying >= {COPY_THRESHOLD_BARS} bars of the fine-tuning data <= {COPY_TARGET:.0%}",
             all(copying[s] <= COPY_TARGET for s in names),
             "; ".join(f"{s}: {copying[s]:.1%}" for s in names)),
        line("(5)", "base model's held-out perplexity below the n-gram baseline's on each style",
             all(ppl[s]["base"] < ppl[s]["ngram"] for s in names),
             "; ".join(f"{s}: {ppl[s]['base']:.3f} vs n-gram {ppl[s]['ngram']:.3f}" for s in names)),
    ]


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
                     + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def model_names(names: list[str]) -> dict[str, str]:
    return {"reference": "real continuation", "base": "base", **{f"ft_{s}": f"fine-tuned on {s}" for s in names}}


def summary_table(results: dict) -> str:
    """The headline numbers, one row per style (printed and in the report)."""
    rows = []
    for s in results["names"]:
        ppl, summ = results["perplexity"][s], results["clips"][s]["summary"]
        rows.append([s, f"{ppl['base']:.3f}", f"{ppl[f'ft_{s}']:.3f}", f"{ppl['ngram']:.3f}",
                     f"{len(results['clips'][s]['closer_metrics'])}/{len(METRICS)}",
                     f"{summ['base']['labels'][s]:.0%}", f"{summ[f'ft_{s}']['labels'][s]:.0%}",
                     f"{summ[f'ft_{s}']['originality']['finetune_data']['copying_fraction']:.1%}"])
    return _table(["style", "ppl base", "ppl fine-tuned", "ppl n-gram", "metrics closer", "labelled right: base",
                   "labelled right: fine-tuned", "copying (fine-tuned)"], rows)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _keys(results: dict) -> list[str]:
    return ["base", *(f"ft_{s}" for s in results["names"])]


def report_text(results: dict) -> str:
    """The Markdown report: every number of results.json, and what they do not show."""
    sections = (_head_section, _data_section, _finetune_section, _perplexity_section, _metrics_section,
                _classifier_section, _originality_section)
    return "\n".join(part for section in sections for part in section(results)) + "\n## What this does not show\n\n" \
        + caveats(results)


def _head_section(results: dict) -> list[str]:
    t, criteria_lines = results["timings"], results["criteria"]
    quick = " — QUICK MODE (smoke test, numbers meaningless)" if results["quick"] else ""
    return [f"# Style experiment: does fine-tuning move the style? ({' vs '.join(results['names'])})\n",
            f"Written {results['written']}{quick}. Command (from the repository root):\n\n```\n{results['command']}\n```\n",
            f"Total time {t['total'] / 60:.1f} min: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k != "total") + ".\n",
            "## Result\n", summary_table(results),
            "".join(f"- **{'PASS' if c['passed'] else 'FAIL'}** {c['id']} {c['criterion']}: {c['detail']}\n" for c in criteria_lines)
            + f"\n{sum(c['passed'] for c in criteria_lines)} of {len(criteria_lines)} criteria pass.\n"]


def _data_section(results: dict) -> list[str]:
    names = results["names"]
    return ["## Data\n",
            _table(["style", "sources", "distinct files", "used", "training pieces", "held-out pieces", "unreadable", "data folder"],
                   [[s["name"], ", ".join(f"`{p}`" for p in s["sources"]), str(s["found"]), str(s["files"]), str(s["train"]),
                     str(s["held_out"]), str(s["skipped"]), f"`{s['folder']}`"] for s in results["styles"]]),
            f"Each style is capped at {results['cap'] or 'no limit'} files (lowest sha256 of the content hash, a choice "
            f"unrelated to the split); {results['styles'][1]['dropped_shared']} contents found in both styles were left to "
            f"{names[0]}. Held out: `is_validation(content hash, {results['settings']['val_fraction']})`, the rule "
            "`segue finetune` splits by; after each fine-tune the experiment checked that its validation set is exactly "
            "this held-out set (same data fingerprint, fraction and counts).\n",
            "### Overlap with the base model's training data\n", overlap_text(results)]


def _finetune_section(results: dict) -> list[str]:
    base = results["base"]
    return ["## Fine-tuning\n",
            f"`segue finetune` from `{base['path']}` (sha256 {base['sha256'][:12]}) with "
            f"`{' '.join(f'{k} {v}' for k, v in results['finetune_options'].items())}`"
            + (f" `{results['settings'].get('finetune_args')}`" if results["settings"].get("finetune_args") else "")
            + "; every other option (patience, augmentation...) at finetune's defaults. Validation perplexity: the fine-tune's own "
            "measure on its validation windows (= the held-out pieces), before the first step and at the best step.\n",
            _table(["style", "steps", "training loop", "whole fine-tune", "val ppl: start", "val ppl: best", "command"],
                   [[s, str(f["steps"]), f"{f['loop_seconds'] / 60:.1f} min", f"{f['seconds'] / 60:.1f} min"
                     + (" (reused)" if f["reused"] else ""), _num(f["base_val_perplexity"]), _num(f["val_perplexity"]),
                     f"`{f['command']}`"] for s, f in results["finetune"].items()])]


def _perplexity_section(results: dict) -> list[str]:
    names, keys, label, ppl = results["names"], _keys(results), model_names(results["names"]), results["perplexity"]
    rows = [[f"{s}{part}", str(p["pieces"]), f"{p['tokens']:,}", *[f"{p[k]:.3f}" for k in keys], f"{p['ngram']:.3f}"]
            for s in names for part, p in ((" (all)", ppl[s]), (", unseen by the base too", ppl[s].get("unseen"))) if p]
    unseen = any(ppl[s].get("unseen") for s in names)
    return ["## (1) and (5) Perplexity on the held-out pieces\n",
            "Per token, each piece scored as `BOS piece EOS` over the full vocabulary (`eval_measures.model_perplexity`, windows "
            "sliding by half the context); the models and the n-gram of a row score exactly the same tokens. The n-gram "
            f"(order {results['settings']['ngram_order']}, Kneser-Ney) is trained on the style's training split.\n",
            _table(["held-out pieces", "pieces", "tokens", *[label[k] for k in keys], "n-gram"], rows),
            "The second row of each style keeps only the held-out pieces that were not in the base model's training "
            "split either (see the overlap above): neither the base nor the fine-tunes trained on the music scored there.\n"
            if unseen else ""]


def _metrics_section(results: dict) -> list[str]:
    settings, keys, label = results["settings"], _keys(results), model_names(results["names"])
    text = ["## (2) Style metrics of the continuations\n",
            f"Prompt {settings['prompt_bars']} bars of a held-out piece, continue {settings['bars']} bars (temperature "
            f"{settings['temperature']:g}, top-p {settings['top_p']:g}, {settings['samples']} seeds per clip, the same seeds "
            "for every model). Mean distance of each continuation's metrics to the real continuation's (lower is better; "
            "histograms: total variation, scalars: absolute difference).\n"]
    for s in results["names"]:
        c = results["clips"][s]
        summ = c["summary"]
        text += [f"### {s}: {c['clips']} clips, {summ['base']['continuations']} continuations per model\n",
                 f"Fine-tuned on {s} closer than the base on {len(c['closer_metrics'])} of {len(METRICS)} metrics: "
                 f"{', '.join(c['closer_metrics']) or 'none'}.\n",
                 _table(["metric", "unit", *[label[k] for k in keys]],
                        [[m, METRIC_UNITS[m], *[f"{summ[k]['distances'][m]:.3f}" for k in keys]] for m in METRICS]
                        + [["notes per continuation", "notes", *[f"{summ[k]['mean_notes']:.1f}" for k in keys]],
                           ["empty continuations", "count", *[str(summ[k]["empty"]) for k in keys]]])]
        if c["skipped"]:
            text.append("Held-out files without a clip: " + "; ".join(f"{n} ({w})" for n, w in c["skipped"][:10])
                        + (f"; and {len(c['skipped']) - 10} more" if len(c["skipped"]) > 10 else "") + ".\n")
    return text


def _classifier_section(results: dict) -> list[str]:
    names, keys, label, cls = results["names"], _keys(results), model_names(results["names"]), results["classifier"]
    return ["## (3) Style classifier\n",
            f"Logistic regression on the style metrics of {results['settings']['bars']}-bar windows "
            "(`metrics.train_style_classifier`), trained only on the real training pieces: "
            + ", ".join(f"{s} {cls['train_pieces'][s]} pieces / {cls['train_windows'][s]} windows" for s in names)
            + f". Held-out real windows labelled right: {cls['held_out_accuracy']:.1%}. Share of continuations given each "
            "label (rows: whose continuations, of which style's prompts):\n",
            _table(["prompts", "continuations by", *[f"labelled {s}" for s in names]],
                   [[s, label[k], *[_share(results["clips"][s]["summary"][k]["labels"][x]) for x in names]]
                    for s in names for k in ("reference", *keys)])]


def _originality_section(results: dict) -> list[str]:
    names, keys, label, o = results["names"], _keys(results), model_names(results["names"]), results["originality"]
    held = sum(v.get("held_out_in_base_train", 0) for v in results["base"]["overlap"].values())
    base = (f"; **base data** = the base model's training split re-derived from its manifest ({o['base_data_pieces']} pieces), "
            f"which holds {held} of the held-out pieces themselves: the real continuation's row shows the copying that "
            "follows from that alone" if o["base_data_pieces"] else
            "; the base model's own training data could not be read, so it was not compared")
    rows = [[s, label[k], _share(c["finetune_data"]["copying_fraction"]), str(c["finetune_data"]["max_longest_copy"]),
             _share(c["base_data"]["copying_fraction"]) if "base_data" in c else "-"]
            for s in names for k in ("reference", *keys) for c in [results["clips"][s]["summary"][k]["originality"]]]
    return ["## (4) Originality\n",
            "Longest run of bars of a continuation found verbatim in the data (notes at the same positions with the same "
            "durations; velocity ignored; bars with under 2 notes never count). Copying = a run of >= "
            f"{COPY_THRESHOLD_BARS} bars. Compared against: **fine-tuning data** = the training splits of both styles "
            f"({o['finetune_data_pieces']} pieces, the union of what the two fine-tunes learned from){base}.\n",
            _table(["prompts", "continuations by", "copying: fine-tuning data", "longest", "copying: base data"], rows)]


def overlap_text(results: dict) -> str:
    data = results["base"]["data"]
    head = f"The base model's manifest gives `training.data_source` = `{data['source'] or '(none)'}`. "
    if not data["available"]:
        return head + f"{data.get('why', '')}: the overlap could not be computed.\n"
    fraction = f"`is_validation(hash, {data['val_fraction']:g})`"
    skipped = "; ".join(data["skipped_now"]) or "none"
    head += f"Re-reading it today: {data['files']} files, {data['duplicates']} duplicates, skipped by today's ingest checks: {skipped}. "
    if data.get("excluded"):
        head += (f"The base was trained with `--exclude`: its manifest lists {data['excluded']} pieces it left out, "
                 "and they are left out here too. ")
    if data["fingerprint_matches"]:
        head += ("Those files" + (f" plus {len(data['restored'])} that today's checks skip but the base's did not "
                                  f"({', '.join(data['restored'])})" if data["restored"] else "")
                 + " reproduce the manifest's data fingerprint: exactly the files the base was trained and validated on. ")
    else:
        head += ("They do NOT reproduce the manifest's data fingerprint (the folder changed since the base was trained): "
                 "the counts below are by today's content. ")
    if data["fraction_confirmed"]:
        head += (f"Split by {fraction}: the fraction whose training split has exactly the manifest's "
                 f"`training.train_tokens` ({data['manifest_train_tokens']:,} tokens). ")
    elif data["fraction_confirmed"] is None:
        head += f"Split by {fraction} (--base-val-fraction; the manifest records no training token count to check it). "
    else:
        gaps = ", ".join(f"{float(f):g}: {g:+.1%}" for f, g in data["fraction_token_gaps"].items())
        head += (f"Split by {fraction} (--base-val-fraction), but no fraction tried reproduces the manifest's "
                 f"`training.train_tokens` ({data['manifest_train_tokens']:,}); training tokens relative to it: {gaps}. ")
    head += f"That gives {data['train_pieces']} training and {data['val_pieces']} validation pieces.\n\n"
    rows = [[s, f"{o['held_out_in_base_train']} of {o['held_out']} ({o['held_out_in_base_train'] / max(1, o['held_out']):.0%})",
             str(o["held_out_in_base_val"]), f"{o['train_in_base_train']} of {o['train']}"]
            for s, o in results["base"]["overlap"].items()]
    return head + _table(["style", "held-out pieces in the base's training split", "in the base's validation split",
                          "training pieces in the base's training split"], rows)


def caveats(results: dict) -> str:
    notes = []
    o = results["base"]["overlap"]
    if any(v.get("held_out_in_base_train") for v in o.values()):
        notes.append("The base model was pretrained on most of the held-out pieces (table above): its held-out "
                     "perplexity and continuations are measured on music it has seen, which favours the base. The "
                     "fine-tunes never saw the held-out pieces during fine-tuning; what they gain is focus on one style.")
    notes.append("Continuations are of held-out prompts in the same style, so the prompt already steers every model "
                 "toward the style; the base's labels show how much. The rows with the other style's prompts show "
                 "whether a fine-tune pulls foreign prompts toward its style.")
    notes.append("The classifier sees only the style metrics of 4 bars (pitch classes, rhythm, density, polyphony, "
                 "velocity, range): it may tell these styles apart by texture (four-part chorales vs single-line tunes) "
                 "more than by idiom, and a continuation can be labelled right while sounding wrong.")
    real = {s: results["clips"][s]["summary"]["reference"]["originality"]["finetune_data"]["copying_fraction"]
            for s in results["names"]}
    if any(real.values()):
        notes.append("The real continuations themselves repeat >= 2 bars of the fine-tuning data ("
                     + ", ".join(f"{s} {v:.0%}" for s, v in real.items()) + " of clips): the collections hold the same "
                     "or near-identical phrases on both sides of the split (a tune in two collections, repeated "
                     "cadences), so part of any model's copying count is the data's own repetition.")
    notes.append(f"Continuations of one clip share its prompt and differ only by seed; {results['settings']['clips']} "
                 "clips per style make the means noisy at the level of a few percent.")
    if results["quick"]:
        notes.append("QUICK MODE: a few fine-tuning steps and a handful of clips; the numbers only show that the "
                     "experiment runs end to end.")
    return "".join(f"- {n}\n" for n in notes)


# --- the experiment ---------------------------------------------------------------------------------

def measure_style(style: Style, models: dict[str, Generator], classifier: StyleClassifier, indexes: dict, args) -> dict:
    tokenizer = models["base"].tokenizer
    examples, skipped = candidate_examples(style, tokenizer, args)
    clips, failed = continue_examples(examples, models, args)
    if not clips:
        raise ExperimentError(f"no held-out {style.name} file gave a {args.prompt_bars}+{args.bars}-bar clip: "
                              + "; ".join(f"{n}: {w}" for n, w in (skipped + failed)[:5]))
    measure_clips(clips, classifier, indexes, tokenizer, args)
    summary = summarise_clips(clips, tuple(args.names))
    own, base = summary[f"ft_{style.name}"]["distances"], summary["base"]["distances"]
    return {"clips": len(clips), "skipped": skipped + failed, "summary": summary,
            "closer_metrics": [m for m in METRICS if own[m] < base[m]],
            "per_clip": [{"file": c["example"].name, "offset_bar": c["example"].offset_bar,
                          "measures": c["measures"]} for c in clips]}


def run(args, argv: list[str]) -> dict:
    timings: dict[str, float] = {}
    started = clock = time.perf_counter()
    base_manifest = load_base_manifest(args.base)
    styles = prepare_styles(args)
    for style in styles:
        split_style(style, args.base / TOKENIZER_FILE, args.val_fraction)
        write_held_out(style, args.out / HELD_OUT_DIR / style.name)
    timings["data"] = time.perf_counter() - clock
    if args.prepare_only:
        return {}
    finetunes = {}
    for style in styles:
        finetunes[style.name] = run_finetune(style, args)
        check_finetune(style, finetunes[style.name], base_manifest, args.base, args)
        timings[f"fine-tune {style.name}"] = finetunes[style.name]["seconds"]

    clock = time.perf_counter()
    base_data = base_training_data(base_manifest, args.base / TOKENIZER_FILE, args.base_val_fraction, args.threads)
    models = {"base": Generator.load(args.base, threads=args.threads),
              **{f"ft_{s.name}": Generator.load(finetunes[s.name]["model"], threads=args.threads) for s in styles}}
    tokenizer = models["base"].tokenizer
    indexes = {"finetune_data": CopyIndex([piece.tokens for s in styles for piece in s.split.train], tokenizer)}
    if base_data["available"]:
        indexes["base_data"] = CopyIndex(base_data.pop("train"), tokenizer)
    timings["base data and copy indexes"] = time.perf_counter() - clock

    clock = time.perf_counter()
    seen = base_data.get("train_hashes") if base_data["available"] else None
    ppl = {s.name: perplexities(s, models, args, seen) for s in styles}
    timings["perplexity"] = time.perf_counter() - clock
    clock = time.perf_counter()
    classifier, classifier_info = train_classifier(styles, args.bars)
    timings["classifier"] = time.perf_counter() - clock
    clock = time.perf_counter()
    clips = {s.name: measure_style(s, models, classifier, indexes, args) for s in styles}
    timings["continuations and measures"] = time.perf_counter() - clock
    timings["total"] = time.perf_counter() - started
    results = {
        "command": "python3 bench/style_experiment.py" + (" " + shlex.join(argv) if argv else ""),
        "written": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "names": list(args.names),
        "settings": {k: [str(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v
                     for k, v in vars(args).items()},
        "cap": min(s.found for s in styles) if args.max_files is None else args.max_files,
        "styles": [style_info(s) for s in styles],
        "base": {"path": str(args.base), "sha256": base_manifest.files[MODEL_FILE],
                 "data": {k: v for k, v in base_data.items() if not k.endswith("_hashes")},
                 "overlap": {s.name: overlap(s, base_data) for s in styles}},
        "finetune": {name: {k: str(v) if isinstance(v, Path) else v for k, v in info.items() if k != "manifest"}
                     for name, info in finetunes.items()},
        "finetune_options": finetune_options(args),
        "perplexity": ppl, "classifier": classifier_info, "clips": clips,
        "originality": {"finetune_data_pieces": len(indexes["finetune_data"].pieces),
                        "base_data_pieces": len(indexes["base_data"].pieces) if "base_data" in indexes else 0,
                        "threshold_bars": COPY_THRESHOLD_BARS},
        "timings": timings,
    }
    results["criteria"] = criteria(results)
    return results


def load_base_manifest(base: Path) -> Manifest:
    if not (Path(base) / MANIFEST_FILE).is_file():
        raise ExperimentError(f"base model {base} has no {MANIFEST_FILE}: give a model folder with --base "
                              "(export one with `segue export-onnx`)")
    return load_manifest(base)


def style_info(style: Style) -> dict:
    return {"name": style.name, "sources": [str(p) for p in style.sources], "folder": str(style.folder),
            "found": style.found, "dropped_shared": style.dropped_shared, "files": style.split.files,
            "train": len(style.split.train), "held_out": len(style.split.val), "skipped": len(style.split.skipped),
            "fingerprint": style.fingerprint, "held_out_hashes": style.val_hashes}


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_args(args) -> None:
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if len(set(args.names)) != 2:
        raise ExperimentError("--names must be two different style names")
    if not 0 < args.val_fraction < 1 or not 0 < args.base_val_fraction < 1:
        raise ExperimentError("--val-fraction and --base-val-fraction must be between 0 and 1")
    if min(args.prompt_bars, args.bars, args.clips, args.samples) < 1:
        raise ExperimentError("--prompt-bars, --bars, --clips and --samples must be at least 1")
    if args.samples > 16:
        raise ExperimentError("--samples is at most 16 (one batch of variations per clip)")
    if args.reuse_models and args.fresh:
        raise ExperimentError("--reuse-models and --fresh contradict each other")
    args.base, args.out, args.report = args.base.resolve(), args.out.resolve(), args.report.resolve()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        results = run(args, argv)
        if args.prepare_only:
            print(f"data: {args.out / 'data'}\nheld out: {args.out / HELD_OUT_DIR}")
            return 0
    except (ExperimentError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(_json_ready(results), indent=1) + "\n")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report_text(results))
    print("\n" + summary_table(results))
    for c in results["criteria"]:
        print(f"{'PASS' if c['passed'] else 'FAIL'} {c['id']} {c['criterion']}: {c['detail']}")
    print(f"\nreport: {args.report}\nresults: {args.out / 'results.json'}\ntotal {results['timings']['total'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
