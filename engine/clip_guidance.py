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
- balance, for both: a pitch class (drum sound) the continuation has played less than its share in
  the clip gains a little for each note it is behind, and one played more loses as much
  (`TrackGuidance.token_bias`). The fixed preference alone left the continuation's pitch classes
  at 0.75 agreement with the real next bars; following what was played brought it to 0.83.

The guidance only moves probability *between the pitches the grammar allows at that step*
(`guide`): the model's total probability of playing a note there rather than moving on, or of
another part taking its turn, is left as it was, so density, rhythm and the turns of a band stay the
model's. Its strength is a request option (`stay_with_clip`, 0 = the model alone, 1 = the engine's
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

    def __init__(self, pitches: Sequence[int], is_drum: bool, strength: float, pitch_table: np.ndarray):
        played = np.asarray(pitches, dtype=np.int64)
        self.is_drum = is_drum
        self.strength = strength
        self.pitch_table = pitch_table
        self._is_pitch = pitch_table >= 0
        self._token_pitch = pitch_table[self._is_pitch]
        self._preference = pitch_preference(pitches, is_drum, strength)
        self._bin_of_pitch = np.arange(128) if is_drum else np.arange(128) % 12
        self._target = np.bincount(self._bin_of_pitch[played], minlength=128 if is_drum else 12) / len(played)

    @classmethod
    def of(cls, pitches: Sequence[int], is_drum: bool, strength: float, pitch_table: np.ndarray) -> TrackGuidance | None:
        """None when there is nothing to guide by (no notes in the clip, or strength 0)."""
        return cls(pitches, is_drum, strength, pitch_table) if strength > 0 and len(pitches) else None

    def token_bias(self, played: np.ndarray) -> np.ndarray:
        """[vocab] log-odds on this track's pitch tokens, given `played` ([128] notes per pitch the
        continuation has played so far)."""
        assert self._preference is not None
        counts = np.bincount(self._bin_of_pitch, weights=played, minlength=len(self._target))
        short = self._target * (counts.sum() + 1) - counts  # notes each bin lacks if the next note were its
        balance = self.strength * BALANCE_WEIGHT * np.clip(short, -BALANCE_CAP, BALANCE_CAP)
        per_pitch = self._preference + balance[self._bin_of_pitch]
        out = np.zeros(len(self.pitch_table))
        out[self._is_pitch] = per_pitch[self._token_pitch]
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
