"""ONNX Runtime session over a verified model folder, with an explicit KV cache.

    decoder = OnnxDecoder.load("models/default")
    cache = decoder.empty_cache(batch=1)
    logits, cache = decoder.step(ids, cache)      # prefill: ids [batch, T]
    logits, cache = decoder.step(next_ids, cache) # decode: ids [batch, 1]

The cache is a tuple of per-layer key/value arrays [batch, heads, past, head_dim]; its length
is the position of the next token, so position ids are derived, never guessed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engine.manifest import MODEL_FILE, Manifest, ModelError, read_model_folder


@dataclass(frozen=True)
class KVCache:
    tensors: tuple[np.ndarray, ...]  # past_key_0, past_value_0, past_key_1, ...

    @property
    def length(self) -> int:
        return int(self.tensors[0].shape[2])

    @property
    def batch(self) -> int:
        return int(self.tensors[0].shape[0])

    def select(self, rows) -> KVCache:
        """The cache of some batch rows, in the order given; a repeated row is copied (a variation
        finishing early drops its row, beam search reorders and duplicates rows)."""
        return KVCache(tuple(t[rows] for t in self.tensors))

    def repeat(self, times: int) -> KVCache:
        """A batch-1 cache copied `times` times (one prompt prefill shared by all variations)."""
        return KVCache(tuple(np.repeat(t, times, axis=0) for t in self.tensors))


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


class OnnxDecoder:
    def __init__(self, folder: Path, manifest: Manifest, session: ort.InferenceSession):
        self.folder = Path(folder)
        self.manifest = manifest
        self.session = session
        shape = manifest.model
        self.n_layer = shape.n_layer
        self.n_head = shape.n_head
        self.head_dim = shape.head_dim
        self.vocab_size = shape.vocab_size
        self.max_context = shape.max_context
        self.past_names = list(manifest.onnx.past_inputs)
        self.output_names = list(manifest.onnx.outputs)
        declared = {i.name for i in session.get_inputs()}
        missing = {"input_ids", "position_ids", *self.past_names} - declared
        if missing:
            raise ModelError(f"{self.folder / MODEL_FILE} lacks the inputs its manifest names: {', '.join(sorted(missing))}")
        self._check_shape_against_graph()

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
        found = {"n_layer": sum(1 for name in inputs if name.startswith("past_")) // 2,
                 "n_head": cache_shape[1], "head_dim": cache_shape[3], "vocab_size": outputs.get("logits", [None])[-1]}
        for field, value in found.items():
            if isinstance(value, int) and getattr(self, field) != value:  # a symbolic dimension says nothing
                raise ModelError(f"{where}: model.{field} is {getattr(self, field)}, but the graph's is {value}; "
                                 "the manifest does not describe this model")

        def runs_at(position: int) -> bool:
            feeds = {"input_ids": np.zeros((1, 1), dtype=np.int64), "position_ids": np.full((1, 1), position, dtype=np.int64)}
            feeds.update(zip(self.past_names, self.empty_cache().tensors, strict=True))
            quiet = ort.RunOptions()
            quiet.log_severity_level = 4  # the failure is the expected answer for the second probe: no error log
            try:
                self.session.run(self.output_names[:1], feeds, quiet)
                return True
            except Exception:  # onnxruntime's own error types: an index outside the position table
                return False

        if not runs_at(self.max_context - 1):
            raise ModelError(f"{where}: model.max_context is {self.max_context}, but the graph has no position "
                             f"{self.max_context - 1}; the manifest does not describe this model")
        if runs_at(self.max_context):
            raise ModelError(f"{where}: model.max_context is {self.max_context}, but the graph reads longer contexts; "
                             "the manifest does not describe this model")

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None, providers: list[str] | None = None) -> OnnxDecoder:
        """Verify every file hash, then create the session from the verified bytes (never the other way round)."""
        manifest, files = read_model_folder(Path(folder))
        return cls.from_bytes(Path(folder), manifest, files[MODEL_FILE], threads, providers)

    @classmethod
    def from_bytes(cls, folder: Path, manifest: Manifest, model: bytes, threads: int | None = None,
                   providers: list[str] | None = None) -> OnnxDecoder:
        """A session over ONNX bytes already checked against `manifest` (read_model_folder)."""
        threads = threads or int(os.environ.get("SEGUE_THREADS", "1"))
        try:
            session = ort.InferenceSession(model, session_options(threads), providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelError(f"ONNX Runtime could not load {folder / MODEL_FILE}: {exc}") from exc
        return cls(folder, manifest, session)

    def empty_cache(self, batch: int = 1) -> KVCache:
        empty = np.zeros((batch, self.n_head, 0, self.head_dim), dtype=np.float32)
        return KVCache(tuple(empty for _ in self.past_names))

    def step(self, ids: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Feed `ids` [batch, T] after the cached positions. Returns the last position's logits
        [batch, vocab] and the extended cache."""
        logits, cache = self.forward(ids, cache)
        return logits[:, -1, :], cache

    def forward(self, ids: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """As `step`, but the logits of every fed position [batch, T, vocab] (for scoring a sequence)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        batch, steps = ids.shape
        start = cache.length
        if start + steps > self.max_context:
            raise ValueError(f"{start + steps} positions exceed the model context of {self.max_context}")
        positions = np.broadcast_to(np.arange(start, start + steps, dtype=np.int64), (batch, steps))
        feeds = {"input_ids": ids, "position_ids": np.ascontiguousarray(positions)}
        feeds.update(zip(self.past_names, cache.tensors, strict=True))
        outputs = self.session.run(self.output_names, feeds)
        return outputs[0], KVCache(tuple(outputs[1:]))

    def warm_up(self) -> None:
        """One prefill and one decode step, so the first request does not pay for lazy init."""
        _, cache = self.step(np.zeros((1, 16), dtype=np.int64), self.empty_cache())
        self.step(np.zeros((1, 1), dtype=np.int64), cache)
