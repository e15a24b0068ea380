"""Style metrics of a clip, distances between two clips' metrics, and a small style classifier.

Used by `segue eval` (training/evaluate.py) to compare a model's continuation with the real one:

    a = style_metrics(generated, bars=4, start=16.0)
    b = style_metrics(reference, bars=4, start=16.0)
    metric_distances(a, b)   # {"pitch_class_histogram": 0.12, "pitch_range": 3.0, ...}

and by experiments that label continuations by style:

    classifier = train_style_classifier({"bach": bach_clips, "irish": irish_clips})
    classifier.predict(continuation)  # "bach"

The measures are the style-fidelity measures of the symbolic-music literature (pitch-class
histogram, pitch range, note density, inter-onset intervals, polyphony, velocity, pitch and
rhythm entropy), all computed on notes in beats, so they do not depend on tempo.
Histograms are compared by total variation distance (half the L1 distance, 1 - overlap: 0 for
identical, 1 for disjoint); scalars by absolute difference in their own unit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from engine.clip import Clip, Note

# Inter-onset intervals (beats) go to the nearest of these on a log scale: the grid values of
# common rhythms (thirty-second to whole note, with triplets and dots), the last bin holds longer gaps.
IOI_VALUES = (1 / 8, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 3 / 4, 1.0, 1.5, 2.0, 3.0, 4.0)
IOI_LABELS = ("1/8", "1/6", "1/4", "1/3", "1/2", "2/3", "3/4", "1", "3/2", "2", "3", ">=4")
VELOCITY_BINS = 8  # 16 velocity steps each: about one dynamic marking (pp, p, mp, ...) per bin
# Onset positions for the rhythm entropy: 12 per beat holds sixteenths and triplets (the tokenizer's grid).
POSITIONS_PER_BEAT = 12

HISTOGRAM_METRICS = ("pitch_class_histogram", "ioi_histogram", "velocity_histogram")
SCALAR_METRICS = ("pitch_range", "mean_pitch", "notes_per_bar", "polyphony", "velocity_mean", "velocity_std",
                  "pitch_entropy", "rhythm_entropy")
METRIC_UNITS = {
    "pitch_class_histogram": "TV", "ioi_histogram": "TV", "velocity_histogram": "TV",
    "pitch_range": "semitones", "mean_pitch": "semitones", "notes_per_bar": "notes", "polyphony": "voices",
    "velocity_mean": "velocity", "velocity_std": "velocity", "pitch_entropy": "bits", "rhythm_entropy": "bits",
}


def _entropy_bits(counts: np.ndarray) -> float:
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum() + 0.0)  # + 0.0 turns -0.0 into 0.0


def _normalised(counts: np.ndarray) -> list[float]:
    total = counts.sum()
    return [float(x) for x in (counts / total if total > 0 else counts.astype(float))]


def _span_start(clip: Clip) -> float:
    """The start of the bar holding the clip's first note (0 for an empty clip)."""
    if not clip.notes:
        return 0.0
    first = min(n.start for n in clip.notes)
    return math.floor(first / clip.beats_per_bar + 1e-9) * clip.beats_per_bar


def _ioi_bin(interval: float) -> int:
    if interval >= IOI_VALUES[-1]:
        return len(IOI_VALUES) - 1
    return int(np.argmin(np.abs(np.log2(np.asarray(IOI_VALUES)) - math.log2(interval))))


def _polyphony(notes: Sequence[Note], end: float) -> float:
    """Mean number of notes sounding while any note sounds: summed note time / time anything sounds."""
    spans = sorted((n.start, min(n.end, end)) for n in notes if n.start < end)
    if not spans:
        return 0.0
    covered, current_start, current_end = 0.0, spans[0][0], spans[0][1]
    for start, stop in spans[1:]:
        if start > current_end:
            covered += current_end - current_start
            current_start, current_end = start, stop
        else:
            current_end = max(current_end, stop)
    covered += current_end - current_start
    total = sum(stop - start for start, stop in spans)
    return total / covered if covered > 0 else 0.0


def style_metrics(clip: Clip, bars: int, start: float | None = None) -> dict:
    """The style metrics of the notes that start within `bars` bars from beat `start`.

    `start` defaults to the start of the bar holding the clip's first note, so a continuation from
    `Generator.generate` (its notes placed after the prompt) is measured from its own first bar;
    pass it explicitly when the first bar may be empty. Notes ringing past the span are cut at
    its end for polyphony. Returns plain floats and lists (JSON-ready):
    histograms (normalised, all zeros when there are no notes) and scalars (0 when undefined).
    """
    if bars < 1:
        raise ValueError(f"metrics need at least one bar, not {bars}")
    start = _span_start(clip) if start is None else float(start)
    bar_beats = clip.beats_per_bar
    end = start + bars * bar_beats
    eps = 1e-6  # onsets on a bar line written as 15.999999 belong to the bar that starts there
    notes = [n for n in clip.notes if start - eps <= n.start < end - eps]
    pitches = np.asarray([n.pitch for n in notes], dtype=np.int64)
    velocities = np.asarray([n.velocity for n in notes], dtype=np.float64)
    onsets = sorted({round(n.start - start, 6) for n in notes})  # a chord is one onset
    iois = np.diff(onsets)
    ioi_counts = np.bincount([_ioi_bin(float(i)) for i in iois], minlength=len(IOI_VALUES)).astype(float)
    bar_positions = int(round(bar_beats * POSITIONS_PER_BEAT))
    positions = [int(round(o * POSITIONS_PER_BEAT)) % bar_positions for o in onsets]
    return {
        "notes": len(notes),
        "pitch_class_histogram": _normalised(np.bincount(pitches % 12, minlength=12).astype(float)),
        "ioi_histogram": _normalised(ioi_counts),
        "velocity_histogram": _normalised(np.bincount(np.clip((velocities - 1) // 16, 0, VELOCITY_BINS - 1).astype(int),
                                                      minlength=VELOCITY_BINS).astype(float)),
        "pitch_range": float(pitches.max() - pitches.min()) if len(notes) else 0.0,
        "mean_pitch": float(pitches.mean()) if len(notes) else 0.0,
        "notes_per_bar": len(notes) / bars,
        "polyphony": _polyphony(notes, end),
        "velocity_mean": float(velocities.mean()) if len(notes) else 0.0,
        "velocity_std": float(velocities.std()) if len(notes) else 0.0,
        "pitch_entropy": _entropy_bits(np.bincount(pitches, minlength=128).astype(float)),
        "rhythm_entropy": _entropy_bits(np.bincount(positions, minlength=bar_positions).astype(float)),
    }


def total_variation(p: Sequence[float], q: Sequence[float]) -> float:
    """Half the L1 distance of two normalised histograms (1 - their overlap); an empty one is 1 from
    any non-empty one and 0 from another empty one."""
    p, q = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    p_empty, q_empty = p.sum() <= 0, q.sum() <= 0
    if p_empty or q_empty:
        return 0.0 if p_empty and q_empty else 1.0
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def metric_distances(a: Mapping, b: Mapping) -> dict[str, float]:
    """Per-metric distance between two `style_metrics` results (0 when identical, symmetric)."""
    out = {name: total_variation(a[name], b[name]) for name in HISTOGRAM_METRICS}
    out.update({name: abs(float(a[name]) - float(b[name])) for name in SCALAR_METRICS})
    return out


def feature_vector(metrics: Mapping) -> np.ndarray:
    """All metrics as one vector (histograms, then scalars), in a fixed order."""
    parts = [np.asarray(metrics[name], dtype=float) for name in HISTOGRAM_METRICS]
    parts.append(np.asarray([metrics[name] for name in SCALAR_METRICS], dtype=float))
    return np.concatenate(parts)


def clip_windows(clip: Clip, bars: int) -> list[float]:
    """Start beats of the non-overlapping `bars`-bar windows of a clip that hold at least one note."""
    bar_beats = clip.beats_per_bar
    starts = {int(math.floor(n.start / bar_beats + 1e-9)) // bars for n in clip.notes}
    return [index * bars * bar_beats for index in sorted(starts)]


@dataclass(frozen=True)
class StyleClassifier:
    """Multinomial logistic regression over standardised `feature_vector`s of `window_bars`-bar spans."""

    labels: tuple[str, ...]
    window_bars: int
    mean: np.ndarray  # [features]
    scale: np.ndarray  # [features]
    weights: np.ndarray  # [features, labels]
    bias: np.ndarray  # [labels]

    def features(self, clip: Clip, bars: int | None = None, start: float | None = None) -> np.ndarray:
        """The clip's features over `bars` bars from beat `start`; by default from its first note's bar
        to its last note's bar (pass both for a continuation whose last bars may be empty)."""
        start = _span_start(clip) if start is None else start
        if bars is None:
            last = max((n.start for n in clip.notes), default=start)
            bars = max(1, int(math.floor((last - start) / clip.beats_per_bar + 1e-9)) + 1)
        return feature_vector(style_metrics(clip, bars, start))

    def _probabilities(self, x: np.ndarray) -> np.ndarray:
        return _softmax(((x - self.mean) / self.scale) @ self.weights + self.bias)

    def predict_proba(self, clip: Clip, bars: int | None = None, start: float | None = None) -> dict[str, float]:
        p = self._probabilities(self.features(clip, bars, start)[None, :])[0]
        return {label: float(v) for label, v in zip(self.labels, p, strict=True)}

    def predict(self, clip: Clip, bars: int | None = None, start: float | None = None) -> str:
        """The most likely style label of the clip (see `features` for the span measured)."""
        probabilities = self.predict_proba(clip, bars, start)
        return max(probabilities, key=probabilities.get)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def train_style_classifier(clips_by_label: Mapping[str, Sequence[Clip]], window_bars: int = 4, l2: float = 1e-2,
                           steps: int = 500, learning_rate: float = 0.5) -> StyleClassifier:
    """Fit a style classifier on real pieces: each piece is cut into `window_bars`-bar windows (the
    length of the continuations it will label, so entropies and ranges are measured on spans of the
    same size), every window with notes is one example. Full-batch gradient descent on the
    L2-regularised cross-entropy: deterministic, and convex, so no seed is needed."""
    labels = tuple(sorted(clips_by_label))
    if len(labels) < 2:
        raise ValueError(f"a style classifier needs at least two labels, not {len(labels)}")
    rows, targets = [], []
    for index, label in enumerate(labels):
        before = len(rows)
        for clip in clips_by_label[label]:
            for start in clip_windows(clip, window_bars):
                rows.append(feature_vector(style_metrics(clip, window_bars, start)))
                targets.append(index)
        if len(rows) == before:
            raise ValueError(f"style {label!r} has no notes to learn from")
    x = np.stack(rows)
    y = np.eye(len(labels))[targets]
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0  # a feature constant in training carries no information; keep it finite
    z = (x - mean) / scale
    # Weight classes equally, so a style with more windows does not win by prior alone.
    class_weight = (len(targets) / (len(labels) * y.sum(axis=0)))[targets][:, None]
    weights = np.zeros((x.shape[1], len(labels)))
    bias = np.zeros(len(labels))
    norm = class_weight.sum()
    for _ in range(steps):
        error = (_softmax(z @ weights + bias) - y) * class_weight / norm
        weights -= learning_rate * (z.T @ error + l2 * weights)
        bias -= learning_rate * error.sum(axis=0)
    return StyleClassifier(labels, window_bars, mean, scale, weights, bias)
