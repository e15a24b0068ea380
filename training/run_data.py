"""The data of one training run: from a folder (or the built-in corpus) to the two window samplers.

    files, source = source_files(args.data, collections, dist)   # a MIDI folder, or music21:COLLECTIONS
    files, excluded = exclude_files(files, args.exclude, dist)   # --exclude, by content
    corpus = read_data(files, source, tokenizer_file, out, val_fraction, augment, dist, progress)
    train, val = make_samplers(corpus, tokenizer, window, seed, dist.rank, augment)

Every file is checked on its own, duplicates are dropped and the split is by content hash
(training/data.py); the ingest report is written to the run folder and printed. Data that cannot
train anything (nothing readable, an empty side of the split, a side shorter than one window) is
refused here, with a DataError whose one line says what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engine.manifest import Excluded
from engine.tokens import ClipTokenizer
from training.augment import AugmentConfig, TokenAugmenter
from training.data import Corpus, WindowSampler, content_hash, data_fingerprint, find_midi_files, load_corpus
from training.distributed import Distributed
from training.ingest_report import REPORT_TEXT, build_report, print_report, write_report

EXCLUDED_HASHES_KEPT = 5000  # the manifest lists the left-out hashes up to this many (else only their fingerprint)


class DataError(ValueError):
    """The data cannot be trained on; the message says why and what to do, in one line."""


def folder_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist")
    files = find_midi_files(folder)
    if not files:
        raise DataError(f"no MIDI files (.mid, .midi, .smf) in {folder}")
    return files


def source_files(data: Path | None, collections: list[str] | None, dist: Distributed) -> tuple[list[Path], str]:
    """The MIDI files of `data`, or of the built-in corpus when there is no folder; and the source's name."""
    if data:
        return folder_files(data), source_name(data)
    from training.corpus import DEFAULT_COLLECTIONS, convert, default_cache_dir, list_sources

    collections = collections or list(DEFAULT_COLLECTIONS)
    # Rank 0 converts (or finds the cache); the others wait, then read the cache it wrote.
    if not dist.is_main:
        dist.barrier()
    files = convert(list_sources(collections), default_cache_dir())
    if dist.is_main:
        dist.barrier()
    return files, "music21:" + ",".join(collections)


def source_name(folder: Path) -> str:
    """How the manifest names a data folder: under the trainer's home as `~/...`, so a shared model
    does not carry its trainer's home path (and user name) to everyone who loads it."""
    resolved = Path(folder).expanduser().resolve()
    try:
        return str(Path("~") / resolved.relative_to(Path.home().resolve()))
    except ValueError:
        return str(resolved)


def exclude_files(files: list[Path], exclude: list[Path], dist: Distributed) -> tuple[list[Path], Excluded | None]:
    """`files` without those whose bytes equal a file's in the --exclude folders, and what was left out.

    Keyed on content, as the split is: a held-out piece stays out under any name or folder."""
    if not exclude:
        return files, None
    excluded: set[str] = set()
    for folder in exclude:
        if not Path(folder).is_dir():
            raise DataError(f"--exclude folder {folder} does not exist")
        excluded.update(content_hash(path.read_bytes()) for path in find_midi_files(Path(folder)))
    kept, left_out = [], set()
    for path in files:
        file_hash = content_hash(Path(path).read_bytes())
        if file_hash in excluded:
            left_out.add(file_hash)
        else:
            kept.append(path)
    dist.say(f"--exclude: {len(files) - len(kept)} files left out ({len(left_out)} distinct contents; "
             f"{len(excluded)} distinct contents in {', '.join(map(str, exclude))})")
    return kept, Excluded(folders=[str(f) for f in exclude], files_left_out=len(files) - len(kept),
                          fingerprint=data_fingerprint(left_out),
                          hashes=sorted(left_out) if len(left_out) <= EXCLUDED_HASHES_KEPT else [])


def read_data(files: list[Path], source: str, tokenizer_file: Path, out: Path, val_fraction: float,
              augment: AugmentConfig, dist: Distributed, progress: bool) -> Corpus:
    """Ingest, report (written and printed by rank 0), and refuse data that cannot train anything."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1, not {val_fraction}")
    # Each rank ingests on its share of the cores: the result is deterministic, so all ranks agree.
    workers = max(1, (os.cpu_count() or 1) // dist.world)
    corpus = load_corpus(files, tokenizer_file, val_fraction, workers=workers, progress=progress and dist.is_main,
                         tempo_factors=augment.tempo_factors)
    if dist.is_main:
        report = build_report(corpus, source, val_fraction, augment.to_dict())
        write_report(report, out)
        print_report(report)
    if not corpus.train and not corpus.val:
        raise DataError(f"none of the {len(files)} MIDI files in {source} could be used "
                        f"(every reason is in {Path(out) / REPORT_TEXT})")
    if not corpus.train or not corpus.val:
        part = "training" if not corpus.train else "validation"
        raise DataError(f"the {part} part is empty ({len(corpus.train)} train / {len(corpus.val)} validation files): "
                        f"add files or change --val-fraction")
    return corpus


def check_same_data(corpus: Corpus, fingerprint: str | None, source: str) -> None:
    """A resumed run must read exactly the data it started with (`fingerprint`, from its checkpoint)."""
    if fingerprint != corpus.fingerprint:
        raise DataError(f"the files in {source} changed since this run started (data fingerprint "
                        f"{corpus.fingerprint[:12]} vs {str(fingerprint)[:12]}); "
                        "an exact resume needs the same data: start a new run")


def make_samplers(corpus: Corpus, tokenizer: ClipTokenizer, window: int, seed: int, rank: int,
                  augment: AugmentConfig) -> tuple[WindowSampler, WindowSampler]:
    """(training sampler: augmented, one seed per rank; validation sampler: plain, sequential)."""
    try:
        val = WindowSampler(corpus.val, tokenizer, window, seed=seed)
        if val.window_count() == 0:
            raise ValueError("no window")
    except ValueError as exc:
        raise DataError(f"the validation part ({len(corpus.val)} files, {corpus.token_count('val'):,} tokens) is shorter "
                        f"than one window of {window} tokens: add files, raise --val-fraction or lower --window") from exc
    try:
        train = WindowSampler(corpus.train, tokenizer, window, seed=seed + rank, augment=TokenAugmenter(tokenizer, augment),
                              variants=corpus.train_variants, variant_prob=augment.tempo_prob)
    except ValueError as exc:
        raise DataError(f"the training part ({len(corpus.train)} files, {corpus.token_count('train'):,} tokens) is shorter "
                        f"than one window of {window} tokens: add files or lower --window") from exc
    return train, val


def program_counts(corpus: Corpus, tokenizer: ClipTokenizer, base: dict[str, int] | None = None) -> dict[str, int]:
    """Notes per program in the training part (plus `base`'s): lets the engine map unseen instruments."""
    kinds = tokenizer.kinds
    program_of = np.full(tokenizer.vocab_size, -2, dtype=np.int64)  # -2: not a Program token
    for token, program in kinds.program.items():
        program_of[token] = program
    is_note = np.zeros(tokenizer.vocab_size, dtype=bool)
    is_note[[*kinds.pitch, *kinds.pitch_drum]] = True
    programs = {str(p): int(n) for p, n in (base or {}).items()}
    for piece in corpus.train:
        # Each note belongs to the last Program before it (a Program may cover many notes of a bar).
        ids = np.asarray(piece, dtype=np.int64)
        stated = program_of[ids]
        last = np.maximum.accumulate(np.where(stated >= -1, np.arange(len(ids)), 0))
        current = stated[last]
        notes = is_note[ids] & (current >= -1)
        values, counts = np.unique(current[notes], return_counts=True)
        for program, count in zip(values, counts, strict=True):
            programs[str(int(program))] = programs.get(str(int(program)), 0) + int(count)
    return programs
