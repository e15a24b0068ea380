"""Measure how well a model continues held-out clips in their style, against two baselines, with a report.

    segue eval --model models/NAME --data DIR [--out runs/eval-NAME] [--prompt-bars 4] [--bars 4]

Writes OUT/report.md (the tables), OUT/metrics.json (the same numbers for scripts), OUT/plots/*.png
and OUT/audio/ (prompt + continuation as .mid and .wav, to listen). The protocol:

1. Split DIR by file content hash exactly as training does (`is_validation(hash, --val-fraction)`).
   The model must have been trained with at least this validation fraction (and on the same
   files' split), or the "held-out" files include its training data.
2. Perplexity on the validation pieces, each scored as `BOS piece EOS` (every token after BOS is
   predicted, over the full vocabulary, no grammar mask), token-weighted over all pieces. The
   model reads windows of its context sliding by `--stride` tokens, each token scored once with at
   least context - stride tokens before it; the n-gram baseline scores the same tokens.
3. For each held-out file (single meter; in hash order, up to --max-clips): a prompt of P bars at a
   seeded random bar offset and the real next B bars as the reference. The model, an n-gram model
   trained on the training split, and "repeat the prompt's last bar" each continue the prompt by B
   bars; each is measured with `training.metrics.style_metrics` and compared with the reference
   (`metric_distances`), averaged over clips.
4. Originality: for every continuation (and for the reference, as the base rate of the data
   itself), the longest run of bars found verbatim in the training split.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import symusic

from engine.clip import Clip, ClipError
from engine.generate import ContinuationRequest, Generator, RequestError
from engine.manifest import ModelError
from engine.midi_file import write_clip
from engine.sampling import SamplingParams
from engine.session import OnnxDecoder
from engine.tokens import TOKENIZER_FILE, ClipTokenizer
from training.data import find_midi_files, ingest_file, is_validation
from training.metrics import (
    HISTOGRAM_METRICS,
    IOI_LABELS,
    METRIC_UNITS,
    SCALAR_METRICS,
    metric_distances,
    style_metrics,
)
from training.ngram import NgramModel, continue_clip
from training.originality import COPY_THRESHOLD_BARS, CopyIndex, copy_summary

SYSTEMS = ("model", "ngram", "repeat")  # compared with "reference", the real continuation
SYSTEM_NAMES = {"reference": "real continuation", "model": "model", "ngram": "n-gram", "repeat": "repeat last bar"}
REPORT_SECTIONS = ("Data", "Perplexity", "Style fidelity", "Metric values", "Originality", "Plots", "Audio", "Clips")


@dataclass
class DataSplit:
    train: list[np.ndarray]  # token ids of the training pieces
    val: list[tuple[Path, str, np.ndarray]]  # (file, content hash, token ids), in hash order
    files: int
    skipped: list[tuple[str, str]]  # (file, reason)
    duplicates: int


def split_folder(folder: Path, tokenizer_file: Path, val_fraction: float) -> DataSplit:
    """Tokenize every MIDI file of `folder` with the model's tokenizer and split it as training does."""
    files = find_midi_files(folder)
    split = DataSplit([], [], len(files), [], 0)
    seen: set[str] = set()
    for path in files:
        result = ingest_file(path, str(tokenizer_file))
        if result.reason:
            split.skipped.append((str(path), result.reason))
        elif result.hash in seen:
            split.duplicates += 1
        else:
            seen.add(result.hash)
            if is_validation(result.hash, val_fraction):
                split.val.append((path, result.hash, result.tokens))
            else:
                split.train.append(result.tokens)
    split.val.sort(key=lambda item: item[1])  # hash order: an arbitrary but stable sample of the folder
    return split


def capped(pieces: list[np.ndarray], max_tokens: int) -> list[np.ndarray]:
    """Whole pieces in order until `max_tokens` (the first piece is cut if it alone is longer)."""
    out, total = [], 0
    for piece in pieces:
        if total + len(piece) > max_tokens:
            if not out:
                out.append(piece[:max_tokens])
            break
        out.append(piece)
        total += len(piece)
    return out


def model_perplexity(decoder: OnnxDecoder, pieces: list[np.ndarray], bos: int, eos: int,
                     stride: int | None = None) -> tuple[float, int]:
    """Perplexity of the ONNX model on `BOS piece EOS` sequences, token-weighted, and the tokens scored."""
    context = decoder.max_context
    stride = min(stride or context // 2, context)
    nll, count = 0.0, 0
    for piece in pieces:
        seq = np.concatenate([[bos], np.asarray(piece, dtype=np.int64), [eos]]).astype(np.int64)
        start, scored = 0, 0  # seq[1..scored] have been scored
        while scored < len(seq) - 1:
            window = seq[start:start + context]
            logits, _ = decoder.forward(window[None, :], decoder.empty_cache(1))
            logits = logits[0].astype(np.float64)  # logits[t] predicts seq[start + t + 1]
            top = logits.max(axis=1, keepdims=True)
            log_z = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]
            predicted = min(len(window), len(seq) - 1 - start)
            t = np.arange(scored - start, predicted)
            nll -= float((logits[t, seq[start + 1 + t]] - log_z[t]).sum())
            count += len(t)
            scored = start + predicted
            start += stride
    if count == 0:
        raise ValueError("no validation tokens to score")
    return math.exp(nll / count), count


@dataclass(frozen=True)
class Example:
    """One held-out clip: the prompt (P bars from beat 0) and the real next bars placed after it."""

    name: str
    offset_bar: int
    prompt: Clip
    reference: Clip


def _window(clip: Clip, first_bar: int, bars: int, shift_bars: int) -> list:
    """Notes starting in bars [first_bar, first_bar + bars), moved `shift_bars` bars earlier, cut at the window's end."""
    beats = clip.beats_per_bar
    start, end = first_bar * beats, (first_bar + bars) * beats
    # max(0, ...): an onset a hair before the bar line (float ticks) must not become a negative start.
    return [replace(n, start=max(0.0, n.start - shift_bars * beats), duration=min(n.duration, end - n.start))
            for n in clip.notes if start - 1e-6 <= n.start < end - 1e-6]


def held_out_example(path: Path, prompt_bars: int, bars: int, rng: np.random.Generator) -> Example | str:
    """A prompt and its real continuation at a random bar offset where both hold notes, or why there is none.

    The file has passed `ingest_file`'s checks; it is read without `read_clip`'s limits, which are
    sized for a DAW clip and would refuse a long piece."""
    try:
        clip = Clip.from_score(symusic.Score.from_midi(path.read_bytes()), name=path.stem)
    except Exception as exc:  # symusic's parse errors have many types; the file is skipped with the reason
        return f"unreadable ({exc})"
    beats = clip.beats_per_bar
    onsets = np.bincount([int(math.floor(n.start / beats + 1e-6)) for n in clip.notes], minlength=clip.bars + 1)
    cumulative = np.concatenate([[0], np.cumsum(onsets)])  # notes starting before bar b: cumulative[b]
    offsets = [o for o in range(0, clip.bars - prompt_bars - bars + 1)
               if cumulative[o + prompt_bars] > cumulative[o] and cumulative[o + prompt_bars + bars] > cumulative[o + prompt_bars]]
    if not offsets:
        return f"no {prompt_bars}+{bars} bars with notes in both prompt and continuation ({clip.bars} bars long)"
    offset = int(rng.choice(offsets))
    prompt = Clip((), clip.tempo, clip.time_signature, prompt_bars * beats, clip.program, clip.is_drum, path.stem)
    prompt = prompt.with_notes(_window(clip, offset, prompt_bars, offset))
    reference = replace(prompt, length=(prompt_bars + bars) * beats).with_notes(
        _window(clip, offset + prompt_bars, bars, offset))
    return Example(path.stem, offset, prompt, reference)


def repeat_last_bar(prompt: Clip, prompt_bars: int, bars: int) -> Clip:
    """The baseline that plays the prompt's last bar again `bars` times."""
    beats = prompt.beats_per_bar
    last = _window(prompt, prompt_bars - 1, 1, 0)
    return prompt.with_notes(replace(n, start=n.start + k * beats) for k in range(1, bars + 1) for n in last)


def continuation_tokens(tokenizer: ClipTokenizer, continuation: Clip, prompt_bars: int, bars: int) -> list[int]:
    """The continuation alone, from its first bar, as the tokens the originality index compares."""
    beats = continuation.beats_per_bar
    alone = replace(continuation.shifted(-prompt_bars * beats), length=bars * beats)
    return tokenizer.encode_clip(alone) if alone.notes else []


def evaluate(args) -> dict:
    """Run the whole protocol; returns everything the report and metrics.json show."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    generator = Generator.load(args.model, threads=args.threads)
    tokenizer = generator.tokenizer
    kinds = tokenizer.kinds
    split = split_folder(args.data, args.model / TOKENIZER_FILE, args.val_fraction)
    if not split.val:
        raise ValueError(f"none of the {split.files} files in {args.data} fell in the validation split at "
                         f"--val-fraction {args.val_fraction}; add files or raise the fraction")
    if not split.train:
        raise ValueError(f"no files of {args.data} are left for the training split the n-gram baseline learns from")
    timings["tokenize"] = time.perf_counter() - clock

    clock = time.perf_counter()
    val_pieces = capped([tokens for _, _, tokens in split.val], args.max_val_tokens)
    model_ppl, scored = model_perplexity(generator.decoder, val_pieces, kinds.bos, kinds.eos, args.stride)
    timings["model perplexity"] = time.perf_counter() - clock
    clock = time.perf_counter()
    ngram = NgramModel.train(split.train, tokenizer.vocab_size, kinds.bos, kinds.eos, args.ngram_order)
    ngram_ppl, ngram_scored = ngram.perplexity(val_pieces)
    assert ngram_scored == scored, "the n-gram and the model must score the same tokens"
    index = CopyIndex(split.train, tokenizer, transpose=args.transpose_invariant)
    timings["n-gram and copy index"] = time.perf_counter() - clock

    clock = time.perf_counter()
    params = SamplingParams(args.temperature, 0, args.top_p)
    clips, skipped = [], []
    for path, file_hash, tokens in split.val:
        if len(clips) >= args.max_clips:
            break
        meters = {int(t) for t in tokens if int(t) in kinds.time_sig}
        if len(meters) > 1:
            skipped.append((path.name, "changes meter (bars would not line up)"))
            continue
        example = held_out_example(path, args.prompt_bars, args.bars, np.random.default_rng([args.seed, int(file_hash[:8], 16)]))
        if isinstance(example, str):
            skipped.append((path.name, example))
            continue
        seed = args.seed + len(clips)
        try:
            model_done = generator.generate(example.prompt, ContinuationRequest(
                bars=args.bars, temperature=args.temperature, top_p=args.top_p, seed=seed))[0]
            ngram_done = continue_clip(ngram, tokenizer, example.prompt, args.bars, params, seed)
        except (RequestError, ClipError) as exc:  # e.g. a meter the vocabulary lacks, a tempo out of range
            skipped.append((path.name, str(exc)))
            continue
        continuations = {
            "reference": example.reference,
            "model": model_done.clip,
            "ngram": ngram_done.clip,
            "repeat": repeat_last_bar(example.prompt, args.prompt_bars, args.bars),
        }
        start = args.prompt_bars * example.prompt.beats_per_bar
        metrics = {name: style_metrics(clip, args.bars, start) for name, clip in continuations.items()}
        clips.append({
            "file": path.name, "offset_bar": example.offset_bar, "example": example, "continuations": continuations,
            "metrics": metrics,
            "distances": {name: metric_distances(metrics[name], metrics["reference"]) for name in SYSTEMS},
            "longest_copy": {name: index.longest_copy(continuation_tokens(tokenizer, clip, args.prompt_bars, args.bars))
                             for name, clip in continuations.items()},
        })
    if not clips:
        raise ValueError(f"no held-out file gave a {args.prompt_bars}+{args.bars}-bar example: "
                         + "; ".join(f"{name}: {why}" for name, why in skipped[:5]))
    timings["continuations and metrics"] = time.perf_counter() - clock
    return {"generator": generator, "split": split, "clips": clips, "skipped": skipped, "timings": timings,
            "perplexity": {"model": model_ppl, "ngram": ngram_ppl, "uniform": float(tokenizer.vocab_size),
                           "tokens": scored, "pieces": len(val_pieces), "ngram_order": args.ngram_order,
                           "ngram_discounts": [level.discount for level in ngram.levels],
                           "training_run": generator.decoder.manifest.metrics.val_perplexity}}


def summarise(clips: list[dict]) -> dict:
    """Per system: mean distance to the reference per metric; per system and the reference: mean metric values."""
    names = ("reference", *SYSTEMS)
    distances = {s: {m: float(np.mean([c["distances"][s][m] for c in clips])) for m in (*HISTOGRAM_METRICS, *SCALAR_METRICS)}
                 for s in SYSTEMS}
    values = {}
    for name in names:
        values[name] = {m: float(np.mean([c["metrics"][name][m] for c in clips])) for m in SCALAR_METRICS}
        for m in HISTOGRAM_METRICS:
            filled = [c["metrics"][name][m] for c in clips if sum(c["metrics"][name][m]) > 0]
            values[name][m] = np.mean(filled, axis=0).tolist() if filled else [0.0] * len(clips[0]["metrics"][name][m])
        values[name]["empty"] = sum(1 for c in clips if c["metrics"][name]["notes"] == 0)
    originality = {name: copy_summary([c["longest_copy"][name] for c in clips]) for name in names}
    return {"distances": distances, "values": values, "originality": originality}


def write_plots(values: dict, folder: Path) -> list[Path]:
    """Grouped bar charts of the mean histograms: the real continuation next to each system."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    charts = [("pitch_class_histogram", "pitch_classes.png", "Pitch-class histogram",
               ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"], "pitch class"),
              ("ioi_histogram", "ioi.png", "Inter-onset intervals", list(IOI_LABELS), "interval (beats)"),
              ("velocity_histogram", "velocity.png", "Velocity distribution",
               [f"{1 + 16 * i}-{min(127, 16 * (i + 1))}" for i in range(len(values["reference"]["velocity_histogram"]))],
               "velocity")]
    names = ("reference", *SYSTEMS)
    paths = []
    for metric, filename, title, labels, xlabel in charts:
        fig, ax = plt.subplots(figsize=(9, 3.6))
        x = np.arange(len(labels))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ax.bar(x + (i - (len(names) - 1) / 2) * width, values[name][metric], width, label=SYSTEM_NAMES[name])
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("share (mean over clips)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / filename, dpi=110)
        plt.close(fig)
        paths.append(folder / filename)
    return paths


def write_audio(clips: list[dict], folder: Path, count: int, soundfont: Path | None) -> tuple[list[tuple[Path, Path | None]], str]:
    """Prompt + continuation as .mid (and .wav) for the first `count` clips: the real one, the model's, the n-gram's.
    Returns (midi, wav or None) pairs and, when rendering failed, the reason."""
    from engine.render import RenderError, render_midi

    written, problem = [], ""
    for number, clip in enumerate(clips[:count], start=1):
        example = clip["example"]
        for name in ("reference", "model", "ngram"):
            continuation = clip["continuations"][name]
            whole = replace(example.prompt, length=example.reference.length).with_notes(example.prompt.notes + continuation.notes)
            midi = write_clip(folder / f"{number:02d}-{example.name}-{name}.mid", whole,
                              track_name=f"{example.name}: prompt + {SYSTEM_NAMES[name]}")
            wav = None
            if not problem:
                try:
                    wav = render_midi(midi, soundfont=soundfont).path
                except RenderError as exc:
                    problem = str(exc)  # one reason is enough; the .mid files are still there to open
            written.append((midi, wav))
    return written, problem


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_report(args, result: dict, summary: dict, plots: list[Path], audio: list, audio_problem: str, out: Path) -> Path:
    """report.md: every number a person needs to judge the model, with the plots and audio linked."""
    split, ppl, clips = result["split"], result["perplexity"], result["clips"]
    manifest = result["generator"].decoder.manifest
    d, v, o = summary["distances"], summary["values"], summary["originality"]
    metrics = (*HISTOGRAM_METRICS, *SCALAR_METRICS)
    wins = {s: sum(d["model"][m] < d[s][m] for m in metrics) for s in ("ngram", "repeat")}
    text = [f"# Segue evaluation: {manifest.name or args.model.name}\n",
            f"Model `{args.model}` ({(manifest.model.parameters or 0) / 1e6:.2f} M parameters, context "
            f"{manifest.model.max_context}) on `{args.data}`. Prompt {args.prompt_bars} bars, continuation "
            f"{args.bars} bars, temperature {args.temperature:g}, top-p {args.top_p:g}, seed {args.seed}; written "
            f"{time.strftime('%Y-%m-%d %H:%M')}. Reproduce: `segue eval {shlex.join(args.argv)}`.\n",
            "## Data\n",
            f"{split.files} MIDI files: {len(split.train)} training and {len(split.val)} validation pieces "
            f"(content hash split at {args.val_fraction:g}), {split.duplicates} duplicates dropped, "
            f"{len(split.skipped)} unreadable. {len(clips)} held-out clips evaluated"
            + (f"; {len(result['skipped'])} validation files gave no clip (listed under Clips)." if result["skipped"] else ".")
            + " The model must have been trained with a validation fraction of at least this much, or some of these "
              "pieces were in its training data.\n",
            "## Perplexity\n",
            f"Per token on {ppl['tokens']:,} validation tokens ({ppl['pieces']} pieces, each `BOS piece EOS`, every "
            f"token after BOS scored over the full vocabulary; lower is better). The model reads windows of its "
            f"context sliding by {args.stride or manifest.model.max_context // 2} tokens.\n",
            _table(["", "perplexity"], [
                ["model", f"{ppl['model']:.3f}"],
                [f"n-gram (order {ppl['ngram_order']}, interpolated Kneser-Ney, training split)", f"{ppl['ngram']:.3f}"],
                ["uniform over the vocabulary", f"{ppl['uniform']:.0f}"],
            ] + ([["model, as recorded by its training run (its own split)", f"{ppl['training_run']:.3f}"]]
                 if ppl.get("training_run") else [])),
            "## Style fidelity\n",
            "Distance of each continuation's metrics to the real continuation's, mean over clips (lower is better). "
            "Histograms: total variation distance (0 identical, 1 disjoint); scalars: absolute difference in their "
            f"unit. The model is closer than the n-gram on {wins['ngram']} of {len(metrics)} metrics and closer than "
            f"repeat-last-bar on {wins['repeat']}.\n",
            _table(["metric", "unit", *[SYSTEM_NAMES[s] for s in SYSTEMS]],
                   [[m, METRIC_UNITS[m], *[f"{d[s][m]:.3f}" for s in SYSTEMS]] for m in metrics]),
            "## Metric values\n",
            "Mean over clips of each metric itself (the histograms are in the plots). Empty continuations count "
            "as zeros.\n",
            _table(["metric", "unit", *[SYSTEM_NAMES[s] for s in ("reference", *SYSTEMS)]],
                   [[m, METRIC_UNITS[m], *[f"{v[s][m]:.3f}" for s in ("reference", *SYSTEMS)]] for m in SCALAR_METRICS]
                   + [["empty continuations", "clips", *[str(v[s]["empty"]) for s in ("reference", *SYSTEMS)]]]),
            "## Originality\n",
            f"Longest run of consecutive bars found verbatim in the training split ({len(split.train)} pieces): same "
            "notes at the same positions with the same durations, velocity and instrument ignored"
            + (", in any transposition" if args.transpose_invariant else "")
            + "; bars with fewer than 2 notes never count. The real continuation shows how much the data repeats itself.\n",
            _table(["", "mean longest copy (bars)", "longest", f"copying >= {COPY_THRESHOLD_BARS} bars"],
                   [[SYSTEM_NAMES[s], f"{o[s]['mean_longest_copy']:.2f}", str(o[s]["max_longest_copy"]),
                     f"{o[s]['copying_fraction']:.0%}"] for s in ("reference", *SYSTEMS)]),
            "## Plots\n",
            *[f"![{p.stem}](plots/{p.name})\n" for p in plots],
            "## Audio\n",
            "Prompt followed by each continuation, rendered with FluidSynth (General MIDI soundfont).\n"
            + (f"\nRendering failed: {audio_problem}\n" if audio_problem else ""),
            "".join(f"- [{midi.name}](audio/{midi.name})" + (f" — [{wav.name}](audio/{wav.name})" if wav else "") + "\n"
                    for midi, wav in audio) or "No audio (--audio 0).\n",
            "## Clips\n",
            _table(["file", "prompt bars", "notes: real / model / n-gram / repeat", "longest copy: model / n-gram"],
                   [[c["file"], f"{c['offset_bar'] + 1}-{c['offset_bar'] + args.prompt_bars}",
                     " / ".join(str(c["metrics"][s]["notes"]) for s in ("reference", *SYSTEMS)),
                     f"{c['longest_copy']['model']} / {c['longest_copy']['ngram']}"] for c in clips]),
            *(["\nNot evaluated: " + "; ".join(f"{name} ({why})" for name, why in result["skipped"]) + "\n"]
              if result["skipped"] else []),
            "\nTime: " + ", ".join(f"{k} {s:.2f} s" for k, s in result["timings"].items()) + ".\n"]
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segue eval", description="Measure how well a model continues held-out clips of a "
                                "MIDI folder in their style, next to an n-gram model and a repeat-the-last-bar baseline; "
                                "writes a report with plots and audio.")
    p.add_argument("--model", type=Path, required=True, help="model folder (models/NAME)")
    p.add_argument("--data", type=Path, required=True, help="folder of MIDI files; its validation split is held out")
    p.add_argument("--out", type=Path, help="report folder (default runs/eval-NAME)")
    p.add_argument("--prompt-bars", type=int, default=4, help="bars of real music the model continues (default 4)")
    p.add_argument("--bars", type=int, default=4, help="bars generated and compared with the real ones (default 4)")
    p.add_argument("--max-clips", type=int, default=32, help="held-out clips to continue (default 32)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation share of the content-hash split (default 0.2)")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature for the model and the n-gram")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling for the model and the n-gram")
    p.add_argument("--seed", type=int, default=0, help="seeds the bar offsets and the sampling")
    p.add_argument("--ngram-order", type=int, default=6, help="n-gram order of the baseline (default 6)")
    p.add_argument("--stride", type=int, help="perplexity window stride in tokens (default half the model context)")
    p.add_argument("--max-val-tokens", type=int, default=200_000, help="cap on validation tokens scored for perplexity")
    p.add_argument("--transpose-invariant", action="store_true", help="originality: also count transposed copies")
    p.add_argument("--audio", type=int, default=3, help="clips to render to audio (default 3; 0 = none)")
    p.add_argument("--soundfont", type=Path, help="soundfont for the audio (default the Debian General MIDI one)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the model (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # for the report's "reproduce" line
    if args.prompt_bars < 1 or args.bars < 1:
        print("error: --prompt-bars and --bars must be at least 1", file=sys.stderr)
        return 1
    out = args.out or Path("runs") / f"eval-{args.model.resolve().name}"
    if not args.data.is_dir():
        print(f"error: data folder {args.data} does not exist", file=sys.stderr)
        return 1
    try:
        result = evaluate(args)
    except (ModelError, ValueError, ClipError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(result["clips"])
    plots = write_plots(summary["values"], out / "plots")
    clock = time.perf_counter()
    audio, audio_problem = write_audio(result["clips"], out / "audio", args.audio, args.soundfont) if args.audio else ([], "")
    result["timings"]["audio"] = time.perf_counter() - clock
    if audio_problem:
        print(f"warning: audio not rendered: {audio_problem}", file=sys.stderr)
    report = write_report(args, result, summary, plots, audio, audio_problem, out)
    (out / "metrics.json").write_text(json.dumps({
        "model": str(args.model), "data": str(args.data),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "argv"},
        "perplexity": result["perplexity"], **summary, "timings": result["timings"],
        "clips": [{"file": c["file"], "offset_bar": c["offset_bar"], "metrics": c["metrics"], "distances": c["distances"],
                   "longest_copy": c["longest_copy"]} for c in result["clips"]],
        "skipped": result["skipped"],
    }, indent=1) + "\n")
    ppl = result["perplexity"]
    print(f"perplexity: model {ppl['model']:.3f}, n-gram {ppl['ngram']:.3f} on {ppl['tokens']:,} tokens; "
          f"{len(result['clips'])} clips\n{report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
