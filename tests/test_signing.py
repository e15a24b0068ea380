"""Signed model folders (OpenSSF model-signing, ECDSA P-256): what verifies, what is refused, and why."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from engine.generate import Generator
from engine.manifest import ModelError
from engine.signing import SIGNATURE_FILE, SIGNER_KEY_FILE, check_signature, sign_folder
from plugin_bridge.models import ModelRegistry
from plugin_bridge.signing_cli import sign_main, verify_main


def make_key(folder, name: str):
    """A P-256 key pair as PEM files, as `openssl ecparam -name prime256v1 -genkey` writes them."""
    key = ec.generate_private_key(ec.SECP256R1())
    private = folder / f"{name}.pem"
    public = folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture
def keys(tmp_path):
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    return make_key(keys_dir, "mine"), make_key(keys_dir, "theirs")


@pytest.fixture
def signed(model_copy, keys, capsys):
    (private, _), _ = keys
    assert sign_main([str(model_copy), "--key", str(private)]) == 0
    assert "signed" in capsys.readouterr().out
    return model_copy


def test_a_signed_folder_verifies_and_loads(signed, keys, capsys):
    (_, public), _ = keys
    assert verify_main([str(signed), "--trusted-key", str(public)]) == 0
    assert "intact and signed by trusted key" in capsys.readouterr().out
    assert verify_main([str(signed)]) == 0  # against its own signer.pub: intact, not who
    assert "pass --trusted-key" in capsys.readouterr().out
    generator = Generator.load(signed, trusted_keys=[public], require_signed=True)
    assert generator.signed_by and len(generator.signed_by) == 16


def _flip_bit(folder):
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "model.onnx").write_bytes(data)


def _rewrite_weights_and_manifest(folder):
    """The attack the manifest's own hashes cannot stop: new weights, and the manifest's hash updated to match."""
    _flip_bit(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _corrupt_signature(folder):
    bundle = (folder / SIGNATURE_FILE).read_text()
    (folder / SIGNATURE_FILE).write_text(bundle[: len(bundle) // 2])


def _symlink(folder):
    target = folder.parent / "elsewhere.json"
    shutil.move(folder / "tokenizer.json", target)
    (folder / "tokenizer.json").symlink_to(target)


@pytest.mark.parametrize("tamper, words", [
    (_flip_bit, "does not verify"),
    (lambda f: (f / "tokenizer.json").unlink(), "does not verify"),
    (lambda f: (f / "notes.txt").write_text("extra"), "does not verify"),
    (_corrupt_signature, "does not verify"),
    (_symlink, "does not verify"),
    (_rewrite_weights_and_manifest, "does not verify"),
])
def test_tampered_signed_folders_are_refused(signed, keys, tamper, words):
    (_, public), _ = keys
    tamper(signed)
    with pytest.raises(ModelError, match=words):
        check_signature(signed, [public])
    with pytest.raises(ModelError):  # and without a trusted key, against the folder's own public key
        Generator.load(signed)


def test_a_foreign_or_unsigned_folder_is_refused_only_when_signatures_are_required(signed, model_copy, keys, tmp_path):
    (_, mine), (their_private, _) = keys
    foreign = tmp_path / "foreign"
    shutil.copytree(model_copy, foreign)
    (foreign / SIGNATURE_FILE).unlink()
    sign_folder(foreign, their_private)
    assert check_signature(foreign) is not None  # intact: it verifies against its own signer.pub
    with pytest.raises(ModelError, match="does not verify with any trusted key"):
        check_signature(foreign, [mine], require_signed=True)
    unsigned = tmp_path / "unsigned"
    shutil.copytree(model_copy, unsigned)
    for name in (SIGNATURE_FILE, SIGNER_KEY_FILE):
        (unsigned / name).unlink()
    assert check_signature(unsigned) is None  # signing is optional by default
    with pytest.raises(ModelError, match="is not signed"):
        check_signature(unsigned, [mine], require_signed=True)


def test_a_server_requiring_signatures_loads_only_models_signed_by_its_keys(signed, keys, tmp_path):
    (_, mine), (their_private, _) = keys
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(signed, models / "mine")
    shutil.copytree(signed, models / "theirs")
    sign_folder(models / "theirs", their_private)
    shutil.copytree(signed, models / "plain")
    for name in (SIGNATURE_FILE, SIGNER_KEY_FILE):
        (models / "plain" / name).unlink()
    registry = ModelRegistry(models, trusted_keys=(mine,), require_signed=True)
    assert registry.scan() == ["mine"]
    refused = registry.refused()
    assert "does not verify with any trusted key" in refused["theirs"] and "is not signed" in refused["plain"]


def test_export_can_sign_as_it_writes(tiny_build, keys, tmp_path):
    from export.onnx_export import main as export_main

    (private, public), _ = keys
    out = tmp_path / "exported"
    assert export_main([str(tiny_build / "run" / "best.safetensors"), "--out", str(out), "--sign", str(private)]) == 0
    assert check_signature(out, [public], require_signed=True)
