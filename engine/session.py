"""ONNX Runtime session over a verified model folder, with an explicit KV cache.

    decoder = OnnxDecoder.load("models/default")
    cache = decoder.empty_cache(batch=1)
    logits, cache = decoder.step(ids, cache)      # prefill: ids [batch, T]
    logits, cache = decoder.step(next_ids, cache) # decode: ids [batch, 1]

The cache's length is the position of the next token, so position ids are derived, never guessed.
Two graph kinds (the manifest's `onnx.kv_cache`, confirmed against the graph at load):

* "shared-buffer" (export-onnx since issue 11): attention is ONNX Runtime's GroupQueryAttention.
  A cache is one buffer per layer and key/value of `max_context` positions, allocated once and
  bound through IO binding as both the past input and the present output, so a decode step writes
  its one new position and copies nothing. Stepping an older cache of the same buffer (a branch:
  the chord lookahead, "generate again" on a prepared prompt) copies it first, so every `KVCache`
  keeps meaning what it meant when it was returned. On a GPU the buffers are device memory
  (`_DeviceStore`) and the graph takes GroupQueryAttention's lengths from the host
  (engine/host_lengths.py: CUDA's kernel got them wrong when the graph computed them).
* "concat" (older folders): presents = pasts + new positions, copied by the graph on every step.

On the CPU, a session of one thread runs the shared-buffer graph with its GroupQueryAttention nodes
rewritten to the native operator (engine/native_attention.py: the same attention in C, built once per
machine, 1.6-4.7x faster than the node for a decode step); without a C compiler, or with
SEGUE_NATIVE_ATTENTION=0, the node runs as exported. `decoder.attention` says which. For the int8
variant that session also runs its quantized matmuls natively (engine/native_matmul.py: a decode
step's one-row products, 1.2x faster a step on the small preset). Prompts run on it too where the
kernel's path is the faster for them (AVX-512 VNNI without AMX: native_matmul.takes_prompts); elsewhere,
or with SEGUE_NATIVE_PROMPTS=0, runs of more than NATIVE_MATMUL_ROWS rows go to a second session of the
same graph with ONNX Runtime's matmuls; SEGUE_NATIVE_MATMUL=0 keeps ONNX Runtime's for every run. The
int4 variant (the manifest's, where export measured it), or `decode_weights="int4"` (SEGUE_DECODE_WEIGHTS=int4)
with the int8 one: the int8 variant's decode steps (runs of up to
NATIVE_MATMUL_ROWS rows) read its weights quantized again to int4 at load (engine/native_matmul4_kernel.h:
half the bytes a step, for models whose weights come from DRAM), and prompts run on a second session of
the int8 weights, natively where the kernel takes prompts; `decoder.decode_weights` says which. Only where
the int4 kernel has its fast path (native_matmul.FAST_INT4_PATHS); elsewhere int8 decode steps, logged. CPU graphs also
get a `last_positions` input (engine/last_positions.py): `step` and a prompt's prefill ask for the
last position's logits only, and the graph then runs the last layer's tail for that position alone.

`KVCache.tensors` is the history as per-layer arrays [batch, heads, length, head_dim] in both
cases (past_key_0, past_value_0, past_key_1, ...), or [batch, heads, length, head_dim + 4] int8 rows
where the int8 variant keeps an int8 cache (`decoder.cache_row`, engine/cache_rows.py);
`KVCache(tensors)` builds a cache from float arrays for any decoder.

Configuration for a machine whose cores belong to a DAW first (arguments win over the environment):
SEGUE_THREADS (intra-op threads of the decode session, default 1), SEGUE_PREFILL_THREADS (threads
for prompts of PREFILL_MIN_TOKENS or more, default the same: a second session only when larger),
SEGUE_DECODE_WEIGHTS (int8 or int4, for the int8 variant on the native operator; default int8),
SEGUE_VARIANT (fp32, int8, fp16, ...; default the manifest's `serve` choice, timed again here when it
was measured on another CPU (engine/variant_choice.py), or on a GPU the fp16 variant where the folder
has one; a folder without the variant serves its own choice, with a warning), SEGUE_PROVIDER (cpu or
cuda; cuda falls back to the CPU, and to the CPU's precision, with a warning when this onnxruntime
has no usable CUDA).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from engine import cache_rows, host_lengths, last_positions, native_attention, native_matmul
from engine.machine import cpu_name
from engine.manifest import MODEL_FILE, Manifest, ModelError, read_model_folder
from engine.variant_choice import INT4_VARIANT, choose_for_gpu, choose_here, needs_measuring_here

log = logging.getLogger("segue.engine")

PREFILL_MIN_TOKENS = 32  # prompts at least this long may run on the prefill session (SEGUE_PREFILL_THREADS)
# Runs of more rows (batch x positions) than this go to ONNX Runtime's int8 matmuls, fewer to the native
# one (engine/native_matmul.py), where the decode session has it: the crossover measured in
# docs/performance.md, Session 14. Not where the native kernel takes prompts too (native_matmul.PROMPT_PATHS).
NATIVE_MATMUL_ROWS = 4
DECODE_WEIGHTS_SWITCH = "SEGUE_DECODE_WEIGHTS"  # int4: the int8 variant's decode steps from int4 weights
PREFILL_CHUNK = 64  # prompt positions per run on the shared-buffer graph (see OnnxDecoder._forward_shared)
# Where the native int8 matmuls take prompts (native_prompts): each row is quantized on its own there, so a
# position's result does not depend on which run it goes in, and a prompt goes in runs of 256 positions
# (a 256-token prefill of the small preset 1.2-1.3x faster than in runs of 64: docs/performance.md,
# "Session 20") while a kept prompt still lends its first positions in steps of 16.
NATIVE_PROMPT_RUN = 256
NATIVE_LEND_STEP = 16  # at least the attention's SEGUE_QUERIES_FROM: see OnnxDecoder._runs
NATIVE_LEND_REST = 8  # the attention's SEGUE_QUERIES_FROM (engine/native_attention_kernel.h)
# The two counts nearly every run feeds, made once (a decode step binds one on every call).
_LAST_FEEDS = {count: np.array([count], dtype=np.int64) for count in (1, last_positions.EVERY)}
POOL_BYTES = 256 << 20  # free cache buffers kept per decoder for reuse (already paged in: no page faults)
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class _Written:
    """`written`: how many positions the newest cache over a store holds (the next writer must start there)."""

    def __init__(self) -> None:
        self.written = 0
        self.lock = threading.Lock()

    def claim(self, length: int, steps: int) -> bool:
        """Reserve positions length..length+steps-1 for one writer; False when a newer cache owns them."""
        with self.lock:
            if self.written != length:
                return False
            self.written = length + steps
            return True

    def unclaim(self, length: int, steps: int) -> None:
        """A claimed step that failed wrote nothing valid: let the cache step again without a copy."""
        with self.lock:
            if self.written == length + steps:
                self.written = length


class _Store(_Written):
    """One preallocated buffer per layer and key/value [batch, heads, capacity, head_dim], an IO binding
    of the decode session with every buffer bound once as its past and its present (OrtValues over the
    same memory), and `written`: how many positions the newest cache over this store holds (the next
    writer must start there)."""

    def __init__(self, buffers: list[np.ndarray], binding: Any, pool: _Pool | None):
        super().__init__()
        self.buffers = buffers
        self.binding = binding
        self.batch = int(buffers[0].shape[0])
        self.pool = pool
        if pool is not None:  # the buffers go back to the pool when the last cache over them is gone
            weakref.finalize(self, pool.give_back, buffers, binding)


class _DeviceStore(_Written):
    """The cache of a GPU session: one buffer per layer and key/value [batch, heads, capacity, head_dim]
    in device memory (OrtValues), bound as both past and present of every run over it, so that a step
    writes only its new positions, in place (GroupQueryAttention's shared-buffer mode). Measured on an
    H200 (session 15): 0.56-0.74 ms a decode step, where a fresh present per step took 40-60 ms.
    `written` as in _Store. Rows are copied through the host: that happens when variations start or end,
    not per step."""

    pool = None

    def __init__(self, buffers: list[Any], device: str):
        super().__init__()
        self.buffers = buffers
        self.device = device
        self.batch = int(buffers[0].shape()[0])

    @classmethod
    def filled(cls, history: tuple[np.ndarray, ...], capacity: int, dtype: np.dtype, device: str) -> _DeviceStore:
        """A store holding `history` (host arrays [batch, heads, n, head_dim]); the rest zeros, so that
        no kernel ever reads uninitialised memory behind the history."""
        buffers = []
        for tensor in history:
            full = np.zeros((tensor.shape[0], tensor.shape[1], capacity, tensor.shape[3]), dtype=dtype)
            full[:, :, :tensor.shape[2]] = tensor
            buffers.append(ort.OrtValue.ortvalue_from_numpy(full, device, 0))
        store = cls(buffers, device)
        store.written = int(history[0].shape[2])
        return store

    def history(self, length: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """The first `length` positions of `rows` (default all), on the host."""
        tensors = (b.numpy() for b in self.buffers)
        return tuple(np.ascontiguousarray((t if rows is None else t[rows])[:, :, :length]) for t in tensors)


class _Pool:
    """Free cache buffers of one decoder, by batch size, up to POOL_BYTES."""

    def __init__(self, make):
        self.make = make  # batch -> (buffers, binding)
        self.free: dict[int, list[tuple]] = {}
        self.bytes = 0
        self.lock = threading.Lock()

    def take(self, batch: int) -> _Store:
        with self.lock:
            entries = self.free.get(batch)
            entry = entries.pop() if entries else None
            if entry is not None:
                self.bytes -= sum(b.nbytes for b in entry[0])
        buffers, binding = entry if entry is not None else self.make(batch)
        return _Store(buffers, binding, pool=self)

    def give_back(self, buffers: list[np.ndarray], binding: Any) -> None:
        size = sum(b.nbytes for b in buffers)
        with self.lock:
            if self.bytes + size <= POOL_BYTES:
                self.free.setdefault(int(buffers[0].shape[0]), []).append((buffers, binding))
                self.bytes += size


class KVCache:
    """The attention history of a batch of sequences: per-layer keys and values for `length` positions.

    Immutable in meaning: `select`, `repeat` and `OnnxDecoder.step` return new caches and never change
    what an existing one holds."""

    __slots__ = ("_tensors", "_store", "_length")

    def __init__(self, tensors: tuple[Any, ...] = (), *, store: _Store | _DeviceStore | None = None, length: int = 0):
        if store is None and not tensors:
            raise ValueError("a KVCache needs its tensors or a store")
        self._tensors = tuple(tensors)  # numpy arrays, or OrtValues kept on a device
        self._store = store
        self._length = length

    @property
    def tensors(self) -> tuple[np.ndarray, ...]:
        """past_key_0, past_value_0, past_key_1, ...: [batch, heads, length, head_dim] host arrays
        (copies for a shared-buffer cache, so they stay valid whatever happens to the buffer)."""
        if isinstance(self._store, _DeviceStore):
            return self._store.history(self._length)
        if self._store is not None:
            return tuple(b[:, :, :self._length].copy() for b in self._store.buffers)
        return tuple(t if isinstance(t, np.ndarray) else t.numpy() for t in self._tensors)

    @property
    def length(self) -> int:
        if self._store is not None:
            return self._length
        return int(_shape(self._tensors[0])[2])

    @property
    def batch(self) -> int:
        if self._store is not None:
            return self._store.batch
        return int(_shape(self._tensors[0])[0])

    def select(self, rows) -> KVCache:
        """The cache of some batch rows, in the order given; a repeated row is copied (a variation
        finishing early drops its row, beam search reorders and duplicates rows)."""
        index = np.arange(self.batch)[rows]
        if self._store is None:
            return KVCache(tuple(t[index] for t in self.tensors))
        if index.tolist() == list(range(self.batch)):
            return self  # every row in order: the same history (a later step copies if it must)
        return self._copy_rows(index)

    def repeat(self, times: int) -> KVCache:
        """Every row copied `times` times in place (a batch-1 prompt prefill shared by all variations)."""
        if self._store is None:
            return KVCache(tuple(np.repeat(t, times, axis=0) for t in self.tensors))
        if times == 1:
            return self
        return self._copy_rows(np.repeat(np.arange(self.batch), times))

    @property
    def in_place(self) -> bool:
        """Whether this cache lies in a preallocated shared buffer, which a step from it can extend in
        place (while no newer cache over the buffer has written past it)."""
        return self._store is not None

    def rewind_buffer(self) -> None:
        """Free the buffer positions after this cache's, so that the next step from it writes there in
        place again instead of copying the history first. Only for a caller that knows every cache
        stepped from this one over the same buffer is finished with (PrefillCache's lease): a step from
        one of those afterwards would read positions written by another."""
        store = self._store
        if store is not None:
            with store.lock:
                store.written = min(store.written, self._length)

    def _copy_rows(self, index: np.ndarray) -> KVCache:
        if isinstance(self._store, _DeviceStore):
            history = self._store.history(self._length, index)
            capacity = int(self._store.buffers[0].shape()[2])
            return KVCache(store=_DeviceStore.filled(history, capacity, history[0].dtype, self._store.device),
                           length=self._length)
        assert self._store is not None and self._store.pool is not None, "a shared-buffer cache has its pool"
        store = self._store.pool.take(len(index))
        n = self._length
        for source, target in zip(self._store.buffers, store.buffers, strict=True):
            for row, origin in enumerate(index):
                target[row, :, :n] = source[origin, :, :n]
        store.written = n
        return KVCache(store=store, length=n)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, np.ndarray) else tuple(value.shape())


def session_options(threads: int) -> ort.SessionOptions:
    """Options for a machine whose cores belong to a DAW first."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle worker threads must sleep, not spin on the cores the audio engine needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def choose_providers(providers: list[str] | None = None) -> list[str]:
    """The execution providers to ask for: `providers`, else SEGUE_PROVIDER (cpu or cuda), else the CPU.
    A provider this onnxruntime build lacks is dropped with a warning that says so, and the CPU is
    always last, so a request for CUDA on a machine without it still serves."""
    if providers is None:
        wanted = os.environ.get("SEGUE_PROVIDER", "cpu").strip().lower()
        if wanted not in ("cpu", "cuda"):
            raise ModelError(f"SEGUE_PROVIDER is {wanted!r}; use cpu or cuda")
        providers = [CUDA, CPU] if wanted == "cuda" else [CPU]
    available = set(ort.get_available_providers())
    chosen = [p for p in providers if p in available and p != CPU]
    for missing in (p for p in providers if p not in available):
        log.warning("%s was requested but this onnxruntime build does not have it (it has %s); running on the CPU. "
                    "Install the `gpu` extra (onnxruntime-gpu) on a machine with CUDA to use the GPU.",
                    missing, ", ".join(sorted(available)))
    return [*chosen, CPU]


class OnnxDecoder:
    def __init__(self, folder: Path, manifest: Manifest, session: ort.InferenceSession,
                 prefill_session: ort.InferenceSession | None = None, variant: str = "fp32",
                 prefill_from: int = PREFILL_MIN_TOKENS):
        self.folder = Path(folder)
        self.manifest = manifest
        self.session = session
        # Runs of `prefill_from` rows or more go here: a session with more threads for long prompts, when
        # configured, or the graph with ONNX Runtime's int8 matmuls where `session` has the native ones.
        self.prefill_session = prefill_session
        self.prefill_from = prefill_from
        self.native_matmuls = 0  # int8 linear layers of `session` on the native operator (set by from_bytes)
        self.native_prompts = False  # and prompts run on the native int8 kernel too (set by from_bytes)
        self.decode_weights = variant  # what a decode step's matmuls read: the variant's own, or "int4" (from_bytes)
        self.variant = variant
        self.serve_reason = ""  # why this precision is served (from_bytes: the manifest's measurement, or one made here)
        self.attention = "GroupQueryAttention"  # or "native (...)": engine/native_attention.py, set by from_bytes
        shape = manifest.model
        self.n_layer = shape.n_layer
        self.n_head = shape.n_head
        self.head_dim = shape.head_dim
        self.vocab_size = shape.vocab_size
        self.max_context = shape.max_context
        self.past_names = list(manifest.onnx.past_inputs)
        self.present_names = list(manifest.onnx.present_outputs)
        self.output_names = list(manifest.onnx.outputs)
        # fp32 logits can be written straight into an array of ours at each decode step (`_run`).
        self._float_logits = next((o.type for o in session.get_outputs() if o.name == "logits"), "") == "tensor(float)"
        # The cache's element type is the graph's: float32, or float16 for the fp16 variant (GPU), or int8
        # rows for the int8 variant on the native operator (engine/native_attention.py; float16 there with
        # SEGUE_INT8_CACHE=0). `cache_row`: the last dimension of a cache tensor, head_dim numbers, or an
        # int8 row's head_dim bytes and its scale (engine/cache_rows.py).
        self.cache_dtype = np.dtype(_CACHE_DTYPES.get(_cache_type(session, manifest), np.float32))
        self.cache_row = cache_rows.row_width(self.head_dim) if self.cache_dtype == np.int8 else self.head_dim
        providers = session.get_providers()
        self.device = "cuda" if CUDA in providers else "cpu"
        declared = {i.name for i in session.get_inputs()}
        # A graph rewritten at load (engine/last_positions.py) can skip what a run's unwanted logits need.
        self._last_input = last_positions.INPUT in declared
        # A CUDA session's graph takes GroupQueryAttention's lengths from the host (engine/host_lengths.py).
        self._host_lengths = host_lengths.SEQLENS in declared
        missing = {"input_ids", "position_ids", *self.past_names} - declared
        if missing:
            raise ModelError(f"{self.folder / MODEL_FILE} lacks the inputs its manifest names: {', '.join(sorted(missing))}")
        self._check_shape_against_graph()
        self.kv_cache = self._graph_kv_cache()
        if self.kv_cache != manifest.onnx.kv_cache:
            raise ModelError(f"{self.folder / 'manifest.json'}: onnx.kv_cache is {manifest.onnx.kv_cache!r}, but the graph's "
                             f"cache is {self.kv_cache!r}; the manifest does not describe this model")
        # The shared buffer lives in host memory; on a GPU the cache stays on the device instead (OrtValues
        # returned by one step and bound as the next step's pasts), through the graph's plain semantics.
        self.shared = self.kv_cache == "shared-buffer" and self.device == "cpu"
        # On a GPU, the same design in device memory (_DeviceStore), where the graph can be told the lengths.
        self.device_buffers = self.kv_cache == "shared-buffer" and self.device != "cpu" and self._host_lengths
        self._pool = _Pool(self._new_buffers)

    # --- loading -----------------------------------------------------------------------------------

    def _check_shape_against_graph(self) -> None:
        """The manifest's model shape must be the graph's. The manifest is not covered by its own file
        hashes, so an edited one (`max_context` 512 -> 4096) would otherwise be believed, and long
        requests would fail deep inside ONNX Runtime. The graph's declared shapes give the layers, heads,
        head size and vocabulary; two one-token runs give the context: its last position must exist and
        the one after it must not (the position table has exactly `max_context` rows)."""
        where = self.folder / "manifest.json"
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        cache_shape = inputs[self.past_names[0]]
        row = cache_shape[3]
        found = {"n_layer": sum(1 for name in inputs if name.startswith("past_")) // 2, "n_head": cache_shape[1],
                 "head_dim": row - (self.cache_row - self.head_dim) if isinstance(row, int) else row,
                 "vocab_size": outputs.get("logits", [None])[-1]}
        for field, value in found.items():
            if isinstance(value, int) and getattr(self, field) != value:  # a symbolic dimension says nothing
                raise ModelError(f"{where}: model.{field} is {getattr(self, field)}, but the graph's is {value}; "
                                 "the manifest does not describe this model")

        failures: list[str] = []

        def runs_at(position: int) -> bool:
            # The history is as long as the position says (both graph kinds read it so).
            past = np.zeros((1, self.n_head, position, self.cache_row), dtype=self.cache_dtype)
            feeds: dict[str, np.ndarray] = {"input_ids": np.zeros((1, 1), dtype=np.int64),
                                            "position_ids": np.full((1, 1), position, dtype=np.int64)}
            feeds.update((name, past) for name in self.past_names)
            feeds.update(self._last_feed(None))
            feeds.update(self._lengths_feed(feeds["position_ids"]))
            quiet = ort.RunOptions()
            quiet.log_severity_level = 4  # the failure is the expected answer for the second probe: no error log
            try:
                self.session.run(self.output_names[:1], feeds, quiet)
                return True
            except Exception as exc:  # onnxruntime's own error types: an index outside the position table
                failures.append(str(exc).splitlines()[0][:300])
                return False

        if not runs_at(self.max_context - 1):
            raise ModelError(f"{where}: model.max_context is {self.max_context}, but the graph has no position "
                             f"{self.max_context - 1}; the manifest does not describe this model "
                             f"(ONNX Runtime {ort.__version__}: {failures[-1]})")
        # The upper probe relies on Gather refusing an index outside the table, which the CPU's kernel
        # does; CUDA's does not check (seen on an H200: the probe "ran"), so only the CPU asks it.
        if self.device == "cpu" and runs_at(self.max_context):
            raise ModelError(f"{where}: model.max_context is {self.max_context}, but the graph reads longer contexts; "
                             "the manifest does not describe this model")

    def _graph_kv_cache(self) -> str:
        """"shared-buffer" when a past longer than the history comes back as a present of the same length
        (GroupQueryAttention reads the history's length from position_ids), "concat" when the graph appends."""
        past = np.zeros((1, self.n_head, 2, self.cache_row), dtype=self.cache_dtype)
        feeds: dict[str, np.ndarray] = {"input_ids": np.zeros((1, 1), dtype=np.int64),
                                        "position_ids": np.zeros((1, 1), dtype=np.int64)}
        feeds.update((name, past) for name in self.past_names)
        feeds.update(self._last_feed(None))
        feeds.update(self._lengths_feed(feeds["position_ids"]))
        try:
            present = self.session.run(self.present_names[:1], feeds)[0]
        except Exception as exc:  # onnxruntime's own error types
            raise ModelError(f"{self.folder / MODEL_FILE} does not run a decode step in ONNX Runtime {ort.__version__}: "
                             f"{str(exc).splitlines()[0][:300]}") from exc
        return "shared-buffer" if present.shape[2] == 2 else "concat"

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None, providers: list[str] | None = None,
             variant: str | None = None, prefill_threads: int | None = None,
             decode_weights: str | None = None) -> OnnxDecoder:
        """Verify every file hash, then create the session from the verified bytes (never the other way round)."""
        manifest, files = read_model_folder(Path(folder))
        return cls.from_bytes(Path(folder), manifest, files[MODEL_FILE], threads, providers, variant=variant,
                              prefill_threads=prefill_threads, files=files, decode_weights=decode_weights)

    @classmethod
    def from_bytes(cls, folder: Path, manifest: Manifest, model: bytes, threads: int | None = None,
                   providers: list[str] | None = None, *, variant: str | None = None, prefill_threads: int | None = None,
                   files: dict[str, bytes] | None = None, decode_weights: str | None = None) -> OnnxDecoder:
        """A session over ONNX bytes already checked against `manifest` (read_model_folder), warmed up.

        `model` is model.onnx; another variant (`variant`, else SEGUE_VARIANT, else the manifest's `serve`
        choice) is taken from `files` or read once from the folder and checked against its sha256 before
        a session is made of it. When the manifest's choice between fp32 and int8 was measured on another
        CPU, both are timed here first and the export's rule decides (`serve_reason` says which way).
        `decode_weights` (else SEGUE_DECODE_WEIGHTS, else "int8"): "int4" for the int8 variant's decode steps
        from its weights quantized again to int4 (see the top of this file)."""
        threads = threads or int(os.environ.get("SEGUE_THREADS", "1"))
        decode_weights = (decode_weights or os.environ.get(DECODE_WEIGHTS_SWITCH, "").strip() or "int8").lower()
        if decode_weights not in ("int8", "int4"):
            raise ValueError(f"decode weights {decode_weights!r}: choose int8 or int4")
        prefill_threads = prefill_threads or int(os.environ.get("SEGUE_PREFILL_THREADS", "0")) or threads
        served = manifest.serve.variant if manifest.serve else "fp32"
        preferred = os.environ.get("SEGUE_VARIANT", "").strip()
        if variant is None and preferred and preferred != "fp32" and preferred not in manifest.variants:
            log.warning("SEGUE_VARIANT is %s, but %s has no such variant; serving its %s", preferred, folder, served)
        elif variant is None and preferred:
            variant = preferred
        chosen = choose_providers(providers)

        attention: dict[ort.InferenceSession, str] = {}
        matmuls: dict[ort.InferenceSession, int] = {}
        prompts: dict[ort.InferenceSession, bool] = {}  # its native matmuls are the faster way for a prompt's runs too
        # The int8 variant keeps its cache in int8 rows (else float16) on the native operator
        # (engine/native_attention.py): a decode step reads the whole history, so fewer bytes. Not where a
        # prefill session of more threads keeps ONNX Runtime's node, whose cache is float32 (both sessions
        # write the same buffers).
        half_cache = prefill_threads <= threads

        def make_session(name: str, session_threads: int, decode: bool = True, matmul_bits: int = 8) -> ort.InferenceSession:
            """`decode`: a session for runs of a few rows, which takes the native int8 matmuls too (from int4
            weights with `matmul_bits` 4)."""
            graph = model if name == "fp32" else _variant_bytes(Path(folder), manifest, name, files)
            if chosen == [CPU] and session_threads == 1:  # the node keeps its thread pool where there is one
                int8_file = name in ("int8", INT4_VARIANT)
                native, why = native_attention.prepare(graph, quantized_matmuls=decode and native_attention.enabled(native_matmul.SWITCH),
                                                       half_cache=half_cache and int8_file, int8_cache=half_cache and int8_file,
                                                       matmul_bits=matmul_bits)
                if native is not None:
                    options = session_options(session_threads)
                    try:
                        options.register_custom_ops_library(str(native.library))
                        made = ort.InferenceSession(_last_positions_graph(native.graph, folder, name), options,
                                                    providers=chosen)
                        narrow = ", int8 cache" if native.int8_cache else ", float16 cache" if native.half_cache else ""
                        attention[made] = f"native ({native.library.name}{narrow})"
                        matmuls[made] = native.matmuls
                        prompts[made] = native.matmuls > 0 and matmul_bits == 8 and native_matmul.takes_prompts(native.library)
                        return made
                    except Exception as exc:  # onnxruntime's own error types: the node instead, as exported
                        why = f"ONNX Runtime did not take it: {str(exc).splitlines()[0][:300]}"
                if native_attention.enabled():
                    log.info("%s (%s): ONNX Runtime's GroupQueryAttention, not the native operator: %s", folder, name, why)
            slim = _last_positions_graph(graph, folder, name)  # on a GPU too: a prompt's logits cross the bus
            if CUDA in chosen:
                slim = _host_lengths_graph(slim, folder, name)
            for candidate in dict.fromkeys((slim, graph)):  # the rewritten graph, else the exported one
                try:
                    made = ort.InferenceSession(candidate, session_options(session_threads), providers=chosen)
                    break
                except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
                    if candidate is graph:
                        raise ModelError(f"ONNX Runtime could not load {folder / MODEL_FILE} ({name}): {exc}") from exc
                    log.warning("%s (%s): ONNX Runtime did not take the graph with last_positions (%s); loading it as "
                                "exported", folder, name, str(exc).splitlines()[0][:300])
            attention[made] = "GroupQueryAttention"
            return made

        reason = manifest.serve.reason if manifest.serve is not None else "the manifest names no choice: fp32"
        sessions: dict[str, ort.InferenceSession] = {}
        for_gpu = variant is None and CUDA in chosen
        if for_gpu:
            variant, reason = choose_for_gpu(manifest)
            reason = f"on the GPU: {reason}"
        elif variant is None and chosen == [CPU] and needs_measuring_here(manifest):
            # The manifest's choice was timed on another CPU: time both precisions here and apply its rule.
            sessions = {name: make_session(name, threads) for name in ("fp32", "int8")}
            timed = {name: cls(folder, manifest, session, None, name) for name, session in sessions.items()}
            if INT4_VARIANT in manifest.variants and threads == 1 and prefill_threads <= threads and fast_int4_here():
                four_session = make_session(INT4_VARIANT, threads, matmul_bits=4)
                if matmuls.get(four_session):  # timed with its prompts on the int8 session, as it would be served
                    sessions[INT4_VARIANT] = four_session
                    timed[INT4_VARIANT] = cls(folder, manifest, four_session, sessions["int8"], INT4_VARIANT, NATIVE_MATMUL_ROWS + 1)
            here = choose_here(manifest, timed)
            variant, reason = here.variant, here.reason
            log.info("%s: serving %s on %s: %s", folder, variant, cpu_name(), reason)
        elif variant is not None:
            reason = "asked for (SEGUE_VARIANT or the caller)"
        variant = variant or served

        def decode_session(name: str, wanted_four: bool) -> tuple[ort.InferenceSession, str, str]:
            """The decode session for variant `name`, with int4 decode steps where `wanted_four` and this load can
            have them (the int8 file on the native operator, one thread of a CPU with the fast int4 kernel); the
            variant it serves (int8 for an int4 that cannot be), and why not int4 where it was wanted ("" else)."""
            why_not = ""
            if wanted_four:
                if name not in ("int8", INT4_VARIANT) or chosen != [CPU] or threads != 1 or prefill_threads > threads:
                    why_not = "they are for the int8 file on one thread of the CPU"
                elif not fast_int4_here():
                    why_not = "this CPU has no fast int4 kernel (AVX-512 VNNI or AVX2; elsewhere int8's is the faster)"
                else:
                    made = (sessions.get(INT4_VARIANT) if name == INT4_VARIANT else None) or make_session(name, threads, matmul_bits=4)
                    if matmuls.get(made):
                        return made, name, ""
                    why_not = f"no native int4 matmuls here ({attention.get(made)})"
                name = "int8" if name == INT4_VARIANT else name
            return sessions.get(name) or make_session(name, threads), name, why_not

        # int4 decode steps: the int4 variant's, or the int8 one's with SEGUE_DECODE_WEIGHTS=int4.
        wanted_four = decode_weights == "int4" or variant == INT4_VARIANT
        session, variant, why_not = decode_session(variant, wanted_four)
        four = wanted_four and not why_not
        if why_not:
            log.info("%s: no int4 decode steps (%s); serving %s", folder, why_not, variant)
        if CUDA in chosen and CUDA not in session.get_providers():
            log.warning("CUDAExecutionProvider could not start here (no usable GPU or CUDA libraries); "
                        "running %s on the CPU", folder)
            chosen = [CPU]
            if for_gpu and variant != served:  # the GPU's precision, on the CPU after all: the CPU's instead
                variant = served
                reason = manifest.serve.reason if manifest.serve is not None else "the manifest names no choice: fp32"
            # The CPU's own graph (the GPU's feeds lengths from the host); the int4 variant's with its int4 steps.
            wanted_four = variant == INT4_VARIANT
            session, variant, why_not = decode_session(variant, wanted_four)
            four = wanted_four and not why_not
            if why_not:
                reason = f"{reason}; int8 decode steps here"
        prefill, prefill_from = None, PREFILL_MIN_TOKENS
        if four:  # prompts on the int8 weights: natively where that kernel takes them, else ONNX Runtime's matmuls
            prefill, prefill_from = sessions.get("int8") or make_session(variant, threads), NATIVE_MATMUL_ROWS + 1
            if not prompts.get(prefill):
                prefill = make_session(variant, threads, decode=False)
        elif prefill_threads > threads or (matmuls.get(session) and not prompts.get(session)):
            prefill = make_session(variant, max(prefill_threads, threads), decode=False)
            if matmuls.get(session):  # runs of many rows on ONNX Runtime's int8 matmuls, faster there
                prefill_from = NATIVE_MATMUL_ROWS + 1
        if prefill is not None and _cache_type(prefill, manifest) != _cache_type(session, manifest):  # one fell back to the node
            log.warning("%s: the prefill session's cache is %s and the decode session's %s; prompts run on the "
                        "decode session", folder, _cache_type(prefill, manifest), _cache_type(session, manifest))
            prefill, prefill_from = None, PREFILL_MIN_TOKENS
        decoder = cls(folder, manifest, session, prefill, variant, prefill_from)
        decoder.serve_reason = f"{reason}; its decode steps from int4 weights (SEGUE_DECODE_WEIGHTS=int4)" \
            if four and variant != INT4_VARIANT else reason
        decoder.attention = attention.get(session, "GroupQueryAttention")
        decoder.native_matmuls = matmuls.get(session, 0)
        decoder.native_prompts = bool(decoder.native_matmuls and (prefill is None or prompts.get(prefill)))
        decoder.decode_weights = "int4" if four else variant
        if for_gpu and decoder.device == "cuda":
            log.info("%s: serving %s %s", folder, variant, reason)
        log.info("loaded %s (%s, %s cache, %s, %d thread(s)%s, attention: %s%s)", folder, variant, decoder.kv_cache,
                 decoder.device, threads, f", prefill {prefill_threads}" if prefill_threads > threads else "", decoder.attention,
                 f", {decoder.native_matmuls} {'int4' if four else 'int8'} matmuls native for "
                 f"{'every run' if decoder.native_prompts and not four else f'runs of up to {NATIVE_MATMUL_ROWS} rows'}"
                 f"{', prompts on the native int8 ones' if four and decoder.native_prompts else ''}"
                 if decoder.native_matmuls else "")
        decoder.warm_up()
        return decoder

    # --- the cache -----------------------------------------------------------------------------------

    def _new_buffers(self, batch: int) -> tuple[list[np.ndarray], Any]:
        shape = (batch, self.n_head, self.max_context, self.cache_row)
        buffers = [np.zeros(shape, dtype=self.cache_dtype) for _ in self.past_names]
        return buffers, self._binding(buffers, self.session)

    def empty_cache(self, batch: int = 1) -> KVCache:
        empty = np.zeros((batch, self.n_head, 0, self.cache_row), dtype=self.cache_dtype)
        return KVCache(tuple(empty for _ in self.past_names))

    def in_buffer(self, cache: KVCache) -> KVCache:
        """The same history in a preallocated buffer of this decoder's (a copy), which a step extends in
        place: what a PrefillCache keeps as a prompt's hot buffer (`cache` itself without shared buffers)."""
        if not self.shared:
            return cache
        if cache._store is not None and cache._store.pool is self._pool:
            return cache._copy_rows(np.arange(cache.batch))
        return KVCache(store=self._writable(cache, 0), length=cache.length)

    def _writable(self, cache: KVCache, steps: int) -> _Store:
        """A store whose positions cache.length.. this step may write: the cache's own, unless a newer
        cache already wrote past it (then a copy), or a new one filled from host tensors."""
        store = cache._store
        if isinstance(store, _Store) and store.pool is self._pool:
            if store.claim(cache.length, steps):
                return store
            copied = cache._copy_rows(np.arange(cache.batch))._store
            assert isinstance(copied, _Store)
            copied.written = cache.length + steps
            return copied
        fresh = self._pool.take(cache.batch)
        n = cache.length
        if n:
            for target, source in zip(fresh.buffers, cache.tensors, strict=True):
                target[:, :, :n] = self._as_cache_type(source)
        fresh.written = n + steps
        return fresh

    # --- running the graph -------------------------------------------------------------------------

    def step(self, ids: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Feed `ids` [batch, T] after the cached positions. Returns the last position's logits
        [batch, vocab] and the extended cache."""
        logits, cache = self.forward(ids, cache, last=1)
        return logits[:, -1, :], cache

    def step_instead(self, ids: np.ndarray, cache: KVCache, discarded: KVCache,
                     every_position: bool = False) -> tuple[np.ndarray, KVCache]:
        """`step(ids, cache)` where `discarded` is a step from `cache` whose result is thrown away (the chord
        lookahead's speculative Program for rows that then chose another token, a guessed token that was
        not drawn). On the shared buffer the new positions overwrite the discarded ones in place: no copy
        of the history, which a plain `step` from the older cache would need (0.3-0.5 ms a time at 512
        positions). `discarded` is unusable afterwards. `every_position`: the logits of every fed
        position [batch, T, vocab], as `forward` gives them, instead of the last one's."""
        store, claimed = discarded._store, None
        if store is not None and (self.shared or self.device_buffers) and store is cache._store and discarded.length > cache.length:
            with store.lock:
                if store.written == discarded.length:  # nothing was written after the discarded step: its
                    store.written = cache.length + ids.shape[1]  # positions stay ours (no other writer can
                    claimed = store  # take them in between), as many as this step writes
        discarded._store, discarded._tensors = None, ()  # its positions are about to be overwritten
        logits, cache = self.forward(ids, cache, claimed, last=None if every_position else 1)
        return (logits if every_position else logits[:, -1, :]), cache

    def shortened(self, cache: KVCache, length: int) -> KVCache:
        """The first `length` positions of a shared-buffer cache, over the same buffers (no copy). Stepping
        it copies them unless it goes through `step_instead` with `cache` as the discarded one."""
        if cache._store is None or not 0 <= length <= cache.length:
            raise ValueError("only a shared-buffer cache can be shortened, to at most its length")
        return KVCache(store=cache._store, length=length)

    @property
    def prefill_chunk(self) -> int:
        """The step in which another prompt's positions may stand in for a prompt's first ones (0: none may).
        Feed the positions after the first k * prefill_chunk, at least `prefill_rest` of them, with
        `forward(..., rest_of_prompt=True)` after a cache of those positions computed for another prompt
        that begins with the same tokens, and they come out bit for bit as a prefill of the whole prompt
        writes them (see `_runs`). PrefillCache lends kept prompts' first positions on this basis."""
        if not self.shared:
            return 0
        return NATIVE_LEND_STEP if self.native_prompts else PREFILL_CHUNK

    @property
    def prefill_rest(self) -> int:
        """The fewest positions of a prompt left to compute after lent ones (see `prefill_chunk`)."""
        return NATIVE_LEND_REST if self.native_prompts else 1

    def _runs(self, start: int, end: int, prompt: bool) -> list[tuple[int, int]]:
        """The runs [a, b) in which positions start..end-1 go to the shared-buffer graph.

        A prompt's (`prompt`: from its first position, or the rest of one after lent positions) are cut at
        the multiples of the run size counted from the prompt's first position, so that a prefill of the
        whole prompt and one of its rest after k * prefill_chunk lent positions (leaving prefill_rest)
        compute every position alike:
        - ONNX Runtime's int8 matmuls quantize a run's activations as a whole, so a position's result
          depends on the run it is in: there the run size is prefill_chunk itself, and the rest's runs are
          the whole prompt's;
        - where the native matmuls take prompts, each row is quantized on its own, and the native attention
          computes a query alike in any run of at least SEGUE_QUERIES_FROM (8) positions (a query per lane)
          and alike in any shorter one (a query at a time), not alike across the two: the rest's first run
          is the tail of one of the whole prompt's, and holds at least 8 positions (prefill_chunk >= 8
          where it ends on a multiple of the run size, prefill_rest where it ends the prompt).
        Other runs of several positions (a guess after a history) go in runs of the run size from `start`."""
        size = NATIVE_PROMPT_RUN if self.native_prompts else PREFILL_CHUNK
        first_cut = (start // size + 1) * size if prompt else start + size
        edges = [start, *range(first_cut, end, size), end]
        return list(zip(edges, edges[1:], strict=False))

    def forward(self, ids: np.ndarray, cache: KVCache, claimed: _Store | _DeviceStore | None = None,
                rest_of_prompt: bool = False, last: int | None = None) -> tuple[np.ndarray, KVCache]:
        """As `step`, but the logits of every fed position [batch, T, vocab] (for scoring a sequence).
        `claimed`: the cache's own store, whose positions this step writes already reserved (step_instead).
        `rest_of_prompt`: `ids` end a prompt whose first `cache.length` positions are cached; they run on
        the session a prefill of the whole prompt would use (see `prefill_chunk`).
        `last`: only the last `last` positions' logits, [batch, min(last, T), vocab]; the graph then skips
        the work only the others' logits need (engine/last_positions.py), a quarter of a prefill's."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        batch, steps = ids.shape
        start = cache.length
        if batch != cache.batch:
            raise ValueError(f"{batch} rows of ids for a cache of {cache.batch} rows")
        if start + steps > self.max_context:
            raise ValueError(f"{start + steps} positions exceed the model context of {self.max_context}")
        positions = np.arange(start, start + steps, dtype=np.int64)[None, :]
        if batch > 1:
            positions = np.repeat(positions, batch, axis=0)
        if last is not None and not 1 <= last:
            raise ValueError(f"last is {last}: ask for at least one position's logits")
        if self.shared:
            assert claimed is None or isinstance(claimed, _Store)
            return self._forward_shared(ids, positions, cache, claimed, start + steps if rest_of_prompt else steps, last,
                                        prompt=start == 0 or rest_of_prompt)
        if self.kv_cache == "shared-buffer" and steps > 1 and start > 0 and batch > 1:
            # GroupQueryAttention takes several new positions after a history one row at a time.
            parts = [self.forward(ids[r:r + 1], cache.select([r]), last=last) for r in range(batch)]
            tensors = zip(*(part.tensors for _, part in parts), strict=True)
            return np.concatenate([logits for logits, _ in parts]), KVCache(tuple(np.concatenate(t) for t in tensors))
        if self.device_buffers or self.device != "cpu":
            logits, cache = self._forward_device(ids, positions, cache, last, claimed)
            return self._last_of(logits, last), cache
        feeds = {"input_ids": ids, "position_ids": positions, **self._last_feed(last)}
        feeds.update(zip(self.past_names, (self._as_cache_type(t) for t in cache.tensors), strict=True))
        outputs = self._session_for(steps * batch).run(self.output_names, feeds)
        return self._last_of(outputs[0], last), KVCache(tuple(outputs[1:]))

    def _lengths_feed(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """GroupQueryAttention's lengths where the graph takes them as inputs (engine/host_lengths.py)."""
        return host_lengths.feeds(positions) if self._host_lengths else {}

    def _last_feed(self, last: int | None) -> dict[str, np.ndarray]:
        """The `last_positions` feed where the graph has that input (None: every position)."""
        if not self._last_input:
            return {}
        count = last or last_positions.EVERY
        made = _LAST_FEEDS.get(count)
        return {last_positions.INPUT: made if made is not None else np.array([count], dtype=np.int64)}

    @staticmethod
    def _last_of(logits: np.ndarray, last: int | None) -> np.ndarray:
        """The last `last` positions of logits a graph without the input computed for every position."""
        return logits if last is None or logits.shape[1] <= last else logits[:, -last:]

    def _as_cache_type(self, tensor: np.ndarray) -> np.ndarray:
        """A history built elsewhere (KVCache(tensors) from float32 arrays) in the graph's element type."""
        if tensor.dtype == self.cache_dtype:
            return tensor
        if self.cache_dtype == np.int8:
            return cache_rows.quantize(tensor)
        return (cache_rows.widen(tensor) if tensor.dtype == np.int8 else tensor).astype(self.cache_dtype)

    def _session_for(self, rows: int) -> ort.InferenceSession:
        """The session for a run of `rows` rows (batch x positions; a prompt's chunks count the whole
        prompt, so that all its runs go to one session)."""
        return self.prefill_session if self.prefill_session is not None and rows >= self.prefill_from else self.session

    def _forward_shared(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache, claimed: _Store | None = None,
                        run: int = 0, last: int | None = None, prompt: bool = False) -> tuple[np.ndarray, KVCache]:
        """`run`: the length that chooses the session (the new positions', or a whole prompt's).
        `last`: as in `forward`. `prompt`: the positions are a prompt's, or the rest of one (see `_runs`)."""
        batch, steps = ids.shape
        start = cache.length
        run = run or steps
        runs = self._runs(start, start + steps, prompt) if steps > 1 else [(start, start + 1)]
        store = claimed if claimed is not None else self._writable(cache, steps)
        try:
            if len(runs) > 1 or (steps > 1 and start > 0 and batch > 1):
                # A long prompt goes in runs (ONNX Runtime's GroupQueryAttention is 1.5-2x faster on a
                # prompt fed 64 positions at a time than whole, measured in bench/bench_engine.py's way; the
                # native operators' best run is longer: NATIVE_PROMPT_RUN), and several new positions after
                # a history go one row at a time (the node takes them so only for a batch of one): each
                # row's slice of the buffers is bound on its own (no copy).
                session = self._session_for(run)
                wanted = steps if last is None else min(last, steps)
                rows = []
                for r in range(batch):
                    binding = store.binding if batch == 1 and session is self.session else \
                        self._binding([b[r:r + 1] for b in store.buffers], session)
                    parts = []
                    for first, after in runs:
                        s, end = first - start, after - start
                        # How many of this run's positions are among the last `wanted`: none, for a prompt's
                        # earlier runs (one is computed and dropped: a run yields at least one).
                        kept = max(0, min(end - s, wanted - (steps - end)))
                        got = self._run(binding, ids[r:r + 1, s:end], positions[r:r + 1, s:end], session,
                                        None if kept == end - s else max(kept, 1))
                        if kept:
                            parts.append(got[:, got.shape[1] - kept:])
                    rows.append(np.concatenate(parts, axis=1))
                logits = np.concatenate(rows)
            elif (session := self._session_for(run * batch)) is not self.session:
                logits = self._run(self._binding(store.buffers, session), ids, positions, session, last)
            else:
                logits = self._run(store.binding, ids, positions, self.session, last)
        except BaseException:
            store.unclaim(start, steps)
            raise
        return logits, KVCache(store=store, length=start + steps)

    def _binding(self, buffers: list[np.ndarray], session: ort.InferenceSession) -> Any:
        """An IO binding of `buffers` (contiguous host arrays) as both pasts and presents, logits first."""
        binding = session.io_binding()
        binding.bind_output("logits")  # first, so get_outputs()[0] is the logits
        for past, present, buffer in zip(self.past_names, self.present_names, buffers, strict=True):
            value = ort.OrtValue.ortvalue_from_numpy(buffer)  # the same memory, not a copy
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        return binding

    def _run(self, binding: Any, ids: np.ndarray, positions: np.ndarray, session: ort.InferenceSession,
             last: int | None = None) -> np.ndarray:
        """One run on the shared buffers; the logits of its last `last` positions (None: all)."""
        batch, steps = ids.shape
        computed = min(last, steps) if last is not None and self._last_input else steps
        fed = getattr(binding, "segue_fed", None)
        if self._float_logits and fed is not None and fed.fits(ids.shape, last):
            # The same shapes as this binding's last run (a decode step after a decode step): the inputs
            # and the logits stay bound at their addresses and only their contents change (binding them
            # anew cost 7-12 % of a small model's step, docs/performance.md "Session 16").
            fed.ids[...] = ids
            fed.positions[...] = positions
            session.run_with_iobinding(binding)
            return fed.logits.copy()  # ours: the next run writes the bound array again
        if self._float_logits and steps == 1:
            fed = _BoundInputs(ids, positions, last, np.empty((batch, computed, self.vocab_size), dtype=np.float32),
                               self._last_feed(last))
            for name, value in (("input_ids", fed.ids), ("position_ids", fed.positions), *fed.feeds.items()):
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))  # by address, not a copy
            binding.bind_output("logits", "cpu", 0, np.float32, list(fed.logits.shape), fed.logits.ctypes.data)
            binding.segue_fed = fed
            session.run_with_iobinding(binding)
            return fed.logits.copy()
        binding.segue_fed = None  # other shapes: bound anew below, and so next time too
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
        for name, value in self._last_feed(last).items():
            binding.bind_cpu_input(name, value)
        if self._float_logits:
            # The logits go straight into a fresh array of ours: reading them back through get_outputs()
            # wraps every output, the cache's too, and copies (0.1 ms a step).
            logits = np.empty((batch, computed, self.vocab_size), dtype=np.float32)
            binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
            session.run_with_iobinding(binding)
            return self._last_of(logits, last)
        binding.bind_output("logits")  # unallocated again: its shape changes with T
        session.run_with_iobinding(binding)
        return self._last_of(binding.get_outputs()[0].numpy(), last)  # a copy: the next run reuses ONNX Runtime's memory

    def _forward_device(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache, last: int | None = None,
                        claimed: _Store | _DeviceStore | None = None) -> tuple[np.ndarray, KVCache]:
        """On a GPU: the cache stays on the device. In device buffers bound as past and present (_DeviceStore)
        where the graph allows; else each step's presents are bound as the next step's pasts."""
        session = self._session_for(ids.size)
        if self.device_buffers:
            return self._forward_device_buffers(ids, positions, cache, last, session,
                                                claimed if isinstance(claimed, _DeviceStore) else None)
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("position_ids", positions)
        for name, value in {**self._last_feed(last), **self._lengths_feed(positions)}.items():
            binding.bind_cpu_input(name, value)
        for name, value in zip(self.past_names, cache._tensors, strict=True):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(self._as_cache_type(value)))
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), KVCache(tuple(outputs[1:]))

    def _forward_device_buffers(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache, last: int | None,
                                session: ort.InferenceSession, claimed: _DeviceStore | None) -> tuple[np.ndarray, KVCache]:
        """`claimed`: as in `forward` (the positions already reserved in the cache's own store)."""
        start, steps = cache.length, ids.shape[1]
        store = cache._store
        if claimed is not None:
            store = claimed
        elif not (isinstance(store, _DeviceStore) and store.claim(start, steps)):
            # Host tensors, or a store a newer cache already wrote past: a new store with this history.
            store = _DeviceStore.filled(cache.tensors, self.max_context, self.cache_dtype, self.device)
            store.written = start + steps
        try:
            binding = session.io_binding()
            binding.bind_output("logits", "cpu")  # first, so get_outputs()[0] is the logits
            for past, present, buffer in zip(self.past_names, self.present_names, store.buffers, strict=True):
                binding.bind_ortvalue_input(past, buffer)
                binding.bind_ortvalue_output(present, buffer)
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("position_ids", positions)
            for name, value in {**self._last_feed(last), **self._lengths_feed(positions)}.items():
                binding.bind_cpu_input(name, value)
            session.run_with_iobinding(binding)
            logits = binding.get_outputs()[0].numpy()
        except BaseException:
            store.unclaim(start, steps)
            raise
        return logits, KVCache(store=store, length=start + steps)

    def warm_up(self) -> None:
        """One prefill and a few decode steps (and a batch of two), so the first request pays for no lazy
        initialisation: ONNX Runtime's kernels and arenas, the cache buffers it will reuse."""
        _, cache = self.step(np.zeros((1, 16), dtype=np.int64), self.empty_cache())
        for _ in range(2):
            _, cache = self.step(np.zeros((1, 1), dtype=np.int64), cache)
        pair = cache.repeat(2)
        self.step(np.zeros((2, 1), dtype=np.int64), pair)
        if self.prefill_session is not None and self.prefill_from > 16:  # the first step above did not reach it
            self.step(np.zeros((1, self.prefill_from), dtype=np.int64), self.empty_cache())



class _BoundInputs:
    """A decode step's ids, positions and logits bound to an IO binding at fixed addresses: the next step
    of the same shape writes the arrays instead of binding new ones (`OnnxDecoder._run`)."""

    __slots__ = ("ids", "positions", "last", "logits", "feeds")

    def __init__(self, ids: np.ndarray, positions: np.ndarray, last: int | None, logits: np.ndarray,
                 feeds: dict[str, np.ndarray]):
        # Every array the binding points into lives here, as long as the binding keeps this record.
        self.ids = np.array(ids, dtype=np.int64, order="C")
        self.positions = np.array(positions, dtype=np.int64, order="C")
        self.last = last
        self.logits = logits
        self.feeds = feeds  # the last_positions input, where the graph has it

    def fits(self, shape: tuple[int, ...], last: int | None) -> bool:
        return self.ids.shape == shape and self.last == last


_CACHE_DTYPES = {"tensor(float16)": np.float16, "tensor(int8)": np.int8}  # else float32


def _cache_type(session: ort.InferenceSession, manifest: Manifest) -> str:
    """The element type of `session`'s first past input, as ONNX Runtime names it ("tensor(float)")."""
    return next((i.type for i in session.get_inputs() if i.name == manifest.onnx.past_inputs[0]), "tensor(float)")


def _last_positions_graph(graph: bytes, folder: Path | str, variant: str) -> bytes:
    """`graph` rewritten so that a run can ask for only its last positions' logits (engine/last_positions.py:
    a prefill skips a quarter of its work), or as it is, with the reason in the log."""
    rewritten, why = last_positions.rewrite(graph)
    if why:
        log.info("%s (%s): every position's logits computed on every run: %s", folder, variant, why)
    return rewritten


def _host_lengths_graph(graph: bytes, folder: Path | str, variant: str) -> bytes:
    """`graph` with GroupQueryAttention's lengths fed from the host (engine/host_lengths.py), which CUDA's
    kernel needs, or as it is, with the reason in the log."""
    rewritten, why = host_lengths.rewrite(graph)
    if why:
        log.warning("%s (%s): GroupQueryAttention's lengths stay computed in the graph on the GPU: %s", folder, variant, why)
    return rewritten


def fast_int4_here() -> bool:
    """Whether this machine's native library (built on first use) has a fast int4 kernel for decode steps."""
    library, _ = native_attention.library()
    return library is not None and native_matmul.fast_int4(library)


def _variant_bytes(folder: Path, manifest: Manifest, variant: str, files: dict[str, bytes] | None) -> bytes:
    """The verified bytes of a variant's ONNX file: from `files` (already checked) or read once and checked."""
    if variant not in manifest.variants:
        known = ", ".join(["fp32", *manifest.variants])
        raise ModelError(f"{folder} has no {variant!r} variant (it has {known})")
    name = manifest.variants[variant].file
    if files is not None and name in files:
        return files[name]
    path = folder / name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"model folder {folder} is missing {name} ({exc.strerror})") from None
    if hashlib.sha256(data).hexdigest() != manifest.files[name]:
        raise ModelError(f"{path} does not match the sha256 in its manifest: the file was changed or corrupted")
    return data
