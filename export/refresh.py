"""Re-export a model folder from its own weights: the shared-buffer graph and, optionally, the int8 and fp16 variants.

    python -m export.refresh models/default --quantize int8                 # in place (staged, swapped at the end)
    python -m export.refresh models/default --out /tmp/default-new --quantize int8

For folders written before the shared-buffer cache (issue 11), or to add the int8 variant to a
folder whose checkpoint is gone. The weights are read back out of `model.onnx` by
training/from_onnx.py (which checks them against ONNX Runtime), exported again with the same
checks as `export-onnx`, and the new graph must reproduce the old graph's logits within 1e-4 and
decode the same greedy tokens: the same model, a faster graph. The manifest keeps every record of
where the model came from (checkpoint hash, training data, metrics, search defaults, base model,
fine-tune) and gets the new graph, parity, files, variants and serve choice. A signed folder
comes out unsigned (its files change): sign it again with `segue sign`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from engine.manifest import MODEL_FILE, TOKENIZER_FILE, Manifest, ModelError, OnnxSignature, Parity, ServeChoice, Variant
from export.onnx_export import PARITY_TOLERANCE, _opset, export_folder, report_variants

GREEDY_STEPS = 48


def refresh(folder: Path, out: Path | None = None, quantize: str | None = None, val_data: Path | None = None,
            val_tokens: int = 50_000, fp16: bool = False) -> Manifest:
    import onnxruntime as ort

    from engine.session import session_options
    from training.from_onnx import load_model_folder

    folder = Path(folder)
    out = Path(out or folder)
    model, old, gap = load_model_folder(folder)
    old_graph = (folder / MODEL_FILE).read_bytes()
    tokenizer = (folder / TOKENIZER_FILE).read_bytes()
    print(f"read {folder}: the torch model rebuilt from its graph matches it within {gap:.1e}", flush=True)
    training = old.training
    if val_data is None and training.data_source:
        val_data = Path(training.data_source).expanduser()
    val_fraction = training.val_fraction or 0.05
    exclude = frozenset(training.excluded.hashes) if training.excluded else frozenset()

    def write_tokenizer(stage: Path) -> None:
        (stage / TOKENIZER_FILE).write_bytes(tokenizer)  # the very bytes: the same vocabulary

    def manifest_for(stage: Path, kind: str, parity: Parity, files: dict[str, str],
                     variants: dict[str, Variant] | None = None, serve: ServeChoice | None = None) -> Manifest:
        onnx = OnnxSignature(old.onnx.inputs, old.onnx.outputs, old.onnx.past_inputs, old.onnx.present_outputs,
                             _layout(kind), _opset(stage / MODEL_FILE), kind)
        new = dataclasses.replace(old, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), onnx=onnx,
                                  parity=parity, files=files, variants=variants or {}, serve=serve)
        return Manifest.from_dict(new.to_dict(), "the re-exported manifest")  # validated like any other

    def same_model(decoder) -> None:
        """The old graph and the new one: the same logits on random prompts, the same greedy tokens."""
        reference = ort.InferenceSession(old_graph, session_options(1), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        ids = rng.integers(0, decoder.vocab_size, (2, 40))
        empty = np.zeros((2, decoder.n_head, 0, decoder.head_dim), np.float32)
        feeds = {"input_ids": ids, "position_ids": np.tile(np.arange(40), (2, 1)), **{n: empty for n in decoder.past_names}}
        want = reference.run(["logits"], feeds)[0]
        got, _ = decoder.forward(ids, decoder.empty_cache(2))
        worst = float(np.abs(got - want).max())
        old_tokens, new_tokens = _greedy(reference, decoder, ids[:1, :8])
        if worst > PARITY_TOLERANCE or old_tokens != new_tokens:
            raise RuntimeError(f"the re-exported graph is not the same model: logits differ by {worst:.2e}, greedy tokens "
                               f"{'agree' if old_tokens == new_tokens else 'differ'}; {out} was not written")
        print(f"old graph vs new: logits within {worst:.1e}, {GREEDY_STEPS} greedy tokens identical", flush=True)

    return export_folder(model, out, write_tokenizer, manifest_for, None, quantize, val_data, val_fraction, val_tokens,
                         "shared-buffer", exclude, same_model, fp16=fp16)


def _layout(kind: str) -> str:
    if kind == "concat":
        return OnnxSignature.kv_layout
    return ("[batch, heads, sequence, head_dim] per layer; presents = pasts + new positions, or, given a past buffer "
            "longer than the history (its length from position_ids), that buffer with the new positions written in place")


def _greedy(reference, decoder, prompt: np.ndarray) -> tuple[list[int], list[int]]:
    """GREEDY_STEPS argmax tokens after `prompt` [1, T]: the old graph (plain interface) and the engine."""
    names = decoder.past_names
    pasts = [np.zeros((1, decoder.n_head, 0, decoder.head_dim), np.float32)] * len(names)
    ids, position, old = prompt, 0, []
    for _ in range(GREEDY_STEPS):
        positions = np.arange(position, position + ids.shape[1])[None]
        outputs = reference.run(None, {"input_ids": ids, "position_ids": positions, **dict(zip(names, pasts, strict=True))})
        position += ids.shape[1]
        pasts = outputs[1:]
        old.append(int(outputs[0][0, -1].argmax()))
        ids = np.asarray([[old[-1]]])
    logits, cache = decoder.step(prompt, decoder.empty_cache(1))
    new = []
    for _ in range(GREEDY_STEPS):
        new.append(int(logits[0].argmax()))
        logits, cache = decoder.step(np.asarray([[new[-1]]]), cache)
    return old, new


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.refresh", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="a model folder, e.g. models/default")
    p.add_argument("--out", type=Path, help="where to write (default: replace FOLDER, atomically)")
    p.add_argument("--quantize", choices=["int8"], help="also write model.int8.onnx with its validation perplexity")
    p.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx (for CUDA) with its validation perplexity")
    p.add_argument("--val-data", type=Path, metavar="FOLDER", help="validation data (default: the manifest's training data)")
    p.add_argument("--val-tokens", type=int, default=50_000)
    args = p.parse_args(argv)
    try:
        manifest = refresh(args.folder, args.out, args.quantize, args.val_data, args.val_tokens, args.fp16)
    except (ModelError, RuntimeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out or args.folder}: {manifest.onnx.kv_cache} cache, parity {manifest.parity.max_abs_diff:.1e}"
          if manifest.parity else f"wrote {args.out or args.folder}")
    report_variants(manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
