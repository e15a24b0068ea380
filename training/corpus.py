"""The built-in training corpus: music21's public-domain scores, converted to MIDI once and cached.

music21 ships about 3,100 scores (MusicXML, Humdrum, ABC tune books that expand to thousands of
tunes). Parsing them is slow (tens of minutes for everything on two cores), so every source file is
converted once into a folder of `.mid` files under the cache directory, with a `done.json` marker
written last: an interrupted conversion resumes where it stopped, and later runs only read MIDI.

    python -m training.corpus --collections bach oneills1850 --out ~/.cache/segue/corpus
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

# Score formats music21 parses into notes; `rntxt` files are harmonic analyses, not music to learn.
_SCORE_SUFFIXES = {".mxl", ".xml", ".musicxml", ".krn", ".abc"}

# A well-chosen subset for a CPU-sized default model: two clearly different idioms (chorales and
# polyphony vs. fiddle and folk tunes) plus some classical chamber music for range.
DEFAULT_COLLECTIONS = (
    "bach",
    "oneills1850",
    "ryansMammoth",
    "airdsAirs",
    "essenFolksong",
    "palestrina",
    "beethoven",
    "mozart",
    "haydn",
    "trecento",
    "monteverdi",
    "schumann_robert",
    "schumann_clara",
    "josquin",
    "miscFolk",
)


def default_cache_dir() -> Path:
    """Where converted corpora live: outside the repository, overridable for CI and tests."""
    root = os.environ.get("SEGUE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "segue")
    return Path(root) / "music21-midi"


@dataclass(frozen=True)
class SourceFile:
    collection: str
    path: Path

    @property
    def key(self) -> str:
        """A stable folder name for this source inside the cache."""
        return self.path.name.replace(".", "_")


def list_sources(collections: list[str] | None = None, limit_per_collection: int | None = None) -> list[SourceFile]:
    from music21 import corpus

    wanted = set(collections) if collections else None
    by_collection: dict[str, list[Path]] = {}
    for raw in corpus.getCorePaths():
        path = Path(raw)
        parts = path.parts
        collection = parts[parts.index("corpus") + 1]
        if wanted is not None and collection not in wanted:
            continue
        if path.suffix.lower() not in _SCORE_SUFFIXES:
            continue
        by_collection.setdefault(collection, []).append(path)
    missing = (wanted or set()) - set(by_collection)
    if missing:
        raise SystemExit(f"error: unknown music21 collection(s): {', '.join(sorted(missing))}")
    sources = []
    for collection, paths in sorted(by_collection.items()):
        paths.sort()
        if limit_per_collection:
            # Spread the subset over the whole collection rather than taking its first files.
            step = max(1, len(paths) // limit_per_collection)
            paths = paths[::step][:limit_per_collection]
        sources.extend(SourceFile(collection, p) for p in paths)
    return sources


def _convert_one(source: SourceFile, out_dir: Path) -> tuple[int, int, str]:
    """Parse one source file and write each of its pieces as MIDI. Returns (written, failed, error)."""
    import warnings

    from music21 import converter, stream

    warnings.filterwarnings("ignore")
    target = out_dir / source.collection / source.key
    marker = target / "done.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        return info["written"], info["failed"], ""
    target.mkdir(parents=True, exist_ok=True)
    try:
        parsed = converter.parse(str(source.path))
    except Exception as exc:  # music21 raises many types on odd scores; one bad file must not stop the rest
        return 0, 1, f"{source.path.name}: {type(exc).__name__}: {exc}"
    scores = list(parsed.scores) if isinstance(parsed, stream.Opus) else [parsed]
    written = failed = 0
    for index, score in enumerate(scores):
        try:
            score.write("midi", fp=str(target / f"{index:04d}.mid"))
            written += 1
        except Exception:
            failed += 1
    marker.write_text(json.dumps({"source": str(source.path), "written": written, "failed": failed}))
    return written, failed, ""


def convert(sources: list[SourceFile], out_dir: Path, workers: int | None = None) -> list[Path]:
    """Convert every source (in parallel, resumable) and return the sorted list of MIDI files."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    written = failed = 0
    errors: list[str] = []
    started = time.time()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_convert_one, s, out_dir) for s in sources]
        with tqdm(total=len(futures), desc="converting music21 corpus", unit="file") as bar:
            for future in as_completed(futures):
                w, f, err = future.result()
                written += w
                failed += f
                if err:
                    errors.append(err)
                bar.update(1)
                bar.set_postfix(pieces=written, failed=failed)
    print(
        f"corpus: {written} pieces written, {failed} pieces music21 could not write, "
        f"{len(errors)} source files unreadable, {time.time() - started:.0f} s -> {out_dir}",
        file=sys.stderr,
    )
    return midi_files(out_dir, [s.collection for s in sources])


def midi_files(out_dir: Path, collections: list[str] | None = None) -> list[Path]:
    roots = [out_dir / c for c in sorted(set(collections))] if collections else [out_dir]
    return sorted(p for root in roots if root.exists() for p in root.rglob("*.mid"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert the music21 corpus to a cached folder of MIDI files.")
    parser.add_argument("--collections", nargs="*", default=list(DEFAULT_COLLECTIONS))
    parser.add_argument("--limit-per-collection", type=int, default=None,
                        help="take at most this many source files from each collection (spread evenly)")
    parser.add_argument("--out", type=Path, default=default_cache_dir())
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    files = convert(list_sources(args.collections, args.limit_per_collection), args.out, args.workers)
    print(f"{len(files)} MIDI files under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
