"""DAW measures: does a continuation sound like the next bars of the clip, or like something a producer
could have done without Segue ("repeat the last bar", "loop the clip")?

    scores = score_continuation(prompt, continuation, real, bars=4)       # one DawScores
    rows = score_example(prompt, real, 4, {"model": continuation})       # + both baselines
    summary = summarize(rows_of_all_clips)                               # per instrument family and system
    print(markdown_table(summary))
    for criterion, value, threshold, passed in criteria_verdicts(summary): ...

Conventions (all times in beats, as in engine/clip.py):

- A continuation, like the real next bars and both baselines, has its notes placed after the prompt:
  it is measured on the window of `bars` bars from `continuation_start(prompt)`, the prompt's length
  rounded up to whole bars (where `Generator` places its notes). A note belongs to the window (and to a bar) when
  it starts in it; onsets written a hair before a bar line (15.999999) belong to the bar that starts there.
- Bar length comes from the meter (`Clip.beats_per_bar`): 4 beats in 4/4, 3 in 3/4 and in 6/8.
- A clip is a drum clip when `is_drum` is set or all its notes are on MIDI channel 10 (channel 9 here).
  Pitched measures are None on drum clips and drum measures None on pitched ones.
- Agreements are cosine similarities of count histograms: 1 for proportional histograms, 0 for
  disjoint ones; two empty histograms agree (1), an empty one and a non-empty one do not (0), the same
  convention as `training.metrics.total_variation`.
- A measure that has no value (the mean pitch of no notes, a ratio over zero real notes) is None and
  is left out of the summary's means and medians; the summary counts clips, not values.

Numpy only: no torch, no ONNX Runtime, so `segue eval` and tests can import it anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import numpy as np

from engine.clip import Clip, Note
from training.metrics import POSITIONS_PER_BEAT, style_metrics

DRUM_CHANNEL = 9  # MIDI channel 10, counted from 0
EPS = 1e-6  # beats: onsets within this of a bar line belong to the bar that starts there
COPY_GRID = 48  # positions per beat when bars are compared for copying (sixteenths, triplets, 32nds)

# The 16 General MIDI program families, 8 programs each, in program order.
GM_FAMILIES = ("piano", "chromatic percussion", "organ", "guitar", "bass", "strings", "ensemble", "brass", "reed", "pipe",
               "synth lead", "synth pad", "synth effects", "ethnic", "percussive", "sound effects")
DRUMS = "drums"
ALL_PITCHED = "all pitched"  # the summary group that pools every pitched family

MODEL = "model"
REPEAT_LAST_BAR = "repeat last bar"
LOOP_THE_CLIP = "loop the clip"
SYSTEMS = (MODEL, REPEAT_LAST_BAR, LOOP_THE_CLIP)

# The "Done when" thresholds.
MAX_MEAN_PITCH_OFFSET = 4.0  # semitones
MIN_PITCH_CLASS_AGREEMENT = 0.80
NOTES_PER_BAR_RATIO_RANGE = (0.8, 1.25)  # median, inclusive
MAX_VOICES_DELTA = 0.5  # |mean voices - clip's voices|
MIN_KIT_AGREEMENT = 0.85
MAX_DRUM_NOTE_BEATS = 1.0  # unless the clip has longer drum notes
DYNAMIC_CLIP_VELOCITIES = 4  # a clip with at least this many distinct velocities is "dynamic" ...
MIN_DYNAMIC_VELOCITIES = 4  # ... and its continuations' median distinct velocities must reach this
MAX_COPIED_BARS = 0.5


# --- windows and tracks ----------------------------------------------------------------------------

def continuation_start(prompt: Clip) -> float:
    """The beat where a continuation of `prompt` starts: the end of the prompt's last (possibly partial) bar."""
    return prompt.bars * prompt.beats_per_bar


def window_notes(clip: Clip, start: float, bars: int) -> list[Note]:
    """The notes of `clip` that start within `bars` bars from beat `start`, as written (absolute times, full durations)."""
    if bars < 1:
        raise ValueError(f"a window needs at least one bar, not {bars}")
    end = start + bars * clip.beats_per_bar
    return [n for n in clip.notes if start - EPS <= n.start < end - EPS]


def _span(clip: Clip, start: float, bars: int | None) -> int:
    """`bars`, or by default the whole bars of `clip` from `start` (at least one)."""
    if bars is not None:
        return bars
    return max(1, clip.bars - int(math.floor(start / clip.beats_per_bar + EPS)))


def is_drum_clip(clip: Clip) -> bool:
    """True for a drum track: `is_drum` set, or every note on MIDI channel 10 (channel 9 counted from 0)."""
    return clip.is_drum or (bool(clip.notes) and all(n.channel == DRUM_CHANNEL for n in clip.notes))


def instrument_family(program: int, is_drum: bool) -> str:
    """The General MIDI family of a track: "drums" for a drum track, else one of the 16 GM families of
    8 programs each ("piano" 0-7, "chromatic percussion" 8-15, ..., "guitar" 24-31, "bass" 32-39, ...,
    "sound effects" 120-127). `program` is 0-based, as in `Clip.program`."""
    if not 0 <= program <= 127:
        raise ValueError(f"program {program} is outside 0-127")
    return DRUMS if is_drum else GM_FAMILIES[program // 8]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two non-negative histograms; two empty ones agree (1), one empty one does not (0)."""
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if norm_a == 0 or norm_b == 0:
        return 1.0 if norm_a == norm_b else 0.0
    return min(1.0, float(np.dot(a, b)) / (norm_a * norm_b))


# --- baselines -------------------------------------------------------------------------------------

def repeat_last_bar_clip(prompt: Clip, bars: int) -> Clip:
    """The baseline that plays the prompt's last bar again `bars` times after the prompt.

    The notes starting in the last bar are cut at its end and repeated bar after bar: the same notes as
    `training.eval_measures.repeat_last_bar(prompt, prompt.bars, bars)` (kept apart so this module stays
    numpy-only: eval_measures loads the ONNX generator). The clip's length covers prompt and continuation."""
    if bars < 1:
        raise ValueError(f"a continuation needs at least one bar, not {bars}")
    beats, start = prompt.beats_per_bar, continuation_start(prompt)
    last_bar = start - beats
    last = [replace(n, duration=min(n.duration, start - n.start)) for n in window_notes(prompt, last_bar, 1)]
    return replace(prompt, length=start + bars * beats).with_notes(
        replace(n, start=n.start + k * beats) for k in range(1, bars + 1) for n in last)


def loop_clip(prompt: Clip, bars: int) -> Clip:
    """The baseline that loops the clip: its whole bars tiled after its end, cut after `bars` bars.

    Continuation bar k plays prompt bar k mod P (P = `prompt.bars`), with the notes' durations as written,
    except that notes ringing past the continuation's end are cut there."""
    if bars < 1:
        raise ValueError(f"a continuation needs at least one bar, not {bars}")
    start = continuation_start(prompt)
    end = start + bars * prompt.beats_per_bar
    source = window_notes(prompt, 0.0, prompt.bars)
    notes = []
    for copy in range(1, -(-bars // prompt.bars) + 1):
        for n in source:
            onset = n.start + copy * start
            if onset < end - EPS:
                notes.append(replace(n, start=onset, duration=min(n.duration, end - onset)))
    return replace(prompt, length=end).with_notes(notes)


# --- measures --------------------------------------------------------------------------------------

def pitch_offset(continuation: Clip, real: Clip, start: float, bars: int) -> float | None:
    """|mean pitch of the continuation - mean pitch of the real bars| in semitones, over the notes starting
    in the window (each note counted once, as `style_metrics`' mean pitch). None when either has no notes."""
    a, b = style_metrics(continuation, bars, start), style_metrics(real, bars, start)
    if a["notes"] == 0 or b["notes"] == 0:
        return None
    return abs(a["mean_pitch"] - b["mean_pitch"])


def pitch_class_agreement(continuation: Clip, real: Clip, start: float, bars: int) -> float:
    """Cosine similarity of the 12-bin pitch-class histograms of the continuation and the real bars.

    The histograms are COUNT-weighted (each note starting in the window counts once, whatever its
    length): the real bars and the prompt are cut at their window's end while a continuation's last notes
    may ring on, so durations would favour whichever side was not cut. 1.0 for the same pitch classes in
    the same proportions (a transposition by octaves included), 0.0 for disjoint ones or an empty continuation."""
    a, b = style_metrics(continuation, bars, start), style_metrics(real, bars, start)
    return _cosine(np.asarray(a["pitch_class_histogram"]), np.asarray(b["pitch_class_histogram"]))


def notes_per_bar_ratio(continuation: Clip, real: Clip, start: float, bars: int) -> float | None:
    """Continuation notes per bar / real notes per bar (every note of a chord counts), over the window.
    0.0 for an empty continuation; None when the real bars have no notes (nothing to compare with)."""
    real_notes = len(window_notes(real, start, bars))
    if real_notes == 0:
        return None
    return len(window_notes(continuation, start, bars)) / real_notes


def voices(clip: Clip, start: float = 0.0, bars: int | None = None) -> float:
    """Mean number of notes sounding at once while anything sounds, over notes starting within `bars` bars
    from `start` (default: the whole clip), cut at the window's end.

    It is the time average of the count of sounding notes, sampled on an infinitely fine grid, over the
    instants where at least one note sounds (silence is not counted): summed note time / time covered
    (`training.metrics`' polyphony). A melody is 1.0, a held triad 3.0; 0.0 for no notes."""
    return float(style_metrics(clip, _span(clip, start, bars), start)["polyphony"])


def voices_delta(prompt: Clip, continuation: Clip, bars: int) -> float:
    """`voices` of the continuation's `bars` bars after the prompt minus `voices` of the prompt (all its bars).
    Positive: the continuation is thicker than the clip; an empty continuation gives -voices(prompt)."""
    return voices(continuation, continuation_start(prompt), bars) - voices(prompt)


def distinct_velocities(clip: Clip, start: float = 0.0, bars: int | None = None) -> int:
    """Number of distinct MIDI velocities among the notes starting within `bars` bars from `start`
    (default: the whole clip). 0 for no notes; a clip played at one velocity gives 1."""
    return len({n.velocity for n in window_notes(clip, start, _span(clip, start, bars))})


def kit_histogram_agreement(continuation: Clip, real: Clip, start: float, bars: int) -> float:
    """Cosine similarity of the 128-bin drum-pitch (GM kit sound: 36 kick, 38 snare, 42 closed hat, ...)
    count histograms of the continuation and the real bars over the window; 0.0 for an empty continuation."""
    def histogram(clip: Clip) -> np.ndarray:
        return np.bincount([n.pitch for n in window_notes(clip, start, bars)], minlength=128).astype(float)

    return _cosine(histogram(continuation), histogram(real))


def _onset_positions(clip: Clip, start: float, bars: int) -> np.ndarray:
    """Histogram of onset positions within the bar on a grid of POSITIONS_PER_BEAT (12) per beat."""
    slots = int(round(clip.beats_per_bar * POSITIONS_PER_BEAT))
    onsets = {round(n.start - start, 6) for n in window_notes(clip, start, bars)}  # simultaneous hits: one onset
    return np.bincount([int(round(o * POSITIONS_PER_BEAT)) % slots for o in onsets], minlength=slots).astype(float)


def onset_grid_agreement(continuation: Clip, real: Clip, start: float, bars: int) -> float:
    """Cosine similarity of where in the bar the continuation and the real bars play.

    Each distinct onset time in the window (a kick and a hat together are one onset) is quantized to the
    nearest of 12 positions per beat (sixteenths and eighth-note triplets both fall on it: 48 positions in a
    4/4 bar, 36 in 6/8) and its position within its bar is counted, pooled over the window's bars. The same
    groove gives 1.0; a straight-eighths groove moved by a sixteenth gives 0.0."""
    return _cosine(_onset_positions(continuation, start, bars), _onset_positions(real, start, bars))


def longest_drum_note(clip: Clip, start: float = 0.0, bars: int | None = None) -> float:
    """The longest written duration, in beats, of the notes starting within `bars` bars from `start`
    (default: the whole clip); 0.0 for no notes. A drum hit has no length; a long one is a stuck note in a DAW."""
    return max((n.duration for n in window_notes(clip, start, _span(clip, start, bars))), default=0.0)


def _bar_signatures(clip: Clip, start: float, bars: int) -> list[tuple]:
    """Per bar of the window: the sorted (pitch, onset, duration) of its notes in 1/48 beats, onsets from
    the bar line, durations cut at the bar's end; velocity and channel ignored."""
    beats = clip.beats_per_bar
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(bars)]
    for n in window_notes(clip, start, bars):
        bar = min(bars - 1, max(0, int(math.floor((n.start - start + EPS) / beats))))
        bar_start = start + bar * beats
        duration = min(n.duration, bar_start + beats - n.start)
        out[bar].append((n.pitch, int(round((n.start - bar_start) * COPY_GRID)), int(round(duration * COPY_GRID))))
    return [tuple(sorted(notes)) for notes in out]


def copied_bars(prompt: Clip, continuation: Clip, bars: int) -> float:
    """Fraction of the continuation's bars with notes that equal some bar of the prompt exactly.

    A bar is the multiset of (pitch, onset from its bar line, duration cut at the bar's end) of the notes
    starting in it, times rounded to 1/48 beat; velocity is ignored (a bar played louder is still a copy).
    Bars without notes are left out of the fraction (silence copies nothing); 0.0 when no bar has notes.
    "Loop the clip" scores 1.0: a continuation that only loops the clip is not a continuation."""
    generated = [b for b in _bar_signatures(continuation, continuation_start(prompt), bars) if b]
    if not generated:
        return 0.0
    clip_bars = set(_bar_signatures(prompt, 0.0, prompt.bars))
    return sum(b in clip_bars for b in generated) / len(generated)


# --- one continuation ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DawScores:
    """Every DAW measure of one continuation of one prompt, against the real next bars.

    Pitched-only fields are None for drum clips, drum-only fields None for pitched clips; a measure with
    no value (see its function) is None too. `clip_*` fields describe the prompt."""

    family: str
    is_drum: bool
    bars: int
    notes: int  # continuation notes starting in the window
    real_notes: int
    notes_per_bar_ratio: float | None
    distinct_velocities: int
    clip_distinct_velocities: int
    copied_bars: float
    # pitched tracks
    pitch_offset: float | None = None
    pitch_class_agreement: float | None = None
    voices: float | None = None
    clip_voices: float | None = None
    voices_delta: float | None = None
    # drum tracks
    kit_histogram_agreement: float | None = None
    onset_grid_agreement: float | None = None
    longest_drum_note: float | None = None
    clip_longest_drum_note: float | None = None

    @property
    def long_drum_note(self) -> bool:
        """True when the continuation has a drum note longer than one beat and than every note of the clip."""
        if self.longest_drum_note is None or self.clip_longest_drum_note is None:
            return False
        return self.longest_drum_note > max(MAX_DRUM_NOTE_BEATS, self.clip_longest_drum_note) + EPS


def score_continuation(prompt: Clip, continuation: Clip, real: Clip, bars: int) -> DawScores:
    """All measures that apply to the prompt's track (pitched or drums) of a continuation of `bars` bars,
    compared with the real next bars; continuation and real have their notes placed after the prompt."""
    if bars < 1:
        raise ValueError(f"a continuation needs at least one bar, not {bars}")
    for name, clip in (("continuation", continuation), ("real continuation", real)):
        if clip.time_signature != prompt.time_signature:
            message = (f"the {name} is in {clip.time_signature[0]}/{clip.time_signature[1]} but the prompt in "
                       f"{prompt.time_signature[0]}/{prompt.time_signature[1]}; bars would not line up")
            raise ValueError(message)
    start = continuation_start(prompt)
    drum = is_drum_clip(prompt)
    common = DawScores(
        family=instrument_family(prompt.program, drum), is_drum=drum, bars=bars,
        notes=len(window_notes(continuation, start, bars)), real_notes=len(window_notes(real, start, bars)),
        notes_per_bar_ratio=notes_per_bar_ratio(continuation, real, start, bars),
        distinct_velocities=distinct_velocities(continuation, start, bars), clip_distinct_velocities=distinct_velocities(prompt),
        copied_bars=copied_bars(prompt, continuation, bars),
    )
    if drum:
        return replace(
            common, kit_histogram_agreement=kit_histogram_agreement(continuation, real, start, bars),
            onset_grid_agreement=onset_grid_agreement(continuation, real, start, bars),
            longest_drum_note=longest_drum_note(continuation, start, bars), clip_longest_drum_note=longest_drum_note(prompt))
    continuation_voices, clip_voices = voices(continuation, start, bars), voices(prompt)
    return replace(
        common, pitch_offset=pitch_offset(continuation, real, start, bars),
        pitch_class_agreement=pitch_class_agreement(continuation, real, start, bars),
        voices=continuation_voices, clip_voices=clip_voices, voices_delta=continuation_voices - clip_voices)


def score_example(prompt: Clip, real: Clip, bars: int, continuations: Mapping[str, Clip]) -> list[tuple[str, DawScores]]:
    """(system, scores) for each given continuation (e.g. {"model": clip}) and for both baselines, "repeat
    last bar" and "loop the clip" (unless given under those names): the rows `summarize` takes."""
    systems = dict(continuations)
    systems.setdefault(REPEAT_LAST_BAR, repeat_last_bar_clip(prompt, bars))
    systems.setdefault(LOOP_THE_CLIP, loop_clip(prompt, bars))
    return [(name, score_continuation(prompt, clip, real, bars)) for name, clip in systems.items()]


# --- summary over clips ----------------------------------------------------------------------------

@dataclass(frozen=True)
class SummaryRow:
    """The measures of one system's continuations of the clips of one instrument family (or of all pitched
    families, `ALL_PITCHED`), as the issue's criteria read them. None where no clip gives a value."""

    family: str
    system: str
    clips: int
    pitch_offset_mean: float | None  # mean |pitch offset|, semitones
    pitch_class_agreement_mean: float | None
    notes_per_bar_ratio_median: float | None
    voices_delta_mean: float | None
    distinct_velocities_median: float | None
    dynamic_clips: int  # clips with at least DYNAMIC_CLIP_VELOCITIES distinct velocities
    dynamic_distinct_velocities_median: float | None  # median distinct velocities of those clips' continuations
    kit_histogram_agreement_mean: float | None
    onset_grid_agreement_mean: float | None
    longest_drum_note_max: float | None
    long_drum_notes: int | None  # continuations with a drum note over max(1 beat, the clip's longest); None for pitched
    copied_bars_mean: float


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _median(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.median(kept)) if kept else None


def _summary_row(family: str, system: str, scores: Sequence[DawScores]) -> SummaryRow:
    dynamic = [s for s in scores if s.clip_distinct_velocities >= DYNAMIC_CLIP_VELOCITIES]
    drums = [s for s in scores if s.is_drum]
    return SummaryRow(
        family=family, system=system, clips=len(scores),
        pitch_offset_mean=_mean(s.pitch_offset for s in scores),
        pitch_class_agreement_mean=_mean(s.pitch_class_agreement for s in scores),
        notes_per_bar_ratio_median=_median(s.notes_per_bar_ratio for s in scores),
        voices_delta_mean=_mean(s.voices_delta for s in scores),
        distinct_velocities_median=_median(s.distinct_velocities for s in scores),
        dynamic_clips=len(dynamic), dynamic_distinct_velocities_median=_median(s.distinct_velocities for s in dynamic),
        kit_histogram_agreement_mean=_mean(s.kit_histogram_agreement for s in scores),
        onset_grid_agreement_mean=_mean(s.onset_grid_agreement for s in scores),
        longest_drum_note_max=max((s.longest_drum_note for s in drums if s.longest_drum_note is not None), default=None),
        long_drum_notes=sum(s.long_drum_note for s in drums) if drums else None,
        copied_bars_mean=float(np.mean([s.copied_bars for s in scores])),
    )


def summarize(rows: Iterable[tuple[str, DawScores]]) -> list[SummaryRow]:
    """One row per (instrument family, system) that has clips, plus one per system pooling every pitched
    family (`ALL_PITCHED`). Families in GM order with the pooled row before "drums"; systems in `SYSTEMS`
    order, then any others (e.g. "n-gram", "real continuation") in the order first seen."""
    groups: dict[tuple[str, str], list[DawScores]] = {}
    order: list[str] = []
    for system, scores in rows:
        if system not in order:
            order.append(system)
        groups.setdefault((scores.family, system), []).append(scores)
        if not scores.is_drum:
            groups.setdefault((ALL_PITCHED, system), []).append(scores)
    systems = [s for s in SYSTEMS if s in order] + [s for s in order if s not in SYSTEMS]
    families = [*GM_FAMILIES, ALL_PITCHED, DRUMS]
    return [_summary_row(family, system, groups[family, system])
            for family in families for system in systems if (family, system) in groups]


class Verdict(NamedTuple):
    criterion: str  # "family, system: what is measured"
    value: float
    threshold: str
    passed: bool


def _row_verdicts(row: SummaryRow) -> list[tuple[str, float | None, str, bool]]:
    low, high = NOTES_PER_BAR_RATIO_RANGE
    ratio = row.notes_per_bar_ratio_median
    ratio_check = ("median notes-per-bar ratio", ratio, f"{low:g}–{high:g}", ratio is not None and low <= ratio <= high)
    if row.family == DRUMS:
        checks = [
            ("mean kit agreement", row.kit_histogram_agreement_mean, f"≥ {MIN_KIT_AGREEMENT:g}",
             row.kit_histogram_agreement_mean is not None and row.kit_histogram_agreement_mean >= MIN_KIT_AGREEMENT),
            (f"continuations with a drum note over {MAX_DRUM_NOTE_BEATS:g} beat (and over the clip's longest)",
             None if row.long_drum_notes is None else float(row.long_drum_notes), "0", row.long_drum_notes == 0),
            ratio_check,
        ]
    else:
        delta = row.voices_delta_mean
        checks = [
            ("mean |pitch offset| (semitones)", row.pitch_offset_mean, f"≤ {MAX_MEAN_PITCH_OFFSET:g}",
             row.pitch_offset_mean is not None and row.pitch_offset_mean <= MAX_MEAN_PITCH_OFFSET),
            ("mean pitch-class agreement", row.pitch_class_agreement_mean, f"≥ {MIN_PITCH_CLASS_AGREEMENT:g}",
             row.pitch_class_agreement_mean is not None and row.pitch_class_agreement_mean >= MIN_PITCH_CLASS_AGREEMENT),
            ratio_check,
            ("mean voices minus the clip's", delta, f"±{MAX_VOICES_DELTA:g}", delta is not None and abs(delta) <= MAX_VOICES_DELTA),
        ]
    if row.dynamic_clips:
        value = row.dynamic_distinct_velocities_median
        checks.append((f"median distinct velocities (clips with ≥ {DYNAMIC_CLIP_VELOCITIES})", value, f"≥ {MIN_DYNAMIC_VELOCITIES}",
                       value is not None and value >= MIN_DYNAMIC_VELOCITIES))
    checks.append(("mean fraction of bars copied from the clip", row.copied_bars_mean, f"≤ {MAX_COPIED_BARS:g}",
                   row.copied_bars_mean <= MAX_COPIED_BARS))
    return checks


def criteria_verdicts(summary: Sequence[SummaryRow], systems: Sequence[str] | None = None) -> list[Verdict]:
    """The issue's "Done when" criteria, checked on every summary row (or those of `systems`):

    pitched: mean |pitch offset| ≤ 4 semitones, mean pitch-class agreement ≥ 0.80, median notes-per-bar
    ratio within 0.8–1.25, mean (voices - clip's voices) within ±0.5; drums: mean kit agreement ≥ 0.85, no
    continuation with a drum note longer than one beat unless the clip has one at least as long, median
    notes-per-bar ratio within 0.8–1.25; dynamics (when some clips have ≥ 4 distinct velocities): those
    clips' continuations have a median ≥ 4 distinct velocities; not a looper: mean copied bars ≤ 0.5.
    Bounds are inclusive. A criterion no clip gives a value for is left out."""
    out = []
    for row in summary:
        if systems is not None and row.system not in systems:
            continue
        for what, value, threshold, passed in _row_verdicts(row):
            if value is not None:
                out.append(Verdict(f"{row.family}, {row.system}: {what}", float(value), threshold, bool(passed)))
    return out


def _escaped(text: str) -> str:
    """Text for a markdown table cell: a "|" (as in "|pitch offset|") would end the cell."""
    return text.replace("|", "\\|")


def _cell(value: float | int | None) -> str:
    if value is None:
        return "—"
    return str(value) if isinstance(value, int) else f"{value:.2f}"


def markdown_table(summary: Sequence[SummaryRow]) -> str:
    """The summary as a markdown table, one line per family and system ("—": no value)."""
    columns = [field.name for field in fields(SummaryRow)]
    header = ["family", "system", "clips", "mean |pitch offset|", "mean pitch-class agr.", "median notes/bar ratio",
              "mean voices Δ", "median distinct vel.", "dynamic clips", "median distinct vel. (dynamic)", "mean kit agr.",
              "mean onset agr.", "longest drum note", "long drum notes", "mean copied bars"]
    assert len(header) == len(columns), "one header per SummaryRow field"
    lines = ["| " + " | ".join(map(_escaped, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in summary:
        cells = [_escaped(row.family), _escaped(row.system)] + [_cell(getattr(row, name)) for name in columns[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_verdicts(verdicts: Sequence[Verdict]) -> str:
    """Criteria verdicts as a markdown table: criterion, value, threshold, pass/FAIL."""
    lines = ["| criterion | value | threshold | verdict |", "|---|---|---|---|"]
    lines += [f"| {_escaped(v.criterion)} | {v.value:.2f} | {v.threshold} | {'pass' if v.passed else 'FAIL'} |" for v in verdicts]
    return "\n".join(lines) + "\n"
