"""A variant added to an existing model folder: the folder staged next to itself, the manifest rewritten there,
and the stage swapped in atomically; and the command line the `python -m export.half` / `export.int4` commands
share.

The other files keep their bytes (and so their hashes in the manifest). A signed folder comes out unsigned,
since its manifest changes: sign it again with `segue sign`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from engine.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest, ModelError, read_model_folder


def update_model_folder(folder: Path, manifest: Manifest, files: dict[str, bytes], tag: str,
                        update: Callable[[Path], Manifest], leave_out: frozenset[str] = frozenset()) -> Manifest:
    """Stage `folder` (its manifest's files but `leave_out`, from `files`) in a new folder beside it, let
    `update(stage)` write what it adds there and return the new manifest, write that manifest (checked by
    reading the stage back), and swap the stage in; the stage is removed whatever happens."""
    from export.onnx_export import _swap_in

    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{tag}-", dir=folder.parent))
    stage.chmod(0o755)  # mkdtemp makes it private; a model folder is readable like any other
    try:
        for name in manifest.files:
            if name not in leave_out:
                (stage / name).write_bytes(files[name])
        updated = update(stage)
        (stage / MANIFEST_FILE).write_text(updated.to_json())
        read_model_folder(stage)  # the manifest as written reads back, with every file's hash
        if (folder / SIGNATURE_FILE).exists():
            print(f"note: {folder} was signed; its manifest changed, so it comes out unsigned: sign it again with "
                  "`segue sign`", file=sys.stderr)
        _swap_in(stage, folder)
        return updated
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def variant_command(argv: list[str] | None, prog: str, description: str,
                    add: Callable[[Path, Path | None, int], Manifest], done: str) -> int:
    """`prog FOLDER [--val-data DIR] [--val-tokens N]`: run `add`, print `done` (with {folder}) and the variants."""
    from export.onnx_export import report_variants

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("folder", type=Path, help="a model folder, e.g. models/default")
    p.add_argument("--val-data", type=Path, metavar="FOLDER", help="validation data (default: the manifest's training data)")
    p.add_argument("--val-tokens", type=int, default=50_000)
    args = p.parse_args(argv)
    try:
        manifest = add(args.folder, args.val_data, args.val_tokens)
    except (ModelError, RuntimeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(done.format(folder=args.folder))
    report_variants(manifest)
    return 0


def validation_set(stage: Path, manifest: Manifest, val_data: Path | None, val_tokens: int):
    """The held-out tokens a variant added to the folder is measured on (a quantize.ValidationSet): `val_data`,
    else the manifest's training data, split as it was trained (its validation fraction, its left-out pieces)."""
    from export.quantize import ValidationSet

    training = manifest.training
    if val_data is None and training.data_source:
        val_data = Path(training.data_source).expanduser()
    exclude = frozenset(training.excluded.hashes) if training.excluded else frozenset()
    return ValidationSet(stage, val_data, training.val_fraction or 0.05, val_tokens, exclude)
