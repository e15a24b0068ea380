"""Per-track DAW measures on held-out multi-track MIDI: does each instrument of a band continue like its real next bars?

    segue eval-tracks --model models/default --data DIR [DIR ...] --out runs/daw-eval \
        [--prompt-bars 4] [--bars 8] [--max-files 40] [--seed 0] [--compare-model models/old]

(or `python3 -m training.daw_eval ...`).

`segue eval` merges every file into one clip; a DAW user continues a band, track by track. Here each file's
tracks stay apart (`read_tracks`), all are continued together in one request (each hearing the whole band), and
each track's continuation is scored against that track's real next bars with training/daw_measures.py, next to
"repeat the last bar" and "loop the clip". Every file of the --data folders is held out (no split: use folders the
model never trained on); files are taken in content-hash order, each cut at a bar offset drawn from a generator
seeded by (seed, file hash), as training/held_out.py does, so a file's cut does not depend on the other files.
Writes OUT/report.md, OUT/daw_metrics.json and OUT/plots/*.png (one chart per measure, training/daw_plots.py) and
prints the tables.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import symusic

from engine.clip import Arrangement, Clip, ClipError
from engine.generate import ContinuationRequest, Generator, RequestError, VariationDone
from engine.manifest import ModelError
from engine.midi_file import read_tracks
from training.data import content_hash, find_midi_files
from training.daw_measures import (
    MODEL,
    DawScores,
    SummaryRow,
    criteria_verdicts,
    is_drum_clip,
    markdown_table,
    markdown_verdicts,
    score_example,
    summarize,
)
from training.daw_plots import CHARTS, write_measure_plots
from training.held_out import bar_window


@dataclass(frozen=True)
class Skip:
    """A file (or a file for one model) left out, with a short reason the report counts and the particulars."""

    file: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Example:
    """One file cut at one offset: every track's prompt bars from beat 0, and its real next bars placed after them."""

    path: Path
    offset_bar: int
    prompt: Arrangement  # continued: the tracks with notes in the prompt bars; the others are context
    references: tuple[Clip, ...]  # one per track of `prompt`


@dataclass
class ModelRun:
    """What one model did on the examples: the score rows `summarize` takes and the multi-track check."""

    folder: Path
    name: str
    rows: list[tuple[str, DawScores]] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    multitrack_checked: int = 0
    multitrack_passed: int = 0


# --- choosing the examples ---------------------------------------------------------------------------

def files_in_hash_order(folders: Sequence[Path]) -> tuple[list[tuple[str, Path]], list[Skip]]:
    """(hash, file) for every MIDI file of the folders in hash order, an arbitrary but stable sample that adding
    a file does not reshuffle; a file with the same bytes as another is measured once."""
    seen: dict[str, Path] = {}
    skipped = []
    for path in (p for folder in folders for p in find_midi_files(folder)):
        try:
            digest = content_hash(path.read_bytes())
        except OSError as exc:  # a dangling link, a file without read permission
            skipped.append(Skip(str(path), "unreadable", str(exc)))
            continue
        if digest in seen:
            skipped.append(Skip(str(path), "duplicate", f"same bytes as {seen[digest]}"))
        else:
            seen[digest] = path
    return sorted(seen.items()), skipped


def changes_meter(path: Path) -> bool:
    """True when the file has more than one meter: its bars would not line up with the one meter of an arrangement."""
    score = symusic.Score.from_midi(path.read_bytes())
    return len({(int(ts.numerator), int(ts.denominator)) for ts in score.time_signatures}) > 1


def usable_offsets(arrangement: Arrangement, prompt_bars: int, bars: int) -> list[int]:
    """First bars of a window whose prompt bars and next bars both hold notes (on any track): an empty prompt has
    nothing to continue and an empty reference nothing to compare with."""
    beats = arrangement.beats_per_bar
    bar_of_note = [int(np.floor(n.start / beats + 1e-6)) for track in arrangement.tracks for n in track.notes]
    cumulative = np.concatenate([[0], np.cumsum(np.bincount(bar_of_note, minlength=arrangement.bars + 1))])
    return [o for o in range(arrangement.bars - prompt_bars - bars + 1)
            if cumulative[o + prompt_bars] > cumulative[o] and cumulative[o + prompt_bars + bars] > cumulative[o + prompt_bars]]


def cut_track(track: Clip, offset: int, prompt_bars: int, bars: int) -> tuple[Clip, Clip]:
    """The track's prompt bars moved to beat 0, and its real next bars placed after them (as `held_out_example`)."""
    beats = track.beats_per_bar
    prompt = replace(track, notes=(), length=prompt_bars * beats).with_notes(bar_window(track, offset, prompt_bars, offset))
    reference = replace(prompt, length=(prompt_bars + bars) * beats).with_notes(
        bar_window(track, offset + prompt_bars, bars, offset))
    return prompt, reference


def cut_example(path: Path, digest: str, prompt_bars: int, bars: int, seed: int) -> Example | Skip:
    """The file's example at a seeded offset, or why it has none."""
    try:
        arrangement = read_tracks(path)
        if changes_meter(path):
            return Skip(str(path), "changes meter", "bars would not line up")
    except ClipError as exc:
        return Skip(str(path), "unreadable", str(exc))
    offsets = usable_offsets(arrangement, prompt_bars, bars)
    if not offsets:
        return Skip(str(path), f"no {prompt_bars}+{bars} bars with notes in both", f"{arrangement.bars} bars long")
    offset = int(np.random.default_rng([seed, int(digest[:8], 16)]).choice(offsets))
    cuts = [cut_track(track, offset, prompt_bars, bars) for track in arrangement.tracks]
    continued = tuple(i for i, (prompt, _) in enumerate(cuts) if prompt.notes)
    if not continued:
        return Skip(str(path), "no track has notes in the prompt")
    return Example(path, offset, Arrangement(tuple(p for p, _ in cuts), continued), tuple(r for _, r in cuts))


def choose_examples(files: list[tuple[str, Path]], args: argparse.Namespace) -> tuple[list[Example], list[Skip]]:
    """The first --max-files usable files in hash order, each cut once (every model sees the same cuts)."""
    examples: list[Example] = []
    skipped: list[Skip] = []
    for digest, path in files:
        if len(examples) == args.max_files:
            break
        found = cut_example(path, digest, args.prompt_bars, args.bars, args.seed)
        if isinstance(found, Skip):
            skipped.append(found)
        else:
            examples.append(found)
    return examples, skipped


# --- continuing and scoring --------------------------------------------------------------------------

def score_tracks(example: Example, done: Sequence[VariationDone], bars: int) -> list[tuple[str, DawScores]]:
    """Each continued track against its own real next bars, with both baselines (`score_example`)."""
    rows = []
    for finished in done:
        track = finished.track
        rows += score_example(example.prompt.tracks[track], example.references[track], bars, {MODEL: finished.clip})
    return rows


def instruments(clips: Sequence[Clip]) -> list[tuple[int, bool]]:
    """(program, drum track) of each clip: what a DAW needs to put a continuation back on the right track."""
    return [(clip.program, is_drum_clip(clip)) for clip in clips]


def keeps_instruments(example: Example, done: Sequence[VariationDone]) -> bool:
    """True when the band came back as the same tracks, each with its prompt's program and drum flag."""
    back = sorted(done, key=lambda d: d.track)
    prompt = [example.prompt.tracks[i] for i in example.prompt.continued]
    return [d.track for d in back] == list(example.prompt.continued) and instruments([d.clip for d in back]) == instruments(prompt)


def run_model(folder: Path, generator: Generator, examples: Sequence[Example], args: argparse.Namespace) -> ModelRun:
    """Continue every example once (seed + file index, so models compared see the same seeds) and score it."""
    run = ModelRun(folder, generator.decoder.manifest.name or folder.name)
    for index, example in enumerate(examples):
        request = ContinuationRequest(bars=args.bars, variations=1, temperature=args.temperature, top_p=args.top_p,
                                      seed=args.seed + index, stay_with_clip=args.stay_with_clip)
        try:
            done = generator.generate(example.prompt, request)
        except RequestError as exc:  # e.g. a meter this model's vocabulary lacks
            run.skipped.append(Skip(str(example.path), "refused by the model", str(exc)))
            continue
        run.rows += score_tracks(example, done, args.bars)
        if len(example.prompt.continued) >= 2:
            run.multitrack_checked += 1
            run.multitrack_passed += keeps_instruments(example, done)
    return run


# --- the report ----------------------------------------------------------------------------------------

def skip_summary(skipped: Sequence[Skip]) -> str:
    """The count with its reasons counted, "3 (2 unreadable, 1 changes meter)": a glance says whether the data was sound."""
    counts = Counter(skip.reason for skip in skipped)
    return f"{len(skipped)}" + (" (" + ", ".join(f"{n} {reason}" for reason, n in counts.most_common()) + ")" if counts else "")


def model_section(heading: str, run: ModelRun, summary: list[SummaryRow]) -> str:
    """One model's table, its verdicts on the DAW criteria and the multi-track check, under its own heading."""
    verdicts = criteria_verdicts(summary, systems=(MODEL,))
    return "\n".join([
        f"## {heading}: {run.name} (`{run.folder}`)\n",
        f"{sum(1 for system, _ in run.rows if system == MODEL)} track continuations scored; files refused by the model: "
        f"{skip_summary(run.skipped)}.\n", markdown_table(summary),
        "The model against the DAW criteria:\n", markdown_verdicts(verdicts) if verdicts else "(no criterion applies)\n",
        f"Multi-track check: {run.multitrack_passed} of {run.multitrack_checked} files with two or more continued tracks came "
        "back as the same tracks with the same programs and drum flags.\n"])


def plot_label(heading: str, run: ModelRun, runs: Sequence[tuple[str, ModelRun, list[SummaryRow]]]) -> str:
    """The model's name in the plots' legends, with its role when two runs share a name (a model against itself)."""
    return run.name if sum(other.name == run.name for _, other, _ in runs) == 1 else f"{run.name} ({heading.lower()})"


def plots_section(out: Path, runs: Sequence[tuple[str, ModelRun, list[SummaryRow]]]) -> tuple[str, list[Path]]:
    """OUT/plots/*.png and the report's section linking them; without matplotlib, a section that says so."""
    try:
        paths = write_measure_plots([(plot_label(h, run, runs), summary) for h, run, summary in runs], out / "plots")
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "matplotlib":
            raise
        install = "matplotlib, which is not installed: pip install -e '.[cpu,train]'"
        print(f"warning: no plots: they need {install}", file=sys.stderr)
        return f"## Plots\n\nNo plots: they need {install}.\n", []
    titles = {chart.filename: chart.title for chart in CHARTS}
    links = "".join(f"![{titles[path.name]}](plots/{path.name})\n\n" for path in paths)
    return ("## Plots\n\nEach measure per instrument family: every model next to \"repeat last bar\" and \"loop the clip\" "
            "(the numbers of the tables above); a dashed line marks the DAW criterion where the measure has one.\n\n"
            + links), paths


def write_outputs(out: Path, argv: Sequence[str], examples: Sequence[Example], skipped: Sequence[Skip],
                  runs: Sequence[tuple[str, ModelRun, list[SummaryRow]]]) -> str:
    """OUT/report.md, OUT/daw_metrics.json and OUT/plots/*.png; returns the report's text."""
    out.mkdir(parents=True, exist_ok=True)
    command = "segue eval-tracks " + shlex.join(argv)
    plots, plot_paths = plots_section(out, runs)
    report = "\n".join([
        "# Segue per-track DAW evaluation\n", f"Command: `{command}`\n",
        f"Models: {', '.join(f'{run.name} (`{run.folder}`)' for _, run, _ in runs)}.\n",
        f"Files used: {len(examples)}; skipped: {skip_summary(skipped)}.\n",
        *(model_section(heading, run, summary) for heading, run, summary in runs), plots]).rstrip("\n") + "\n"
    (out / "report.md").write_text(report)
    metrics = {
        "command": command, "files_used": [{"file": str(e.path), "offset_bar": e.offset_bar, "tracks": len(e.prompt.tracks),
                                          "continued": list(e.prompt.continued)} for e in examples],
        "skipped": [asdict(s) for s in skipped],
        "models": [{"role": heading, "name": run.name, "folder": str(run.folder),
                    "summary": [asdict(row) for row in summary],
                    "verdicts": [v._asdict() for v in criteria_verdicts(summary, systems=(MODEL,))],
                    "multitrack": {"checked": run.multitrack_checked, "passed": run.multitrack_passed},
                    "skipped": [asdict(s) for s in run.skipped]} for heading, run, summary in runs],
        "plots": [f"plots/{path.name}" for path in plot_paths]}
    (out / "daw_metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False) + "\n")
    return report


# --- the command -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segue eval-tracks", description="Continue held-out multi-track MIDI "
                                "files track by track and score each track against its real next bars.")
    p.add_argument("--model", type=Path, required=True, help="model folder (models/NAME)")
    p.add_argument("--data", type=Path, nargs="+", required=True, help="folders of MIDI files, all held out")
    p.add_argument("--out", type=Path, required=True, help="report folder (created if needed)")
    p.add_argument("--prompt-bars", type=int, default=4, help="bars of real music continued (default 4)")
    p.add_argument("--bars", type=int, default=8, help="bars generated and compared with the real ones (default 8)")
    p.add_argument("--max-files", type=int, default=40, help="usable files to measure (default 40)")
    p.add_argument("--seed", type=int, default=0, help="seeds the bar offsets and the sampling (default 0)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the model (default 1)")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (default 0.9)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    p.add_argument("--stay-with-clip", type=float, default=ContinuationRequest.stay_with_clip,
                   help="clip guidance strength, 0 = the model alone (default %(default)s; engine/clip_guidance.py)")
    p.add_argument("--compare-model", type=Path, help="a second model run on the same files, offsets and seeds")
    return p


def usage_problem(args: argparse.Namespace) -> str:
    """Why the options cannot run (a missing folder, an invalid request), or "" when they can."""
    if args.prompt_bars < 1 or args.max_files < 1:
        return "--prompt-bars and --max-files must be at least 1"
    for folder in args.data:
        if not folder.is_dir():
            return f"data folder {folder} does not exist"
        if not find_midi_files(folder):
            return f"data folder {folder} has no MIDI files"
    try:  # the request every file gets, but for the seed's offset
        ContinuationRequest(bars=args.bars, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            stay_with_clip=args.stay_with_clip).validate()
    except RequestError as exc:
        return str(exc)
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    problem = usage_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    generators = []
    for heading, folder in [("Model", args.model)] + ([("Compared model", args.compare_model)] if args.compare_model else []):
        try:
            generators.append((heading, folder, Generator.load(folder, threads=args.threads)))
        except (ModelError, OSError, ValueError) as exc:
            print(f"error: cannot load the model {folder}: {exc}", file=sys.stderr)
            return 1
    files, skipped = files_in_hash_order(args.data)
    examples, unusable = choose_examples(files, args)
    skipped += unusable
    if not examples:
        print(f"error: none of the {len(files)} files gave a usable example; skipped: {skip_summary(skipped)}", file=sys.stderr)
        return 1
    runs = []
    for heading, folder, generator in generators:
        run = run_model(folder, generator, examples, args)
        runs.append((heading, run, summarize(run.rows)))
    write_outputs(args.out, argv, examples, skipped, runs)
    for heading, run, summary in runs:
        print(f"{heading}: {run.name} ({len(examples)} files, skipped {skip_summary(skipped)})\n{markdown_table(summary)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
