"""Training-step time of one model shape: fp32 vs bf16 autocast, and what attention dropout costs.

    python bench/bench_train_step.py --preset small --context 512 --batch-size 16 --threads 2

One forward + backward + clipped AdamW step on random tokens, the median of --repeats after a
warm-up, all variants side by side in one run. "attention dropout" re-runs the old code path
(dropout_p > 0 in scaled_dot_product_attention), which sends PyTorch's CPU kernel to its slow,
materialising fallback; the shipped model has no attention-weight dropout for that reason.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import training.model as model_module  # noqa: E402
from engine.tokens import ClipTokenizer  # noqa: E402
from training.loop import make_optimizer, training_dtype, window_loss  # noqa: E402
from training.model import GPT, PRESETS, preset  # noqa: E402


def step_seconds(model: GPT, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None, repeats: int) -> float:
    optimizer = make_optimizer(model, 1e-4, 0.1)
    times = []
    for i in range(repeats + 1):  # the first step warms up allocators and kernels
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = window_loss(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if i:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    vocab = ClipTokenizer.default().vocab_size
    model = GPT(preset(args.preset, vocab, max_context=args.context, dropout=0.1)).train()
    x = torch.randint(0, vocab, (args.batch_size, args.context))
    y = torch.randint(0, vocab, (args.batch_size, args.context))
    native = training_dtype("auto", torch.device("cpu")) is not None
    sdpa = F.scaled_dot_product_attention

    def with_attention_dropout(*a, **k):
        return sdpa(*a, **{**k, "dropout_p": 0.1})

    rows = []
    for name, dtype, attention_dropout in [("fp32 + attention dropout (old)", None, True), ("fp32", None, False),
                                           ("bf16 autocast", torch.bfloat16, False)]:
        model_module.F.scaled_dot_product_attention = with_attention_dropout if attention_dropout else sdpa
        try:
            rows.append((name, step_seconds(model, x, y, dtype, args.repeats)))
        finally:
            model_module.F.scaled_dot_product_attention = sdpa
    print(f"{args.preset}, {model.num_parameters() / 1e6:.2f} M parameters, {args.batch_size} x {args.context} tokens, "
          f"{args.threads} thread(s), native bf16: {'yes' if native else 'no (bf16 is emulated and slow here)'}\n")
    print("| variant | step (s) | tokens/s | speed vs the old step |\n|---|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {args.batch_size * args.context / seconds:,.0f} | {rows[0][1] / seconds:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
