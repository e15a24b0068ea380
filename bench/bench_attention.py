"""What ONNX Runtime's GroupQueryAttention costs per layer on this CPU, next to the memory floor of its work.

    python bench/bench_attention.py
    python bench/bench_attention.py --contexts 256 512 --repeats 9
    python bench/bench_attention.py --profile models/default     # and each op kind's share of a whole step

The engine's decode step is one GroupQueryAttention node per layer plus the layer's matmuls
(`export/gqa.py`). This times the node alone, as the engine runs it (one thread, the shared KV buffer
bound as past and present, one new position), for the head layouts of the presets (8 heads of 32:
`small` and the shipped `compact`; 8 heads of 64: `seed`), at several lengths of history. Next to
each time: the floor, the history's keys and values (what the node must read) at the read bandwidth
measured here for a working set that size, and the ratio. The matmuls' own floor is in
bench_engine.py's tables; this is the part of a step that grows with the context.

Times are process CPU time (one thread), the best of `--repeats` rounds of 200 calls.

`--plain` adds the same decode attention written with plain ONNX operators over a position-major
buffer ([positions, heads * size]: the history is a contiguous prefix, bound as an input without a
copy, so nothing is repacked), in two forms: the values weighted with Mul and summed with ReduceSum,
or one matrix-vector product per head against every head's values (the diagonal blocks kept). It is
the alternative to GroupQueryAttention that needs no custom operator; both are checked against numpy.

`--native` adds the engine's native operator (engine/native_attention.c, built for this CPU as the engine
builds it at load) as the same one-node graph, next to the node: decode at each context, and a 256-token
prompt fed in the engine's 64-position chunks (per layer, the four chunks together). It is checked
against the node's output first.

`--profile FOLDER` adds, for that model folder's served precision, ONNX Runtime's own profile of a
decode step at 512 positions and of a 256-token prefill (fed in the engine's 64-position chunks):
the share of kernel time each kind of node takes.
"""

from __future__ import annotations

import bench_setup  # noqa: F401  (first: one thread, this checkout on sys.path)

# isort: split
import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from engine import native_attention
from engine.machine import cpu_name, vector_extensions
from engine.session import session_options

LAYOUTS = {"8 x 32 (small, compact)": (8, 32), "8 x 64 (seed)": (8, 64)}
CALLS = 200


def attention_session(heads: int, head_dim: int, capacity: int, native: bool = False, half: bool = False) -> ort.InferenceSession:
    """One GroupQueryAttention node over a [1, heads, capacity, head_dim] buffer, as export/gqa.py writes it;
    `native`: rewritten to the engine's native operator, as the engine rewrites a model at load; `half`:
    its float16-cache form (segue.CausalAttention16)."""
    width = heads * head_dim
    value = helper.make_tensor_value_info
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total"],
                            ["out", "present_key", "present_value"], domain="com.microsoft",
                            num_heads=heads, kv_num_heads=heads)
    cache = [1, heads, capacity, head_dim]
    graph = helper.make_graph(
        [node], "attention",
        [value("qkv", TensorProto.FLOAT, [1, "steps", 3 * width]), value("past_key", TensorProto.FLOAT, cache),
         value("past_value", TensorProto.FLOAT, cache), value("seqlens_k", TensorProto.INT32, [1]),
         value("total", TensorProto.INT32, [])],
        [value("out", TensorProto.FLOAT, [1, "steps", width]), value("present_key", TensorProto.FLOAT, cache),
         value("present_value", TensorProto.FLOAT, cache)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    options, serialized = session_options(1), model.SerializeToString()
    if native:
        rewritten, why = native_attention.prepare(serialized, half_cache=half)
        if rewritten is None:
            raise SystemExit(f"--native: the native operator is not available here: {why}")
        if half and not rewritten.half_cache:
            raise SystemExit("--native: this build of the native operator has no float16 cache (no F16C)")
        options.register_custom_ops_library(str(rewritten.library))
        serialized = rewritten.graph
    return ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])


def best_us(call, repeats: int, calls: int = CALLS) -> float:
    """Microseconds of one `call()` (process CPU time): the best of `repeats` rounds of `calls`, after 20 to warm up."""
    for _ in range(20):
        call()
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(calls):
            call()
        best = min(best, (time.process_time() - started) / calls * 1e6)
    return best


def node_us(session: ort.InferenceSession, heads: int, head_dim: int, capacity: int, context: int, repeats: int) -> float:
    """Microseconds of one decode call with `context` positions of history (best of `repeats` rounds)."""
    binding, out, arrays = attention_binding(session, heads, head_dim, capacity, context, 1)
    took = best_us(lambda: session.run_with_iobinding(binding), repeats)
    del out, arrays  # alive until the last run (the binding points into them)
    return took


def attention_binding(session: ort.InferenceSession, heads: int, head_dim: int, capacity: int, context: int,
                      steps: int) -> tuple[Any, np.ndarray, list[np.ndarray]]:
    """An IO binding of `steps` new positions after `context` of history in a shared buffer, its output, and
    the arrays it points into (the binding holds raw pointers: the caller keeps these alive while it runs)."""
    rng = np.random.default_rng(0)
    half = next(i.type for i in session.get_inputs() if i.name == "past_key") == "tensor(float16)"
    cache = np.float16 if half else np.float32
    keys = rng.standard_normal((1, heads, capacity, head_dim), dtype=np.float32).astype(cache)
    values = rng.standard_normal((1, heads, capacity, head_dim), dtype=np.float32).astype(cache)
    qkv = rng.standard_normal((1, steps, 3 * heads * head_dim), dtype=np.float32)
    out = np.empty((1, steps, heads * head_dim), dtype=np.float32)
    binding = session.io_binding()
    binding.bind_cpu_input("qkv", qkv)
    binding.bind_cpu_input("past_key", keys)
    binding.bind_cpu_input("past_value", values)
    binding.bind_cpu_input("seqlens_k", np.array([context + steps - 1], dtype=np.int32))
    binding.bind_cpu_input("total", np.array(context + steps, dtype=np.int32))
    binding.bind_output("out", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
    for name, buffer in (("present_key", keys), ("present_value", values)):  # shared: the engine's binding
        binding.bind_output(name, "cpu", 0, cache, list(buffer.shape), buffer.ctypes.data)
    return binding, out, [keys, values, qkv]


def prompt_us(session: ort.InferenceSession, heads: int, head_dim: int, capacity: int, repeats: int) -> float:
    """Microseconds of a 256-token prompt's attention in one layer, fed as the engine feeds it (64 positions a run)."""
    runs = [attention_binding(session, heads, head_dim, capacity, start, 64) for start in range(0, 256, 64)]

    def prompt() -> None:
        for binding, _, _ in runs:
            session.run_with_iobinding(binding)

    return best_us(prompt, repeats, calls=CALLS // 10)  # `runs` (and the arrays its bindings point into) lives until here


def same_output(node: ort.InferenceSession, native: ort.InferenceSession, heads: int, head_dim: int, capacity: int) -> None:
    """The native operator's output is the node's, for a decode step and a prompt chunk, or the bench stops."""
    for context, steps in ((300, 1), (128, 64)):
        outputs = []
        for session in (node, native):
            binding, out, arrays = attention_binding(session, heads, head_dim, capacity, context, steps)
            session.run_with_iobinding(binding)
            outputs.append(out)
            del arrays  # kept alive until the run is done
        if not np.allclose(outputs[0], outputs[1], atol=1e-5):
            raise SystemExit("the native operator's output differs from GroupQueryAttention's")


PLAIN_FORMS = ("Mul + ReduceSum", "a product per head")


def plain_attention_session(heads: int, head_dim: int, form: str) -> ort.InferenceSession:
    """Decode attention (one new position) over position-major keys and values, in plain ONNX operators.

    Scores: the history's keys [S, H*D] times the query laid out block-diagonally [H*D, H] (one
    matrix product whose small right side is what gets packed), the new position's score the same
    way, softmax over positions. Values: `form` (see PLAIN_FORMS)."""
    width = heads * head_dim
    blocks = np.zeros((width, heads), dtype=np.float32)
    blocks[np.arange(width), np.arange(width) // head_dim] = 1 / np.sqrt(head_dim)
    diagonal = np.kron(np.eye(heads), np.ones((1, head_dim))).astype(np.float32).reshape(heads, 1, width)
    constants = {"blocks": blocks, "diagonal": diagonal, "column": np.array([width, 1]), "per_head": np.array([-1, heads, head_dim]),
                 "per_head_1": np.array([-1, heads, 1]), "row": np.array([1, width]), "first": np.array([0]),
                 "one": np.array([1]), "zero": np.array([0]), "end": np.array([2**40])}
    node = helper.make_node
    nodes = [node("Reshape", ["q", "column"], ["q_column"]), node("Mul", ["q_column", "blocks"], ["q_blocks"]),
             node("MatMul", ["past_k", "q_blocks"], ["scores_past"]), node("MatMul", ["k_new", "q_blocks"], ["score_new"]),
             node("Concat", ["scores_past", "score_new"], ["scores"], axis=0), node("Softmax", ["scores"], ["p"], axis=0)]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
              for name, shape in (("q", [1, width]), ("k_new", [1, width]), ("v_new", [1, width]),
                                  ("past_k", ["S", width]), ("past_v", ["S", width]))]
    if form == PLAIN_FORMS[0]:
        inputs.append(helper.make_tensor_value_info("S", TensorProto.INT64, [1]))
        nodes += [node("Slice", ["p", "zero", "S"], ["p_past"]), node("Slice", ["p", "S", "end"], ["p_new"]),
                  node("Reshape", ["p_past", "per_head_1"], ["p_past3"]), node("Reshape", ["past_v", "per_head"], ["v3"]),
                  node("Mul", ["v3", "p_past3"], ["weighted"]), node("ReduceSum", ["weighted", "first"], ["summed"], keepdims=0),
                  node("Reshape", ["p_new", "per_head_1"], ["p_new3"]), node("Reshape", ["v_new", "per_head"], ["v_new3"]),
                  node("Mul", ["v_new3", "p_new3"], ["own"]), node("Reshape", ["own", "row"], ["own_row"]),
                  node("Reshape", ["summed", "row"], ["summed_row"]), node("Add", ["summed_row", "own_row"], ["out"])]
    else:
        nodes += [node("Concat", ["past_v", "v_new"], ["values"], axis=0), node("Transpose", ["p"], ["p_t"], perm=[1, 0]),
                  node("Unsqueeze", ["p_t", "one"], ["p_rows"]), node("MatMul", ["p_rows", "values"], ["every"]),
                  node("Mul", ["every", "diagonal"], ["kept"]), node("ReduceSum", ["kept", "first"], ["out"], keepdims=0)]
    used = {name for n in nodes for name in n.input}
    initializers = [numpy_helper.from_array(value if value.dtype == np.float32 else value.astype(np.int64), name)
                    for name, value in constants.items() if name in used]
    graph = helper.make_graph(nodes, "plain_attention", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])


def plain_us(session: ort.InferenceSession, heads: int, head_dim: int, capacity: int, context: int, repeats: int) -> float:
    """Microseconds of one call of a plain-operator attention (best of `repeats` rounds), after checking its
    output against numpy's attention over the same history."""
    width = heads * head_dim
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((capacity, width), dtype=np.float32)
    values = rng.standard_normal((capacity, width), dtype=np.float32)
    query = rng.standard_normal((1, width), dtype=np.float32)
    binding = session.io_binding()
    binding.bind_cpu_input("q", query)
    for name, array in (("k_new", keys[context:context + 1]), ("v_new", values[context:context + 1]),
                        ("past_k", keys[:context]), ("past_v", values[:context])):  # prefixes: no copy
        binding.bind_cpu_input(name, array)
    if "S" in {i.name for i in session.get_inputs()}:
        binding.bind_cpu_input("S", np.array([context], dtype=np.int64))
    binding.bind_output("out")
    session.run_with_iobinding(binding)
    k = keys[:context + 1].reshape(-1, heads, head_dim)
    v = values[:context + 1].reshape(-1, heads, head_dim)
    scores = np.einsum("shd,hd->sh", k, query.reshape(heads, head_dim)) / np.sqrt(head_dim)
    weights = np.exp(scores - scores.max(axis=0))
    expected = np.einsum("sh,shd->hd", weights / weights.sum(axis=0), v).reshape(-1)
    if not np.allclose(binding.get_outputs()[0].numpy().reshape(-1), expected, atol=1e-4):
        raise SystemExit("the plain-operator attention does not compute attention")
    return best_us(lambda: session.run_with_iobinding(binding), repeats)


def read_gbs(nbytes: int, repeats: int) -> float:
    """Read bandwidth (GB/s) for a working set of `nbytes`, read over and over as the node reads its history:
    a matrix-vector product over it (BLAS streams the matrix once; a numpy sum would be compute-bound)."""
    matrix = np.ones((max(nbytes // 4 // 256, 4), 256), dtype=np.float32)
    vector = np.ones(256, dtype=np.float32)
    best = float("inf")
    for _ in range(repeats * 4):
        started = time.perf_counter()
        for _ in range(20):
            matrix @ vector
        best = min(best, (time.perf_counter() - started) / 20)
    return matrix.nbytes / best / 1e9


def _profiled(graph: str, feeds, rounds: int) -> dict[str, float]:
    """Share of kernel time per op type over `rounds` runs of `feeds` (a list of IO-binding setups)."""
    import collections
    import json

    options = session_options(1)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="segue-profile-")) / "ort")
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    bindings = [setup(session) for setup in feeds]
    for _ in range(rounds):
        for binding in bindings:
            session.run_with_iobinding(binding)
    trace_file = Path(session.end_profiling())
    kernel_us: collections.Counter = collections.Counter()
    for event in json.loads(trace_file.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            kernel_us[event["args"]["op_name"]] += event["dur"]
    trace_file.unlink()
    total = sum(kernel_us.values())
    return {op: us / total for op, us in kernel_us.most_common()}


def op_shares(folder: Path, rounds: int = 50) -> tuple[str, dict[str, dict[str, float]]]:
    """Kernel time per op type (shares) of a decode step at 512 positions and of a 256-token prefill in the
    engine's 64-position chunks, from ONNX Runtime's profiler, on the folder's served precision."""
    from engine.manifest import MODEL_FILE
    from engine.session import PREFILL_CHUNK, OnnxDecoder

    decoder = OnnxDecoder.load(folder, threads=1)  # verifies the folder and chooses the precision
    name = MODEL_FILE if decoder.variant == "fp32" else decoder.manifest.variants[decoder.variant].file
    shape = (1, decoder.n_head, decoder.max_context, decoder.head_dim)
    buffers = {past: np.zeros(shape, dtype=np.float32) for past in decoder.past_names}
    ids = np.random.default_rng(0).integers(0, decoder.vocab_size, (1, 512))

    def binding(start: int, count: int):
        def setup(session):
            bound = session.io_binding()
            bound.bind_cpu_input("input_ids", np.ascontiguousarray(ids[:, start:start + count]))
            bound.bind_cpu_input("position_ids", np.arange(start, start + count, dtype=np.int64)[None])
            bound.bind_output("logits")
            for past, present in zip(decoder.past_names, decoder.present_names, strict=True):
                value = ort.OrtValue.ortvalue_from_numpy(buffers[past])  # shared past and present, as the engine binds
                bound.bind_ortvalue_input(past, value)
                bound.bind_ortvalue_output(present, value)
            return bound
        return setup

    graph = str(folder / name)
    prefill = _profiled(graph, [binding(s, PREFILL_CHUNK) for s in range(0, 256, PREFILL_CHUNK)], max(rounds // 10, 3))
    decode = _profiled(graph, [binding(511, 1)], rounds * 4)
    return decoder.variant, {"decode step @512": decode, "prefill 256 (64-position chunks)": prefill}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 512, 896])
    parser.add_argument("--capacity", type=int, default=1024, help="positions in the preallocated buffer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plain", action="store_true",
                        help="also time the attention written with plain ONNX operators over a position-major buffer")
    parser.add_argument("--native", action="store_true",
                        help="also time the engine's native operator (engine/native_attention.c, built here)")
    parser.add_argument("--profile", type=Path, help="a model folder: each op kind's share of its decode step and prefill")
    args = parser.parse_args(argv)
    if max(args.contexts) >= args.capacity:
        parser.error(f"every context must be below --capacity ({args.capacity})")
    print(f"CPU: {cpu_name()} ({' '.join(vector_extensions()) or '?'}), onnxruntime {ort.__version__}, one thread, "
          f"process CPU time, best of {args.repeats} rounds of {CALLS} calls\n")
    print("| heads x size | context | node (us) | history read (KB) | floor (us) | node / floor |")
    print("|---|---|---|---|---|---|")
    for label, (heads, head_dim) in LAYOUTS.items():
        session = attention_session(heads, head_dim, args.capacity)
        for context in args.contexts:
            took = node_us(session, heads, head_dim, args.capacity, context, args.repeats)
            nbytes = 2 * heads * context * head_dim * 4  # keys and values of the history, fp32
            floor = nbytes / (read_gbs(nbytes, args.repeats) * 1e9) * 1e6
            print(f"| {label} | {context} | {took:.1f} | {nbytes / 1024:.0f} | {floor:.1f} | {took / floor:.1f}x |", flush=True)
    if args.plain:
        print("\n| heads x size | context | GroupQueryAttention (us) | " + " | ".join(f"plain: {f} (us)" for f in PLAIN_FORMS) + " |")
        print("|---|---|---|" + "---|" * len(PLAIN_FORMS))
        for label, (heads, head_dim) in LAYOUTS.items():
            session = attention_session(heads, head_dim, args.capacity)
            plain = [plain_attention_session(heads, head_dim, form) for form in PLAIN_FORMS]
            for context in args.contexts:
                node = node_us(session, heads, head_dim, args.capacity, context, args.repeats)
                forms = [plain_us(p, heads, head_dim, args.capacity, context, args.repeats) for p in plain]
                print(f"| {label} | {context} | {node:.1f} | " + " | ".join(f"{t:.1f}" for t in forms) + " |", flush=True)
    if args.native:
        print("\n| heads x size | context | GroupQueryAttention (us) | native operator (us) | node / native | "
              "native, float16 cache (us) | float32 / float16 cache |")
        print("|---|---|---|---|---|---|---|")
        prompts = []
        for label, (heads, head_dim) in LAYOUTS.items():
            node = attention_session(heads, head_dim, args.capacity)
            native = attention_session(heads, head_dim, args.capacity, native=True)
            half = attention_session(heads, head_dim, args.capacity, native=True, half=True)
            same_output(node, native, heads, head_dim, args.capacity)
            for context in args.contexts:
                times = [node_us(s, heads, head_dim, args.capacity, context, args.repeats) for s in (node, native, half)]
                print(f"| {label} | {context} | {times[0]:.1f} | {times[1]:.1f} | {times[0] / times[1]:.2f}x | {times[2]:.1f} | "
                      f"{times[1] / times[2]:.2f}x |", flush=True)
            prompts.append((label, [prompt_us(s, heads, head_dim, args.capacity, args.repeats) for s in (node, native, half)]))
        for label, times in prompts:
            print(f"| {label} | prompt of 256 in runs of 64 | {times[0]:.0f} | {times[1]:.0f} | {times[0] / times[1]:.2f}x | "
                  f"{times[2]:.0f} | {times[1] / times[2]:.2f}x |")
    if args.profile is not None:
        variant, shares = op_shares(args.profile)
        print(f"\n{args.profile} ({variant}): share of kernel time by op type (ONNX Runtime's profiler)\n")
        phases = list(shares)
        ops = sorted({op for phase in shares.values() for op in phase}, key=lambda op: -max(p.get(op, 0) for p in shares.values()))
        print("| op type | " + " | ".join(phases) + " |")
        print("|---|" + "---|" * len(phases))
        for op in ops:
            print(f"| {op} | " + " | ".join(f"{shares[phase].get(op, 0.0) * 100:.1f} %" for phase in phases) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
