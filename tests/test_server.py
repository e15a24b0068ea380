"""`segue serve` as a musician starts it: both transports up, clients served, clear refusals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import clip_payload

from plugin_bridge.client import SegueClient
from plugin_bridge.osc_client import OscClient


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`segue serve` in a subprocess. Its stderr (the log) is read as it is written, so a test waits
    for the log line that says something happened instead of sleeping, and a full pipe never stalls
    the server; `stop()` ends it with SIGTERM and closes both pipes."""

    def __init__(self, *args):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "plugin_bridge.cli", "serve", *map(str, args)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self._log: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read_log, name="segue-serve-stderr", daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        for line in self.process.stderr:
            with self._changed:
                self._log.append(line)
                self._changed.notify_all()
        with self._changed:  # the server exited: wake anyone still waiting for a line
            self._ended = True
            self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return "".join(self._log)

    def wait_ready(self, timeout: float = 60.0) -> str:
        """The banner line; the server prints it once both transports listen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if line.startswith("segue serving"):
                return line
            if self.process.poll() is not None:
                self._reader.join(timeout=10)
                raise AssertionError(f"server exited: {self.log}")
        raise AssertionError("server did not come up")

    def wait_for_log(self, text: str, timeout: float = 60.0) -> bool:
        """True once a log line contains `text`; False after `timeout` s or when the server exited without it."""
        seen = lambda: any(text in line for line in self._log)
        with self._changed:
            self._changed.wait_for(lambda: seen() or self._ended, timeout)
            return seen()

    def stop(self) -> str:
        """SIGTERM, wait for the exit, and return the whole log."""
        try:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=20)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=20)
            self._reader.join(timeout=20)
            self.process.stdout.close()
            self.process.stderr.close()
        return self.log


def test_serve_answers_both_transports_and_stops_cleanly(models_dir, tmp_path):
    zmq_port, osc_port = free_port(), free_port(socket.SOCK_DGRAM)
    server = Server("--models", models_dir, "--zmq-port", zmq_port, "--osc-port", osc_port, "--clips-dir", tmp_path / "clips")
    try:
        banner = server.wait_ready()
        assert f"127.0.0.1:{zmq_port}" in banner and f"127.0.0.1:{osc_port}" in banner and "default" in banner
        with SegueClient(f"tcp://127.0.0.1:{zmq_port}", timeout=30) as client:
            assert client.hello()["models"][0]["name"] == "default"
            events = list(client.continue_stream(clip_payload(), bars=2, variations=2, seed=4))
            assert events[-1]["type"] == "finished"
            paths = [e["path"] for e in events if e["type"] == "done"]
            assert len(paths) == 2 and all(os.path.exists(p) and p.startswith(str(tmp_path / "clips")) for p in paths)
        with OscClient("127.0.0.1", osc_port, timeout=30) as osc:
            assert osc.request("ping")["type"] == "pong"
            request_id = osc.continue_clip({"clip": clip_payload(), "bars": 1, "seed": 2, "constraints": {"min_notes_per_bar": 1}})
            replies = list(osc.stream(request_id))
            assert replies[-1]["type"] == "finished" and any(r["type"] == "note" for r in replies)
    finally:
        err = server.stop()
    assert server.process.returncode == 0, err
    # One log line per request: client, model, bars, time to first note, total.
    lines = [line for line in err.splitlines() if "first_note_ms=" in line]
    assert len(lines) == 2 and all("model=default" in line and "total_ms=" in line for line in lines)


def test_a_restarted_server_has_a_new_instance_but_the_same_zeromq_client_names(models_dir, tmp_path):
    """`hello` carries one instance id per server start, the same over both transports; after a restart
    on the same ports it differs, while the name the server gives the first ZeroMQ connection (and so
    its `.mid` file names) comes back (docs/protocol.md sections 1 and 3.7)."""
    zmq_port, osc_port = free_port(), free_port(socket.SOCK_DGRAM)
    runs = []
    for _ in range(2):
        server = Server("--models", models_dir, "--zmq-port", zmq_port, "--osc-port", osc_port, "--clips-dir", tmp_path / "clips",
                        "--no-watch")
        try:
            server.wait_ready()
            with SegueClient(f"tcp://127.0.0.1:{zmq_port}", timeout=30) as client:
                over_zmq = client.hello()["instance"]
                events = list(client.continue_stream(clip_payload(1), bars=1, seed=1, request_id="r1"))
            with OscClient("127.0.0.1", osc_port, timeout=30) as osc:
                over_osc = osc.request("hello")["instance"]
        finally:
            server.stop()
        assert over_zmq == over_osc and len(over_zmq) == 16 and int(over_zmq, 16) >= 0
        runs.append((over_zmq, os.path.basename(next(e["path"] for e in events if e["type"] == "done"))))
    (first, first_file), (second, second_file) = runs
    assert first != second, "a restarted server must say so with a new instance id"
    assert first_file == second_file and first_file.startswith("zmq_") and first_file.endswith("-r1-v1.mid")


def test_port_in_use_is_a_clear_refusal(models_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "plugin_bridge.cli", "serve", "--models", str(models_dir),
                                 "--zmq-port", str(port), "--osc-port", str(free_port(socket.SOCK_DGRAM)),
                                 "--clips-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"port {port}" in result.stderr and "already in use" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--host", "0.0.0.0"], "--allow-remote"),
    (["--models", "/nonexistent/models"], "no usable model"),
])
def test_refusals(args, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "plugin_bridge.cli", "serve", "--clips-dir", str(tmp_path), *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_a_tampered_folder_dropped_in_is_refused_while_serving(models_dir, tiny_model, tmp_path):
    import shutil

    zmq_port = free_port()
    server = Server("--models", models_dir, "--zmq-port", zmq_port, "--osc-port", free_port(socket.SOCK_DGRAM),
                    "--clips-dir", tmp_path / "clips")
    try:
        server.wait_ready()
        staged = tmp_path / "bad"
        shutil.copytree(tiny_model, staged)
        data = bytearray((staged / "model.onnx").read_bytes())
        data[1000] ^= 0xFF
        (staged / "model.onnx").write_bytes(bytes(data))
        shutil.move(staged, models_dir / "evil")
        # the watcher polls every second and verifies every hash: wait for its verdict, however long a busy machine takes
        assert server.wait_for_log("model evil refused"), f"the watcher never refused the tampered folder:\n{server.log}"
        with SegueClient(f"tcp://127.0.0.1:{zmq_port}", timeout=30) as client:
            assert [m["name"] for m in client.hello()["models"]] == ["default"]
            assert list(client.continue_stream(clip_payload(), bars=1, seed=1))[-1]["type"] == "finished"
    finally:
        err = server.stop()
    assert "model evil refused" in err and "model.onnx does not match the sha256" in err
    assert json.loads((models_dir / "default" / "manifest.json").read_text())["parity"]["passed"]
