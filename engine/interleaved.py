"""Several tracks continued as one token stream, the way the model was trained on a band.

A multi-track file is one REMI stream: the notes of all instruments in time order, each run of one
instrument's notes named by its Program (miditok's `program_changes`, restated at each bar's first
note, engine/tokens.py):

    Bar TimeSig Position_0 Program_-1 PitchDrum_36 .. PitchDrum_42 .. Program_33 Pitch_40 .. Position_12 ..

Continuing each track in a stream of its own (drums alone, then bass alone) asks the model for
something it never saw: after a bass note it expects the drums' Program, and a grammar that allows
only bass pitches renormalises that expectation onto noise. `InterleavedGrammar` lets the model
write the band as it learned it: one clock (Bar, TimeSig, Position) shared by all continued tracks,
and at each position any of them may play, each named by its Program, in the order the model picks.

Each track keeps its own `ContinuationGrammar` (its pitch table, drum Duration cap, constraints,
sounding notes and notes per bar); this class only moves them along the shared clock and decides
whose turn a token is. The rules, as miditok writes a band:
- after `Position`, a note follows: the last named instrument's pitch directly (its Program implied;
  never at a bar's first note, which is always named), or another continued track's Program;
- after a note: another pitch of the same instrument at this position, another track's Program, a
  later Position, or Bar;
- the notes of one position come in any pitch order and an instrument may come back to a position
  once after another one played there (humanised data quantises to such streams, and two source
  tracks of one program write two runs of it; `RUNS_PER_POSITION`); a pitch still sounding, or
  started here, is not started again (the sub-grammars run with `ascending_chords=False`);
- a track may start a note where it has a free voice and room in the bar; a later Position is
  allowed when some track could play there and no track loses the room for its minimum of notes per
  bar; `Bar` when every track has its minimum.
Tracks must have distinct Program tokens (two tracks of one program would be one stream): the
engine decodes tracks that share one in separate rows (`engine/generate.py`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from engine.assembler import NoteAssembler
from engine.clip import Note
from engine.grammar import ContinuationGrammar, Expect, MaskedStream

# The composite waits for a note after a Position (never Bar or another Position there).
_NOTE_START = "note_start"
# Runs of notes one track may have at one position: its own, and one return after another track
# (two source tracks of one program do that in training data). More would let a search alternate
# instruments at one position without end, which no file does.
RUNS_PER_POSITION = 2
# Presence guidance (see `presence_bias`): log-odds added to a track's Program per note it is behind
# the density it had in the clip, counting at most PRESENCE_CAP notes.
PRESENCE_WEIGHT = 2.0
PRESENCE_CAP = 4.0


class InterleavedGrammar(MaskedStream):
    """The allowed next tokens of several tracks' continuations written as one stream."""

    def __init__(self, tracks: Sequence[ContinuationGrammar], notes_per_bar: Sequence[float] | None = None):
        """`notes_per_bar`: each track's density in the clip, for `presence_bias` (None: no guidance)."""
        if len(tracks) < 2:
            raise ValueError("an interleaved grammar needs at least two tracks")
        first = tracks[0]
        self.vocab = first.vocab
        if not self.vocab.program_per_bar:
            raise ValueError("interleaving needs a vocabulary that names the instrument once per run of notes")
        if any(g.ascending_chords for g in tracks):
            raise ValueError("interleaved tracks take a position's notes in any order (ascending_chords=False)")
        if len({g.program_id for g in tracks}) != len(tracks):
            raise ValueError("interleaved tracks need distinct Program tokens")
        if any((g.time_sig_id, g.positions_per_bar, g.bars) != (first.time_sig_id, first.positions_per_bar, first.bars)
               for g in tracks):
            raise ValueError("interleaved tracks share one meter and one number of bars")
        self.tracks = list(tracks)
        self.time_sig_id = first.time_sig_id
        self.bars = first.bars
        self.positions_per_bar = first.positions_per_bar
        self._program_ids = np.asarray([g.program_id for g in tracks])
        self._track_of_program = {int(p): i for i, p in enumerate(self._program_ids)}
        self._position_index = self.vocab.position_index
        self._position_ok = (self._position_index >= 0) & (self._position_index < self.positions_per_bar)
        self.bars_started = 0
        self.position = -1
        self.active: int | None = None  # the track named by the last Program of this bar
        self.runs_here: tuple[int, ...] = (0,) * len(tracks)  # runs of notes each track has at this position
        self.notes_per_bar = None if notes_per_bar is None else np.asarray(notes_per_bar, dtype=np.float64)
        self.notes_played = np.zeros(len(tracks))  # notes each track has started in the continuation
        self.expect: Expect | str = Expect.BAR_START
        self._mask: np.ndarray | None = None

    # --- the interface the generator and beam search use (as ContinuationGrammar's) ---

    @property
    def active_track(self) -> int:
        """Index (into `tracks`) of the track whose note the next Pitch token would be."""
        return 0 if self.active is None else self.active

    @property
    def is_drum(self) -> bool:
        return self.tracks[self.active_track].is_drum

    @property
    def pitch_table(self) -> np.ndarray:
        return self.tracks[self.active_track].pitch_table

    @property
    def preference(self) -> np.ndarray | None:
        """Clip guidance for the pitch tokens allowed now: they are always the active track's."""
        return self.tracks[self.active_track].preference

    @property
    def chord_steers(self) -> list[tuple[np.ndarray, float, float]]:
        """As `ContinuationGrammar.chord_steers`, for every track that has a note at the shared
        position: the active one's pitches after a note of its own, and another's Program (a return
        to this position, which adds to its chord there)."""
        if self.expect not in (_NOTE_START, Expect.NOTE_END):
            return []
        steers = []
        allowed = self.allowed()
        for index, grammar in enumerate(self.tracks):
            growth = grammar.chord_growth() if grammar.position == self.position else None
            if growth is None:
                continue
            if index == self.active and self.expect is Expect.NOTE_END:
                steers.append((allowed & (grammar.pitch_table >= 0), *growth))
            elif index != self.active and allowed[grammar.program_id]:
                only = np.zeros(self.vocab.size, dtype=bool)
                only[grammar.program_id] = True
                steers.append((only, *growth))
        return steers

    def forced_opening(self) -> list[int]:
        for grammar in self.tracks:
            grammar.forced_opening()
        self.bars_started = 1
        self.expect = Expect.BAR_START
        self._mask = None
        return [self.vocab.bar, self.time_sig_id]

    def copy(self) -> InterleavedGrammar:
        clone = copy.copy(self)
        clone.tracks = [g.copy() for g in self.tracks]
        clone.notes_played = self.notes_played.copy()
        return clone

    def presence_bias(self) -> np.ndarray | None:
        """[vocab] log-odds to add to the model's scores before sampling, or None.

        In a band stream the model picks whose turn it is, and a small model favours the parts it
        heard most in training (drums, bass, piano): a guitar or a pad it rarely saw falls silent
        after a bar or two, though the musician asked for it to go on. This nudges, without forcing,
        each part towards the density it had in the clip: a track that is N notes behind that pace
        (at most PRESENCE_CAP) gets N * PRESENCE_WEIGHT added to its Program token's log-odds (a drum
        part that played last, to its own next hit as well). What
        it plays, and whether it plays at all, stays the model's choice (a hard minimum of notes per
        bar, tried first, made the model stack notes to get past it)."""
        if self.notes_per_bar is None or self.expect not in (_NOTE_START, Expect.NOTE_END):
            return None
        bars_elapsed = self.bars_started - 1 + (self.position + 1) / self.positions_per_bar
        behind = np.clip(self.notes_per_bar * bars_elapsed - self.notes_played, 0.0, PRESENCE_CAP)
        if not behind.any():
            return None
        bias = np.zeros(self.vocab.size)
        bias[self._program_ids] = behind * PRESENCE_WEIGHT
        if self.active is not None and self.tracks[self.active].is_drum:
            # A drum part that spoke last plays on with its Program implied, and a groove's hits
            # stack at one position (kick and hat): its own next hit carries its presence too.
            # Without it drums settled at 0.78-0.81 of the real density once the pitched parts
            # were guided (docs/default-model.md).
            bias[self.tracks[self.active].pitch_table >= 0] = behind[self.active] * PRESENCE_WEIGHT
        return bias

    # --- masks ---

    def _compute_mask(self) -> np.ndarray:
        e = self.expect
        if e is Expect.TIME_SIG:
            mask = np.zeros(self.vocab.size, dtype=bool)
            mask[self.time_sig_id] = True
            return mask
        if e in (Expect.PITCH, Expect.VELOCITY, Expect.DURATION):
            return np.array(self.tracks[self.active_track].allowed())
        return self._between_notes()

    def _between_notes(self) -> np.ndarray:
        mask = np.zeros(self.vocab.size, dtype=bool)
        if self.expect is not _NOTE_START:  # a Position is always followed by a note
            mask[self.vocab.bar] = all(g.missing <= 0 for g in self.tracks)
            mask |= self._later_positions()
        if self.expect is Expect.BAR_START:  # a note needs its Position first
            return mask
        for index, grammar in enumerate(self.tracks):
            if index == self.active and self.expect is Expect.NOTE_END:  # another note of the same instrument here
                mask |= grammar.allowed() & (grammar.pitch_table >= 0)
            elif index == self.active:  # its first note at a new position: the Program stays implied
                mask |= self._pitches_starting(grammar)
            elif self.runs_here[index] < RUNS_PER_POSITION and self._pitches_starting(grammar).any():
                mask[grammar.program_id] = True
        return mask

    def _later_positions(self) -> np.ndarray:
        """[vocab] bool: Positions after the shared clock where some track could play and no track
        loses the room for its minimum."""
        later = np.arange(self.positions_per_bar) > self.position
        playable_any = np.zeros(self.positions_per_bar, dtype=bool)
        keeps_all = later.copy()
        for grammar in self.tracks:
            playable, keeps = grammar.position_options()
            playable_any |= playable
            keeps_all &= keeps
        ok = later & playable_any & keeps_all
        return self._position_ok & ok[np.clip(self._position_index, 0, self.positions_per_bar - 1)]

    def _pitches_starting(self, grammar: ContinuationGrammar) -> np.ndarray:
        """[vocab] bool: the pitches `grammar`'s track could start here with (empty: it cannot play here)."""
        probe = grammar.copy()
        probe.enter(self.position)  # a track may be behind the shared clock, or return to this position
        playable, _ = probe.position_options()  # a free voice, room in the bar (what allowing its Position checks alone)
        if not playable[self.position]:
            return np.zeros(self.vocab.size, dtype=bool)
        probe.begin_note()
        return probe.allowed()

    # --- state ---

    def _advance(self, token: int) -> None:
        v = self.vocab
        self._mask = None
        if token == v.bar:
            for grammar in self.tracks:
                grammar.follow(token)
            self.bars_started += 1
            self.position = -1
            self.active = None
            self.runs_here = (0,) * len(self.tracks)
            self.expect = Expect.TIME_SIG
        elif self.expect is Expect.TIME_SIG:
            for grammar in self.tracks:
                grammar.follow(token)
            self.expect = Expect.BAR_START
        elif v.position_index[token] >= 0:
            self.position = int(v.position_index[token])
            self.runs_here = (0,) * len(self.tracks)
            self.expect = _NOTE_START
        elif token in self._track_of_program:
            self.active = self._track_of_program[token]
            self._start_note(self.tracks[self.active])
            self.expect = Expect.PITCH
        elif self.expect is _NOTE_START:  # the active instrument's pitch, its Program implied
            assert self.active is not None
            grammar = self.tracks[self.active]
            self._start_note(grammar)
            grammar.follow(token)
            self.expect = Expect.VELOCITY
        else:  # Pitch after a note of the same instrument, Velocity, Duration: the active track's own
            assert self.active is not None
            grammar = self.tracks[self.active]
            if self.expect is Expect.NOTE_END:  # another note of the same run
                self.notes_played[self.active] += 1
            grammar.follow(token)
            self.expect = grammar.expect

    def _start_note(self, grammar: ContinuationGrammar) -> None:
        """A run of the active track's notes begins at the shared position."""
        grammar.enter(self.position)  # catch up with the shared clock (or return to this position)
        grammar.begin_note()
        assert self.active is not None
        self.notes_played[self.active] += 1
        self.runs_here = tuple(n + (i == self.active) for i, n in enumerate(self.runs_here))


class BandAssembler:
    """Notes of an interleaved stream, each told to its track: the clock tokens go to every
    track's assembler, a note's tokens to the assembler of the track the grammar says is writing."""

    def __init__(self, assemblers: Sequence[NoteAssembler]):
        self.assemblers = list(assemblers)

    def feed(self, token: int, track: int) -> Note | None:
        """`track`: the index of the track writing, as the grammar said after accepting `token`."""
        kinds = self.assemblers[0].kinds
        if token == kinds.bar or token in kinds.time_sig or token in kinds.position:
            for assembler in self.assemblers:
                assembler.feed(token)
            return None
        return self.assemblers[track].feed(token)
