"""One of the engine's switches on against off, in the engine, in one process: the int8 variant loaded twice,
once as the engine serves it and once with the switch at 0.

    python bench/bench_switch.py models/default                                 # SEGUE_INT8_CACHE
    python bench/bench_switch.py FOLDER --switch SEGUE_FOLD_LAYERS --contexts 64 256 512 896 --repeats 9
    python bench/bench_switch.py models/default --val-data ~/.cache/segue/default-v3-data   # + perplexity

Switches: SEGUE_INT8_CACHE (the int8 variant's KV cache in int8 rows, segue.CausalAttention8; at 0 in
float16), SEGUE_HALF_CACHE (in float16, segue.CausalAttention16; run with SEGUE_INT8_CACHE=0 set),
SEGUE_FOLD_LAYERS (norms, GELUs and residual adds folded into the native int8 matmuls),
SEGUE_NATIVE_MATMUL (the native int8 matmuls themselves; bench/bench_native_matmul.py adds batches),
SEGUE_NATIVE_PROMPTS (prompts on the native int8 matmuls too, where native_matmul.takes_prompts; at 0 on
a second session with ONNX Runtime's: compare the prefill rows), SEGUE_MATMUL_STREAMS (a decode step's
row reads four blocks of weights at once; at 0 one after another).

The two decoders alternate inside each round: for each context the median ms of a decode step (32
steps after a prefill of the rest, process CPU time, one thread) and the ratio; then prefills of 256
and 512 tokens; then how far apart their logits are along the way (max |difference| and how often the
argmax agrees). With --val-data, the perplexity of both (and of fp32) on the validation files as
`export-onnx` chooses them: what the change costs in quality.
"""

from __future__ import annotations

import bench_setup  # noqa: F401  (first: one thread, this checkout on sys.path)

# isort: split
import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from engine import native_attention, native_matmul
from engine.machine import cpu_name
from engine.session import OnnxDecoder

SWITCHES = (native_attention.INT8_SWITCH, native_attention.HALF_SWITCH, native_matmul.FOLD_SWITCH, native_matmul.SWITCH,
            native_matmul.PROMPTS_SWITCH, native_matmul.STREAMS_SWITCH)
CACHE_SWITCHES = {native_attention.INT8_SWITCH: np.int8, native_attention.HALF_SWITCH: np.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a model folder with an int8 variant")
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 512, 896])
    parser.add_argument("--steps", type=int, default=32, help="decode steps per sample")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--switch", default=native_attention.INT8_SWITCH, choices=SWITCHES)
    parser.add_argument("--val-data", type=Path, help="a folder of MIDI files: also the perplexity of both")
    args = parser.parse_args(argv)

    os.environ.pop(args.switch, None)
    on = OnnxDecoder.load(args.folder, variant="int8")
    os.environ[args.switch] = "0"
    off = OnnxDecoder.load(args.folder, variant="int8")
    del os.environ[args.switch]
    if args.switch in CACHE_SWITCHES and on.cache_dtype != CACHE_SWITCHES[args.switch]:
        print(f"no {np.dtype(CACHE_SWITCHES[args.switch])} cache here ({on.attention}): nothing to compare")
        return 1
    if args.switch not in CACHE_SWITCHES and not on.native_matmuls:
        print(f"no native int8 matmuls here ({on.attention}): nothing to compare")
        return 1
    if args.switch == native_matmul.PROMPTS_SWITCH and not on.native_prompts:
        print("prompts stay on ONNX Runtime's int8 matmuls on this CPU (native_matmul.takes_prompts): nothing to compare")
        return 1
    contexts = [c for c in args.contexts if args.steps < c < on.max_context]
    print(f"{cpu_name()}; {args.folder} int8, {on.attention}; {args.switch} on against 0; median of {args.repeats} "
          "rounds, process CPU time\n")
    ids = np.random.default_rng(0).integers(0, on.vocab_size, size=(1, max([*contexts, 512])))
    logits: dict[str, list[np.ndarray]] = {"on": [], "off": []}

    def decode_ms(decoder: OnnxDecoder, context: int, keep: list[np.ndarray]) -> float:
        _, cache = decoder.step(ids[:, :context - args.steps], decoder.empty_cache())
        token = np.zeros((1, 1), dtype=np.int64)
        started = time.process_time()
        for _ in range(args.steps):
            got, cache = decoder.step(token, cache)
            keep.append(got)
        return (time.process_time() - started) / args.steps * 1e3

    def prefill_ms(decoder: OnnxDecoder, tokens: int, keep: list[np.ndarray]) -> float:
        started = time.process_time()
        got, _ = decoder.step(ids[:, :tokens], decoder.empty_cache())
        keep.append(got)
        return (time.process_time() - started) * 1e3

    print(f"| run | on (ms) | {args.switch}=0 (ms) | off / on |")
    print("|---|---|---|---|")
    cases = [(f"decode step at {c}", lambda d, k, c=c: decode_ms(d, c, k)) for c in contexts]
    cases += [(f"prefill {n}", lambda d, k, n=n: prefill_ms(d, n, k)) for n in (256, 512)]
    for name, measure in cases:
        mine, theirs = [], []
        for round_ in range(args.repeats):
            keep_on: list[np.ndarray] = []
            keep_off: list[np.ndarray] = []
            mine.append(measure(on, keep_on))
            theirs.append(measure(off, keep_off))
            if round_ == 0:
                logits["on"] += keep_on
                logits["off"] += keep_off
        a, b = statistics.median(mine), statistics.median(theirs)
        print(f"| {name} | {a:.3f} | {b:.3f} | {b / a:.2f}x |", flush=True)
    got, want = np.concatenate(logits["on"]), np.concatenate(logits["off"])
    print(f"\nlogits over those runs: max |on - off| {np.abs(got - want).max():.2e}, "
          f"argmax the same for {(got.argmax(-1) == want.argmax(-1)).mean() * 100:.1f} % of {len(got)} positions")

    if args.val_data is not None:
        from engine.manifest import TOKENIZER_FILE
        from engine.tokens import ClipTokenizer
        from export.quantize import perplexity, validation_pieces

        pieces = validation_pieces(args.val_data, args.folder / TOKENIZER_FILE, 0.05, 50_000)
        kinds = ClipTokenizer.from_file(args.folder / TOKENIZER_FILE).kinds
        fp32 = OnnxDecoder.load(args.folder, variant="fp32")
        print(f"\nperplexity on {args.val_data} (validation files at fraction 0.05, as export-onnx picks them):")
        for name, decoder in (("int8", on), (f"int8, {args.switch}=0", off), ("fp32", fp32)):
            ppl, tokens = perplexity(decoder, pieces, kinds.bos, kinds.eos)
            print(f"  {name}: {ppl:.5f} over {tokens} tokens", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
