"""The model-folder contract between `export-onnx` and the engine, as one typed `Manifest`.

A model folder holds `model.onnx`, `tokenizer.json` and `manifest.json`. The manifest names the
model shape, the ONNX inputs/outputs (including the KV-cache tensors), the sha256 of every file,
where the model came from and the generation defaults (`search`) that clients fall back on, as
onnxruntime-genai's `genai_config.json` does. `export-onnx` is the only writer (`Manifest.to_json`);
everything else reads it once, through `Manifest.from_json`, into the dataclasses below and never
indexes the raw dict. `verify_model_folder` checks every hash before any session is created: a
flipped bit inside the weights loads and runs silently in ONNX Runtime, so the hash is the only
thing that catches it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "model.sig"  # engine/signing.py: a signed folder's two files besides those its manifest lists
SIGNER_KEY_FILE = "signer.pub"
SIGNING_FILES = (SIGNATURE_FILE, SIGNER_KEY_FILE)
MODEL_FILE = "model.onnx"
INT8_MODEL_FILE = "model.int8.onnx"  # export-onnx --quantize int8: the same graph with int8 MatMul weights
TOKENIZER_FILE = "tokenizer.json"
MAX_MANIFEST_BYTES = 8 << 20  # a manifest lists hashes and a few records; anything bigger is not one


class ModelError(RuntimeError):
    """A model folder that must not be served, with the reason in one sentence."""


def kv_names(n_layer: int) -> tuple[list[str], list[str]]:
    """ONNX input names for the past KV tensors and output names for the present ones, in order."""
    past = [f"past_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    return past, present


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- the sections --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_head: int
    d_model: int
    d_ff: int
    head_dim: int
    vocab_size: int
    max_context: int
    parameters: int | None = None
    preset: str | None = None


@dataclass(frozen=True)
class OnnxSignature:
    inputs: list[str]
    outputs: list[str]
    past_inputs: list[str]
    present_outputs: list[str]
    kv_layout: str = "[batch, heads, sequence, head_dim] per layer; presents = pasts + new positions"
    opset: int | None = None
    # How the graph treats its cache (engine/session.py confirms it against the graph at load):
    # "concat": presents = pasts + new positions, copied by the graph on every step (folders before issue 11);
    # "shared-buffer": attention is ONNX Runtime's GroupQueryAttention, so a past buffer longer than the
    # history (its length given by position_ids) can be bound as its own present and only new positions are written.
    kv_cache: str = "concat"


KV_CACHE_KINDS = ("concat", "shared-buffer")


@dataclass(frozen=True)
class SearchDefaults:
    """Generation defaults a client gets when it names none: the one table the CLI and the protocol use."""

    bars: int = 4
    variations: int = 1
    temperature: float = 0.9  # a touch below "as trained": fewer wild notes, still varied
    top_k: int = 0
    top_p: float = 0.95
    mode: str = "sample"
    beam_width: int = 5
    stay_with_clip: float = 1.0  # clip guidance strength (engine/clip_guidance.py): 0 = the model alone


@dataclass(frozen=True)
class Parity:
    max_abs_diff_prefill: float
    max_abs_diff_decode: float
    decode_steps: int
    tolerance: float
    passed: bool
    # The engine's own path (the shared-buffer cache bound through IO binding) against torch, when checked.
    max_abs_diff_engine: float | None = None

    @property
    def max_abs_diff(self) -> float:
        return max(self.max_abs_diff_prefill, self.max_abs_diff_decode, self.max_abs_diff_engine or 0.0)


@dataclass(frozen=True)
class Variant:
    """Another precision of `model.onnx` (same inputs, outputs and cache), and what it costs in quality.

    Both perplexities are measured by the exported ONNX models on the same validation tokens, so they
    stand side by side (`metrics.val_perplexity` is training's own figure, on its own windows)."""

    file: str
    weights: str  # e.g. "int8 (dynamic quantization of the MatMul weights, per-tensor, QInt8)"
    val_perplexity: float | None = None
    reference_val_perplexity: float | None = None  # model.onnx (fp32) on the same tokens
    val_tokens: int | None = None
    val_source: str | None = None

    @property
    def perplexity_loss(self) -> float | None:
        """Relative perplexity increase over fp32 (0.01 = 1 % worse), when both were measured."""
        if self.val_perplexity is None or not self.reference_val_perplexity:
            return None
        return self.val_perplexity / self.reference_val_perplexity - 1.0


@dataclass(frozen=True)
class ServeChoice:
    """Which precision the engine serves by default, and the measurement that chose it (SEGUE_VARIANT overrides)."""

    variant: str = "fp32"  # "fp32" (model.onnx) or a key of `Manifest.variants`
    reason: str = ""
    measured_on: str | None = None  # the CPU the timings below were taken on
    timings_ms: dict[str, float] = field(default_factory=dict)  # medians, process CPU time, one thread


@dataclass(frozen=True)
class Excluded:
    """What `--exclude` kept out of training and validation, by content hash."""

    folders: list[str] = field(default_factory=list)
    files_left_out: int = 0
    fingerprint: str | None = None
    hashes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TrainingRecord:
    data_fingerprint: str | None = None
    data_source: str | None = None
    steps: int | None = None
    train_tokens: int | None = None
    programs: dict[str, int] = field(default_factory=dict)  # GM program -> training tokens (seen instruments)
    val_fraction: float | None = None
    excluded: Excluded | None = None


@dataclass(frozen=True)
class Metrics:
    val_loss: float | None = None
    val_perplexity: float | None = None


@dataclass(frozen=True)
class BaseModelRecord:
    """What a fine-tune started from (a model folder or a checkpoint)."""

    kind: str
    sha256: str
    path: str | None = None
    name: str | None = None
    source_checkpoint_sha256: str | None = None
    data_fingerprint: str | None = None
    onnx_parity_max_abs_diff: float | None = None


@dataclass(frozen=True)
class FinetuneRecord:
    """What a fine-tune learned from, and how it went."""

    data_fingerprint: str
    data_source: str | None = None
    files: int | None = None
    train_files: int | None = None
    val_files: int | None = None
    skipped: int | None = None
    duplicates: int | None = None
    val_fraction: float | None = None
    lr: float | None = None
    augmentation: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    val_perplexity: float | None = None
    base_val_perplexity: float | None = None


@dataclass(frozen=True, kw_only=True)  # keyword-only, so the fields keep the order they are written in
class Manifest:
    schema_version: int = SCHEMA_VERSION
    name: str = ""
    created: str | None = None
    model: ModelShape
    onnx: OnnxSignature
    source_checkpoint_sha256: str | None = None
    training: TrainingRecord = field(default_factory=TrainingRecord)
    metrics: Metrics = field(default_factory=Metrics)
    parity: Parity | None = None
    variants: dict[str, Variant] = field(default_factory=dict)  # absent in older manifests: fp32 only
    serve: ServeChoice | None = None  # absent: serve model.onnx
    search: SearchDefaults = field(default_factory=SearchDefaults)  # absent in older manifests: the defaults above
    files: dict[str, str]  # file name in the folder -> sha256
    base_model: BaseModelRecord | None = None
    finetune: FinetuneRecord | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> Manifest:
        """Validate a parsed manifest; ModelError names the first field that is missing or of the wrong type."""
        if not isinstance(data, dict):
            raise ModelError(f"{where} must be a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ModelError(f"{where} has schema version {version!r}; this Segue reads version {SCHEMA_VERSION}")
        for key in ("model", "onnx", "files"):
            if not isinstance(data.get(key), dict):
                raise ModelError(f"{where} is missing its {key!r} section")
        manifest = _build(cls, data, where)
        manifest.check_consistent(where)
        return manifest

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> Manifest:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{where} is not valid JSON ({exc})") from exc
        except RecursionError:
            raise ModelError(f"{where} nests JSON too deeply to be a manifest") from None
        return cls.from_dict(data, where)

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def check_consistent(self, where: str = "manifest") -> None:
        """Facts the shape and the ONNX names must agree on, so a session never fails on them later."""
        shape = self.model
        for name in ("n_layer", "n_head", "head_dim", "vocab_size", "max_context"):
            if getattr(shape, name) < 1:
                raise ModelError(f"{where}: model.{name} must be at least 1, not {getattr(shape, name)}")
        past, present = kv_names(shape.n_layer)
        if self.onnx.past_inputs != past or self.onnx.present_outputs != present:
            raise ModelError(f"{where}: the ONNX KV-cache names do not match a model of {shape.n_layer} layers")
        for required in (MODEL_FILE, TOKENIZER_FILE):
            if required not in self.files:
                raise ModelError(f"{where} lists no hash for {required}")
        if self.onnx.kv_cache not in KV_CACHE_KINDS:
            raise ModelError(f"{where}: onnx.kv_cache is {self.onnx.kv_cache!r}; this Segue knows {', '.join(KV_CACHE_KINDS)}")
        for key, variant in self.variants.items():
            if variant.file not in self.files:
                raise ModelError(f"{where}: variant {key!r} names {variant.file}, which it lists no hash for")
        if self.serve is not None and self.serve.variant != "fp32" and self.serve.variant not in self.variants:
            raise ModelError(f"{where}: serve.variant is {self.serve.variant!r}, which is not one of its variants")
        for name in self.files:
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ModelError(f"{where} lists a file outside the folder: {name}")

    @property
    def seen_programs(self) -> dict[int, int]:
        """GM programs the model was trained on -> token counts (keys as ints)."""
        return {int(program): count for program, count in self.training.programs.items()}


# --- reading and verifying a folder ---------------------------------------------------------------

def load_manifest(folder: Path) -> Manifest:
    return _manifest_and_bytes(folder)[0]


def _manifest_and_bytes(folder: Path) -> tuple[Manifest, bytes]:
    """The manifest and the very bytes it was parsed from, read once (their sha256 names the model
    in provenance records)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ModelError(f"model folder {folder} has no {MANIFEST_FILE}; export it with `export-onnx`")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ModelError(f"{path} is {path.stat().st_size} bytes, too large to be a manifest")
    data = path.read_bytes()
    return Manifest.from_json(data, str(path)), data


def verify_model_folder(folder: Path) -> Manifest:
    """The manifest, after checking that every listed file exists and matches its sha256."""
    return read_model_folder(folder)[0]


def read_model_folder(folder: Path) -> tuple[Manifest, dict[str, bytes]]:
    """The manifest and the bytes of every file it lists (and of the manifest), each read once and checked against its
    sha256: whoever loads a model uses these very bytes, so nothing can change a file between the
    check and the load. The folder holds exactly the listed files and the manifest, none of them a
    symbolic link (a link could point anywhere, and an unlisted file is unaccounted for)."""
    folder = Path(folder)
    manifest, manifest_bytes = _manifest_and_bytes(folder)
    expected_names = {MANIFEST_FILE, *SIGNING_FILES, *manifest.files}
    extra = sorted(p.name for p in folder.iterdir() if p.name not in expected_names and not p.name.startswith("."))
    if extra:
        raise ModelError(f"model folder {folder} holds files its manifest does not list: {', '.join(extra[:5])}")
    contents = {}
    for name, expected in manifest.files.items():
        path = folder / name
        if path.is_symlink() or (folder / MANIFEST_FILE).is_symlink():
            raise ModelError(f"{path if path.is_symlink() else folder / MANIFEST_FILE} is a symbolic link; "
                             f"a model folder holds its own files")
        if not path.is_file():
            raise ModelError(f"model folder {folder} is missing {name}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != expected:
            raise ModelError(f"{path} does not match the sha256 in its manifest: the file was changed or corrupted")
        contents[name] = data
    contents[MANIFEST_FILE] = manifest_bytes
    return manifest, contents


# --- a small typed reader for the dataclasses above ----------------------------------------------

T = TypeVar("T")


def _build(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise ModelError(f"{where} must be an object")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {}
    for name, spec in known.items():
        has_default = spec.default is not dataclasses.MISSING or spec.default_factory is not dataclasses.MISSING
        if data.get(name) is None and has_default:  # absent or null: the field's default
            continue
        if name not in data:
            raise ModelError(f"{where} is missing {name!r}")
        values[name] = _convert(hints[name], data[name], f"{where}: {name}")
    # Keys this version does not know (written by a newer export) are ignored, not refused.
    return cls(**values)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, list):
            raise ModelError(f"{where} must be a list")
        return [_convert(args[0], v, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ModelError(f"{where} must be an object")
        return {str(k): _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ModelError(f"{where} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelError(f"{where} must be a whole number, not {value!r:.40}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ModelError(f"{where} must be a number, not {value!r:.40}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ModelError(f"{where} must be a string, not {value!r:.40}")
        return value
    raise TypeError(f"no manifest reader for {hint!r}")  # a programming error in this module


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if getattr(value, f.name) is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
