"""The plots of `segue eval-tracks` (training/daw_eval.py): one grouped bar chart per DAW measure.

    paths = write_measure_plots([("my-model", summarize(rows))], OUT / "plots")

Each chart has the instrument families along x and, per family, a bar for each model's continuations next to
"repeat last bar" and "loop the clip"; where the DAW criteria (`daw_measures.criteria_verdicts`) bound the measure,
the bound is a dashed line. The bars are the summary rows the report's tables print (`daw_measures.summarize`):
nothing here measures anything. matplotlib is imported only when plots are drawn (Agg backend, files only), as in
training/eval_report.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from training.daw_measures import (
    MAX_COPIED_BARS,
    MAX_MEAN_PITCH_OFFSET,
    MAX_VOICES_DELTA,
    MIN_KIT_AGREEMENT,
    MIN_PITCH_CLASS_AGREEMENT,
    MODEL,
    NOTES_PER_BAR_RATIO_RANGE,
    SummaryRow,
)


class Chart(NamedTuple):
    """One measure's chart: the SummaryRow field it plots and the criterion's bounds (none: no criterion)."""

    field: str
    filename: str
    title: str
    ylabel: str
    bounds: tuple[float, ...] = ()
    criterion: str = ""  # the bound as the verdict table writes it ("≤ 4"), for the legend


_LOW, _HIGH = NOTES_PER_BAR_RATIO_RANGE
CHARTS = (
    Chart("pitch_offset_mean", "pitch_offset.png", "Mean |pitch offset| from the real next bars", "semitones",
          (MAX_MEAN_PITCH_OFFSET,), f"≤ {MAX_MEAN_PITCH_OFFSET:g}"),
    Chart("pitch_class_agreement_mean", "pitch_class_agreement.png", "Mean pitch-class agreement with the real next bars",
          "cosine similarity (1: same)", (MIN_PITCH_CLASS_AGREEMENT,), f"≥ {MIN_PITCH_CLASS_AGREEMENT:g}"),
    Chart("notes_per_bar_ratio_median", "notes_per_bar_ratio.png", "Median notes per bar / the real next bars'", "ratio",
          (_LOW, _HIGH), f"{_LOW:g}–{_HIGH:g}"),
    Chart("voices_delta_mean", "voices_delta.png", "Mean voices minus the clip's", "notes sounding at once",
          (-MAX_VOICES_DELTA, MAX_VOICES_DELTA), f"±{MAX_VOICES_DELTA:g}"),
    Chart("distinct_velocities_median", "distinct_velocities.png", "Median distinct velocities (all clips)", "velocities"),
    Chart("kit_histogram_agreement_mean", "kit_agreement.png", "Mean kit agreement with the real next bars",
          "cosine similarity (1: same)", (MIN_KIT_AGREEMENT,), f"≥ {MIN_KIT_AGREEMENT:g}"),
    Chart("onset_grid_agreement_mean", "onset_agreement.png", "Mean onset-grid agreement with the real next bars",
          "cosine similarity (1: same)"),
    Chart("copied_bars_mean", "copied_bars.png", "Mean share of generated bars copied from the clip", "share of bars",
          (MAX_COPIED_BARS,), f"≤ {MAX_COPIED_BARS:g}"),
)
BASELINE_COLOURS = ("0.45", "0.75")  # greys: the baselines stand behind the models' colours


class Series(NamedTuple):
    """One set of bars: a model's rows, or a baseline's, by family."""

    label: str
    rows: dict[str, SummaryRow]
    baseline: bool


def chart_series(runs: Sequence[tuple[str, Sequence[SummaryRow]]]) -> list[Series]:
    """Each run's model rows under its label, then the baselines of the first run. A later run's baseline rows
    are added under their own label only where they differ (the model refused some files the first one took)."""
    models = [Series(label, {r.family: r for r in summary if r.system == MODEL}, False) for label, summary in runs]
    baselines: list[Series] = []
    for index, (label, summary) in enumerate(runs):
        for system in dict.fromkeys(r.system for r in summary if r.system != MODEL):
            rows = {r.family: r for r in summary if r.system == system}
            first = next((s for s in baselines if s.label == system), None)
            if first is None and index == 0:
                baselines.append(Series(system, rows, True))
            elif first is None or first.rows != rows:
                baselines.append(Series(f"{system} ({label}'s files)", rows, True))
    return models + baselines


def write_measure_plots(runs: Sequence[tuple[str, Sequence[SummaryRow]]], folder: Path) -> list[Path]:
    """One PNG per chart of `CHARTS` that has a value for some family, in `folder`: per instrument family, each
    run's model (labelled) and the baselines side by side, with the criterion's bounds. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    series = chart_series(runs)
    models = sum(not s.baseline for s in series)
    order = list(dict.fromkeys(family for _, summary in runs for family in (r.family for r in summary)))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for chart in CHARTS:
        values = {s.label: {f: getattr(s.rows[f], chart.field) if f in s.rows else None for f in order} for s in series}
        families = [f for f in order if any(values[s.label][f] is not None for s in series)]
        path = folder / chart.filename
        if not families:  # e.g. the kit chart of a data set without drums
            path.unlink(missing_ok=True)  # not a stale chart of an earlier run next to this report
            continue
        fig, ax = plt.subplots(figsize=(max(6.5, 3.5 + 1.1 * len(families)), 3.6))
        x = np.arange(len(families))
        width = 0.8 / len(series)
        for i, s in enumerate(series):  # the models come first: C0, C1 (C3, red, is the criterion's)
            colour = BASELINE_COLOURS[(i - models) % len(BASELINE_COLOURS)] if s.baseline else f"C{i}"
            bars = [np.nan if (v := values[s.label][f]) is None else v for f in families]
            ax.bar(x + (i - (len(series) - 1) / 2) * width, bars, width, label=s.label, color=colour)
        for k, bound in enumerate(chart.bounds):
            ax.axhline(bound, color="C3", linestyle="--", linewidth=1, label=f"criterion {chart.criterion}" if k == 0 else None)
        if chart.bounds and min(chart.bounds) < 0:
            ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(x, families, fontsize=8, rotation=30)
        ax.set_xlabel("instrument family")
        ax.set_ylabel(chart.ylabel)
        ax.set_title(chart.title)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: never over a bar
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
