"""What `segue eval` writes: report.md, metrics.json, the plots and the audio.

    OUT/report.md      every number a person needs to judge the model, one section per question
    OUT/metrics.json   the same numbers for scripts
    OUT/plots/*.png    mean pitch-class, inter-onset and velocity histograms, real vs each system, and the DAW measures
    OUT/audio/         prompt + continuation as .mid (and .wav through FluidSynth), to listen

`result` is what `training.evaluate.evaluate` returns and `summary` what
`training.eval_measures.summarise` makes of its clips; nothing here measures anything.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from engine.midi_file import write_clip
from training import daw_measures
from training.eval_measures import SYSTEMS
from training.metrics import HISTOGRAM_METRICS, IOI_LABELS, METRIC_UNITS, SCALAR_METRICS
from training.originality import COPY_THRESHOLD_BARS

SYSTEM_NAMES = {"reference": "real continuation", "model": "model", "ngram": "n-gram", "repeat": "repeat last bar"}
REPORT_SECTIONS = ("Data", "Perplexity", "Style fidelity", "Metric values", "Originality", "DAW measures", "Plots", "Audio",
                   "Clips")
ALL_SYSTEMS = ("reference", *SYSTEMS)
METRICS = (*HISTOGRAM_METRICS, *SCALAR_METRICS)


def write_plots(values: dict, folder: Path) -> list[Path]:
    """Grouped bar charts of the mean histograms: the real continuation next to each system."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    charts = [("pitch_class_histogram", "pitch_classes.png", "Pitch-class histogram",
               ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"], "pitch class"),
              ("ioi_histogram", "ioi.png", "Inter-onset intervals", list(IOI_LABELS), "interval (beats)"),
              ("velocity_histogram", "velocity.png", "Velocity distribution",
               [f"{1 + 16 * i}-{min(127, 16 * (i + 1))}" for i in range(len(values["reference"]["velocity_histogram"]))],
               "velocity")]
    paths = []
    for metric, filename, title, labels, xlabel in charts:
        fig, ax = plt.subplots(figsize=(9, 3.6))
        x = np.arange(len(labels))
        width = 0.8 / len(ALL_SYSTEMS)
        for i, name in enumerate(ALL_SYSTEMS):
            ax.bar(x + (i - (len(ALL_SYSTEMS) - 1) / 2) * width, values[name][metric], width, label=SYSTEM_NAMES[name])
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("share (mean over clips)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / filename, dpi=110)
        plt.close(fig)
        paths.append(folder / filename)
    return paths


DAW_CHARTS = (("pitch_class_agreement_mean", "pitch-class agreement with the real bars (mean)"),
              ("notes_per_bar_ratio_median", "notes per bar / real (median)"),
              ("pitch_offset_mean", "|mean pitch - real| in semitones (mean)"),
              ("copied_bars_mean", "bars copied from the clip (mean share)"))


def write_daw_plots(summary: list, folder: Path) -> list[Path]:
    """One grouped bar chart of the DAW measures: per instrument family, each system side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    families = list(dict.fromkeys(row.family for row in summary))
    systems = list(dict.fromkeys(row.system for row in summary))
    fig, axes = plt.subplots(1, len(DAW_CHARTS), figsize=(4.2 * len(DAW_CHARTS), 3.6))
    width = 0.8 / max(1, len(systems))
    for ax, (measure, title) in zip(axes, DAW_CHARTS, strict=True):
        x = np.arange(len(families))
        for i, system in enumerate(systems):
            values = [next((getattr(r, measure) for r in summary if r.family == family and r.system == system), None)
                      for family in families]
            ax.bar(x + (i - (len(systems) - 1) / 2) * width, [np.nan if v is None else v for v in values], width, label=system)
        ax.set_xticks(x, families, fontsize=7, rotation=30)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = folder / "daw_measures.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def write_audio(clips: list[dict], folder: Path, count: int, soundfont: Path | None) -> tuple[list[tuple[Path, Path | None]], str]:
    """Prompt + continuation as .mid (and .wav) for the first `count` clips: the real one, the model's, the n-gram's.
    Returns (midi, wav or None) pairs and, when rendering failed, the reason."""
    from engine.render import RenderError, render_midi

    written, problem = [], ""
    for number, clip in enumerate(clips[:count], start=1):
        example = clip["example"]
        for name in ("reference", "model", "ngram"):
            continuation = clip["continuations"][name]
            whole = replace(example.prompt, length=example.reference.length).with_notes(example.prompt.notes + continuation.notes)
            midi = write_clip(folder / f"{number:02d}-{example.name}-{name}.mid", whole,
                              track_name=f"{example.name}: prompt + {SYSTEM_NAMES[name]}")
            wav = None
            if not problem:
                try:
                    wav = render_midi(midi, soundfont=soundfont).path
                except RenderError as exc:
                    problem = str(exc)  # one reason is enough; the .mid files are still there to open
            written.append((midi, wav))
    return written, problem


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_report(args, result: dict, summary: dict, plots: list[Path], audio: list, audio_problem: str, out: Path) -> Path:
    """report.md: every number a person needs to judge the model, with the plots and audio linked."""
    sections = (_head(args, result), _data(args, result), _perplexity(args, result), _style_fidelity(summary),
                _metric_values(summary), _originality(args, result, summary), _daw(summary), _plots(plots), _audio(audio, audio_problem),
                _clips(args, result))
    path = out / "report.md"
    path.write_text("\n".join(part for section in sections for part in section))
    return path


def write_metrics(args, result: dict, summary: dict, out: Path) -> Path:
    """metrics.json: the report's numbers, and every clip's, for scripts."""
    path = out / "metrics.json"
    path.write_text(json.dumps({
        "model": str(args.model), "data": str(args.data),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "argv"},
        "perplexity": result["perplexity"], **{k: v for k, v in summary.items() if k != "daw"},
        "daw": [dataclasses.asdict(row) for row in summary["daw"]], "timings": result["timings"],
        "clips": [{"file": c["file"], "offset_bar": c["offset_bar"], "metrics": c["metrics"], "distances": c["distances"],
                   "longest_copy": c["longest_copy"]} for c in result["clips"]],
        "skipped": result["skipped"],
    }, indent=1) + "\n")
    return path


# --- the report's sections, in order -----------------------------------------------------------------

def _head(args, result: dict) -> list[str]:
    manifest = result["generator"].decoder.manifest
    return [f"# Segue evaluation: {manifest.name or args.model.name}\n",
            f"Model `{args.model}` ({(manifest.model.parameters or 0) / 1e6:.2f} M parameters, context "
            f"{manifest.model.max_context}) on `{args.data}`. Prompt {args.prompt_bars} bars, continuation "
            f"{args.bars} bars, temperature {args.temperature:g}, top-p {args.top_p:g}, seed {args.seed}; written "
            f"{time.strftime('%Y-%m-%d %H:%M')}. Reproduce: `segue eval {shlex.join(args.argv)}`.\n"]


def _data(args, result: dict) -> list[str]:
    split, clips = result["split"], result["clips"]
    return ["## Data\n",
            f"{split.files} MIDI files: {len(split.train)} training and {len(split.val)} validation pieces "
            f"(content hash split at {args.val_fraction:g}), {split.duplicates} duplicates dropped, "
            f"{len(split.skipped)} unreadable. {len(clips)} held-out clips evaluated"
            + (f"; {len(result['skipped'])} validation files gave no clip (listed under Clips)." if result["skipped"] else ".")
            + " The model must have been trained with a validation fraction of at least this much, or some of these "
              "pieces were in its training data.\n"]


def _perplexity(args, result: dict) -> list[str]:
    ppl = result["perplexity"]
    context = result["generator"].decoder.manifest.model.max_context
    return ["## Perplexity\n",
            f"Per token on {ppl['tokens']:,} validation tokens ({ppl['pieces']} pieces, each `BOS piece EOS`, every "
            f"token after BOS scored over the full vocabulary; lower is better). The model reads windows of its "
            f"context sliding by {args.stride or context // 2} tokens.\n",
            table(["", "perplexity"], [
                ["model", f"{ppl['model']:.3f}"],
                [f"n-gram (order {ppl['ngram_order']}, interpolated Kneser-Ney, training split)", f"{ppl['ngram']:.3f}"],
                ["uniform over the vocabulary", f"{ppl['uniform']:.0f}"],
            ] + ([["model, as recorded by its training run (its own split)", f"{ppl['training_run']:.3f}"]]
                 if ppl.get("training_run") else []))]


def _style_fidelity(summary: dict) -> list[str]:
    d = summary["distances"]
    wins = {s: sum(d["model"][m] < d[s][m] for m in METRICS) for s in ("ngram", "repeat")}
    return ["## Style fidelity\n",
            "Distance of each continuation's metrics to the real continuation's, mean over clips (lower is better). "
            "Histograms: total variation distance (0 identical, 1 disjoint); scalars: absolute difference in their "
            f"unit. The model is closer than the n-gram on {wins['ngram']} of {len(METRICS)} metrics and closer than "
            f"repeat-last-bar on {wins['repeat']}.\n",
            table(["metric", "unit", *[SYSTEM_NAMES[s] for s in SYSTEMS]],
                  [[m, METRIC_UNITS[m], *[f"{d[s][m]:.3f}" for s in SYSTEMS]] for m in METRICS])]


def _metric_values(summary: dict) -> list[str]:
    v = summary["values"]
    return ["## Metric values\n",
            "Mean over clips of each metric itself (the histograms are in the plots). Empty continuations count "
            "as zeros.\n",
            table(["metric", "unit", *[SYSTEM_NAMES[s] for s in ALL_SYSTEMS]],
                  [[m, METRIC_UNITS[m], *[f"{v[s][m]:.3f}" for s in ALL_SYSTEMS]] for m in SCALAR_METRICS]
                  + [["empty continuations", "clips", *[str(v[s]["empty"]) for s in ALL_SYSTEMS]]])]


def _originality(args, result: dict, summary: dict) -> list[str]:
    o = summary["originality"]
    return ["## Originality\n",
            f"Longest run of consecutive bars found verbatim in the training split ({len(result['split'].train)} pieces): "
            "same notes at the same positions with the same durations, velocity and instrument ignored"
            + (", in any transposition" if args.transpose_invariant else "")
            + "; bars with fewer than 2 notes never count. The real continuation shows how much the data repeats itself.\n",
            table(["", "mean longest copy (bars)", "longest", f"copying >= {COPY_THRESHOLD_BARS} bars"],
                  [[SYSTEM_NAMES[s], f"{o[s]['mean_longest_copy']:.2f}", str(o[s]["max_longest_copy"]),
                    f"{o[s]['copying_fraction']:.0%}"] for s in ALL_SYSTEMS])]


def _daw(summary: dict) -> list[str]:
    rows = summary["daw"]
    verdicts = daw_measures.criteria_verdicts(rows, systems=(daw_measures.MODEL,))
    return ["## DAW measures\n",
            "What a producer hears first, per instrument family: where the continuation sits against the real next bars "
            "(|mean pitch - real|, pitch-class agreement), how busy it is (notes per bar relative to the real bars, "
            "voices relative to the clip), its dynamics, for drums the kit sounds and the onset grid, and how many "
            "generated bars only copy a bar of the clip. \"repeat last bar\" and \"loop the clip\" are what a producer "
            "gets without Segue.\n", daw_measures.markdown_table(rows),
            "\nThe model against the DAW criteria:\n", daw_measures.markdown_verdicts(verdicts) if verdicts else "(no criterion applies)\n"]


def _plots(plots: list[Path]) -> list[str]:
    return ["## Plots\n", *[f"![{p.stem}](plots/{p.name})\n" for p in plots]]


def _audio(audio: list, audio_problem: str) -> list[str]:
    return ["## Audio\n",
            "Prompt followed by each continuation, rendered with FluidSynth (General MIDI soundfont).\n"
            + (f"\nRendering failed: {audio_problem}\n" if audio_problem else ""),
            "".join(f"- [{midi.name}](audio/{midi.name})" + (f" — [{wav.name}](audio/{wav.name})" if wav else "") + "\n"
                    for midi, wav in audio) or "No audio (--audio 0).\n"]


def _clips(args, result: dict) -> list[str]:
    clips = result["clips"]
    return ["## Clips\n",
            table(["file", "prompt bars", "notes: real / model / n-gram / repeat", "longest copy: model / n-gram"],
                  [[c["file"], f"{c['offset_bar'] + 1}-{c['offset_bar'] + args.prompt_bars}",
                    " / ".join(str(c["metrics"][s]["notes"]) for s in ALL_SYSTEMS),
                    f"{c['longest_copy']['model']} / {c['longest_copy']['ngram']}"] for c in clips]),
            *(["\nNot evaluated: " + "; ".join(f"{name} ({why})" for name, why in result["skipped"]) + "\n"]
              if result["skipped"] else []),
            "\nTime: " + ", ".join(f"{k} {s:.2f} s" for k, s in result["timings"].items()) + ".\n"]
