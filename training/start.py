"""Where a run's first weights come from: a preset's random init, or a base model.

    start = from_preset("small", dropout=0.1)                           # segue train
    start = from_base(Path("models/default"), dropout=0.1)               # segue finetune --from models/default
    start = from_base(Path("runs/default/best.safetensors"), dropout=0.1)

A base is a model folder (hashes verified, the PyTorch model rebuilt from its ONNX weights and
checked against ONNX Runtime; see training/from_onnx.py) or a Segue checkpoint. The vocabulary
always comes with the weights: a random init gets the default tokenizer, a base keeps its own, so
the new model's token ids mean what the base's meant. A `Start` also carries what the new model's
manifest will say about its origin: the preset, the programs already learned, the base's record.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from engine.locations import default_model_dir
from engine.manifest import MODEL_FILE, TOKENIZER_FILE, BaseModelRecord, sha256_file
from engine.tokens import ClipTokenizer
from training.checkpoint import CheckpointError, load_checkpoint
from training.from_onnx import load_model_folder
from training.model import GPT, preset


class StartError(ValueError):
    """The model to start from cannot be used; the message says why, in one line."""


@dataclass
class Start:
    """The model a run begins with, and what the new model's manifest will say about it."""

    model: GPT
    tokenizer_text: str  # tokenizer.json, written into the run folder and every checkpoint
    preset: str | None  # the shape's preset name, when known
    programs: dict[str, int]  # GM program -> training tokens the starting weights learned from (a base's)
    base: BaseModelRecord | None  # None for a random init

    def describe(self, path: Path) -> str:
        """The line a fine-tune prints about its base."""
        assert self.base is not None, "only a base model is described"
        parity = self.base.onnx_parity_max_abs_diff
        return (f"base: {path} ({self.base.kind.replace('_', ' ')}, sha256 {self.base.sha256[:12]}, "
                f"{self.model.num_parameters() / 1e6:.2f} M parameters"
                + (f", ONNX parity {parity:.1e}" if parity is not None else "") + ")")


def default_base() -> Path:
    """The model `segue finetune` starts from without --from: the one `segue continue` uses."""
    return default_model_dir()


def from_preset(name: str, dropout: float, context: int | None = None) -> Start:
    """A randomly initialised model of a preset shape (the torch RNG decides the weights), with the
    default vocabulary; `context` overrides the preset's context length."""
    tokenizer = ClipTokenizer.default()
    with tempfile.TemporaryDirectory() as folder:
        text = tokenizer.save(folder).read_text()  # tokenizer.json exactly as `ClipTokenizer.save` writes it
    overrides: dict = {"dropout": dropout}
    if context:
        overrides["max_context"] = context
    return Start(GPT(preset(name, tokenizer.vocab_size, **overrides)), text, name, {}, None)


def from_base(path: Path, dropout: float) -> Start:
    """A verified model folder (rebuilt from ONNX, parity-checked) or a Segue checkpoint."""
    path = Path(path)
    if not path.exists():
        raise StartError(f"--from {path} does not exist: give a model folder (such as models/default) or a .safetensors checkpoint")
    if path.is_dir():
        model, manifest, gap = load_model_folder(path, dropout=dropout)
        record = BaseModelRecord(kind="model_folder", path=str(path), name=manifest.name, sha256=manifest.files[MODEL_FILE],
                                 source_checkpoint_sha256=manifest.source_checkpoint_sha256,
                                 data_fingerprint=manifest.training.data_fingerprint, onnx_parity_max_abs_diff=gap)
        return Start(model, (path / TOKENIZER_FILE).read_text(), manifest.model.preset,
                     dict(manifest.training.programs), record)
    if path.suffix != ".safetensors":
        raise StartError(f"--from {path} is neither a model folder nor a .safetensors checkpoint")
    saved, meta, _ = load_checkpoint(path)
    if "tokenizer" not in meta:
        raise CheckpointError(f"{path} does not carry its tokenizer; it was not written by `segue train` or `segue finetune`")
    model = GPT(replace(saved.cfg, dropout=dropout))
    model.load_state_dict(saved.state_dict())
    record = BaseModelRecord(kind="checkpoint", path=str(path), sha256=sha256_file(path),
                             data_fingerprint=meta.get("data_fingerprint"))
    programs = json.loads(meta["programs"]) if "programs" in meta else {}
    return Start(model, meta["tokenizer"], meta.get("preset"), programs, record)
