"""Clip guidance: a soft pull of each continued track towards the pitches its clip plays.

A musician who continues a bass line in E minor, or a groove of kick, snare and closed hi-hat,
expects the continuation to stay in that key, that register and that kit. A model that hears the
clip mostly does, but a small one drifts: after a bar or two a bass line climbs, a comping part
wanders out of key, and a drum part reaches for cowbells the groove never had (docs/default-model.md,
"Staying with the clip"). Clip guidance nudges, without forcing, each note towards the clip:

- pitched tracks: the clip's pitch classes, in proportion to how often the clip plays each, and its
  register: a pitch more than REGISTER_MARGIN semitones outside the clip's lowest-to-highest range
  loses REGISTER_WEIGHT log-odds per semitone further out;
- drum tracks: the clip's kit sounds, in proportion to how often each is struck;
- chord size, pitched tracks: once a track's chord at one position is as large as the largest its clip
  played, the odds that another note joins it are lowered towards how rarely the clip did that
  (`TrackGuidance.chord_growth`, `steer_chord`): a bass line the clip plays one note at a time is no
  longer written in two- and three-note chords;
- balance, for both: a pitch class (drum sound) the continuation has played less than its share in
  the clip gains a little for each note it is behind, and one played more loses as much
  (`TrackGuidance.token_bias`). The fixed preference alone left the continuation's pitch classes
  at 0.75 agreement with the real next bars; following what was played brought it to 0.83.

Preference and balance only move probability *between the pitches the grammar allows at that step*
(`guide`): the model's total probability of playing a note there rather than moving on, or of
another part taking its turn, is left as it was, so density, rhythm and the turns of a band stay the
model's. Chord size is the one part that changes whether a note is played, and only downwards, only
past the clip's largest chord. Its strength is a request option (`stay_with_clip`, 0 = the model alone, 1 = the engine's
default, up to 2); hard limits are the job of `engine.constraints`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# How often the clip plays a pitch class or drum sound, as a share of its notes; a share this small is
# added to every one first, so a pitch the clip never played is unlikely, not impossible.
SHARE_FLOOR = 0.05
# Log-odds per unit of log(share) at strength 1: a pitch class the clip never plays weighs about 1/36
# of its most played one (when that one has half of the notes), before the balance term.
SHARE_WEIGHT = 1.5
# Register: semitones beyond the clip's range that cost nothing, then log-odds lost per semitone.
REGISTER_MARGIN = 2
REGISTER_WEIGHT = 0.75
# Balance: log-odds per note a pitch class (drum sound) is short of its clip share among the notes
# the continuation has played so far, or over it (negative); at most BALANCE_CAP notes count.
BALANCE_WEIGHT = 0.75
BALANCE_CAP = 4.0
# Chord size: once a track's chord is as large as the clip's largest, the probability that it adds
# another note is lowered this far (at strength 1) from the model's towards the clip's rate (geometric
# interpolation: 0 = the model's, 1 = the clip's). Onsets in one CHORD_GRID step are one chord, unless
# the engine gives the model's own position step.
CHORD_WEIGHT = 1.0
CHORD_GRID = 1 / 24
# The weights above are strength 1, the default, chosen on the held-out DAW set (docs/default-model.md,
# "Staying with the clip"); 2 is tight.
MAX_STRENGTH = 2.0


def pitch_preference(pitches: Sequence[int], is_drum: bool, strength: float = 1.0) -> np.ndarray | None:
    """[128] log-odds to add to each MIDI pitch (or drum sound) of a track whose clip plays `pitches`;
    None when there is nothing to guide by (no notes, or strength 0)."""
    if strength <= 0 or len(pitches) == 0:
        return None
    played = np.asarray(pitches, dtype=np.int64)
    if is_drum:
        share = np.bincount(played, minlength=128)[:128] / len(played)
        return strength * SHARE_WEIGHT * np.log((share + SHARE_FLOOR) / (share.max() + SHARE_FLOOR))
    class_share = np.bincount(played % 12, minlength=12) / len(played)
    by_class = np.log((class_share + SHARE_FLOOR) / (class_share.max() + SHARE_FLOOR))
    every = np.arange(128)
    beyond = np.maximum(0, np.maximum(played.min() - REGISTER_MARGIN - every, every - played.max() - REGISTER_MARGIN))
    return strength * (SHARE_WEIGHT * by_class[every % 12] - REGISTER_WEIGHT * beyond)


class TrackGuidance:
    """One continued track's guidance: the fixed preference of its clip (`pitch_preference`) and the
    balance term, which follows the notes the continuation has played (`token_bias`)."""

    def __init__(self, pitches: Sequence[int], is_drum: bool, strength: float, pitch_table: np.ndarray,
                 onsets: Sequence[float] = (), grid: float = CHORD_GRID):
        """`pitches` and `onsets` (start in beats): the clip's notes, in the same order. `grid`: the
        model's position step in those beats; notes in one step are one chord, as the model hears
        them (a humanised chord's notes are a few ticks apart)."""
        played = np.asarray(pitches, dtype=np.int64)
        self.is_drum = is_drum
        self.strength = strength
        self.pitch_table = pitch_table
        self._preference = pitch_preference(pitches, is_drum, strength)
        self._bin_of_pitch = np.arange(128) if is_drum else np.arange(128) % 12
        self._target = np.bincount(self._bin_of_pitch[played], minlength=128 if is_drum else 12) / len(played)
        sizes = np.bincount(np.unique(np.round(np.asarray(onsets, dtype=np.float64) / grid), return_counts=True)[1])
        self._chord_sizes = sizes  # [k] onsets of the clip with exactly k notes (index 0 unused)
        self.chord_weight = min(1.0, strength * CHORD_WEIGHT)

    @classmethod
    def of(cls, pitches: Sequence[int], is_drum: bool, strength: float, pitch_table: np.ndarray,
           onsets: Sequence[float] = (), grid: float = CHORD_GRID) -> TrackGuidance | None:
        """None when there is nothing to guide by (no notes in the clip, or strength 0)."""
        return cls(pitches, is_drum, strength, pitch_table, onsets, grid) if strength > 0 and len(pitches) else None

    def chord_growth(self, notes: int) -> float | None:
        """When a chord of `notes` notes is already as large as the clip's largest: how often the
        clip's chords grew past that (0 plus half a chord of smoothing, over the clip's chords of that
        size or more); None below that size, for drums, or when the clip gave no onsets to count.
        Chords the clip does play are left to the model: steering them too made guitars and pianos
        thinner than their clips (voices -0.45). Drums are left alone: a kit's hits at one position
        are a groove's layers (kick and hat), not a chord that grows."""
        largest = len(self._chord_sizes) - 1
        if self.is_drum or largest < 1 or notes < largest:  # kit hits together are not a chord: left to the model
            return None
        return 0.5 / (float(self._chord_sizes[largest:].sum()) + 1.0)

    def token_bias(self, played: np.ndarray) -> np.ndarray:
        """[vocab] log-odds on this track's pitch tokens, given `played` ([128] notes per pitch the
        continuation has played so far)."""
        assert self._preference is not None
        counts = np.bincount(self._bin_of_pitch, weights=played, minlength=len(self._target))
        short = self._target * (counts.sum() + 1) - counts  # notes each bin lacks if the next note were its
        balance = self.strength * BALANCE_WEIGHT * np.clip(short, -BALANCE_CAP, BALANCE_CAP)
        out = token_preference(self._preference + balance[self._bin_of_pitch], self.pitch_table)
        assert out is not None
        return out


def steer_chord(logits: np.ndarray, allowed: np.ndarray, notes: np.ndarray, target: float, weight: float,
                temperature: float = 1.0) -> np.ndarray:
    """`logits` with the probability of another note in a chord (the tokens of `notes`, all together:
    a track's pitches, or its Program returning to the position) moved from the model's p down towards
    `target`: p^(1-w) target^w against (1-p)^(1-w) (1-target)^w, renormalised; which pitch, and the
    choice among the other allowed tokens, stay the model's. Only ever lowered: raising it to the
    clip's rate made chordal parts (guitars, pads) thicker than their clips, by 2.5 voices, because a
    band part gets several chances to grow one chord (its own next pitch, and coming back after
    another part), and a chord the model leaves thin may ring longer instead."""
    notes = allowed & notes
    others = allowed & ~notes
    if not notes.any() or not others.any() or weight <= 0:
        return logits
    t = temperature or 1.0
    scaled = logits.astype(np.float64) / t
    log_notes, log_others = np.logaddexp.reduce(scaled[notes]), np.logaddexp.reduce(scaled[others])
    log_p = log_notes - np.logaddexp(log_notes, log_others)
    log_q = log_others - np.logaddexp(log_notes, log_others)
    if log_p <= np.log(target):
        return logits
    new_notes = (1 - weight) * log_p + weight * np.log(target)
    new_others = (1 - weight) * log_q + weight * np.log1p(-target)
    total = np.logaddexp(new_notes, new_others)
    out = logits.astype(np.float64)
    out[notes] += (new_notes - total - log_p) * t
    out[others] += (new_others - total - log_q) * t
    return out


def token_preference(preference: np.ndarray | None, pitch_table: np.ndarray) -> np.ndarray | None:
    """[vocab] the per-pitch `preference` laid on a track's pitch tokens (`pitch_table`: the pitch
    each token plays, -1 for other tokens); 0 on every other token."""
    if preference is None:
        return None
    out = np.zeros(len(pitch_table))
    is_pitch = pitch_table >= 0
    out[is_pitch] = preference[pitch_table[is_pitch]]
    return out


def guide(logits: np.ndarray, allowed: np.ndarray, preference: np.ndarray, pitch_table: np.ndarray,
          temperature: float = 1.0) -> np.ndarray:
    """`logits` with `preference` ([vocab], from `token_preference`) added to the allowed pitch tokens
    and shifted so that their total probability is what the model gave them: guidance changes which
    note is played, never whether one is. The sampler divides by `temperature` (0: greedy, read as 1)
    afterwards, so the preference is scaled to add exactly its log-odds there."""
    notes = allowed & (pitch_table >= 0)
    if notes.sum() < 2:
        return logits
    t = temperature or 1.0
    scores = logits[notes].astype(np.float64) / t
    guided = scores + preference[notes]
    shift = np.logaddexp.reduce(scores) - np.logaddexp.reduce(guided)
    out = logits.astype(np.float64)
    out[notes] = (guided + shift) * t
    return out
