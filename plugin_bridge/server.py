"""`segue serve`: the generation server that plugin shells, DAW scripts and `segue client` talk to.

    segue serve                                  # OSC on 127.0.0.1:9100, ZeroMQ on 127.0.0.1:5555
    segue serve --models ~/segue-models --zmq-port 6000 --osc-port 9200

Loads and verifies every model folder under --models, warms each up, then serves both transports
until Ctrl-C. Model folders written later by `export-onnx` are picked up while it runs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from engine.locations import default_clips_dir, default_models_dir
from plugin_bridge.options import DEFAULT_OSC_PORT, DEFAULT_ZMQ_PORT

if TYPE_CHECKING:  # the transports load pyzmq and python-osc only when a server starts
    from plugin_bridge.osc_transport import OscTransport
    from plugin_bridge.zmq_curve import CurveServer
    from plugin_bridge.zmq_transport import ZmqTransport

DEFAULT_PREFILL_CACHE_MB = 256  # engine/prefill_cache.py DEFAULT_MAX_BYTES
LOOPBACK = {"127.0.0.1", "localhost"}  # IPv6 loopback would need ZeroMQ's IPv6 mode; not offered yet


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="segue serve",
        description="Run the Segue generation server for plugins and DAW scripts (OSC over UDP and ZeroMQ, "
                    "on this computer only unless told otherwise).",
    )
    p.add_argument("--models", type=Path, default=default_models_dir(),
                   help="folder of model folders (default: the models/ folder of this install)")
    p.add_argument("--default-model", default="default", help="model used when a request names none")
    p.add_argument("--osc-port", type=int, default=DEFAULT_OSC_PORT, help=f"UDP port for OSC (default {DEFAULT_OSC_PORT})")
    p.add_argument("--zmq-port", type=int, default=DEFAULT_ZMQ_PORT, help=f"TCP port for ZeroMQ (default {DEFAULT_ZMQ_PORT})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer only)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow --host to be a network address (anyone on that network can then use the server)")
    p.add_argument("--clips-dir", type=Path, default=None, help="where finished .mid clips are written (default ~/Segue/clips)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per model session (default 1)")
    p.add_argument("--workers", type=int, default=2, help="requests generated at the same time (default 2)")
    p.add_argument("--no-watch", action="store_true", help="do not pick up new or updated model folders while running")
    p.add_argument("--prefill-cache-mb", type=float, default=DEFAULT_PREFILL_CACHE_MB, metavar="MB",
                   help="memory for prepared clips, so that Continue on a clip prepared (or continued) before starts at once "
                        f"(default {DEFAULT_PREFILL_CACHE_MB:g}; 0 keeps none)")
    p.add_argument("--no-head-start", action="store_true",
                   help="compute only what is asked: do not draw a prepared clip's continuation up to its first note "
                        "before its Continue (nor the next one after a Continue, for Generate again)")
    p.add_argument("--trusted-key", type=Path, action="append", default=[], metavar="PUB",
                   help="public key (PEM) whose signatures this server trusts; repeatable (see `segue sign`)")
    p.add_argument("--require-signed", action="store_true",
                   help="load only model folders signed by a --trusted-key (unsigned and foreign ones are refused)")
    p.add_argument("--curve-secret", type=Path, metavar="KEY_SECRET",
                   help="ZeroMQ with CURVE: this server's secret key file (make one with `segue keys server`); "
                        "then only clients whose public key is in --curve-clients can connect")
    p.add_argument("--curve-clients", type=Path, metavar="DIR", help="folder of allowed client public keys (*.key)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


class Server:
    """Registry + Service + both transports, started and stopped together (also used by tests and bench)."""

    def __init__(self, models: Path, host: str = "127.0.0.1", osc_port: int = 0, zmq_port: int = 0,
                 clips_dir: Path | None = None, threads: int = 1, workers: int = 2, default_model: str = "default",
                 watch: bool = True, trusted_keys: tuple[Path, ...] = (), require_signed: bool = False,
                 prefill_cache_mb: float = DEFAULT_PREFILL_CACHE_MB, curve: CurveServer | None = None,
                 head_starts: bool = True):
        from plugin_bridge.models import ModelRegistry
        from plugin_bridge.service import Service

        if require_signed and not trusted_keys:
            raise RuntimeError("--require-signed needs at least one --trusted-key PUB (the public key of whoever signs your models)")
        self.registry = ModelRegistry(models, threads=threads, default=default_model, trusted_keys=trusted_keys,
                                      require_signed=require_signed)
        self.registry.scan()
        if not self.registry.names():
            refused = self.registry.refused()
            detail = "; ".join(f"{n}: {r}" for n, r in refused.items()) or "no folder with a manifest.json"
            raise RuntimeError(f"no usable model in {models} ({detail})")
        if prefill_cache_mb < 0:
            raise RuntimeError(f"--prefill-cache-mb must be 0 or more, not {prefill_cache_mb:g}")
        self.service = Service(self.registry, clips_dir or default_clips_dir(), workers=workers,
                               prefill_cache_bytes=int(prefill_cache_mb * 2**20), head_starts=head_starts)
        self.host, self.osc_port, self.zmq_port, self.watch = host, osc_port, zmq_port, watch
        self.curve = curve
        self.osc: OscTransport | None = None
        self.zmq: ZmqTransport | None = None

    def start(self) -> Server:
        from plugin_bridge.osc_transport import OscTransport
        from plugin_bridge.zmq_transport import ZmqTransport

        try:
            self.zmq = ZmqTransport(self.service, host=self.host, port=self.zmq_port, curve=self.curve)
            self.zmq.start()
            self.osc = OscTransport(self.service, host=self.host, port=self.osc_port)
            self.osc.start()
        except OSError:
            self.stop()
            raise
        if self.watch:
            self.registry.start_watching()
        return self

    def stop(self) -> None:
        for transport in (self.osc, self.zmq):
            if transport is not None:
                transport.stop()
        self.service.close()
        self.registry.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.host not in LOOPBACK and not args.allow_remote:
        print(f"error: --host {args.host} would let other computers use this server; add --allow-remote if you mean it",
              file=sys.stderr)
        return 1
    from plugin_bridge.zmq_curve import CurveError, CurveServer

    if (args.curve_secret is None) != (args.curve_clients is None):
        print("error: CURVE needs both --curve-secret (this server's key) and --curve-clients (the allowed clients' keys)",
              file=sys.stderr)
        return 1
    try:
        curve = CurveServer(args.curve_secret, args.curve_clients) if args.curve_secret is not None else None
        server = Server(args.models, args.host, args.osc_port, args.zmq_port, args.clips_dir, args.threads, args.workers,
                        args.default_model, watch=not args.no_watch, trusted_keys=tuple(args.trusted_key),
                        require_signed=args.require_signed, prefill_cache_mb=args.prefill_cache_mb, curve=curve,
                        head_starts=not args.no_head_start).start()
    except (RuntimeError, OSError, CurveError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    models = ", ".join(server.registry.names())
    assert server.osc is not None and server.zmq is not None, "start() either starts both transports or raises"
    print(f"segue serving {models} | OSC udp://{args.host}:{server.osc.port} | ZeroMQ tcp://{args.host}:{server.zmq.port} | "
          f"clips -> {server.service.clips_dir} | Ctrl-C to stop", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
