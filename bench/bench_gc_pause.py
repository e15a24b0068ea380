"""What a full garbage collection costs a server holding its models, with and without the registry's freeze.

    python bench/bench_gc_pause.py                       # models/ (the shipped default)
    python bench/bench_gc_pause.py --models DIR --rounds 9

Python's cyclic collector runs a full (generation 2) collection every so often in a long-running
process, holding the GIL for as long as it takes to walk every tracked object. A server's loaded
models are most of those objects (tokenizer, grammar tables, manifests, ONNX Runtime's bindings), so
that pause lands, now and then, in the middle of a stream or before a first note. ModelRegistry.scan
freezes everything alive after a load (plugin_bridge/models.py). This loads
the folders as `segue serve` does and times a full collection, the median of --rounds, with the objects
unfrozen (as before) and frozen (as the registry leaves them), in one process, one after the other.
"""

from __future__ import annotations

from bench_setup import ROOT  # first: one thread, this checkout on sys.path (bench/bench_setup.py)

# isort: split
import argparse
import gc
import statistics
import time
from pathlib import Path

from engine.machine import cpu_name
from plugin_bridge.models import ModelRegistry


def full_collection_ms(rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="a models folder, as `segue serve --models` takes")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)

    registry = ModelRegistry(args.models)
    loaded = registry.scan()  # loads, then freezes
    if not loaded:
        print(f"no model folder loaded from {args.models}: {registry.refused() or 'none found'}")
        return 1
    frozen = gc.get_freeze_count()
    gc.unfreeze()  # as a server without the freeze holds them
    tracked = len(gc.get_objects())
    before = full_collection_ms(args.rounds)
    gc.freeze()  # what the registry's scan does after a load
    after = full_collection_ms(args.rounds)
    print(f"{cpu_name()}; models {', '.join(loaded)} from {args.models}; median of {args.rounds} full collections\n")
    print("| objects the collector walks | full collection (ms) |")
    print("|---|---|")
    print(f"| {tracked:,} (everything unfrozen) | {before:.2f} |")
    print(f"| {len(gc.get_objects()):,} ({gc.get_freeze_count():,} frozen; the registry froze {frozen:,}) | {after:.3f} |")
    print(f"\na full collection: {before:.2f} ms with the loaded objects unfrozen, {after:.3f} ms frozen")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
