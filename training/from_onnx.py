"""Rebuild the torch GPT from a model folder's ONNX weights, and prove it is the same model.

    python -m training.from_onnx models/default      # prints the largest |torch - onnx| logit gap

Model folders ship only ONNX + tokenizer + manifest (a second copy of the weights would double the
download), so fine-tuning from a folder reads the weights back out of `model.onnx`. What the
dynamo exporter (torch 2.13, `optimize=True`) does to them, seen on the tiny model:

* LayerNorm weights/biases, Linear biases and the position embedding keep their state-dict names
  with the wrapper's `model.` prefix (`model.blocks.0.ln1.weight`, `model.pos_emb.weight`).
* Every Linear weight is folded into an anonymous constant (`val_15`) already transposed to
  [in, out] for a `MatMul`; its bias is added by the next `Add`. So a weight is found through the
  graph: the `Add` that consumes `model.<linear>.bias` has a `MatMul` input whose constant operand
  is the weight, transposed. Explicit `Transpose`/`Identity` nodes and `Gemm(transB)` are followed
  too, so an export without constant folding maps the same way.
* The tied token embedding survives once, as `model.head.weight`: the `Gather` on `input_ids`
  reads it, and the output `MatMul` reads its transpose.

Every name is mapped, shapes are checked, and the rebuilt model's logits are compared with ONNX
Runtime on random prompts (a prefill and cached decode steps): a gap above 1e-4 refuses the folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from engine.manifest import MODEL_FILE, Manifest, verify_model_folder
from training.model import GPT, GPTConfig
from training.parity import logit_gaps

PARITY_TOLERANCE = 1e-4
_PREFIX = "model."  # the export wrapper (`_FlatKV`) holds the GPT as `.model`


class OnnxImportError(ValueError):
    """The ONNX graph could not be turned back into a GPT that reproduces it."""


class _Graph:
    """Constant lookup through the few node types that carry a weight unchanged or transposed."""

    def __init__(self, path: Path):
        import onnx
        from onnx import numpy_helper

        self.path = path
        try:
            proto = onnx.load(str(path))
        except Exception as exc:  # onnx raises DecodeError and friends for damaged files
            raise OnnxImportError(f"{path} is not a readable ONNX model ({exc})") from exc
        self.nodes = list(proto.graph.node)
        self.initializers = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        for node in self.nodes:  # constants stored as nodes rather than initializers
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.initializers[node.output[0]] = numpy_helper.to_array(attr.t)

    def constant(self, name: str) -> np.ndarray | None:
        """The value behind `name` if it is a constant, seen through Identity and Transpose."""
        if name in self.initializers:
            return self.initializers[name]
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Identity":
            return self.constant(node.input[0])
        if node.op_type == "Transpose":
            inner = self.constant(node.input[0])
            if inner is None:
                return None
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            return np.transpose(inner, perm) if perm else inner.T
        return None

    def linear_weight(self, bias_name: str) -> np.ndarray | None:
        """The [out, in] weight of the Linear whose bias initializer is `bias_name`."""
        for node in self.consumers.get(bias_name, []):
            if node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                weight = self.constant(node.input[1])
                if weight is not None:
                    return weight if trans_b else weight.T
            if node.op_type != "Add":
                continue
            other = next(i for i in node.input if i != bias_name)
            matmul = self.producer.get(other)
            if matmul is not None and matmul.op_type == "MatMul":
                weight = self.constant(matmul.input[1])
                if weight is not None:
                    return weight.T
        return None

    def embedding(self, indices: str) -> np.ndarray | None:
        """The table a `Gather` reads with the graph input `indices`."""
        for node in self.consumers.get(indices, []):
            if node.op_type == "Gather":
                table = self.constant(node.input[0])
                if table is not None:
                    return table
        return None

    def output_projection(self, output: str) -> np.ndarray | None:
        """The [vocab, d_model] matrix of the final `MatMul` producing `output`."""
        node = self.producer.get(output)
        if node is not None and node.op_type == "MatMul":
            weight = self.constant(node.input[1])
            return None if weight is None else weight.T
        if node is not None and node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            weight = self.constant(node.input[1])
            return None if weight is None else (weight if trans_b else weight.T)
        return None


def config_from_manifest(manifest: Manifest, dropout: float = 0.0) -> GPTConfig:
    shape = manifest.model
    return GPTConfig(vocab_size=shape.vocab_size, n_layer=shape.n_layer, n_head=shape.n_head, d_model=shape.d_model,
                     d_ff=shape.d_ff, max_context=shape.max_context, dropout=dropout)


def state_dict_from_onnx(path: Path, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Map the ONNX constants back to a full GPT state dict (raises OnnxImportError on any gap)."""
    graph = _Graph(path)
    expected = GPT(cfg).state_dict()
    found: dict[str, np.ndarray] = {}
    for key in expected:
        if key == "head.weight":
            continue  # tied to tok_emb.weight; checked below
        direct = graph.initializers.get(_PREFIX + key, graph.initializers.get(key))
        if direct is not None:
            found[key] = direct
        elif key.endswith(".weight") and key != "tok_emb.weight":
            bias = key[: -len("weight")] + "bias"
            weight = graph.linear_weight(_PREFIX + bias) if _PREFIX + bias in graph.initializers else None
            if weight is None and bias in graph.initializers:
                weight = graph.linear_weight(bias)
            if weight is not None:
                found[key] = weight
    embedding = graph.embedding("input_ids")
    if embedding is not None:
        found["tok_emb.weight"] = embedding
    head = graph.output_projection("logits")
    if head is not None and "tok_emb.weight" in found and not np.array_equal(head, found["tok_emb.weight"]):
        raise OnnxImportError(f"{path}: the output projection is not the token embedding; Segue models tie them")
    missing = [k for k in expected if k != "head.weight" and k not in found]
    if missing:
        raise OnnxImportError(f"{path}: no weights found for {', '.join(missing[:4])}"
                              f"{' and more' if len(missing) > 4 else ''}; the graph was not exported by Segue")
    state = {}
    for key, value in found.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise OnnxImportError(f"{path}: {key} has shape {list(value.shape)} in the graph, "
                                  f"the manifest's model needs {list(expected[key].shape)}")
        state[key] = torch.from_numpy(np.array(value, dtype=np.float32, copy=True))  # own, writable memory
    state["head.weight"] = state["tok_emb.weight"]
    return state


def onnx_parity(model: GPT, path: Path, seeds: tuple[int, ...] = (0, 1, 2), decode_steps: int = 3) -> float:
    """Largest |torch - onnxruntime| logit gap over random prompts, each a prefill plus cached steps."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return max(max(logit_gaps(model, session, seed, decode_steps)) for seed in seeds)


def load_model_folder(folder: Path, dropout: float = 0.0) -> tuple[GPT, Manifest, float]:
    """(model in eval mode, verified manifest, parity gap). Verifies hashes first, parity last.

    Raises engine.manifest.ModelError for a folder that fails its hashes and OnnxImportError for
    a graph that cannot be mapped or whose rebuilt model does not reproduce it within 1e-4.
    """
    folder = Path(folder)
    manifest = verify_model_folder(folder)
    cfg = config_from_manifest(manifest, dropout)
    model = GPT(cfg)
    model.load_state_dict(state_dict_from_onnx(folder / MODEL_FILE, cfg))
    gap = onnx_parity(model, folder / MODEL_FILE)
    if not gap <= PARITY_TOLERANCE:  # `not <=` also refuses NaN
        raise OnnxImportError(f"the torch model rebuilt from {folder / MODEL_FILE} differs from ONNX Runtime by "
                              f"{gap:.2e} (tolerance {PARITY_TOLERANCE:g}); refusing to fine-tune from it")
    model.eval()
    return model, manifest, gap


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.from_onnx",
                                     description="Rebuild the PyTorch model from a model folder and check it against ONNX Runtime.")
    parser.add_argument("folder", type=Path, help="a model folder (model.onnx + tokenizer.json + manifest.json)")
    args = parser.parse_args(argv)
    from engine.manifest import ModelError

    try:
        model, _, gap = load_model_folder(args.folder)
    except (ModelError, OnnxImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.folder}: {model.num_parameters() / 1e6:.2f} M parameters rebuilt; max |torch - onnx| = {gap:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
