"""Optional CURVE authentication and encryption for the ZeroMQ transport.

    segue keys server --out ~/.segue/keys       # server.key (public) and server.key_secret
    segue keys daw-laptop --out ~/.segue/keys   # one pair per client machine or user
    mkdir ~/.segue/clients && cp ~/.segue/keys/daw-laptop.key ~/.segue/clients/
    segue serve --curve-secret ~/.segue/keys/server.key_secret --curve-clients ~/.segue/clients
    segue client --curve-server-key ~/.segue/keys/server.key --curve-key ~/.segue/keys/daw-laptop.key_secret ping

By default the server listens on 127.0.0.1 and trusts every local process, as a plugin host needs.
With CURVE (ZeroMQ's elliptic-curve handshake, RFC 26) the ROUTER socket only completes the
handshake with clients whose public key is in the clients folder: a plaintext client and a client
with an unknown key never get a connection, so they cannot send a request or read a reply, and
everything on the wire is encrypted. OSC has no such mechanism: it stays on 127.0.0.1, reachable by
any local process (docs/protocol.md, section 5). The key files are the ZeroMQ certificate format
(`zmq.auth.create_certificates`), which other ZeroMQ bindings read.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("segue.zmq")


class CurveError(ValueError):
    """A key file or clients folder that cannot be used, with a sentence that says why."""


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise CurveError(f"{path}: not a ZeroMQ key file ({exc}); make one with `segue keys NAME`") from None
    if secret and secret_key is None:
        raise CurveError(f"{path} holds only a public key; give the .key_secret file")
    return public, secret_key


@dataclass(frozen=True)
class CurveServer:
    """The server's key pair and the folder of client public keys it accepts."""

    secret_file: Path
    clients_dir: Path

    def __post_init__(self) -> None:
        _load(self.secret_file, secret=True)  # a bad key is refused at start, not on the first client
        if not self.clients_dir.is_dir():
            raise CurveError(f"{self.clients_dir}: the folder of allowed client keys does not exist")
        if not any(self.clients_dir.glob("*.key")):
            raise CurveError(f"{self.clients_dir} holds no client public key (*.key): no client could connect")

    def apply(self, ctx: zmq.Context, socket: zmq.Socket) -> ThreadAuthenticator:
        """Make `socket` (not yet bound) a CURVE server that admits only the allowed clients.
        Returns the running authenticator; stop it after the socket is closed."""
        public, secret = _load(self.secret_file, secret=True)
        authenticator = ThreadAuthenticator(ctx)
        authenticator.start()
        # The clients folder is read now; keys added later take a restart (stated in the docs).
        authenticator.configure_curve(domain="*", location=str(self.clients_dir))
        socket.curve_secretkey = secret
        socket.curve_publickey = public
        socket.curve_server = True
        allowed = sorted(p.name for p in self.clients_dir.glob("*.key"))
        log.info("ZeroMQ CURVE on: %d allowed client key(s) in %s", len(allowed), self.clients_dir)
        return authenticator


@dataclass(frozen=True)
class CurveClient:
    """The server's public key and this client's key pair."""

    server_key_file: Path
    secret_file: Path

    def apply(self, socket: zmq.Socket) -> None:
        """Make `socket` (not yet connected) a CURVE client of the server."""
        server_public, _ = _load(self.server_key_file, secret=False)
        public, secret = _load(self.secret_file, secret=True)
        socket.curve_serverkey = server_public
        socket.curve_publickey = public
        socket.curve_secretkey = secret


def make_keys(name: str, out: Path) -> tuple[Path, Path]:
    """Write OUT/NAME.key (public, to share) and OUT/NAME.key_secret (keep private)."""
    out.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(out), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segue keys", description=(
        "Make a CURVE key pair for the ZeroMQ transport: NAME.key (public: give it to the other side) "
        "and NAME.key_secret (private)."))
    parser.add_argument("name", help="whose keys: 'server', or a client's name")
    parser.add_argument("--out", type=Path, default=Path.home() / ".segue" / "keys", help="folder for the two files")
    args = parser.parse_args(argv)
    public, secret = make_keys(args.name, args.out)
    print(f"public key: {public}\nsecret key: {secret} (keep it private)")
    return 0
