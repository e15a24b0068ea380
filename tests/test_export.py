"""export-onnx: parity with torch, the manifest contract, and refusal of tampered folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.manifest import Manifest, ModelError, SearchDefaults, kv_names, verify_model_folder
from engine.session import OnnxDecoder
from export.onnx_export import check_parity
from training.checkpoint import load_checkpoint


def test_manifest_records_what_was_exported(tiny_build, tiny_model):
    manifest = json.loads((tiny_model / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert manifest["parity"]["passed"] is True
    assert manifest["parity"]["max_abs_diff_decode"] <= 1e-4
    past, present = kv_names(manifest["model"]["n_layer"])
    assert manifest["onnx"]["inputs"] == ["input_ids", "position_ids", *past]
    assert manifest["onnx"]["outputs"] == ["logits", *present]
    assert set(manifest["files"]) == {"model.onnx", "tokenizer.json"}
    assert len(manifest["source_checkpoint_sha256"]) == 64
    assert len(manifest["training"]["data_fingerprint"]) == 64
    assert manifest["metrics"]["val_perplexity"] > 1
    typed = verify_model_folder(tiny_model)
    assert typed.to_dict() == manifest  # export-onnx writes exactly what the engine reads
    assert typed.search == SearchDefaults()  # generation defaults travel with the model


def test_typed_manifest_refuses_missing_and_mistyped_fields(model_copy):
    """A manifest is validated on load, naming the field (the watcher then refuses just that folder)."""
    original = json.loads((model_copy / "manifest.json").read_text())
    cases = [({**original, "model": {}}, "missing 'n_layer'"),
             ({**original, "model": {**original["model"], "max_context": "512"}}, "max_context must be a whole number"),
             ({**original, "search": {"temperature": "hot"}}, "search: temperature must be a number"),
             ({**original, "onnx": {**original["onnx"], "past_inputs": ["a"]}}, "KV-cache names do not match"),
             ({**original, "schema_version": 99}, "schema version 99"),
             ([1, 2], "must be a JSON object")]
    for data, message in cases:
        (model_copy / "manifest.json").write_text(json.dumps(data))
        with pytest.raises(ModelError, match=message):
            verify_model_folder(model_copy)
    (model_copy / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelError, match="too deeply"):
        verify_model_folder(model_copy)


def test_search_defaults_that_are_not_a_valid_request_refuse_the_model(model_copy):
    from engine.generate import Generator

    data = json.loads((model_copy / "manifest.json").read_text())
    data["search"]["temperature"] = 50.0
    (model_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="search defaults are not a valid request.*temperature 50"):
        Generator.load(model_copy)


def test_older_manifest_without_search_gets_the_default_search(model_copy):
    data = json.loads((model_copy / "manifest.json").read_text())
    del data["search"]
    (model_copy / "manifest.json").write_text(json.dumps(data))
    assert Manifest.from_json(json.dumps(data)).search == SearchDefaults()
    assert OnnxDecoder.load(model_copy).manifest.search.temperature == SearchDefaults().temperature


def test_onnx_matches_torch_on_fresh_prompts(tiny_build, tiny_model):
    model, _, _ = load_checkpoint(tiny_build / "run" / "best.safetensors")
    for seed in (1, 2, 3):
        parity = check_parity(model, tiny_model / "model.onnx", seed=seed, decode_steps=6)
        assert parity.passed, parity
        assert parity.max_abs_diff_prefill <= 1e-4 and parity.max_abs_diff_decode <= 1e-4


def test_engine_session_matches_torch_step_by_step(tiny_build, tiny_model):
    """The engine's own session (with its KV cache) against the torch model, uncached."""
    model, _, _ = load_checkpoint(tiny_build / "run" / "best.safetensors")
    decoder = OnnxDecoder.load(tiny_model)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, decoder.vocab_size, 40)
    logits, cache = decoder.step(ids[None, :30], decoder.empty_cache())
    for t in range(30, 40):
        with torch.no_grad():
            full, _ = model(torch.from_numpy(ids[None, :t]), torch.arange(t)[None, :])
        assert np.abs(logits[0] - full[0, -1].numpy()).max() <= 1e-4
        logits, cache = decoder.step(ids[None, t:t + 1], cache)


@pytest.mark.parametrize("victim", ["model.onnx", "tokenizer.json"])
def test_a_changed_byte_is_refused_naming_the_file(model_copy, victim):
    path = model_copy / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=victim):
        OnnxDecoder.load(model_copy)


def test_missing_file_and_broken_manifest_are_refused(model_copy):
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="missing tokenizer.json"):
        verify_model_folder(model_copy)
    (model_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        verify_model_folder(model_copy)


def test_manifest_cannot_point_outside_the_folder(model_copy):
    manifest = json.loads((model_copy / "manifest.json").read_text())
    manifest["files"]["../secret"] = "0" * 64
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="outside the folder"):
        verify_model_folder(model_copy)


@pytest.mark.parametrize("field, value", [("max_context", 4096), ("max_context", 128), ("n_head", 4), ("vocab_size", 600)])
def test_an_edited_manifest_shape_is_refused_against_the_graph(model_copy, field, value):
    """The manifest is not among the hashed files, so its model shape is checked against the graph
    itself: an edited context length (512 -> 4096 was accepted once, and long requests then failed
    inside ONNX Runtime) or head count is refused at load, naming the field."""
    import dataclasses

    from engine.generate import Generator
    from engine.manifest import load_manifest

    manifest = load_manifest(model_copy)
    edited = dataclasses.replace(manifest, model=dataclasses.replace(manifest.model, **{field: value}))
    (model_copy / "manifest.json").write_text(edited.to_json())
    with pytest.raises(ModelError, match=f"model.{field} is {value}, but the graph"):
        Generator.load(model_copy)
