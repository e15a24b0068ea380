"""The model-folder contract between `export-onnx` and the engine.

A model folder holds `model.onnx`, `tokenizer.json` and `manifest.json`. The manifest names the
model shape, the ONNX inputs/outputs (including the KV-cache tensors) and the sha256 of every file.
`verify_model_folder` checks every hash before any session is created: a flipped bit inside the
weights loads and runs silently in ONNX Runtime, so the hash is the only thing that catches it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"


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


def load_manifest(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ModelError(f"model folder {folder} has no {MANIFEST_FILE}; export it with `export-onnx`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        raise ModelError(f"{path} has schema version {manifest.get('schema_version') if isinstance(manifest, dict) else '?'}; "
                         f"this Segue reads version {SCHEMA_VERSION}")
    for key in ("model", "onnx", "files"):
        if not isinstance(manifest.get(key), dict):
            raise ModelError(f"{path} is missing its {key!r} section")
    return manifest


def verify_model_folder(folder: Path) -> dict:
    """The manifest, after checking that every listed file exists and matches its sha256."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    files = manifest["files"]
    for required in (MODEL_FILE, TOKENIZER_FILE):
        if required not in files:
            raise ModelError(f"{folder / MANIFEST_FILE} lists no hash for {required}")
    for name, expected in files.items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ModelError(f"{folder / MANIFEST_FILE} lists a file outside the folder: {name}")
        if not path.is_file():
            raise ModelError(f"model folder {folder} is missing {name}")
        if sha256_file(path) != expected:
            raise ModelError(f"{path} does not match the sha256 in its manifest: the file was changed or corrupted")
    return manifest
