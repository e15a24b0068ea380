"""What ONNX Runtime's GroupQueryAttention costs per layer on this CPU, next to the memory floor of its work.

    python bench/bench_attention.py
    python bench/bench_attention.py --contexts 256 512 --repeats 9

The engine's decode step is one GroupQueryAttention node per layer plus the layer's matmuls
(`export/gqa.py`). This times the node alone, as the engine runs it (one thread, the shared KV buffer
bound as past and present, one new position), for the head layouts of the presets (8 heads of 32:
`small` and the shipped `compact`; 8 heads of 64: `seed`), at several lengths of history. Next to
each time: the floor, the history's keys and values (what the node must read) at the read bandwidth
measured here for a working set that size, and the ratio. The matmuls' own floor is in
bench_engine.py's tables; this is the part of a step that grows with the context.

Times are process CPU time (one thread), the best of `--repeats` rounds of 200 calls.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core for the bandwidth probe too, before numpy starts its threads

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.machine import cpu_name, vector_extensions  # noqa: E402
from engine.session import session_options  # noqa: E402

LAYOUTS = {"8 x 32 (small, compact)": (8, 32), "8 x 64 (seed)": (8, 64)}
CALLS = 200


def attention_session(heads: int, head_dim: int, capacity: int) -> ort.InferenceSession:
    """One GroupQueryAttention node over a [1, heads, capacity, head_dim] buffer, as export/gqa.py writes it."""
    width = heads * head_dim
    value = helper.make_tensor_value_info
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total"],
                            ["out", "present_key", "present_value"], domain="com.microsoft",
                            num_heads=heads, kv_num_heads=heads)
    cache = [1, heads, capacity, head_dim]
    graph = helper.make_graph(
        [node], "attention",
        [value("qkv", TensorProto.FLOAT, [1, 1, 3 * width]), value("past_key", TensorProto.FLOAT, cache),
         value("past_value", TensorProto.FLOAT, cache), value("seqlens_k", TensorProto.INT32, [1]),
         value("total", TensorProto.INT32, [])],
        [value("out", TensorProto.FLOAT, [1, 1, width]), value("present_key", TensorProto.FLOAT, cache),
         value("present_value", TensorProto.FLOAT, cache)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])


def node_us(session: ort.InferenceSession, heads: int, head_dim: int, capacity: int, context: int, repeats: int) -> float:
    """Microseconds of one decode call with `context` positions of history (best of `repeats` rounds)."""
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1, heads, capacity, head_dim), dtype=np.float32)
    values = rng.standard_normal((1, heads, capacity, head_dim), dtype=np.float32)
    out = np.empty((1, 1, heads * head_dim), dtype=np.float32)
    binding = session.io_binding()
    binding.bind_cpu_input("qkv", rng.standard_normal((1, 1, 3 * heads * head_dim), dtype=np.float32))
    binding.bind_cpu_input("past_key", keys)
    binding.bind_cpu_input("past_value", values)
    binding.bind_cpu_input("seqlens_k", np.array([context], dtype=np.int32))
    binding.bind_cpu_input("total", np.array(context + 1, dtype=np.int32))
    binding.bind_output("out", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
    for name, buffer in (("present_key", keys), ("present_value", values)):  # shared: the engine's binding
        binding.bind_output(name, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
    for _ in range(20):
        session.run_with_iobinding(binding)
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(CALLS):
            session.run_with_iobinding(binding)
        best = min(best, (time.process_time() - started) / CALLS * 1e6)
    return best


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 512, 896])
    parser.add_argument("--capacity", type=int, default=1024, help="positions in the preallocated buffer")
    parser.add_argument("--repeats", type=int, default=5)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
