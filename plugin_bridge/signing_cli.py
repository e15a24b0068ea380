"""`segue sign` and `segue verify`: sign a model folder with your ECDSA key, check a folder's signature.

    openssl ecparam -name prime256v1 -genkey -noout -out segue-key.pem    # once: a P-256 private key
    openssl ec -in segue-key.pem -pubout -out segue-key.pub                # the public key you hand out
    segue sign models/my-band --key segue-key.pem
    segue verify models/my-band --trusted-key segue-key.pub
    segue serve --require-signed --trusted-key segue-key.pub               # only your signed models load

The format is the OpenSSF model-signing one (engine/signing.py). `segue verify` without a trusted key
checks the folder against the public key it carries: that it is intact, not who signed it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.manifest import ModelError, verify_model_folder
from engine.signing import check_signature, sign_folder


def sign_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="segue sign", description="Sign a model folder (OpenSSF model-signing, ECDSA P-256).")
    p.add_argument("model", type=Path, help="model folder, e.g. models/my-band")
    p.add_argument("--key", type=Path, required=True, metavar="KEY", help="your ECDSA private key (PEM, unencrypted)")
    args = p.parse_args(argv)
    try:
        verify_model_folder(args.model)  # never sign a folder whose files do not match its manifest
        fingerprint = sign_folder(args.model, args.key)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"signed {args.model} with key {fingerprint} (model.sig, signer.pub)")
    return 0


def verify_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="segue verify", description="Check a model folder's hashes and signature.")
    p.add_argument("model", type=Path, help="model folder")
    p.add_argument("--trusted-key", type=Path, action="append", default=[], metavar="PUB",
                   help="public key to check the signature against (repeatable); without one, the folder's own")
    p.add_argument("--require-signed", action="store_true", help="fail for an unsigned folder")
    args = p.parse_args(argv)
    try:
        fingerprint = check_signature(args.model, args.trusted_key, args.require_signed)
        verify_model_folder(args.model)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if fingerprint is None:
        print(f"{args.model}: every file matches its manifest; not signed")
    elif args.trusted_key:
        print(f"{args.model}: intact and signed by trusted key {fingerprint}")
    else:
        print(f"{args.model}: intact, signed by key {fingerprint} (its own signer.pub; pass --trusted-key to check who)")
    return 0


if __name__ == "__main__":
    raise SystemExit(sign_main())
