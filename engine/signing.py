"""Signed model folders: the OpenSSF model-signing format (PyPI `model-signing`), ECDSA P-256 keys.

    sign_folder(models/mine, key.pem)                       # writes signer.pub, then model.sig
    check_signature(models/mine, trusted_keys=[], require_signed=False)   # what Generator.load does

A signed folder holds two more files than its manifest lists: `signer.pub`, the public key of whoever
signed it (PEM), and `model.sig`, a Sigstore bundle whose signed statement names the sha256 of every
other file in the folder, `signer.pub` and `manifest.json` included. So the signature covers the
manifest, which the manifest's own hashes cannot, and a rewritten weight file with a rewritten
manifest hash is caught.

Two questions, answered separately:
- *Intact?* Whenever `model.sig` is present it is verified (against the trusted keys if any are
  given, else against the folder's own `signer.pub`): a flipped bit, a missing or extra file, a
  symbolic link or a damaged signature refuses the folder.
- *Trusted?* With `require_signed` (`segue serve --require-signed --trusted-key PUB`) a folder must
  be signed by one of the trusted keys: unsigned folders, and folders signed by anyone else (their
  own `signer.pub` is no reason to trust them), are refused.

`model-signing` is imported only when a signature is checked or made (about a second the first time).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from engine.manifest import SIGNATURE_FILE, SIGNER_KEY_FILE, SIGNING_FILES, ModelError


def key_fingerprint(public_key_pem: bytes) -> str:
    """A short name for a public key: the sha256 of its DER encoding, first 16 hex digits."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(public_key_pem)
    except ValueError as exc:
        raise ModelError(f"not a PEM public key ({exc})") from None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def sign_folder(folder: Path, private_key: Path) -> str:
    """Sign every file of `folder` with the ECDSA private key (PEM); returns the key's fingerprint."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder, private_key = Path(folder), Path(private_key)
    try:
        key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot use {private_key} as a signing key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ModelError(f"{private_key} is not an elliptic-curve (ECDSA) private key")
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (folder / SIGNATURE_FILE).unlink(missing_ok=True)
    (folder / SIGNER_KEY_FILE).write_bytes(public)
    signing, _, hashing = _library()
    try:
        signing.Config().use_elliptic_key_signer(private_key=private_key).set_hashing_config(
            hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE])).sign(folder, folder / SIGNATURE_FILE)
    except Exception as exc:  # the library's own error types
        raise ModelError(f"signing {folder} failed: {exc}") from None
    return key_fingerprint(public)


def check_signature(folder: Path, trusted_keys: Sequence[Path] = (), require_signed: bool = False) -> str | None:
    """Verify `folder`'s signature when it has one; enforce `require_signed`. Returns the fingerprint
    of the key that verified it, None for an unsigned folder that may be used. Raises ModelError."""
    folder = Path(folder)
    signature = folder / SIGNATURE_FILE
    for name in SIGNING_FILES:
        if (folder / name).is_symlink():
            raise ModelError(f"{folder / name} is a symbolic link; a model folder holds its own files")
    if not signature.exists():
        if require_signed:
            raise ModelError(f"model folder {folder} is not signed, and this server only loads signed models")
        return None
    if trusted_keys:
        candidates = list(trusted_keys)
    elif require_signed:
        raise ModelError("--require-signed needs at least one --trusted-key")
    else:
        candidates = [folder / SIGNER_KEY_FILE]
        if not candidates[0].is_file():
            raise ModelError(f"{folder} has {SIGNATURE_FILE} but no {SIGNER_KEY_FILE} to check it with")
    failures = []
    for key in candidates:
        try:
            _verify(folder, key)
            return key_fingerprint(Path(key).read_bytes())
        except ModelError as exc:
            failures.append(str(exc))
    who = "any trusted key" if trusted_keys else f"its own {SIGNER_KEY_FILE}"
    raise ModelError(f"the signature of {folder} does not verify with {who}: {failures[-1]}")


def _verify(folder: Path, public_key: Path) -> None:
    _, verifying, hashing = _library()
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=public_key).set_hashing_config(
            hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE])).verify(folder, folder / SIGNATURE_FILE)
    except Exception as exc:  # ValueError "Signature mismatch", parse errors of a damaged bundle, key errors
        message = " ".join(str(exc).split())[:240] or type(exc).__name__
        raise ModelError(message) from None


def _library():
    try:
        from model_signing import hashing, signing, verifying
    except ImportError as exc:
        raise ModelError(f"model signing needs the `model-signing` package ({exc}); "
                         "pip install 'segue[signing]'") from None
    return signing, verifying, hashing
