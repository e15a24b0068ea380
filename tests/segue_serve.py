"""A real `segue serve` in a subprocess on free loopback ports, for the DAW-script tests.

    with SegueServe(models_dir, clips_dir) as server:
        server.zmq_endpoint, server.osc_port, server.log
    with serve_model(tiny_model, tmp_path_factory.mktemp("x")) as server:  # one model, as `default`
        ...
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SegueServe:
    """Starts `python -m plugin_bridge.cli serve` and waits for its banner; `stop()` sends SIGTERM.
    stderr (the log) is read by a thread as it is written, so a full pipe never stalls the server."""

    def __init__(self, models_dir: Path, clips_dir: Path, ready_timeout: float = 60.0):
        self.zmq_port = free_port()
        self.osc_port = free_port(socket.SOCK_DGRAM)
        self.clips_dir = clips_dir
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "plugin_bridge.cli", "serve", "--models", str(models_dir), "--clips-dir", str(clips_dir),
             "--zmq-port", str(self.zmq_port), "--osc-port", str(self.osc_port), "--no-watch", "--workers", "1"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_log, name="segue-serve-log", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + ready_timeout
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline()
            if line.startswith("segue serving"):
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"segue serve did not start:\n{self.log}")

    @property
    def zmq_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.zmq_port}"

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._lock:
                self._lines.append(line)

    @property
    def log(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def wait_for_log(self, text: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._reader.join(timeout=10)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> SegueServe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_model(model: Path, root: Path) -> SegueServe:
    """A server with `model` copied in as its `default` and its clips under `root`."""
    (root / "models").mkdir()
    shutil.copytree(model, root / "models" / "default")
    return SegueServe(root / "models", root / "clips")
