"""What int4 decode steps cost and gain: perplexity and a decode step, int8 against int4, on one model folder.

    python bench/bench_int4.py models/default --val-data DIR          # DIR: python -m training.corpus ... --out DIR
    python bench/bench_int4.py WORK/seed/shared-buffer               # a step only (no validation data)

`decode_weights="int4"` serves the int8 variant's decode steps from its weights quantized again to int4 in
groups of 64 rows (engine/native_matmul4_kernel.h); prompts stay on the int8 weights. Quality: the
perplexity of the validation files (export-onnx's own measure and tokens: export/quantize.py) with every
position computed on the int4 weights (the decoder's prompt session set aside, so the windows run on the
decode session), against the int8 engine's on the same tokens; the int4 figure is thus what the
int4 weights cost a decode step, whose history the int8 weights wrote. Speed: a decode step after a prefill
of 256 and 512 positions, both ways alternating, median of --rounds, process CPU time, one thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import bench_setup  # noqa: F401,E402  (one thread, before numpy / onnxruntime load)
import numpy as np  # noqa: E402

from engine.machine import cpu_name, vector_extensions  # noqa: E402
from engine.manifest import TOKENIZER_FILE  # noqa: E402
from engine.session import OnnxDecoder  # noqa: E402
from engine.tokens import ClipTokenizer  # noqa: E402


def step_ms(decoder: OnnxDecoder, context: int, steps: int = 32) -> float:
    ids = np.random.default_rng(1).integers(0, decoder.vocab_size, (1, context))
    _, cache = decoder.step(ids, decoder.empty_cache())
    token = ids[:, :1]
    started = time.process_time()
    for _ in range(steps):
        _, cache = decoder.step(token, cache)
    return (time.process_time() - started) / steps * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a model folder with an int8 variant")
    parser.add_argument("--val-data", type=Path, help="a folder of MIDI files: its validation split is scored")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--max-tokens", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)

    int8 = OnnxDecoder.load(args.model, variant="int8")
    int4 = OnnxDecoder.load(args.model, variant="int8", decode_weights="int4")
    if int4.decode_weights != "int4":
        print(f"no int4 decode steps here ({int4.attention}); nothing to compare", file=sys.stderr)
        return 1
    print(f"{args.model}: {int8.n_layer} layers x {int8.n_head * int8.head_dim}; CPU {cpu_name()} "
          f"({', '.join(vector_extensions())})\n")
    contexts = [c for c in (256, 512) if c < int8.max_context - 40]
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for name, decoder in (("int8", int8), ("int4", int4)):
            for context in contexts:
                times.setdefault((name, context), []).append(step_ms(decoder, context))
    print("| decode step (ms, median) | " + " | ".join(f"@{c}" for c in contexts) + " |")
    print("|---|" + "---|" * len(contexts))
    for name in ("int8", "int4"):
        print(f"| {name} | " + " | ".join(f"{statistics.median(times[(name, c)]):.3f}" for c in contexts) + " |")
    print("| int8 / int4 | " + " | ".join(
        f"{statistics.median(times[('int8', c)]) / statistics.median(times[('int4', c)]):.2f}x" for c in contexts) + " |")

    if args.val_data is None:
        return 0
    from export.quantize import every_run_on_decode_steps, validation_pieces
    from training.eval_measures import model_perplexity

    pieces = validation_pieces(args.val_data, args.model / TOKENIZER_FILE, args.val_fraction, args.max_tokens)
    kinds = ClipTokenizer.from_file(args.model / TOKENIZER_FILE).kinds
    reference, tokens = model_perplexity(int8, pieces, kinds.bos, kinds.eos)
    with every_run_on_decode_steps(int4):  # every window on the int4 weights
        got, _ = model_perplexity(int4, pieces, kinds.bos, kinds.eos)
    print(f"\nvalidation perplexity on {tokens} tokens of {args.val_data} (fraction {args.val_fraction:g}): "
          f"int8 {reference:.5f}, int4 {got:.5f} ({(got / reference - 1) * 100:+.2f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
