"""`python -m export.int4 FOLDER`: the int4 variant added to a folder exported without it, measured and chosen here."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import pytest

from engine.manifest import MANIFEST_FILE, read_model_folder
from engine.session import OnnxDecoder, fast_int4_here
from export.int4 import add_int4, main


def without_int4(int8_model: Path, target: Path) -> Path:
    """A copy of the int8 export as a folder exported before int4 existed: no int4 variant, no int4 timing."""
    shutil.copytree(int8_model, target)
    manifest, _ = read_model_folder(target)
    variants = {name: v for name, v in manifest.variants.items() if name != "int4"}
    timings = {key: value for key, value in manifest.serve.timings_ms.items() if not key.startswith("int4")}
    serve = dataclasses.replace(manifest.serve, variant="int8", timings_ms=timings)
    (target / MANIFEST_FILE).write_text(dataclasses.replace(manifest, variants=variants, serve=serve).to_json())
    return target


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_the_int4_variant_is_measured_next_to_fp32_and_the_choice_made_again(int8_model, tiny_build, tmp_path, capsys):
    folder = without_int4(int8_model, tmp_path / "model")
    before = digests(folder)
    if not fast_int4_here():  # a CPU whose int4 kernel is the portable loop: refused, the folder as it was
        assert main([str(folder), "--val-data", str(tiny_build / "midi")]) == 1
        assert "no fast int4 kernel" in capsys.readouterr().err and digests(folder) == before
        return
    manifest = add_int4(folder, tiny_build / "midi")
    int8, int4 = manifest.variants["int8"], manifest.variants["int4"]
    # The same tokens as int8's (the same data and split), so the same fp32 reference; int4's own perplexity.
    assert int4.file == int8.file and int4.val_tokens == int8.val_tokens > 0
    assert int4.reference_val_perplexity == int8.reference_val_perplexity
    assert int4.val_perplexity is not None and int4.val_perplexity != int8.val_perplexity
    assert abs(int4.perplexity_loss) < 0.05 and str(tiny_build / "midi") in int4.val_source
    assert {"fp32 decode@255", "int8 decode@255", "int4 decode@255"} <= manifest.serve.timings_ms.keys()
    assert manifest.serve.variant in ("fp32", "int8", "int4") and "int4" in manifest.serve.reason
    after = digests(folder)  # only the manifest changed: the model files are the same bytes
    assert {k: v for k, v in after.items() if k != MANIFEST_FILE} == {k: v for k, v in before.items() if k != MANIFEST_FILE}
    assert read_model_folder(folder)[0] == manifest
    decoder = OnnxDecoder.load(folder, variant="int4")
    assert decoder.variant == "int4" and decoder.decode_weights == "int4"
    assert not list(tmp_path.glob(".model.int4-*"))  # the staging folder is gone


def test_a_folder_without_int8_or_without_validation_data_is_a_clear_error(int8_model, tiny_model, tmp_path, capsys):
    assert main([str(tiny_model), "--val-data", str(tmp_path)]) == 1
    assert "has no int8 variant" in capsys.readouterr().err
    folder = without_int4(int8_model, tmp_path / "model")
    before = digests(folder)
    empty = tmp_path / "no-midi"
    empty.mkdir()
    with pytest.raises((ValueError, RuntimeError), match="no validation data|no fast int4 kernel"):
        add_int4(folder, empty)
    assert digests(folder) == before and not list(tmp_path.glob(".model.int4-*"))
