"""The REMI token grammar for a continuation, and the musician's constraints, as a mask over the vocabulary.

Every generated sequence decodes because the sampler may only pick what the grammar allows:

    Bar -> TimeSig(clip meter) -> { Position(later than now) -> Program(clip) -> Pitch -> Velocity -> Duration }*
                                     ^ after a Duration: another note at the same position (higher pitch),
                                       a later Position, or the next Bar

That is the older vocabulary, with a Program before every note. In the current one
(`Vocabulary.program_per_bar`) the Program is stated once, before the bar's first note: later notes of
the bar go Position -> Pitch, and "another note at the same position" is its Pitch directly. The
grammar's bookkeeping is the same in both: a note is counted when its Program is (or would be) read.

Positions strictly increase inside a bar and pitches strictly increase inside a position (the order
miditok writes quantised, sorted notes in), so a bar always ends and no note is doubled. Data with
humanised timing (MMA's grooves, a DAW player's chords) reaches the tokenizer in time order, so the
notes of one position come in any pitch order, and a model trained on it expects that; with
`ascending_chords=False` (the engine's choice for the tracks of a band, engine/interleaved.py) a
position's notes may come in any order, each pitch at most once (a note started there is sounding),
which still ends every position. A track continued alone keeps the rising order: parts of one
program (a chorale's four voices) are one run in the prompt, top voice first, and a part free to
add lower notes would take the other voices' notes into its own. A pitch that is still sounding cannot
start again: two overlapping notes of one pitch are ambiguous in a MIDI file (which note-off ends
which note-on?) and DAWs cut or merge them, so the grammar never writes them. Since every generated
pitch is an allowed one, this acts like a voice limit of (allowed pitches) for the room counts below. The bar counter stops generation at
exactly the requested number of bars: the `Bar` that would open one bar too many ends the sequence.

Each `Constraints` field narrows the allowed sets further, so it holds for every generated note:

- key/scale, pitch range: only Pitch tokens in the range (and, for pitched clips, in the scale).
- velocity range: only Velocity tokens whose value lies in the range.
- (not a Constraints field) `longest_note`: Duration tokens no longer than it; the engine caps drum
  hits at one beat, or the clip's longest drum note.
- max_polyphony M: a note may start at time t only while fewer than M notes of the continuation
  sound at t (start <= t < end; notes held over from earlier positions and bars count). Sounding
  notes only increase at note starts, so at no time do more than M sound. Notes of the prompt
  that ring into the continuation are not counted.
- max_notes_per_bar: once a bar holds that many notes, only `Bar` may follow.
- min_notes_per_bar: every bar of the continuation holds at least that many notes (a guarantee,
  not a hope). `Bar` is forbidden while the bar is short, and a Position, Pitch or Duration is
  allowed only if the rest of the bar can still take the missing notes (and if no later bar loses
  the room for its own minimum to a long held note, which holds a voice and its pitch). The room left is
  counted by `_room`, see there. A request whose minimum cannot fit a bar is refused up front.

No dead ends (the state where nothing is allowed cannot be reached). Per state:
- TIME_SIG, PROGRAM: their one token. VELOCITY: non-empty range, checked at construction.
  DURATION: with no minimum every duration; with one, the shortest (it ends by the next position,
  so it takes no room the check counted on; construction refuses a model where it would not).
- PITCH: we got here through a Position or Program that the masks allowed, so some pitch above
  the last is in range and, with a minimum, the lowest such pitch leaves exactly the room the
  Position/Program check counted, minus this note.
- BAR_START, NOTE_END: `Bar` unless the bar is short of its minimum. If it is short, the room left
  is >= the missing notes >= 1 (the invariant every earlier step kept, true at a bar's start by the
  later-bar check and construction), so either this position has room (Program is allowed) or the
  first later position with room is allowed (the room from there on is all the room there is).
  A full bar (max_notes_per_bar) is never short since min <= max.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

from engine.clip_guidance import TrackGuidance
from engine.constraints import Constraints
from engine.tokens import ClipTokenizer


class Expect(Enum):
    TIME_SIG = "time_sig"
    BAR_START = "bar_start"  # after TimeSig: first Position, or Bar (an empty bar)
    PROGRAM = "program"
    PITCH = "pitch"
    VELOCITY = "velocity"
    DURATION = "duration"
    NOTE_END = "note_end"  # after Duration: another note at this position (Program or Pitch), later Position, or Bar
    DONE = "done"


@dataclass(frozen=True)
class Vocabulary:
    """Token-id masks built once per tokenizer; the per-step work is only boolean ANDs."""

    size: int
    bar: int
    position_index: np.ndarray  # [size] index for Position tokens (1/res beat each), -1 elsewhere
    pitch_value: np.ndarray  # [size] MIDI pitch for Pitch tokens, -1 elsewhere
    drum_value: np.ndarray  # [size] MIDI pitch for PitchDrum tokens, -1 elsewhere
    velocity_value: np.ndarray  # [size] velocity for Velocity tokens, -1 elsewhere
    duration_mask: np.ndarray  # [size] bool
    duration_units: np.ndarray  # [size] length of Duration tokens in time units, -1 elsewhere
    units_per_position: int  # time unit = 1/units_per_position of a Position step (exact for every duration)
    program_per_bar: bool = False  # Program only before a bar's first note (see ClipTokenizer.program_per_bar)

    @classmethod
    def of(cls, tokenizer: ClipTokenizer) -> Vocabulary:
        kinds = tokenizer.kinds
        size = tokenizer.vocab_size

        def table(mapping: dict[int, int]) -> np.ndarray:
            out = np.full(size, -1, dtype=np.int64)
            for token, value in mapping.items():
                out[token] = value
            return out

        durations = np.zeros(size, dtype=bool)
        durations[list(kinds.duration)] = True
        # Positions and durations count beats of the meter's denominator at different resolutions;
        # a unit that divides both keeps note ends exact integers.
        per_beat = math.lcm(tokenizer.positions_per_beat, *(res for _, _, res in kinds.duration.values()))
        lengths = {t: beats * per_beat + sub * per_beat // res for t, (beats, sub, res) in kinds.duration.items()}
        return cls(size, kinds.bar, table(kinds.position), table(kinds.pitch), table(kinds.pitch_drum),
                   table(kinds.velocity), durations, table(lengths), per_beat // tokenizer.positions_per_beat,
                   tokenizer.program_per_bar)


class MaskedStream:
    """What every continuation grammar shares: the mask of allowed tokens, computed once per state
    and read-only, accepting a token, and the `Bar` that ends the continuation. A subclass keeps
    `vocab`, `bars`, `bars_started`, `expect` and `_mask`, and says what is allowed
    (`_compute_mask`) and what a token does (`_advance`)."""

    vocab: Vocabulary
    bars: int
    bars_started: int
    expect: Expect | str
    _mask: np.ndarray | None

    def ends_continuation(self, token: int) -> bool:
        """Whether `token` is the `Bar` that would open one bar too many (it ends the sequence)."""
        return token == self.vocab.bar and self.bars_started == self.bars

    def allowed(self) -> np.ndarray:
        """[vocab] bool, read-only: the tokens that may come next (never all False before `done`)."""
        if self._mask is None:
            self._mask = self._compute_mask()
            self._mask.flags.writeable = False
        return self._mask

    def accept(self, token: int) -> bool:
        """Record a sampled token. Returns False when it ends the continuation (it is not emitted)."""
        if not self.allowed()[token]:
            raise ValueError(f"token {token} is not allowed here (expecting {getattr(self.expect, 'value', self.expect)})")
        if self.ends_continuation(token):
            self.expect = Expect.DONE
            self._mask = None
            return False
        self._advance(token)
        return True

    @property
    def done(self) -> bool:
        return self.expect is Expect.DONE

    def _compute_mask(self) -> np.ndarray:
        raise NotImplementedError

    def _advance(self, token: int) -> None:
        raise NotImplementedError


class ContinuationGrammar(MaskedStream):
    """Tracks one continuation's place in the grammar and answers which tokens may come next."""

    active_track = 0  # the one track this grammar writes (engine/interleaved.py writes several)

    def __init__(self, vocab: Vocabulary, time_sig_id: int, program_id: int, positions_per_bar: int, bars: int,
                 is_drum: bool = False, constraints: Constraints | None = None, longest_note: int | None = None,
                 ascending_chords: bool = True):
        """`longest_note`: no Duration longer than this many time units (the shortest is always allowed).
        `ascending_chords`: the notes of one position in rising pitch order (as quantised, sorted data
        writes them); False lets them come in any order, each pitch once (see the module docstring)."""
        self.ascending_chords = ascending_chords
        if bars < 1:
            raise ValueError("a continuation needs at least one bar")
        c = constraints or Constraints()
        c.validate()
        self.vocab = vocab
        self.time_sig_id = time_sig_id
        self.program_id = program_id
        self.positions_per_bar = positions_per_bar
        self.bars = bars
        self.constraints = c
        pitch_table = vocab.drum_value if is_drum else vocab.pitch_value
        self.is_drum = is_drum
        self._pitch_table = pitch_table
        self._pitch_ok = (pitch_table >= 0) & c.pitch_mask(is_drum)[np.clip(pitch_table, 0, 127)]
        self._velocity_ok = c.velocity_mask(vocab.velocity_value)
        low, high = c.pitch_range
        if not self._pitch_ok.any():
            where = f"{low}-{high}" if c.key is None or is_drum else f"{c.scale_name} within {low}-{high}"
            raise ValueError(f"no pitch this model knows lies in {where}")
        if not self._velocity_ok.any():
            raise ValueError(f"no velocity step of this model lies in {c.velocity_range[0]}-{c.velocity_range[1]}")
        self._ok_pitches = np.sort(pitch_table[self._pitch_ok])
        self._position_ok = (vocab.position_index >= 0) & (vocab.position_index < positions_per_bar)
        self._duration_ids = np.flatnonzero(vocab.duration_mask)
        self._duration_len = vocab.duration_units[self._duration_ids]
        if longest_note is not None:
            short = (self._duration_len <= longest_note) | (self._duration_len == self._duration_len.min())
            self._duration_ids, self._duration_len = self._duration_ids[short], self._duration_len[short]
        self._unit = vocab.units_per_position
        self._bar_units = positions_per_bar * self._unit
        self._position_times = np.arange(positions_per_bar) * self._unit  # offsets within a bar
        self._max_voices = c.max_polyphony
        self._max_notes = c.max_notes_per_bar
        self._min_notes = c.min_notes_per_bar or 0
        per_position = min(len(self._ok_pitches), self._max_voices or len(self._ok_pitches))
        if self._min_notes > positions_per_bar * per_position:
            raise ValueError(f"at least {self._min_notes} notes per bar do not fit: a bar of this meter has room "
                             f"for {positions_per_bar * per_position} with these constraints")
        if self._min_notes and self._duration_len.min() > self._unit:
            raise ValueError("this model's shortest note is longer than its grid step, so a minimum number of "
                             "notes per bar cannot be guaranteed")
        self.bars_started = 0
        self.position = -1
        self.last_pitch = -1
        self.notes_in_bar = 0
        self.expect = Expect.BAR_START
        self._ends: list[int] = []  # end times (units from the continuation's start) of notes that may still sound
        self._end_pitches: list[int] = []  # their pitches, in the same order
        self._mask: np.ndarray | None = None  # allowed() of the current state, computed once
        # The masks of states that never change (TimeSig, Program, Velocity, and Duration without a
        # minimum of notes per bar), shared by this grammar's copies.
        self._fixed_masks: dict[Expect | str, np.ndarray] = {}
        # Clip guidance (engine/clip_guidance.py), set by the engine, and the notes played per pitch
        # that it follows. `played` is replaced, never changed in place, so copies may share it.
        self.guidance: TrackGuidance | None = None
        self.played = np.zeros(128)
        self.notes_here = 0  # notes this track has started at the current position (its chord so far)
        self._preference: np.ndarray | None = None

    def forced_opening(self) -> list[int]:
        """The tokens that open the first bar (fed with the prompt): Bar, TimeSig."""
        self._advance(self.vocab.bar)
        self._advance(self.time_sig_id)
        return [self.vocab.bar, self.time_sig_id]

    def copy(self) -> ContinuationGrammar:
        """An independent copy of this state (the vocabulary tables are shared, they never change)."""
        clone = copy.copy(self)
        clone._ends = list(self._ends)
        clone._end_pitches = list(self._end_pitches)
        return clone

    @property
    def pitch_table(self) -> np.ndarray:
        """[vocab] the MIDI pitch (or drum sound) each token of this track plays, -1 for other tokens."""
        return self._pitch_table

    def chord_growth(self) -> tuple[float, float] | None:
        """If this track has started a note at its current position: how often the clip's chords of
        that many notes grew by one more, and how far to move the model's odds towards it (clip
        guidance, `engine.clip_guidance.steer_chord`); else None."""
        if self.guidance is None or self.notes_here < 1:
            return None
        target = self.guidance.chord_growth(self.notes_here)
        return None if target is None else (target, self.guidance.chord_weight)

    @property
    def chord_steers(self) -> list[tuple[np.ndarray, float, float]]:
        """(tokens, target, weight) for each way the next token could add a note to a chord of this
        track at the current position (`engine.clip_guidance.steer_chord`): its pitches after a note
        of its own."""
        growth = self.chord_growth() if self.expect is Expect.NOTE_END else None
        if growth is None:
            return []
        return [(self.allowed() & (self._pitch_table >= 0), *growth)]

    @property
    def preference(self) -> np.ndarray | None:
        """[vocab] clip guidance's log-odds on this track's pitch tokens now, or None (no guidance)."""
        if self.guidance is None:
            return None
        if self._preference is None:
            self._preference = self.guidance.token_bias(self.played)
        return self._preference


    # --- for the interleaved grammar (engine/interleaved.py), which moves several tracks along one clock ---

    @property
    def missing(self) -> int:
        """Notes this bar still needs to reach its minimum (<= 0 when it has enough)."""
        return self._missing

    def enter(self, position: int) -> None:
        """Move to `position` of the current bar without starting a note: the state after a note
        there with nothing above it yet, so a note may start here or the track may move on."""
        if position != self.position:
            self.notes_here = 0
        self.position = position
        self.last_pitch = -1
        self._forget_ended()
        self.expect = Expect.NOTE_END
        self._mask = None

    def begin_note(self) -> None:
        """A note of this track starts at the current position (its Program read or implied)."""
        self._start_note()
        self._mask = None

    def follow(self, token: int) -> None:
        """Advance by a token already checked against a mask that covers this grammar's rules."""
        self._advance(token)

    def position_options(self) -> tuple[np.ndarray, np.ndarray]:
        """[positions_per_bar] bool twice: where in this bar the track could start a note, and where
        moving the shared clock keeps its minimum of notes reachable (positions not yet passed by
        this track; the caller keeps only those after the shared clock)."""
        everywhere = np.ones(self.positions_per_bar, dtype=bool)
        if not self._ends and self._missing <= 0:
            keeps, playable = everywhere, everywhere.copy()
        else:
            room = self._room()
            keeps = np.cumsum(room[::-1])[::-1] >= self._missing
            playable = (room > 0) & keeps
        if self._max_notes is not None and self.notes_in_bar >= self._max_notes:
            playable = np.zeros(self.positions_per_bar, dtype=bool)
        return playable, keeps

    def room_after_here(self) -> int:
        """Notes this track could still start at positions after the current one, in this bar."""
        return int(self._room()[self.position + 1:].sum())

    # --- masks ------------------------------------------------------------------------------

    def _compute_mask(self) -> np.ndarray:
        v = self.vocab
        e = self.expect
        fixed = self._fixed_masks.get(e)
        if fixed is not None:  # a state whose mask never changes: built once, shared (allowed() is read-only)
            return fixed
        mask = np.zeros(v.size, dtype=bool)
        if e is Expect.TIME_SIG:
            mask[self.time_sig_id] = True
        elif e is Expect.PROGRAM:
            mask[self.program_id] = True
        elif e is Expect.PITCH:
            mask |= self._pitch_ok if not self.ascending_chords else self._pitch_ok & (self._pitch_table > self.last_pitch)
            sounding = self._sounding_pitches()
            if len(sounding):
                held = np.zeros(129, dtype=bool)  # by MIDI pitch; index -1 (a token that is no pitch) stays False
                held[sounding] = True
                mask &= ~held[self._pitch_table]  # np.isin's answer, without its sort (this runs every Pitch)
            if self._missing > 0:
                mask &= self._room_after_pitch()
        elif e is Expect.VELOCITY:
            mask |= self._velocity_ok
        elif e is Expect.DURATION:
            mask[self._duration_ids[self._durations_keeping_room()]] = True
        elif e in (Expect.BAR_START, Expect.NOTE_END):
            mask = self._between_notes()
        if e in (Expect.TIME_SIG, Expect.PROGRAM, Expect.VELOCITY) or (e is Expect.DURATION and not self._min_notes):
            mask.flags.writeable = False
            self._fixed_masks[e] = mask
        return mask

    def _between_notes(self) -> np.ndarray:
        """After TimeSig or Duration: Bar, a later Position, or another note at this position."""
        v = self.vocab
        mask = np.zeros(v.size, dtype=bool)
        mask[v.bar] = self._missing <= 0
        if self._max_notes is not None and self.notes_in_bar >= self._max_notes:
            return mask  # the bar is full; never short then, as min <= max
        later = np.arange(self.positions_per_bar) > self.position
        if self._ends or self._missing > 0:
            room = self._room()
            room_from = np.cumsum(room[::-1])[::-1]  # notes that fit from each position to the bar's end
            later &= (room > 0) & (room_from >= self._missing)
        mask |= self._position_ok & later[np.clip(v.position_index, 0, self.positions_per_bar - 1)]
        if self.expect is Expect.NOTE_END and self._room_here(self._free_above(self.last_pitch), pending=0) > 0:
            if self.vocab.program_per_bar:  # the next note's Pitch directly: what PITCH would allow after the Program
                probe = self.copy()
                probe._start_note()
                mask |= probe._compute_mask()
            else:
                mask[self.program_id] = True
        return mask

    @property
    def _missing(self) -> int:
        """Notes this bar still needs to reach its minimum (<= 0 when it has enough)."""
        return self._min_notes - self.notes_in_bar

    def _sounding(self, times: np.ndarray, extra_ends: np.ndarray | None = None) -> np.ndarray:
        """How many notes sound at each of `times` [T] (notes all started by now, so end > t is enough);
        with `extra_ends` [D] the counts are [D, T], each row adding one more note."""
        ends = np.asarray(self._ends, dtype=np.int64)
        counts = (ends[None, :] > times[:, None]).sum(axis=1) if len(ends) else np.zeros(len(times), dtype=np.int64)
        if extra_ends is None:
            return counts
        return counts[None, :] + (extra_ends[:, None] > times[None, :])

    def _room(self, bar_start: int | None = None, extra_ends: np.ndarray | None = None) -> np.ndarray:
        """How many notes could still start at each position of a bar: as many as there are allowed
        pitches, less the voices taken by notes held there. Filling the earliest room first with
        the shortest notes (which end by the next position) fits the most notes: notes of equal
        length packed earliest-first under a voice limit is the optimal greedy of interval scheduling,
        so the sum of this room is exactly how many more notes the bar can take."""
        start = self._bar_start if bar_start is None else bar_start
        pitches = len(self._ok_pitches)
        # A sounding note takes a voice and, as its pitch may not start again, one allowed pitch.
        capacity = pitches if self._max_voices is None else min(self._max_voices, pitches)
        return np.clip(capacity - self._sounding(start + self._position_times, extra_ends), 0, pitches)

    def _sounding_pitches(self) -> np.ndarray:
        """Pitches of notes still sounding now (they may not start again until they end)."""
        now = self._now
        return np.asarray([p for p, end in zip(self._end_pitches, self._ends, strict=True) if end > now], dtype=np.int64)

    def _free_above(self, pitch):
        """For `pitch` (int or array): the allowed pitches not sounding now that a note after one at
        `pitch` could still take at this position: those above it, or, when chords come in any
        order, all the others (a note started here sounds, so it is not taken twice)."""
        sounding = np.sort(self._sounding_pitches())
        if not self.ascending_chords:
            free = len(self._ok_pitches) - len(sounding)  # sounding notes were allowed pitches when they started
            return free - (np.isin(pitch, self._ok_pitches) & ~np.isin(pitch, sounding)).astype(np.int64)
        above = len(self._ok_pitches) - np.searchsorted(self._ok_pitches, pitch, side="right")
        return above - (len(sounding) - np.searchsorted(sounding, pitch, side="right"))

    def _room_here(self, above, pending: int):
        """Notes that could still join the current position: `above` [int or array] allowed pitches
        lie above the last one, and `pending` started notes are not yet counted as sounding."""
        if self._max_voices is None:
            return above
        voices = self._max_voices - int(self._sounding(np.asarray([self._now]))[0]) - pending
        return np.minimum(above, max(voices, 0))

    def _room_after_pitch(self) -> np.ndarray:
        """[vocab] bool: pitches after which this bar can still reach its minimum (this note counted)."""
        later = self._room()[self.position + 1:].sum()
        return self._room_here(self._free_above(self._pitch_table), pending=1) + later >= self._missing

    def _durations_keeping_room(self) -> np.ndarray:
        """[durations] bool: lengths for the pending note that keep every minimum reachable."""
        ok = np.ones(len(self._duration_ids), dtype=bool)
        if not self._min_notes:
            return ok  # with no minimum to keep, any length will do
        ends = self._now + self._duration_len
        if self._missing > 0:  # this bar: the positions after this one, with the new note held
            later = self._room(extra_ends=ends)[:, self.position + 1:].sum(axis=1)
            ok &= self._room_here(self._free_above(self.last_pitch), pending=1) + later >= self._missing
        bar = self.bars_started + 1  # later bars this note reaches must keep room for their minimum
        while bar <= self.bars and (bar - 1) * self._bar_units < ends.max():
            ok &= self._room((bar - 1) * self._bar_units, ends).sum(axis=1) >= self._min_notes
            bar += 1
        return ok

    # --- state --------------------------------------------------------------------------------

    @property
    def _bar_start(self) -> int:
        return (self.bars_started - 1) * self._bar_units

    @property
    def _now(self) -> int:
        return self._bar_start + max(self.position, 0) * self._unit

    def _advance(self, token: int) -> None:
        v = self.vocab
        self._mask = None
        if token == v.bar:
            self.bars_started += 1
            self.position = -1
            self.last_pitch = -1
            self.notes_in_bar = 0
            self.notes_here = 0
            self.expect = Expect.TIME_SIG
            self._forget_ended()
        elif token == self.time_sig_id and self.expect is Expect.TIME_SIG:
            self.expect = Expect.BAR_START
        elif v.position_index[token] >= 0:
            self.position = int(v.position_index[token])
            self.last_pitch = -1
            self.notes_here = 0
            self._forget_ended()
            if v.program_per_bar and self.notes_in_bar > 0:
                self._start_note()  # the bar has named its instrument already
            else:
                self.expect = Expect.PROGRAM
        elif token == self.program_id:
            self._start_note()
        elif self._pitch_table[token] >= 0:
            if self.expect is Expect.NOTE_END:  # another note at this position, its Program implied
                self._start_note()
            self.last_pitch = int(self._pitch_table[token])
            self.notes_here += 1
            self.expect = Expect.VELOCITY
            if self.guidance is not None:
                self.played = self.played.copy()
                self.played[self.last_pitch] += 1
                self._preference = None
        elif v.velocity_value[token] >= 0:
            self.expect = Expect.DURATION
        elif v.duration_mask[token]:
            self._ends.append(self._now + int(v.duration_units[token]))
            self._end_pitches.append(self.last_pitch)
            self.expect = Expect.NOTE_END
        else:
            raise ValueError(f"token {token} has no place in a continuation")

    def _start_note(self) -> None:
        """A note begins (its Program read, or implied): it counts towards the bar from here on."""
        self.notes_in_bar += 1
        self.expect = Expect.PITCH

    def _forget_ended(self) -> None:
        """Time only moves forward, so a note that has ended never sounds again."""
        now = self._now
        alive = [(end, pitch) for end, pitch in zip(self._ends, self._end_pitches, strict=True) if end > now]
        self._ends = [end for end, _ in alive]
        self._end_pitches = [pitch for _, pitch in alive]
