"""A native attention operator in place of ONNX Runtime's GroupQueryAttention node, where a C compiler is.

The exported graph attends with `com.microsoft.GroupQueryAttention` (export/gqa.py). On the CPU that
node costs 2-4x the memory floor of a decode step and computes a prompt chunk's scores for every
position, the causally hidden ones too; it is 40 % of a decode step and of a prefill
(bench/bench_attention.py). `engine/native_attention.c` is the same attention as an ONNX Runtime custom
operator (same layout, same in-place write into the shared KV buffer), compiled here for this CPU.

At load, for a CPU session of one thread (the node's own thread pool is what the other sessions use),
`prepare(graph)` compiles the operator once per machine into the user's cache (a few hundred ms, the
first time only), rewrites the graph's attention nodes to it, and returns the library for the session
options to register. Without a compiler, or with SEGUE_NATIVE_ATTENTION=0, or if anything fails, the
graph stays as exported and the log says why: the node is the fallback, never an error.

With `half_cache`, the operator is segue.CausalAttention16 and the graph's pasts and presents become
float16: the cache takes half the memory, and a decode step, which reads the whole history, reads half
the bytes (at 512 positions the history is half of what a small model's step reads). The engine asks
for it for the int8 variant, whose activations are already rounded to 8 bits (engine/session.py);
SEGUE_HALF_CACHE=0 turns it off. Only where the library offers it (`offers_half_cache`): built for an
x86 CPU with F16C, which converts halves in vector registers; elsewhere the cache stays float32.

With `int8_cache` (asked for with `half_cache`, for the same variant), the operator is
segue.CausalAttention8 and the pasts and presents are int8 rows [batch, heads, length, head_dim + 4]:
a position's bytes and their float32 scale (engine/cache_rows.py), a quarter of the float cache's bytes
plus the scales. SEGUE_INT8_CACHE=0 keeps halves instead.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine import cache_rows

log = logging.getLogger(__name__)

DOMAIN = "ai.segue"
OP_TYPE = "CausalAttention"
HALF_OP_TYPE = "CausalAttention16"  # the same over float16 pasts and presents
INT8_OP_TYPE = "CausalAttention8"  # the same over int8 rows (engine/cache_rows.py)
SOURCES = tuple(Path(__file__).with_name(name) for name in
                ("native_attention.c", "native_attention_kernel.h", "native_layer_kernel.h", "native_matmul_kernel.h",
                 "native_matmul4_kernel.h", "native_gelu_table.h"))
FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
ARCH_SWITCH = "SEGUE_NATIVE_ARCH"  # the -march to build for: this CPU's (native) unless it names another
BUILD_SECONDS = 120
SWITCH = "SEGUE_NATIVE_ATTENTION"
HALF_SWITCH = "SEGUE_HALF_CACHE"
INT8_SWITCH = "SEGUE_INT8_CACHE"

_lock = threading.Lock()
_built: dict[str, Path | None] = {}  # cache key -> library (None: could not build; not retried in this process)


@dataclass(frozen=True)
class NativeGraph:
    """A graph with the native operator in place of its attention nodes, and the library to register."""

    graph: bytes
    library: Path
    nodes: int
    matmuls: int = 0  # quantized matmuls made segue.QuantizedMatMul (engine/native_matmul.py)
    half_cache: bool = False  # the pasts and presents are float16 (segue.CausalAttention16)
    int8_cache: bool = False  # the pasts and presents are int8 rows (segue.CausalAttention8)


def enabled(switch: str = SWITCH) -> bool:
    """Whether the environment leaves `switch` (this operator's, or engine/native_matmul.py's) on."""
    return os.environ.get(switch, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "segue" / "native"


def compiler() -> str | None:
    """$CC, else the first of cc, gcc, clang on the PATH."""
    wanted = os.environ.get("CC", "").strip()
    if wanted:
        return shutil.which(wanted)
    return next((found for name in ("cc", "gcc", "clang") if (found := shutil.which(name))), None)


def library() -> tuple[Path | None, str]:
    """The compiled operator for this machine (built on first use), or None and why not."""
    if not enabled():
        return None, f"{SWITCH}=0"
    cc = compiler()
    if cc is None:
        return None, "no C compiler found (cc, gcc, clang or $CC)"
    try:
        arch = target_arch()
    except ValueError as exc:
        return None, str(exc)
    try:
        key = _cache_key(cc, arch)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{cc} did not run: {exc}"
    with _lock:
        if key not in _built:
            try:
                _built[key] = _build(cc, key, arch)
            except OSError as exc:  # an unwritable cache folder, a full disk: the node serves instead
                log.warning("could not build the native attention operator in %s: %s", cache_dir(), exc)
                _built[key] = None
    built = _built[key]
    return (built, "") if built is not None else (None, f"{cc} could not build {SOURCES[0].name} (see the log)")


def target_arch() -> str:
    """The CPU the library is built for: `native` (this one's vector units), or what SEGUE_NATIVE_ARCH
    names, e.g. `haswell` for the AVX2 code on a machine that has AVX-512 (the tests build it so)."""
    arch = os.environ.get(ARCH_SWITCH, "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", arch):
        raise ValueError(f"{ARCH_SWITCH} is {arch!r}: name a CPU as the compiler's -march takes it (native, haswell, ...)")
    return arch


@functools.cache
def _cache_key(cc: str, arch: str) -> str:
    """The library's name in the cache: the sources, the compiler, its flags and this machine. Worked out
    once per compiler in a process (it runs the compiler and reads the sources), not at every load."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.read_bytes())
    # -march=native builds for this CPU: the key names the machine too, so a copied cache is not reused.
    for part in (cc, version, " ".join(FLAGS), arch, platform.machine(), platform.system(), _cpu_signature()):
        digest.update(part.encode())
    return digest.hexdigest()[:24]


def build_command(cc: str, arch_flags: Sequence[str], output: Path) -> list[str]:
    """The compiler's command line for the library at `output`, built with `arch_flags` (the tests build
    each code path with its own)."""
    return [cc, *FLAGS, *arch_flags, "-o", str(output), str(SOURCES[0]), *([] if sys.platform == "win32" else ["-lm"])]


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo's flags line, as the cache key reads it)."""
    return set(_cpu_signature().split())


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(cc: str, key: str, arch: str) -> Path | None:
    suffix = ".dll" if sys.platform == "win32" else ".dylib" if sys.platform == "darwin" else ".so"
    target = cache_dir() / f"segue-attention-{key}{suffix}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    # The named CPU's vector units; a compiler that takes no -march gets its default.
    for arch_flags in ((f"-march={arch}",), ()):
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            command = build_command(cc, arch_flags, built)
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_SECONDS)
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{' '.join(command)}: {exc}")
                continue
            if done.returncode == 0 and built.exists():
                os.replace(built, target)  # atomic: another process building the same key finds a whole file
                log.info("built the native attention operator: %s", target)
                return target
            errors.append(f"{' '.join(command)}: {done.stderr.strip()[-2000:]}")
    log.warning("could not build the native attention operator; using ONNX Runtime's GroupQueryAttention:\n%s",
                "\n".join(errors))
    return None


def attention_lanes(path: Path) -> int:
    """Floats per vector in the built library's attention: 16 where it was built for AVX-512, else 8."""
    import ctypes

    return int(ctypes.CDLL(str(path)).segue_attention_lanes())


def int16_prompt_scores(path: Path) -> bool:
    """Whether the built library scores a prompt's run over int8 rows from queries rounded to int16 steps
    (AVX-512 VNNI builds; see native_attention_kernel.h): its outputs are then the float arithmetic's on
    those queries, not on the queries themselves."""
    import ctypes

    return bool(ctypes.CDLL(str(path)).segue_int16_prompt_scores())


def offers_half_cache(path: Path) -> bool:
    """Whether the built library registers segue.CausalAttention16 (see native_attention_kernel.h)."""
    import ctypes

    try:
        return bool(ctypes.CDLL(str(path)).segue_half_cache())
    except (OSError, AttributeError):
        return False


def offers_int8_cache(path: Path) -> bool:
    """Whether the built library registers segue.CausalAttention8."""
    import ctypes

    try:
        return bool(ctypes.CDLL(str(path)).segue_int8_cache())
    except (OSError, AttributeError):
        return False


def rewrite(graph: bytes, quantized_matmuls: bool = False, half_cache: bool = False,
            int8_cache: bool = False, matmul_bits: int = 8) -> tuple[bytes, int, int, str]:
    """`graph` with each packed-QKV, rotary-free GroupQueryAttention node (as export/gqa.py writes them)
    replaced by the native operator, and how many were replaced (0: the graph is returned as it was);
    with `quantized_matmuls`, its int8 linear layers too (engine/native_matmul.py), and how many (and their
    norms, GELUs and residual adds folded into them, unless SEGUE_FOLD_LAYERS is 0); with
    `int8_cache` (else `half_cache`), int8 rows (else float16) for pasts and presents where every one of
    them belongs to a replaced node alone (the last value: "int8", "float16", or "" where they stay float32).
    `matmul_bits` 4: the linear layers from int4 weights (segue.QuantizedMatMul4), for decode steps only."""
    import onnx  # only here: a plain load needs no onnx package

    from engine import native_matmul

    model = onnx.load_from_string(graph)
    replaced = 0
    native_nodes = []
    for index, node in enumerate(model.graph.node):
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        inputs = list(node.input) + [""] * 7
        packed = inputs[1] == "" and inputs[2] == ""
        plain = all(name == "" for name in inputs[7:])  # no rotary caches, position ids, bias or sinks
        if (not packed or not plain or attributes.get("do_rotary", 0) or attributes.get("softcap", 0.0)
                or attributes.get("local_window_size", -1) != -1 or attributes.get("smooth_softmax", 0)
                or attributes.get("num_heads") != attributes.get("kv_num_heads") or len(node.output) != 3):
            continue
        native = onnx.helper.make_node(
            OP_TYPE, [inputs[0], inputs[3], inputs[4], inputs[5], inputs[6]], list(node.output), name=node.name,
            domain=DOMAIN, num_heads=int(attributes["num_heads"]), scale=float(attributes.get("scale", 0.0)))
        model.graph.node[index].CopyFrom(native)
        native_nodes.append(model.graph.node[index])
        replaced += 1
    if not replaced:
        return graph, 0, 0, ""
    narrowed = ""
    for wanted, kind in ((int8_cache, "int8"), (half_cache, "float16")):
        if wanted and _narrow_cache(model, native_nodes, kind):
            narrowed = kind
            break
    matmuls = native_matmul.rewrite_model(model, DOMAIN, matmul_bits) if quantized_matmuls else 0
    if matmuls and enabled(native_matmul.FOLD_SWITCH):
        native_matmul.fold_neighbours(model, DOMAIN)
    if not any(opset.domain == DOMAIN for opset in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return model.SerializeToString(), replaced, matmuls, narrowed


def _narrow_cache(model, native_nodes: list, kind: str) -> bool:
    """Make the native nodes' pasts and presents float16 (`kind`), or int8 rows of head_dim + 4 bytes,
    (graph inputs and outputs) and the nodes CausalAttention16 or CausalAttention8, if every cache tensor
    is a float graph input or output that only those nodes touch; else change nothing and say so."""
    from onnx import TensorProto

    body = model.graph
    pasts = {name for node in native_nodes for name in node.input[1:3]}
    presents = {name for node in native_nodes for name in node.output[1:3]}
    inputs = {i.name: i for i in body.input}
    outputs = {o.name: o for o in body.output}
    natives = {id(node) for node in native_nodes}
    touched_elsewhere = {name for node in body.node if id(node) not in natives for name in [*node.input, *node.output]}
    if (not pasts <= inputs.keys() or not presents <= outputs.keys() or touched_elsewhere & (pasts | presents)
            or any(inputs[name].type.tensor_type.elem_type != TensorProto.FLOAT for name in pasts)):
        return False
    element, op_type = (TensorProto.INT8, INT8_OP_TYPE) if kind == "int8" else (TensorProto.FLOAT16, HALF_OP_TYPE)
    for value in [*(inputs[name] for name in pasts), *(outputs[name] for name in presents)]:
        value.type.tensor_type.elem_type = element
        dims = value.type.tensor_type.shape.dim
        if kind == "int8" and len(dims) == 4 and dims[3].HasField("dim_value"):  # head_dim bytes and a scale
            dims[3].dim_value += cache_rows.SCALE_BYTES
    for node in native_nodes:
        node.op_type = op_type
    return True


def prepare(graph: bytes, quantized_matmuls: bool = False, half_cache: bool = False,
            int8_cache: bool = False, matmul_bits: int = 8) -> tuple[NativeGraph | None, str]:
    """The graph with the native operator and its library, or None and why the graph stays as it is.
    `quantized_matmuls`: the int8 linear layers run natively too (for a session of decode steps).
    `int8_cache`: an int8 cache, where the library offers it and SEGUE_INT8_CACHE is not 0; else
    `half_cache`: a float16 cache, where the library offers it and SEGUE_HALF_CACHE is not 0.
    `matmul_bits` 4: the linear layers from int4 weights (engine/native_matmul4_kernel.h; decode steps only)."""
    path, why = library()
    if path is None:
        return None, why
    half_cache = half_cache and enabled(HALF_SWITCH) and offers_half_cache(path)
    int8_cache = int8_cache and enabled(INT8_SWITCH) and offers_int8_cache(path)
    try:
        rewritten, nodes, matmuls, narrowed = rewrite(graph, quantized_matmuls, half_cache, int8_cache, matmul_bits)
    except ImportError:
        return None, "the onnx package is not installed (it rewrites the graph)"
    except Exception as exc:  # a graph onnx cannot parse is ONNX Runtime's to judge, as before
        return None, f"the graph could not be rewritten: {exc}"
    if not nodes:
        return None, "the graph has no GroupQueryAttention node of the exported kind"
    return NativeGraph(rewritten, path, nodes, matmuls, narrowed == "float16", narrowed == "int8"), ""
