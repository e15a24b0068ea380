"""Zero-wait Continue: time to the first note of a `continue`, for a prepared clip and cold, over OSC.

    python bench/bench_prepare.py --runs 15                         # the tiny test model (built) and models/default
    python bench/bench_prepare.py --model models/default --runs 15  # one model folder (repeatable)

For each model, three `segue serve` processes run side by side on loopback: one with
`--prefill-cache-mb 0 --no-head-start` (every continue is cold: tokenize, prefill, decode, as before
`prepare` existed), one with `--no-head-start` (a prepare prefills the clip, and that is all), and one
with the defaults (a prepare also draws the continuation up to its first note: a head start,
plugin_bridge/head_start.py). On the last two each run first sends `prepare` with the very request
the continue will send, as the JUCE shell does, and waits for `prepared` (the musician selected the
clip a moment ago), then sends the `continue`. Runs alternate between the servers with the same
seed, so all decode the same tokens. The
time measured is the client's: from sending the `continue` datagram to receiving the first `note`
(the request is then cancelled: only the first note is measured); `--idle-ms` lets the servers sit
idle before each continue, as a musician's clicks do. Clips: the bundled examples cut
to 4 bars, and a dense 4-bar ostinato (a three-note chord on every 16th: 48 notes a bar). Prints
a Markdown table of medians with the CPU's name; the target of issue 11 is a first note within
5 ms of `continue` for a prepared clip.

`--baseline DIR` runs a fourth server, prepared like the third, from another checkout of Segue (for
example `git worktree add /tmp/before <commit>`), on the same model, its runs alternated with the
others: a before/after column measured side by side, at the same moment of the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_server import prompt_payload  # noqa: E402  (the first bars of an example, as bench_server sends them)

from engine.machine import cpu_name, vector_extensions  # noqa: E402
from plugin_bridge.osc_client import OscClient  # noqa: E402

TARGET_MS = 5.0


def cpu_flags() -> str:
    return " ".join(f for f in vector_extensions() if f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")) or "?"


def ostinato(bars: int = 4) -> dict:
    """A three-note chord on every 16th of four bars of 4/4 (48 notes a bar), cycling through four chords."""
    chords = [(48, 55, 64), (45, 52, 60), (41, 48, 57), (43, 50, 59)]
    notes = []
    for step in range(bars * 16):
        chord = chords[(step // 4) % 4]
        for voice, pitch in enumerate(chord):
            notes.append([pitch + 12 * (step % 2 if voice == 2 else 0), 70 + (step % 4) * 8, step * 0.25, 0.24, 0])
    return {"notes": notes, "tempo": 120.0, "time_signature": [4, 4], "length": bars * 4.0, "program": 0}


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """One `segue serve` process over a folder holding one model (as `default`), and an OSC client of it."""

    def __init__(self, model: Path, cache_mb: float, workdir: Path, root: Path = ROOT, head_starts: bool = True):
        models = workdir / f"models-{model.name}-{cache_mb:g}-{abs(hash(str(root))):x}"
        models.mkdir(parents=True, exist_ok=True)
        if not (models / "default").exists():  # a copy: the server refuses links that leave its models folder
            shutil.copytree(model, models / "default")
        osc_port = free_port(socket.SOCK_DGRAM)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "plugin_bridge.cli", "serve", "--models", str(models), "--no-watch",
             "--osc-port", str(osc_port), "--zmq-port", str(free_port(socket.SOCK_STREAM)),
             "--clips-dir", str(workdir / "clips"), "--prefill-cache-mb", f"{cache_mb:g}", "--log-level", "WARNING",
             *([] if head_starts else ["--no-head-start"])],
            stdout=subprocess.PIPE, text=True, cwd=root, env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(root)})
        assert self.process.stdout is not None
        banner = self.process.stdout.readline()
        if not banner.startswith("segue serving"):
            self.close()
            raise SystemExit(f"the server for {model} did not start: {banner!r}")
        self.client = OscClient("127.0.0.1", osc_port, timeout=120)

    def prepare(self, request: dict) -> dict:
        """Prepare the clip of `request` (a continue's: its options ask for the head start)."""
        request_id = self.client.prepare_clip(request)
        events = list(self.client.stream(request_id))
        if events[-1]["type"] != "prepared":
            raise RuntimeError(events[-1])
        return events[-1]

    def first_note_ms(self, request: dict) -> float:
        """Send a continue, wait for its first note, cancel it and wait for its end. Client-side milliseconds."""
        started = time.perf_counter()
        request_id = self.client.continue_clip(request)
        first = None
        for event in self.client.stream(request_id):
            if event["type"] == "note" and first is None:
                first = (time.perf_counter() - started) * 1000
                self.client.cancel(request_id)
            elif event["type"] == "error":
                raise RuntimeError(event)
        if first is None:
            raise RuntimeError(f"no note in {request.get('bars')} bars (seed {request.get('seed')}); choose other seeds")
        return first

    def close(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def bench_model(model: Path, clips: dict[str, dict], runs: int, bars: int, workdir: Path, idle_ms: float = 0.0,
                baseline: Path | None = None) -> list[dict]:
    cold, prefilled, warm = (Served(model, 0, workdir, head_starts=False), Served(model, 256, workdir, head_starts=False),
                             Served(model, 256, workdir))
    before = Served(model, 256, workdir, baseline) if baseline is not None else None
    prepared_sides = [prefilled, warm] + ([before] if before is not None else [])
    rows = []
    try:
        for name, clip in clips.items():
            base = {"clip": clip, "bars": bars, "variations": 1}
            # Warm-up: the first request after a start builds per-shape tables; neither side counts it.
            cold.first_note_ms({**base, "seed": 10_000})
            for side in prepared_sides:
                first = side.prepare({**base, "seed": 10_000})  # the first time this server sees the clip: prefilled
                assert not first["cached"], first
                side.first_note_ms({**base, "seed": 10_000})
            colds: list[float] = []
            prefills: list[float] = []
            preps: list[float] = []
            befores: list[float] = []
            tokens = 0
            for run in range(runs):
                request = {**base, "seed": run}
                time.sleep(idle_ms / 1000)
                colds.append(cold.first_note_ms(request))
                pairs = [(prefilled, prefills), (warm, preps)] + ([(before, befores)] if before is not None else [])
                for side, times in pairs if run % 2 else pairs[::-1]:  # which goes first alternates
                    prepared = side.prepare(request)
                    tokens = prepared["tokens"]
                    time.sleep(idle_ms / 1000)  # the musician selected the clip a moment before pressing Continue
                    times.append(side.first_note_ms(request))
            rows.append({"model": model.name if model.name != "model" else model.parent.name, "clip": name,
                         "notes": len(clip["notes"]), "tokens": tokens, "cold": statistics.median(colds),
                         "cold_p90": sorted(colds)[int(0.9 * (len(colds) - 1))], "prefilled": statistics.median(prefills),
                         "prefilled_p90": sorted(prefills)[int(0.9 * (len(prefills) - 1))], "prepared": statistics.median(preps),
                         "prepared_p90": sorted(preps)[int(0.9 * (len(preps) - 1))], "prefill": first["prefill_ms"],
                         "baseline": statistics.median(befores) if befores else None})
            print(f"  {rows[-1]['model']} {name}: cold {rows[-1]['cold']:.1f} ms, prefilled {rows[-1]['prefilled']:.1f} ms, "
                  f"prepared (head start) {rows[-1]['prepared']:.1f} ms"
                  + (f" (baseline {rows[-1]['baseline']:.1f} ms)" if befores else ""), file=sys.stderr, flush=True)
    finally:
        for side in [cold] + prepared_sides:
            side.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append",
                        help="a model folder (repeatable; default: the tiny test model, built now, and models/default)")
    parser.add_argument("--runs", type=int, default=15, help="runs per clip and side (median reported)")
    parser.add_argument("--bars", type=int, default=8, help="bars each continue asks for (only its first note is waited for)")
    parser.add_argument("--idle-ms", type=float, default=0.0,
                        help="the servers sit idle this long before each continue, as between a musician's clicks "
                             "(an idle core's caches and clock cool down; 0: back to back)")
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                        help="another Segue checkout whose server runs prepared side by side (a before/after column)")
    args = parser.parse_args()

    clips = {path.stem: prompt_payload(path, 4) for path in sorted((ROOT / "docs" / "examples").glob("*.mid"))}
    clips["ostinato (48 notes/bar)"] = ostinato()
    with tempfile.TemporaryDirectory(prefix="segue-bench-prepare-") as tmp:
        workdir = Path(tmp)
        models = args.model
        if not models:
            sys.path.insert(0, str(ROOT / "tests"))
            import make_tiny_model

            print("building the tiny test model ...", file=sys.stderr, flush=True)
            make_tiny_model.build(workdir / "tiny")
            models = [workdir / "tiny" / "model", ROOT / "models" / "default"]
        rows = []
        for model in models:
            rows += bench_model(model, clips, args.runs, args.bars, workdir, args.idle_ms, args.baseline)

    import onnxruntime

    print(f"\nCPU: {cpu_name()} ({os.cpu_count()} cores; {cpu_flags()}), onnxruntime {onnxruntime.__version__}, "
          f"{args.runs} runs per cell (median, p90), {args.bars}-bar continue, 1 variation, OSC over loopback, "
          f"{args.idle_ms:g} ms idle before each continue; "
          f"`segue serve` defaults (1 thread, 2 workers)\n")
    baseline = f" | prepared, {args.baseline} (ms, p50)" if args.baseline else ""
    print("| model | clip (4 bars) | notes | prompt tokens | prefill, in the background (ms) | first note cold (ms, p50 / p90) "
          "| prepared, prefill only (`--no-head-start`; ms, p50 / p90) "
          f"| prepared, head start (the default; ms, p50 / p90){baseline} | cold / prepared | prepared ≤ {TARGET_MS:g} ms |")
    print("|---|---|---|---|---|---|---|---|" + ("---|" if args.baseline else "") + "---|---|")
    for r in rows:
        before = f" | {r['baseline']:.1f}" if args.baseline else ""
        print(f"| {r['model']} | {r['clip']} | {r['notes']} | {r['tokens']} | {r['prefill']:.1f} | {r['cold']:.1f} / {r['cold_p90']:.1f} "
              f"| {r['prefilled']:.1f} / {r['prefilled_p90']:.1f} "
              f"| {r['prepared']:.1f} / {r['prepared_p90']:.1f}{before} | {r['cold'] / r['prepared']:.1f}× "
              f"| {'yes' if r['prepared'] <= TARGET_MS else 'no'} |")


if __name__ == "__main__":
    main()
