"""Server latency and throughput over OSC and ZeroMQ, side by side in one run.

    python bench/bench_server.py --models models --runs 20

Starts `segue serve` in its own process (as a musician runs it), then for each transport, prompt
length (1 and 4 bars) and variation count (1 and 4) sends `--runs` requests for an 8-bar
continuation and measures, at the client: time to first note (send -> first note event) and
notes per second (notes received / time to `finished`). Then the same with two clients sending
at once. Prints a Markdown table with p50/p95 and the OSC/ZeroMQ ratio.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.midi_file import read_clip  # noqa: E402
from plugin_bridge.client import SegueClient  # noqa: E402
from plugin_bridge.osc_client import OscClient  # noqa: E402
from plugin_bridge.protocol import clip_payload  # noqa: E402


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_payload(path: Path, bars: int) -> dict:
    clip = read_clip(path)
    length = bars * clip.beats_per_bar
    payload = clip_payload(clip)
    payload["notes"] = [n for n in payload["notes"] if n[2] < length]
    payload["length"] = length
    return payload


class Transport:
    """One client of either kind, with the same call: run a request, return (first_note_s, notes, total_s)."""

    def __init__(self, kind: str, zmq_port: int, osc_port: int):
        self.kind = kind
        self.client = SegueClient(f"tcp://127.0.0.1:{zmq_port}", timeout=60) if kind == "zmq" else \
            OscClient("127.0.0.1", osc_port, timeout=60)

    def run(self, request: dict) -> tuple[float, int, float]:
        started = time.perf_counter()
        first, notes = None, 0
        if self.kind == "zmq":
            params = {k: v for k, v in request.items() if k != "clip"}
            events = self.client.continue_stream(request["clip"], **params)
        else:
            events = self.client.stream(self.client.continue_clip(request))
        for event in events:
            if event["type"] == "note":
                notes += 1
                if first is None:
                    first = time.perf_counter() - started
            elif event["type"] == "error":
                raise RuntimeError(event)
        return (first if first is not None else float("nan")), notes, time.perf_counter() - started

    def close(self) -> None:
        self.client.close()


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def measure(kind: str, ports: tuple[int, int], request: dict, runs: int, clients: int = 1) -> dict:
    firsts, rates = [], []
    lock = threading.Lock()

    def worker(seed_base: int) -> None:
        transport = Transport(kind, *ports)
        try:
            transport.run({**request, "seed": 999})  # connection set-up is not what we measure
            for run in range(runs):
                first, notes, total = transport.run({**request, "seed": seed_base + run})
                with lock:
                    firsts.append(first * 1000)
                    rates.append(notes / total)
        finally:
            transport.close()

    threads = [threading.Thread(target=worker, args=(1000 * c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"p50": percentile(firsts, 0.5), "p95": percentile(firsts, 0.95), "rate": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--clip", type=Path, default=ROOT / "docs" / "examples" / "chorale.mid")
    parser.add_argument("--bars", type=int, default=8, help="bars to generate")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.9)
    args = parser.parse_args()

    zmq_port, osc_port = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
    clips = Path(os.environ.get("TMPDIR", "/tmp")) / "segue-bench-clips"
    server = subprocess.Popen([sys.executable, "-m", "plugin_bridge.cli", "serve", "--models", str(args.models),
                               "--zmq-port", str(zmq_port), "--osc-port", str(osc_port), "--clips-dir", str(clips),
                               "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        banner = server.stdout.readline()
        if not banner.startswith("segue serving"):
            raise SystemExit(f"server did not start: {banner}")
        print(f"{banner.strip()}\nclip {args.clip.name}, {args.bars} bars generated, {args.runs} runs per row, "
              f"temperature {args.temperature}\n")
        print("| prompt bars | variations | clients | OSC first note p50 / p95 (ms) | ZeroMQ first note p50 / p95 (ms) "
              "| OSC / ZeroMQ p50 | OSC notes/s | ZeroMQ notes/s |")
        print("|---|---|---|---|---|---|---|---|")
        for prompt_bars, variations, clients in [(1, 1, 1), (4, 1, 1), (1, 4, 1), (4, 4, 1), (4, 1, 2)]:
            request = {"clip": prompt_payload(args.clip, prompt_bars), "bars": args.bars, "variations": variations,
                       "temperature": args.temperature, "top_p": 0.95}
            osc = measure("osc", (zmq_port, osc_port), request, args.runs, clients)
            zmq = measure("zmq", (zmq_port, osc_port), request, args.runs, clients)
            print(f"| {prompt_bars} | {variations} | {clients} | {osc['p50']:.1f} / {osc['p95']:.1f} | "
                  f"{zmq['p50']:.1f} / {zmq['p95']:.1f} | {osc['p50'] / zmq['p50']:.2f} | {osc['rate']:.0f} | {zmq['rate']:.0f} |",
                  flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)


if __name__ == "__main__":
    main()
