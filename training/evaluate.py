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
5. DAW measures (training/daw_measures.py), per GM instrument family and drums: how far the
   continuation's pitch sits from the real bars, pitch-class agreement, notes per bar and voices,
   dynamics, drum kit and onset-grid agreement, and bars copied from the clip, for the model, the
   n-gram, "repeat the last bar" and "loop the clip", with the verdicts of the DAW criteria.

This module is the command and the protocol's order; the held-out selection is
training/held_out.py, the measures training/eval_measures.py (with training/metrics.py,
training/ngram.py, training/originality.py), the report training/eval_report.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from engine.clip import Clip, ClipError
from engine.generate import ContinuationRequest, Generator, RequestError
from engine.manifest import ModelError
from engine.sampling import SamplingParams
from engine.tokens import TOKENIZER_FILE, ClipTokenizer
from training import daw_measures
from training.daw_measures import score_example
from training.eval_measures import SYSTEMS, continuation_tokens, model_perplexity, repeat_last_bar, summarise
from training.eval_report import write_audio, write_daw_plots, write_metrics, write_plots, write_report
from training.held_out import Example, capped, held_out_examples, split_folder
from training.metrics import metric_distances, style_metrics
from training.ngram import NgramModel, continue_clip
from training.originality import CopyIndex


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
    train_pieces = [piece.tokens for piece in split.train]
    timings["tokenize"] = time.perf_counter() - clock

    clock = time.perf_counter()
    val_pieces = capped([piece.tokens for piece in split.val], args.max_val_tokens)
    model_ppl, scored = model_perplexity(generator.decoder, val_pieces, kinds.bos, kinds.eos, args.stride)
    timings["model perplexity"] = time.perf_counter() - clock
    clock = time.perf_counter()
    ngram = NgramModel.train(train_pieces, tokenizer.vocab_size, kinds.bos, kinds.eos, args.ngram_order)
    ngram_ppl, ngram_scored = ngram.perplexity(val_pieces)
    assert ngram_scored == scored, "the n-gram and the model must score the same tokens"
    index = CopyIndex(train_pieces, tokenizer, transpose=args.transpose_invariant)
    timings["n-gram and copy index"] = time.perf_counter() - clock

    clock = time.perf_counter()
    params = SamplingParams(args.temperature, 0, args.top_p)
    clips, skipped = [], []
    examples = held_out_examples(split.val, tokenizer, args.prompt_bars, args.bars, args.seed, skipped)
    while len(clips) < args.max_clips and (example := next(examples, None)) is not None:
        seed = args.seed + len(clips)
        try:
            continuations = continue_example(example, generator, ngram, params, seed, args)
        except (RequestError, ClipError) as exc:  # e.g. a meter the vocabulary lacks, a tempo out of range
            skipped.append((example.path.name, str(exc)))
            continue
        clips.append(measure_example(example, continuations, index, tokenizer, args))
    if not clips:
        raise ValueError(f"no held-out file gave a {args.prompt_bars}+{args.bars}-bar example: "
                         + "; ".join(f"{name}: {why}" for name, why in skipped[:5]))
    timings["continuations and metrics"] = time.perf_counter() - clock
    return {"generator": generator, "split": split, "clips": clips, "skipped": skipped, "timings": timings,
            "perplexity": {"model": model_ppl, "ngram": ngram_ppl, "uniform": float(tokenizer.vocab_size),
                           "tokens": scored, "pieces": len(val_pieces), "ngram_order": args.ngram_order,
                           "ngram_discounts": [level.discount for level in ngram.levels],
                           "training_run": generator.decoder.manifest.metrics.val_perplexity}}


def continue_example(example: Example, generator: Generator, ngram: NgramModel, params: SamplingParams, seed: int,
                     args) -> dict[str, Clip]:
    """The real continuation and each system's, all placed after the prompt."""
    model_done = generator.generate(example.prompt, ContinuationRequest(
        bars=args.bars, temperature=args.temperature, top_p=args.top_p, seed=seed))[0]
    ngram_done = continue_clip(ngram, generator.tokenizer, example.prompt, args.bars, params, seed)
    return {
        "reference": example.reference,
        "model": model_done.clip,
        "ngram": ngram_done.clip,
        "repeat": repeat_last_bar(example.prompt, args.prompt_bars, args.bars),
    }


def measure_example(example: Example, continuations: dict[str, Clip], index: CopyIndex, tokenizer: ClipTokenizer,
                    args) -> dict:
    """One clip's row: every continuation's style metrics, its distances to the real one, its longest copy."""
    start = args.prompt_bars * example.prompt.beats_per_bar
    metrics = {name: style_metrics(clip, args.bars, start) for name, clip in continuations.items()}
    return {
        "file": example.path.name, "offset_bar": example.offset_bar, "example": example,
        "continuations": continuations, "metrics": metrics,
        "distances": {name: metric_distances(metrics[name], metrics["reference"]) for name in SYSTEMS},
        "longest_copy": {name: index.longest_copy(continuation_tokens(tokenizer, clip, args.prompt_bars, args.bars))
                         for name, clip in continuations.items()},
        "daw": score_example(example.prompt, continuations["reference"], args.bars,
                             {daw_measures.MODEL: continuations["model"], "n-gram": continuations["ngram"]}),
    }


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
    summary["daw"] = daw_measures.summarize(row for clip in result["clips"] for row in clip["daw"])
    plots = write_plots(summary["values"], out / "plots") + write_daw_plots(summary["daw"], out / "plots")
    clock = time.perf_counter()
    audio, audio_problem = write_audio(result["clips"], out / "audio", args.audio, args.soundfont) if args.audio else ([], "")
    result["timings"]["audio"] = time.perf_counter() - clock
    if audio_problem:
        print(f"warning: audio not rendered: {audio_problem}", file=sys.stderr)
    report = write_report(args, result, summary, plots, audio, audio_problem, out)
    write_metrics(args, result, summary, out)
    ppl = result["perplexity"]
    print(f"perplexity: model {ppl['model']:.3f}, n-gram {ppl['ngram']:.3f} on {ppl['tokens']:,} tokens; "
          f"{len(result['clips'])} clips\n{report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
