"""The ingest report: what went into a run and what was left out, and why.

Written by `segue train` and `segue finetune` into the run folder as `ingest_report.json` (for
programs) and `ingest_report.txt` (for people), and printed: every skipped file with its reason,
every duplicate with the file it repeats, the split and the data fingerprint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from engine.atomic_file import atomic_write
from training.data import Corpus

REPORT_JSON = "ingest_report.json"
REPORT_TEXT = "ingest_report.txt"
PRINT_LIMIT = 50  # skipped files listed on the terminal; the files hold all of them


def build_report(corpus: Corpus, source: str, val_fraction: float, augmentation: dict | None = None) -> dict:
    return {
        "source": source,
        "files_found": corpus.files,
        "ingested": len(corpus.train) + len(corpus.val),
        "train_files": len(corpus.train),
        "val_files": len(corpus.val),
        "train_tokens": corpus.token_count("train"),
        "val_tokens": corpus.token_count("val"),
        "tempo_copies": len(corpus.train_variants),
        "val_fraction": val_fraction,
        "data_fingerprint": corpus.fingerprint,
        "augmentation": augmentation,
        "duplicates": [{"path": path, "same_as": kept} for path, kept in corpus.duplicates],
        "skipped": [{"path": path, "reason": reason} for path, reason in corpus.skipped],
    }


def format_report(report: dict, limit: int | None = None) -> str:
    """The report as text; `limit` caps the listed skipped files (None: list all)."""
    lines = [
        f"source: {report['source']}",
        f"files found: {report['files_found']}",
        f"ingested: {report['ingested']} ({report['train_files']} train / {report['val_files']} validation; "
        f"{report['train_tokens']:,} / {report['val_tokens']:,} tokens)",
        f"tempo-stretched copies: {report['tempo_copies']}",
        f"data fingerprint: {report['data_fingerprint']}",
        f"duplicates dropped: {len(report['duplicates'])}",
    ]
    lines += [f"  {d['path']} (same content as {d['same_as']})" for d in report["duplicates"][:limit]]
    lines.append(f"skipped: {len(report['skipped'])}")
    lines += [f"  {s['path']}: {s['reason']}" for s in report["skipped"][:limit]]
    hidden = max(0, len(report["skipped"]) - limit) if limit is not None else 0
    if hidden:
        lines.append(f"  ... and {hidden} more in {REPORT_TEXT}")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    out = Path(out)
    paths = out / REPORT_JSON, out / REPORT_TEXT
    atomic_write(paths[0], lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    atomic_write(paths[1], lambda tmp: Path(tmp).write_text(format_report(report)))
    return paths


def print_report(report: dict, stream: TextIO | None = None) -> None:
    print(format_report(report, limit=PRINT_LIMIT), end="", file=stream or sys.stderr)
