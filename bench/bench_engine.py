"""The engine against what a user would reach for, on the same weights, in one run, next to this CPU's floor.

    python bench/bench_engine.py                       # small and seed presets, about 10 minutes
    python bench/bench_engine.py --presets small --repeats 3
    python bench/bench_engine.py --presets shipped     # the trained models/default (its weights read back)

For each preset (random-initialised weights, built here; or `shipped`: the trained model whose
tokenizer is used, its weights read out of its graph; the same weights in every row) it prints a
table with: ms per decoded token at 256/512/896 tokens of context, prefill of 256 and 512 tokens,
time to first note (cold, and prepared: the clip prefilled beforehand by `Generator.prefill` into a
`PrefillCache`, as the server's `prepare` message does; only the engine rows have it), the time of
an 8-bar continuation of the bundled 4-bar chorale, and that time per generated token. The rows:

* HF generate: transformers' GPT2LMHeadModel carrying the same weights (exact GELU, same LayerNorm
  epsilon; its logits are checked against the Segue GPT), `generate` with its KV cache, greedy.
* torch eager: the Segue GPT's own forward with its concatenating cache, greedy.
* ORT plain: ONNX Runtime on the plain past/present export (`--kv-cache concat`), numpy caches.
* engine fp32 / int8: engine/session.py on the shared-buffer export (and its int8 variant), and
  for first note and continuation the whole `Generator` (grammar, constraints, sampling, notes):
  what `segue continue` does per token.
* engine int4: the int8 variant with its decode steps (runs of up to four rows) from its weights
  quantized again to int4 at load (`decode_weights="int4"`, engine/native_matmul4_kernel.h), its
  prompts on the int8 weights: half the bytes a step, for weights that come from DRAM.

Per token at a context: HF is (generate 1+n tokens - generate 1 token) / n, its loop included;
the others time n successive cached model steps; every row the same n steps (--steps, 32) right after
its prefill of the context (untimed), so the first steps after a prefill, slower on a cache the prefill
has pushed out (bench_cold_steps.py), weigh alike in every row. The continuation's length is what the shipped,
trained model writes for 8 bars of the chorale (random weights would write as many notes as the
grammar allows): the engine rows run the whole Generator (`stream`, as `segue continue` does) and
stop after that many tokens; the rows without a grammar prefill the prompt and decode that many
greedy tokens (HF: one `generate` call). First note: the engine rows from the request to the first
streamed note (cold: nothing prepared); the others the prompt's prefill plus the tokens the trained
model needed for its first note. Every figure is the median over `--repeats` rounds (continuations:
half as many), the rows measured in turn inside each round (so a busy machine slows them alike),
one thread everywhere.

Times are process CPU time by default (`--clock wall` for wall-clock time): on cores shared with
other work, CPU time does not count the time the process waited for a core (everything runs on
one thread, so CPU time is the time the work took). Each figure is followed by its ratio to the
floor of this machine: the larger of the compute time (matmul FLOPs at the fp32 or int8 matmul
rate measured here on one core) and the memory time (weights and KV cache read once, at the read
bandwidth measured here for a working set that size; the cache counted in the element type the row
keeps it in: int8 rows (a byte a number and a float32 scale per head) for the engine's int8 row where
the native operator runs, float16 with SEGUE_INT8_CACHE=0).
"""

from __future__ import annotations

from bench_setup import ROOT  # first: one thread, this checkout on sys.path (bench/bench_setup.py)

# isort: split
import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from engine.clip import Clip
from engine.generate import ContinuationRequest, Generator, NoteEvent
from engine.machine import cpu_name, vector_extensions
from engine.manifest import INT8_MODEL_FILE, MODEL_FILE, TOKENIZER_FILE, Parity, Variant, sha256_file
from engine.midi_file import read_clip
from engine.request import MAX_BARS
from engine.session import OnnxDecoder, session_options
from engine.tokens import ClipTokenizer
from training.model import GPT, preset

CONTEXTS = (256, 512, 896)
PREFILLS = (256, 512)
ROWS = ("HF generate", "torch eager", "ORT plain", "engine fp32", "engine int8", "engine int4")
ENGINES = ("engine fp32", "engine int8", "engine int4")
# Bytes a decode step reads per block weight where not 4 (fp32) or 1 (int8): int4 decode steps read half a
# byte, and a byte (the group's peak) per 64 weights (engine/native_matmul4_kernel.h; a float32 scale
# before session 26).
WEIGHT_BYTES = {"engine int4": 0.5 + 1 / 64}
SHIPPED = "shipped"  # --presets name for the trained model folder of --tokenizer (models/default), not random weights


# --- this machine --------------------------------------------------------------------------------

def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def cpu_info() -> tuple[str, list[str]]:
    return cpu_name(), vector_extensions()


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]  # --clock: process CPU time by default (robust to other work on shared cores)


def best_seconds(fn, repeats: int = 5) -> float:
    fn()
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    started = clock()
    fn()
    return clock() - started


@dataclass
class Ceilings:
    fp32_gflops: float
    int8_gops: float
    bandwidth: dict[int, float]  # working-set bytes -> GB/s read

    def read_gbs(self, nbytes: float) -> float:
        """Read bandwidth for a working set of `nbytes` (rounded up to a MiB), measured the first time it is asked
        for. A smaller working set is never slower than a larger one, so the best of this size and every larger
        size measured counts (one measurement taken while other work held the memory bus is not the ceiling)."""
        size = max(1, int(np.ceil(nbytes / (1 << 20)))) << 20
        if size not in self.bandwidth:
            self.bandwidth[size] = read_bandwidth(size)
        return max(gbs for measured, gbs in self.bandwidth.items() if measured >= size)


def read_bandwidth(nbytes: int) -> float:
    """GB/s of the fastest of three read-only kernels (a dot product, a max, torch's sum) over `nbytes`, best of 11."""
    buffer = np.ones(nbytes // 4, dtype=np.float32)
    tensor = torch.from_numpy(buffer)
    fastest = min(best_seconds(lambda: np.dot(buffer, buffer), 11), best_seconds(buffer.max, 11), best_seconds(tensor.sum, 11))
    return nbytes / fastest / 1e9


def measure_ceilings() -> Ceilings:
    a = torch.randn(1024, 1024)
    fp32 = 2 * 1024 ** 3 / best_seconds(lambda: torch.mm(a, a)) / 1e9
    x = np.random.randn(1024, 1024).astype(np.float32)
    fp32 = max(fp32, 2 * 1024 ** 3 / best_seconds(lambda: x @ x) / 1e9)
    int8 = 2 * 256 * 1024 * 1024 / best_seconds(_int8_matmul(), 10) / 1e9
    return Ceilings(fp32, int8, {mb << 20: read_bandwidth(mb << 20) for mb in (4, 16, 64, 256)})


def _int8_matmul():
    """One ONNX Runtime MatMulInteger [256 x 1024] x [1024 x 1024] on one thread: the int8 kernel the
    quantized model runs."""
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.random.randint(-127, 127, (1024, 1024), dtype=np.int8), "b")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [256, 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [256, 1024])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    feed = {"a": np.random.randint(0, 255, (256, 1024), dtype=np.uint8)}
    return lambda: session.run(None, feed)


@dataclass
class Shape:
    """What the floors count, for one preset."""

    n_layer: int
    d_model: int
    d_ff: int
    vocab: int

    @property
    def block_weights(self) -> int:  # quantized in the int8 variant
        return self.n_layer * (4 * self.d_model ** 2 + 2 * self.d_model * self.d_ff)

    @property
    def head_weights(self) -> int:  # the tied output projection stays fp32
        return self.vocab * self.d_model

    def kv_bytes(self, context: int, entry: float = 4) -> int:
        return round(2 * self.n_layer * context * self.d_model * entry)


def decode_floor(shape: Shape, ceilings: Ceilings, context: int, int8: bool, cache_entry: float = 4,
                 per_weight: float | None = None) -> float:
    """Milliseconds: one token at `context`, weights and cache read once, or the matmul work, whichever is longer.
    `cache_entry`: bytes per cached number (1 and a head's share of its scale where the engine keeps the int8
    variant's cache in int8 rows, 2 in float16). `per_weight`: bytes read per block weight, where not 1 (int8)
    or 4 (fp32): WEIGHT_BYTES."""
    weight_bytes = shape.block_weights * (per_weight or (1 if int8 else 4)) + shape.head_weights * 4
    nbytes = weight_bytes + shape.kv_bytes(context, cache_entry)
    memory = nbytes / ceilings.read_gbs(nbytes) / 1e9
    attention = 4 * shape.n_layer * context * shape.d_model
    compute = (2 * shape.block_weights / (ceilings.int8_gops if int8 else ceilings.fp32_gflops)
               + (2 * shape.head_weights + attention) / ceilings.fp32_gflops) / 1e9
    return 1000 * max(memory, compute)


def prefill_floor(shape: Shape, ceilings: Ceilings, tokens: int, int8: bool) -> float:
    attention = 2 * shape.n_layer * tokens * tokens * shape.d_model  # causal: half of the 4 * T^2 * d
    compute = (2 * shape.block_weights * tokens / (ceilings.int8_gops if int8 else ceilings.fp32_gflops)
               + (2 * shape.head_weights * tokens + attention) / ceilings.fp32_gflops) / 1e9
    return 1000 * compute


# --- the same weights, five ways ------------------------------------------------------------------

def hf_model(model: GPT):
    """transformers' GPT-2 with the Segue GPT's weights (Conv1D stores [in, out]: the Linear weights transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    config = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_context, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, n_inner=cfg.d_ff, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, layer_norm_epsilon=1e-5, bos_token_id=None, eos_token_id=None,
                        tie_word_embeddings=True)
    hf = GPT2LMHeadModel(config).eval()
    state = {"transformer.wte.weight": model.tok_emb.weight, "transformer.wpe.weight": model.pos_emb.weight,
             "transformer.ln_f.weight": model.ln_f.weight, "transformer.ln_f.bias": model.ln_f.bias}
    for i, block in enumerate(model.blocks):
        prefix = f"transformer.h.{i}."
        state.update({
            prefix + "ln_1.weight": block.ln1.weight, prefix + "ln_1.bias": block.ln1.bias,
            prefix + "ln_2.weight": block.ln2.weight, prefix + "ln_2.bias": block.ln2.bias,
            prefix + "attn.c_attn.weight": block.attn.qkv.weight.T, prefix + "attn.c_attn.bias": block.attn.qkv.bias,
            prefix + "attn.c_proj.weight": block.attn.proj.weight.T, prefix + "attn.c_proj.bias": block.attn.proj.bias,
            prefix + "mlp.c_fc.weight": block.mlp[0].weight.T, prefix + "mlp.c_fc.bias": block.mlp[0].bias,
            prefix + "mlp.c_proj.weight": block.mlp[2].weight.T, prefix + "mlp.c_proj.bias": block.mlp[2].bias,
        })
    with torch.no_grad():
        params = dict(hf.named_parameters())
        for name, value in state.items():
            params[name].copy_(value.detach())
    hf.generation_config.pad_token_id = 0
    hf.generation_config.eos_token_id = None
    hf.generation_config.bos_token_id = None
    hf.generation_config.do_sample = False
    return hf


def make_folders(model: GPT, root: Path, tokenizer_json: str) -> tuple[Path, Path]:
    """The plain export and the shared-buffer export with its int8 variant, as model folders."""
    from export.onnx_export import _opset, build_manifest, check_parity, export_graph
    from export.quantize import WEIGHTS, quantize_int8

    folders = []
    for kind in ("concat", "shared-buffer"):
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        got = export_graph(model, folder / MODEL_FILE, kind)
        (folder / TOKENIZER_FILE).write_text(tokenizer_json)
        parity: Parity = check_parity(model, folder / MODEL_FILE)
        files = {f: sha256_file(folder / f) for f in (MODEL_FILE, TOKENIZER_FILE)}
        variants = {}
        if kind == "shared-buffer":
            quantize_int8(folder / MODEL_FILE, folder / INT8_MODEL_FILE)
            files[INT8_MODEL_FILE] = sha256_file(folder / INT8_MODEL_FILE)
            variants["int8"] = Variant(INT8_MODEL_FILE, WEIGHTS)
        manifest = build_manifest(model, {}, f"bench-{kind}", parity, "0" * 64, _opset(folder / MODEL_FILE), files, got, variants)
        (folder / "manifest.json").write_text(manifest.to_json())
        print(f"  exported {kind}: parity {parity.max_abs_diff:.1e}", flush=True)
        folders.append(folder)
    return folders[0], folders[1]


class Row:
    """One way of running the model: prefill, n greedy steps, generate from a prompt."""

    def prefill(self, ids: np.ndarray):  # -> state
        raise NotImplementedError

    def steps(self, state, n: int):  # -> state after n greedy tokens
        raise NotImplementedError

    def run(self, ids: np.ndarray, n: int) -> None:
        """Prefill `ids` then generate n tokens greedily."""
        self.steps(self.prefill(ids), n)


class TorchRow(Row):
    def __init__(self, model: GPT):
        self.model = model

    @torch.no_grad()
    def prefill(self, ids):
        t = torch.from_numpy(ids)
        logits, past = self.model(t, torch.arange(t.shape[1])[None], self.model.empty_past(1))
        return logits[:, -1].argmax(-1, keepdim=True), past, t.shape[1]

    @torch.no_grad()
    def steps(self, state, n):
        token, past, position = state
        for _ in range(n):
            logits, past = self.model(token, torch.tensor([[position]]), past)
            token, position = logits[:, -1].argmax(-1, keepdim=True), position + 1
        return token, past, position


class PlainRow(Row):
    def __init__(self, folder: Path):
        self.session = ort.InferenceSession(str(folder / MODEL_FILE), session_options(1), providers=["CPUExecutionProvider"])
        manifest = json.loads((folder / "manifest.json").read_text())
        self.past = manifest["onnx"]["past_inputs"]
        shape = manifest["model"]
        self.empty = np.zeros((1, shape["n_head"], 0, shape["head_dim"]), np.float32)

    def _run(self, ids, pasts, position):
        positions = np.arange(position, position + ids.shape[1], dtype=np.int64)[None]
        out = self.session.run(None, {"input_ids": ids, "position_ids": positions, **dict(zip(self.past, pasts, strict=True))})
        return out[0][:, -1].argmax(-1)[:, None].astype(np.int64), out[1:], position + ids.shape[1]


    def prefill(self, ids):
        return self._run(ids.astype(np.int64), [self.empty] * len(self.past), 0)

    def steps(self, state, n):
        for _ in range(n):
            state = self._run(*state)
        return state


class EngineRow(Row):
    def __init__(self, decoder: OnnxDecoder, tokenizer: ClipTokenizer):
        self.decoder = decoder
        self.generator = Generator(decoder, tokenizer)

    def prefill(self, ids):
        logits, cache = self.decoder.step(ids, self.decoder.empty_cache(1))
        return logits.argmax(-1)[:, None], cache

    def steps(self, state, n):
        token, cache = state
        for _ in range(n):
            logits, cache = self.decoder.step(token, cache)
            token = logits.argmax(-1)[:, None]
        return token, cache


class HFRow(Row):
    def __init__(self, hf):
        self.hf = hf

    @torch.no_grad()
    def generate(self, ids: np.ndarray, n: int):
        t = torch.from_numpy(ids)
        return self.hf.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, min_new_tokens=n, do_sample=False)

    @torch.no_grad()
    def prefill(self, ids):  # the forward pass generate starts with
        return self.hf(torch.from_numpy(ids), use_cache=True)

    def run(self, ids, n):
        self.generate(ids, n)


# --- measuring ----------------------------------------------------------------------------------

def rounds(tasks: dict[str, object], repeats: int) -> dict[str, float]:
    """Median of each task's milliseconds, the tasks run in turn inside each round. A task returns its own ms."""
    samples: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, task in tasks.items():
            samples[name].append(task())  # type: ignore[operator]
    return {name: statistics.median(values) for name, values in samples.items()}


def ms(fn) -> float:
    return _timed(fn) * 1000


def ms_wall(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def first_note_ms(generator: Generator, clip: Clip, request: ContinuationRequest, prefills=None) -> tuple[float, int]:
    """Milliseconds from the request to the first streamed note, and the tokens decoded by then."""
    started = clock()
    stream = generator.stream(clip, request, prefills=prefills) if prefills is not None else generator.stream(clip, request)
    for event in stream:
        if isinstance(event, NoteEvent):
            elapsed = (clock() - started) * 1000
            stream.close()
            return elapsed, 0
    return float("nan"), 0


def measure_preset(name: str, args, ceilings: Ceilings, tokenizer: ClipTokenizer, tokenizer_json: str, clip: Clip,
                   work: Path, reference: dict) -> dict:
    torch.manual_seed(0)
    if name == SHIPPED:  # the trained weights of the model folder the tokenizer comes from, read out of its graph
        from training.from_onnx import load_model_folder

        model = load_model_folder(args.tokenizer.parent)[0].eval()
    else:
        model = GPT(preset(name, tokenizer.vocab_size)).eval()
    cfg = model.cfg
    shape = Shape(cfg.n_layer, cfg.d_model, cfg.d_ff, cfg.vocab_size)
    print(f"\n{name}: {cfg.n_layer} layers x {cfg.d_model}, {cfg.n_head} heads, ff {cfg.d_ff}, context {cfg.max_context}, "
          f"{model.num_parameters() / 1e6:.2f} M parameters ({(shape.block_weights + shape.head_weights) / 1e6:.2f} M in matmuls)",
          flush=True)
    plain_folder, shared_folder = make_folders(model, work / name, tokenizer_json)
    hf = hf_model(model)
    probe = torch.randint(0, cfg.vocab_size, (1, 40))
    with torch.no_grad():
        gap = (hf(probe).logits - model(probe, torch.arange(40)[None])[0]).abs().max().item()
    print(f"  HF GPT-2 logits vs Segue GPT: max |diff| {gap:.1e}", flush=True)
    rows: dict[str, Row] = {
        "HF generate": HFRow(hf), "torch eager": TorchRow(model), "ORT plain": PlainRow(plain_folder),
        "engine fp32": EngineRow(OnnxDecoder.load(shared_folder, threads=1, variant="fp32"), tokenizer),
        "engine int8": EngineRow(OnnxDecoder.load(shared_folder, threads=1, variant="int8"), tokenizer),
        # The int8 variant with its decode steps from int4 weights, its prompts on the int8 ones (engine/session.py).
        "engine int4": EngineRow(OnnxDecoder.load(shared_folder, threads=1, variant="int8", decode_weights="int4"), tokenizer),
    }
    int8_rows = {"engine int8", "engine int4"}
    # Bytes per cached number: the int8 engine keeps int8 rows (a byte a number, a scale a head) where the native operator runs.
    entry = {row_name: row.decoder.cache_dtype.itemsize * row.decoder.cache_row / row.decoder.head_dim
             for row_name, row in rows.items() if isinstance(row, EngineRow)}
    for row_name, row in rows.items():
        if isinstance(row, EngineRow):
            print(f"  {row_name}: attention {row.decoder.attention}, {row.decoder.cache_dtype} cache", flush=True)
    rng = np.random.default_rng(1)
    result: dict[str, dict[str, float]] = {row: {} for row in rows}
    floors: dict[str, dict[str, float]] = {row: {} for row in rows}

    for context in CONTEXTS:
        ids = rng.integers(0, cfg.vocab_size, (1, context))
        n = args.steps  # the same steps after the prefill in every row (before session 24: 16 here against HF's 32)
        tasks = {}
        for row_name, row in rows.items():
            if isinstance(row, HFRow):
                tasks[row_name] = lambda r=row, i=ids, k=n: (ms(lambda: r.generate(i, 1 + k)) - ms(lambda: r.generate(i, 1))) / k
            else:
                def decode(r=row, i=ids, k=n):
                    state = r.prefill(i)  # every round from the same context (untimed), so @896 stays at 896
                    started = clock()
                    r.steps(state, k)
                    return (clock() - started) * 1000 / k
                tasks[row_name] = decode
        for row_name, value in rounds(tasks, args.repeats).items():
            result[row_name][f"@{context}"] = value
            floors[row_name][f"@{context}"] = decode_floor(shape, ceilings, context, row_name in int8_rows, entry.get(row_name, 4),
                                                                 WEIGHT_BYTES.get(row_name))
        print(f"  decode @{context}: " + ", ".join(f"{r} {result[r][f'@{context}']:.2f}" for r in rows), flush=True)

    for tokens in PREFILLS:
        ids = rng.integers(0, cfg.vocab_size, (1, tokens))
        tasks = {row_name: (lambda r=row, i=ids: ms(lambda: r.prefill(i))) for row_name, row in rows.items()}
        for row_name, value in rounds(tasks, args.repeats).items():
            result[row_name][f"prefill {tokens}"] = value
            floors[row_name][f"prefill {tokens}"] = prefill_floor(shape, ceilings, tokens, row_name in int8_rows)
        print(f"  prefill {tokens}: " + ", ".join(f"{r} {result[r][f'prefill {tokens}']:.1f}" for r in rows), flush=True)

    # The whole engine on the 4-bar chorale: first note (cold) and an 8-bar continuation. Random weights
    # write as many notes as the grammar lets them, so every row stops after the number of tokens the
    # shipped (trained) model writes for those 8 bars (`reference`).
    request = ContinuationRequest(bars=args.bars, variations=1, seed=0)
    engines = {r: rows[r] for r in ENGINES}
    prompt = np.asarray([tokenizer.encode_clip(clip)], dtype=np.int64)[:, -(cfg.max_context // 2):]
    prompt_tokens = prompt.shape[1]
    continuation = min(reference["tokens"], cfg.max_context - prompt_tokens - 1)
    first_steps = reference["first_note"]
    tasks = {}
    for row_name, row in rows.items():
        if row_name in engines:
            tasks[row_name] = lambda g=row.generator: first_note_ms(g, clip, request)[0]  # type: ignore[attr-defined]
        else:
            tasks[row_name] = lambda r=row: ms(lambda: r.run(prompt, first_steps))
    for row_name, value in rounds(tasks, args.repeats).items():
        result[row_name]["first note"] = value
        int8 = row_name in int8_rows
        floors[row_name]["first note"] = (prefill_floor(shape, ceilings, prompt_tokens, int8)
                                          + first_steps * decode_floor(shape, ceilings, prompt_tokens, int8, entry.get(row_name, 4),
                                                                       WEIGHT_BYTES.get(row_name)))
    # Prepared: the clip prefilled before the request (Generator.prefill into a PrefillCache, as the server's
    # `prepare` message does); only the engine has this.
    prepared = {}
    for row_name in engines:
        generator = rows[row_name].generator  # type: ignore[attr-defined]
        if hasattr(generator, "prefill"):
            from engine.prefill_cache import PrefillCache

            prefills = PrefillCache()
            generator.prefill(clip, prefills)
            prepared[row_name] = lambda g=generator, c=prefills: first_note_ms(g, clip, request, c)[0]
    for row_name in rows:
        result[row_name]["prepared"] = float("nan")
        floors[row_name]["prepared"] = first_steps * decode_floor(shape, ceilings, prompt_tokens, row_name in int8_rows,
                                                                 entry.get(row_name, 4), WEIGHT_BYTES.get(row_name))
    for row_name, value in rounds(prepared, args.repeats).items():
        result[row_name]["prepared"] = value
    # The engine rows ask for as many bars as a request may, so that the grammar never ends a row before
    # `continuation` tokens (random weights can finish 8 bars in fewer): every row decodes exactly that many.
    endless = ContinuationRequest(bars=MAX_BARS, variations=1, seed=0)
    tasks = {}
    for row_name, row in rows.items():
        if row_name in engines:
            tasks[row_name] = lambda g=row.generator: ms(lambda: continue_for(g, clip, endless, continuation))  # type: ignore[attr-defined]
        else:
            tasks[row_name] = lambda r=row: ms(lambda: r.run(prompt, continuation))
    for row_name, value in rounds(tasks, max(1, args.repeats // 2 + 1)).items():
        int8 = row_name in int8_rows
        result[row_name][f"{args.bars} bars"] = value
        result[row_name]["per token"] = value / continuation
        floors[row_name][f"{args.bars} bars"] = (prefill_floor(shape, ceilings, prompt_tokens, int8) + continuation
                                                 * decode_floor(shape, ceilings, prompt_tokens + continuation // 2, int8,
                                                                              entry.get(row_name, 4), WEIGHT_BYTES.get(row_name)))
        floors[row_name]["per token"] = floors[row_name][f"{args.bars} bars"] / continuation
    generated = {"reference": continuation}
    reference_tokens = continuation
    return {"preset": name, "result": result, "floors": floors, "prompt_tokens": prompt_tokens, "generated": generated,
            "reference_tokens": reference_tokens, "first_steps": first_steps, "hf_gap": gap}


def continue_for(generator: Generator, clip: Clip, request: ContinuationRequest, tokens: int) -> None:
    """`generator.stream` as `segue continue` runs it, stopped once `tokens` tokens are decoded (the sampled
    ones and the forced ones fed with them). Raises if the continuation ends before that."""
    start = len(generator.prompt_tokens(clip)[0]) + 2  # the prompt and the opening Bar and TimeSig
    decoder = generator.decoder
    real_forward = decoder.forward
    fed = [0]

    def counting_forward(ids, cache, *args, **kwargs):  # every model call goes through forward (step, step_instead)
        fed[0] = cache.length + ids.shape[1] - start
        return real_forward(ids, cache, *args, **kwargs)

    decoder.forward = counting_forward  # type: ignore[method-assign]
    try:
        for _ in generator.stream(clip, request, should_stop=lambda: fed[0] >= tokens):
            pass
    finally:
        del decoder.forward  # the class's method again
    if fed[0] < tokens:
        raise RuntimeError(f"the continuation ended after {fed[0]} of {tokens} tokens")


def reference_continuation(model: Path, clip: Clip, bars: int) -> dict:
    """What a trained model writes for the clip: its token count for `bars` bars and the steps to its first note.
    From its int8 file with int8 decode steps, whatever the manifest serves, so that the workload stays the
    same from run to run (served int4 since session 26, the shipped default's seed-0 continuation of the
    chorale is 247 tokens against int8's 233)."""
    generator = Generator.load(model, variant="int8")
    done = generator.generate(clip, ContinuationRequest(bars=bars, variations=1, seed=0))[0]
    return {"tokens": len(done.tokens), "first_note": _tokens_to_first_note(done.tokens, generator.tokenizer),
            "notes": len(done.clip.notes), "model": str(model)}


def _tokens_to_first_note(tokens, tokenizer: ClipTokenizer) -> int:
    """Decode steps until the first note is complete (its Duration token), after the forced opening."""
    for index, token_name in enumerate(tokenizer.tokens_to_text(list(tokens))):
        if token_name.startswith("Duration"):
            return index + 1
    return min(8, len(tokens))


def print_table(measured: dict, bars: int) -> None:
    columns = [f"@{c}" for c in CONTEXTS] + [f"prefill {t}" for t in PREFILLS] + ["first note", "prepared", f"{bars} bars",
                                                                                   "per token"]
    header = [f"ms/token {c}" for c in CONTEXTS] + [f"prefill {t} (ms)" for t in PREFILLS] + \
             ["first note cold (ms)", "first note prepared (ms)", f"{bars}-bar continuation (ms)", "per token end to end (ms)"]
    print(f"\n### {measured['preset']}: measured ms (x floor)\n")
    print("| variant | " + " | ".join(header) + " |")
    print("|---|" + "---|" * len(header))
    for row in ROWS:
        cells = []
        for column in columns:
            value, floor = measured["result"][row][column], measured["floors"][row][column]
            if value != value:  # NaN: this row has no such path
                cells.append("n/a")
            else:
                cells.append(f"{value:.3g} ({value / floor:.1f}x)" if value >= 10 else f"{value:.2f} ({value / floor:.1f}x)")
        print(f"| {row} | " + " | ".join(cells) + " |")
    floor = measured["floors"]
    print("| floor fp32 / int8 / int4 | " + " | ".join(
        f"{floor['engine fp32'][c]:.3g} / {floor['engine int8'][c]:.3g} / {floor['engine int4'][c]:.3g}" for c in columns) + " |")
    hf, fp32, int8, int4 = (measured["result"][r] for r in ("HF generate", "engine fp32", "engine int8", "engine int4"))
    print(f"\nSegue / HF generate: per token end to end {hf['per token'] / fp32['per token']:.1f}x (fp32), "
          f"{hf['per token'] / int8['per token']:.1f}x (int8), {hf['per token'] / int4['per token']:.1f}x (int4 decode steps); "
          f"decode step @512 {hf['@512'] / fp32['@512']:.1f}x / {hf['@512'] / int8['@512']:.1f}x / "
          f"{hf['@512'] / int4['@512']:.1f}x; prefill 256 {hf['prefill 256'] / fp32['prefill 256']:.1f}x / "
          f"{hf['prefill 256'] / int8['prefill 256']:.1f}x; prefill 512 {hf['prefill 512'] / fp32['prefill 512']:.1f}x / "
          f"{hf['prefill 512'] / int8['prefill 512']:.1f}x")
    print(f"prompt {measured['prompt_tokens']} tokens; every row decodes {measured['reference_tokens']} tokens for the "
          f"continuation (the engine rows through the whole Generator, stopped there); first note after "
          f"{measured['first_steps']} tokens (the engine rows: when the Generator streams it)")


def threads_table(work: Path, presets: list[str], repeats: int, tokenizer: ClipTokenizer) -> None:
    """Does a second thread help the prefill, and what does it do to a decode step? (engine, int8 and fp32)"""
    print("\n### engine threads: prefill 256 / decode step @512 (wall-clock ms), 1 vs 2 threads\n")
    print("| preset | variant | 1 thread | 2 threads | prefill speed-up | decode ratio |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(2)
    for name in presets:
        for variant in ("fp32", "int8"):
            decoders = {t: OnnxDecoder.load(work / name / "shared-buffer", threads=t, variant=variant) for t in (1, 2)}
            ids = rng.integers(0, tokenizer.vocab_size, (1, 512))
            tasks = {}
            for t, d in decoders.items():
                tasks[f"prefill {t}"] = lambda d=d, i=ids: ms_wall(lambda: d.step(i[:, :256], d.empty_cache(1)))
                state = {"c": d.step(ids, d.empty_cache(1))[1]}

                def decode(d=d, st=state, i=ids):
                    started = time.perf_counter()
                    for _ in range(8):
                        st["c"] = d.step(i[:, :1], st["c"])[1]
                    return (time.perf_counter() - started) * 1000 / 8
                tasks[f"decode {t}"] = decode
            got = rounds(tasks, repeats)
            print(f"| {name} | {variant} | {got['prefill 1']:.1f} / {got['decode 1']:.2f} | {got['prefill 2']:.1f} / "
                  f"{got['decode 2']:.2f} | {got['prefill 1'] / got['prefill 2']:.2f}x | "
                  f"{got['decode 2'] / got['decode 1']:.2f}x |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "seed"],
                        help=f"training presets with random weights, and/or {SHIPPED!r}: the trained model of --tokenizer's "
                             "folder (its weights read back from its graph), whose continuation takes a trained model's path")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per figure (medians); continuations get half")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per per-token sample, in every row")
    parser.add_argument("--bars", type=int, default=8)
    parser.add_argument("--clip", type=Path, default=ROOT / "docs" / "examples" / "chorale.mid")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "models" / "default" / TOKENIZER_FILE,
                        help="a trained model folder's tokenizer.json; that model also sets the continuation's length")
    parser.add_argument("--work", type=Path, help="folder for the exported models (default: a temporary one)")
    parser.add_argument("--no-threads", action="store_true", help="skip the 1-vs-2-thread table")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: process CPU time (default; the 2-thread rows count both threads' time, so they use wall); "
                             "wall: wall-clock time")
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)

    name, vector = cpu_info()
    print(f"command: python bench/bench_engine.py {shlex.join(argv if argv is not None else sys.argv[1:])}")
    print(f"CPU: {name}; {os.cpu_count()} logical cores; vector extensions: {' '.join(vector)}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; onnxruntime {ort.__version__}, "
          f"torch {torch.__version__}, transformers {_version('transformers')}; clock: {args.clock}")
    ceilings = measure_ceilings()
    print(f"ceilings (one core, best of runs): fp32 matmul {ceilings.fp32_gflops:.0f} GFLOP/s, int8 matmul (ORT MatMulInteger) "
          f"{ceilings.int8_gops:.0f} GOP/s, read bandwidth " +
          ", ".join(f"{size >> 20} MiB {gbs:.0f} GB/s" for size, gbs in sorted(ceilings.bandwidth.items())), flush=True)

    tokenizer_json = args.tokenizer.read_text()
    tokenizer = ClipTokenizer.from_file(args.tokenizer)
    full = read_clip(args.clip)
    length = 4 * full.beats_per_bar
    clip = Clip(tuple(n for n in full.notes if n.start < length), full.tempo, full.time_signature, length, full.program)
    with tempfile.TemporaryDirectory(prefix="segue-bench-") as scratch:
        work = args.work or Path(scratch)
        reference = reference_continuation(args.tokenizer.parent, clip, args.bars)
        print(f"reference continuation ({reference['model']}, trained): {reference['tokens']} tokens, {reference['notes']} "
              f"notes for {args.bars} bars of the 4-bar chorale; first note complete after {reference['first_note']} tokens")
        measured = [measure_preset(p, args, ceilings, tokenizer, tokenizer_json, clip, work, reference) for p in args.presets]
        for m in measured:
            print_table(m, args.bars)
        if not args.no_threads:
            threads_table(work, args.presets, args.repeats, tokenizer)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
