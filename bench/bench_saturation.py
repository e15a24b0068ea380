"""What the int8 variant loses on a CPU without VNNI, where ONNX Runtime's int8 matmuls saturate.

    python bench/bench_saturation.py models/default --val-data DIR            # the whole validation set
    python bench/bench_saturation.py models/default --val-data DIR --max-tokens 5000

Why: an int8 matmul of uint8 activations by int8 weights (ONNX Runtime's U8S8, what `export-onnx
--quantize int8` writes) is exact on a CPU with VNNI or AMX (vpdpbusd sums four products into int32), and
so are the engine's native int8 kernels on every path (engine/native_matmul_kernel.h). ONNX Runtime's
kernels for AVX2 and for AVX-512 without VNNI (MLAS's U8S8 QGEMM and QGEMV: an Intel Core before Ice Lake,
a Xeon before Cascade Lake, an AMD CPU before Zen 4) multiply with vpmaddubsw, which adds each pair of
neighbouring products, q[2i] w[2i] + q[2i+1] w[2i+1], into a saturating int16: a pair above 32,767 is cut
there. On such a CPU the engine runs prompts on ONNX Runtime's matmuls (native_matmul.takes_prompts), and
every step where the native library cannot be built; so this is the error a prefill there carries.

How: the model is rebuilt in torch from its fp32 graph (training/from_onnx.py) and each of its linear
layers computes with the int8 variant's own quantized weights, its activations quantized as ONNX Runtime's
DynamicQuantizeLinear does (one scale for each run of `--runs` rows: 64, a prompt's run there; 1, a decode
step's row). The exact int32 sums come from a matmul; a pair can only pass 32,767 where its two weights'
magnitudes add up to more than 32,767 / 255 (128.5), so only those pairs are recomputed with the int16 cut,
and the difference is added. Perplexity is the engine's measure (training.eval_measures.model_perplexity,
windows of the model's context sliding by half) on the validation files `export-onnx` would pick.
"""

from __future__ import annotations

import bench_setup  # noqa: F401  (first: one thread, this checkout on sys.path)

# isort: split
import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.machine import cpu_name
from engine.manifest import TOKENIZER_FILE
from engine.tokens import ClipTokenizer

INT16_MAX, INT16_MIN = 32767, -32768
PAIR_LIMIT = INT16_MAX / 255  # |w0| + |w1| at or below this cannot saturate whatever the uint8 activations


@dataclass
class Counts:
    """Saturated pairs and rows (a row: one position's activations into one matmul)."""
    pairs: int = 0
    saturated: int = 0
    rows: int = 0
    rows_hit: int = 0
    by_layer: dict[str, int] = field(default_factory=dict)


@dataclass
class QuantizedLinear:
    """One linear layer on the int8 variant's weights ([in, out] int8, zero point, scale) and its bias."""
    name: str
    weights: np.ndarray
    zero: int
    scale: float
    bias: torch.Tensor

    def __post_init__(self) -> None:
        w = self.weights.astype(np.int64)
        self.w = torch.from_numpy(w)
        self.w_float = self.w.double()
        self.column_sums = self.w.sum(0)
        pairs = np.abs(w[0::2]) + np.abs(w[1::2]) if w.shape[0] % 2 == 0 else None
        if pairs is None:
            raise ValueError(f"{self.name}: an odd inner dimension ({w.shape[0]})")
        # The (pair, column) places that can saturate: few, so the int16 cut is recomputed only there.
        self.pair_index, self.column_index = (torch.from_numpy(i) for i in np.nonzero(pairs > PAIR_LIMIT))
        self.even = self.w[0::2][self.pair_index, self.column_index]
        self.odd = self.w[1::2][self.pair_index, self.column_index]

    def __call__(self, x: torch.Tensor, run: int, saturate: bool, counts: Counts) -> torch.Tensor:
        shape = x.shape
        q, zero, scale = quantize(x.reshape(-1, shape[-1]), run)
        exact = self.integer_product(q, zero, saturate, counts)
        y = exact.double() * (scale * self.scale) + self.bias.double()
        return y.float().reshape(*shape[:-1], -1)

    def integer_product(self, q: torch.Tensor, zero: torch.Tensor, saturate: bool, counts: Counts) -> torch.Tensor:
        """MatMulInteger's sums of (q - zero)(w - w_zero) for uint8 rows q [rows, in] and their zero points
        [rows, 1]; with `saturate`, each pair of neighbouring products q w cut to int16 first, as vpmaddubsw."""
        rows, inner = q.shape
        # Exact in float64: |a sum| <= 255 * 128 * inner, far below 2^53, and BLAS where int64 has none.
        sums = (q.double() @ self.w_float).round().long()
        if saturate and len(self.pair_index):
            pairs = q[:, 2 * self.pair_index] * self.even + q[:, 2 * self.pair_index + 1] * self.odd  # [rows, places]
            cut = pairs.clamp(INT16_MIN, INT16_MAX)
            hit = cut != pairs
            sums.index_add_(1, self.column_index, cut - pairs)
            counts.saturated += int(hit.sum())
            counts.rows_hit += int(hit.any(dim=1).sum())
            counts.by_layer[self.name] = counts.by_layer.get(self.name, 0) + int(hit.sum())
        counts.pairs += rows * (inner // 2) * self.w.shape[1]
        counts.rows += rows
        return sums - zero * self.column_sums - self.zero * q.sum(1, keepdim=True) + inner * zero * self.zero


def quantize(rows: torch.Tensor, run: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DynamicQuantizeLinear over each run of `run` rows, in float32 as ONNX Runtime computes it: uint8
    values, and each row's zero point and scale."""
    rows = rows.float()
    groups = torch.arange(rows.shape[0]) // run
    count = int(groups[-1]) + 1
    low = torch.zeros(count).scatter_reduce(0, groups, rows.min(1).values, "amin")  # the range holds zero
    high = torch.zeros(count).scatter_reduce(0, groups, rows.max(1).values, "amax")
    scale = (high - low) / 255
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-low / scale).clamp(0, 255)  # torch.round: half to even, as ONNX Runtime's
    q = (torch.round(rows / scale[groups, None]) + zero[groups, None]).clamp(0, 255)
    return q.long(), zero[groups, None].long(), scale[groups, None].double()


def load(folder: Path):
    """The torch model rebuilt from the fp32 graph, and its linear layers on the int8 variant's weights."""
    import onnx
    from onnx import numpy_helper

    from training.from_onnx import load_model_folder

    model, manifest, _ = load_model_folder(folder)
    graph = onnx.load(str(folder / "model.int8.onnx")).graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    integer_matmuls = [node for node in graph.node if node.op_type == "MatMulInteger"]
    linears = [(f"{i}.{name}", layer) for i, block in enumerate(model.blocks)
               for name, layer in (("qkv", block.attn.qkv), ("proj", block.attn.proj), ("fc1", block.mlp[0]),
                                   ("fc2", block.mlp[2]))]
    if len(integer_matmuls) != len(linears):
        raise SystemExit(f"{len(integer_matmuls)} MatMulInteger nodes for {len(linears)} linear layers: not an "
                         "export-onnx int8 graph")
    quantized = []
    for node, (name, layer) in zip(integer_matmuls, linears, strict=True):  # both in the layers' order
        weights, zero = constants[node.input[1]], int(constants[node.input[3]])
        scale = float(constants[node.input[1].removesuffix("_quantized") + "_scale"])
        reference = layer.weight.detach().numpy().T
        if weights.shape != reference.shape or np.abs((weights.astype(np.float64) - zero) * scale - reference).max() > scale:
            raise SystemExit(f"{name}: the int8 weights of {node.name} are not this layer's")
        quantized.append((layer, QuantizedLinear(name, weights, zero, scale, layer.bias.detach())))
    return model, manifest, quantized


class Simulated:
    """What model_perplexity needs of a decoder: the torch model, every linear layer int8 as configured."""

    def __init__(self, model, max_context: int):
        self.model, self.max_context = model, max_context

    def empty_cache(self, batch: int):
        return None

    def forward(self, ids: np.ndarray, cache) -> tuple[np.ndarray, None]:
        with torch.no_grad():
            tokens = torch.from_numpy(ids)
            logits, _ = self.model(tokens, torch.arange(tokens.shape[1])[None, :])
        return logits.numpy(), None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a model folder with an int8 variant (export-onnx --quantize int8)")
    parser.add_argument("--val-data", type=Path, required=True, help="a folder of MIDI files (the validation split is used)")
    parser.add_argument("--max-tokens", type=int, default=50_000)
    parser.add_argument("--runs", type=int, nargs="+", default=[64, 1],
                        help="rows quantized with one scale: 64 (a prompt's run on ONNX Runtime), 1 (a decode step)")
    args = parser.parse_args(argv)

    from export.quantize import validation_pieces
    from training.eval_measures import model_perplexity

    torch.set_num_threads(1)
    model, manifest, quantized = load(args.folder)
    pieces = validation_pieces(args.val_data, args.folder / TOKENIZER_FILE, 0.05, args.max_tokens)
    kinds = ClipTokenizer.from_file(args.folder / TOKENIZER_FILE).kinds
    decoder = Simulated(model, manifest.model.max_context)
    places = sum(len(q.pair_index) for _, q in quantized)
    total = sum(q.w.numel() // 2 for _, q in quantized)
    print(f"{args.folder} on {cpu_name()}: {places} of {total} weight pairs can saturate (|w0| + |w1| > 128)", flush=True)

    ppl_fp32, tokens = model_perplexity(decoder, pieces, kinds.bos, kinds.eos)
    print("\n| arithmetic | rows a scale | perplexity | vs exact | pairs saturated | rows with one |\n|---|---|---|---|---|---|")
    print(f"| fp32 (torch) | - | {ppl_fp32:.5f} | | | |", flush=True)
    for run in args.runs:
        results = {}
        for saturate in (False, True):
            counts = Counts()
            for layer, q in quantized:
                layer.forward = lambda x, q=q, s=saturate, c=counts, r=run: q(x, r, s, c)
            started = time.time()
            ppl, _ = model_perplexity(decoder, pieces, kinds.bos, kinds.eos)
            results[saturate] = ppl
            name = "int16 pairs saturate (MLAS without VNNI)" if saturate else "exact int32 (VNNI, AMX, native)"
            change = f"{(ppl / results[False] - 1) * 100:+.4f} %" if saturate else ""
            hits = f"{counts.saturated} of {counts.pairs:.3g} ({counts.saturated / counts.pairs:.1e})" if saturate else ""
            rows = f"{counts.rows_hit} of {counts.rows} ({counts.rows_hit / counts.rows * 100:.2f} %)" if saturate else ""
            print(f"| {name} | {run} | {ppl:.5f} | {change} | {hits} | {rows} |", flush=True)
            if saturate:
                worst = sorted(counts.by_layer.items(), key=lambda item: -item[1])[:4]
                print(f"|   most in | | | | {', '.join(f'{k} {v}' for k, v in worst) or 'none'} | ({time.time() - started:.0f} s) |")
        for layer, _ in quantized:
            del layer.forward
    print(f"\n{tokens} tokens scored; {args.val_data}, validation files at fraction 0.05 as export-onnx picks them")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
