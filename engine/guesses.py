"""What a one-track stream feeds the model on a guess (Generator._guess), and how its guesses have fared.

A guessed token goes into the same model call as the token just drawn; the model still draws every
token from its own distribution, so a guess changes no note. One that comes true saves the call the
model would have taken for it; one that does not is written over by the next call, at the cost of one
more position in a call that reads a few already (a few per cent of a call). So a row guesses a kind
of token while enough of its guesses of that kind come true: for Velocity and Duration, judged on every
note written (`NoteHabits.velocity_worth_guessing`), for the Position where a note ends on the guesses
fed (`GuessRecord`).

`NoteHabits` guesses a note's Velocity and Duration from what the stream's own notes have done: the
last one; the last one at the same place in the beat and the same place in its chord (the third note
of a chord on the off-beat: a chorale's voices, an ostinato's accents); and, for Durations, the most
common of the last eight. Every way is scored on every note as it is written, and the guess is the
one that came true most often so far (the last one while they tie). What that saves on the bundled
examples: docs/performance.md, "Session 9".
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

GUESS_TRIAL = 8  # guesses of a kind a row makes before its hit rate decides whether it goes on guessing ...
GUESS_MIN_RATE = 0.15  # ... which it does while at least this share came true (a miss costs a few % of a call)
# A Position guess is made after every note, and after a chord's inner notes it is bound to miss (another
# Pitch comes). Each position more in a call costs about 5 % of a one-position call (the shipped model after
# 300-600 positions: bench/bench_guesses.py --widths), a hit saves the whole call: it pays while a tenth of
# them come true.
POSITION_GUESS_MIN_RATE = 0.1
RECENT_NOTES = 8  # the window of the "most common Duration" guess


@dataclass
class GuessRecord:
    """How a row's guesses of one kind of token (Velocity, Duration, Position) have fared. It goes on
    guessing Positions while at least `min_rate` of them came true (or fewer than GUESS_TRIAL were made);
    Velocity and Duration are judged on every note instead (NoteHabits), the records kept for the benches."""

    made: int = 0
    right: int = 0

    def worth_it(self, min_rate: float = GUESS_MIN_RATE) -> bool:
        return self.made < GUESS_TRIAL or self.right >= min_rate * self.made


class NoteHabits:
    """What a stream's notes have done so far, as it is written: the guesses of the next note's Velocity
    and Duration, and the shortest note begun at the current position (where its chord moves on)."""

    def __init__(self, positions_per_beat: int, velocity: int = -1, duration: int = -1):
        self.positions_per_beat = positions_per_beat
        self.velocity = velocity  # the last Velocity token (the prompt's, to begin with), -1 for none
        self.duration = duration  # the same for Duration
        self.shortest_here: int | None = None  # time units of the shortest note begun at this position
        self._velocity_at: dict[tuple[int, int], int] = {}  # (place in the beat, place in the chord) -> token
        self._velocity_on_beat: dict[int, int] = {}  # place in the beat -> token
        self._duration_at: dict[tuple[int, int], int] = {}
        self._duration_on_beat: dict[int, int] = {}
        self._recent: deque[int] = deque(maxlen=RECENT_NOTES)
        self._counts: Counter[int] = Counter()
        self._velocity_hits = [0, 0]  # last, same place
        self._duration_hits = [0, 0, 0]  # last, same place, most common
        self._velocities_seen = 0
        self._durations_seen = 0

    def moved(self) -> None:
        """A Position or Bar: the notes from here on begin later."""
        self.shortest_here = None

    # --- guesses ---------------------------------------------------------------------------------
    def velocity_worth_guessing(self) -> bool:
        """Whether the best way of guessing a Velocity came true for at least GUESS_MIN_RATE of the notes
        so far (or fewer than GUESS_TRIAL were written). Scored on every note, fed or not, so a row that
        stopped guessing during a stretch of erratic notes starts again when its notes settle."""
        seen = self._velocities_seen
        return seen < GUESS_TRIAL or max(self._velocity_hits) >= GUESS_MIN_RATE * seen

    def duration_worth_guessing(self) -> bool:
        seen = self._durations_seen
        return seen < GUESS_TRIAL or max(self._duration_hits) >= GUESS_MIN_RATE * seen

    def velocity_guess(self, position: int, rank: int) -> int:
        """The next note's Velocity token (-1: none yet), for a note at `position` in its bar that is the
        `rank`-th (from 1) at that position."""
        hits = self._velocity_hits
        if hits[1] > hits[0]:
            return self._same_place(self._velocity_at, self._velocity_on_beat, self.velocity, position, rank)
        return self.velocity

    def duration_guess(self, position: int, rank: int) -> int:
        hits = self._duration_hits
        best = max(range(3), key=hits.__getitem__)  # the first of equals: the last Duration while they tie
        if best == 1:
            return self._same_place(self._duration_at, self._duration_on_beat, self.duration, position, rank)
        if best == 2:
            return self._most_common()
        return self.duration

    # --- what was written ------------------------------------------------------------------------
    def saw_velocity(self, token: int, position: int, rank: int) -> None:
        """Score each way of guessing on the Velocity `token` the stream wrote, then remember it."""
        hits = self._velocity_hits
        hits[0] += self.velocity == token
        hits[1] += self._same_place(self._velocity_at, self._velocity_on_beat, self.velocity, position, rank) == token
        self._velocities_seen += 1
        self.velocity = token
        beat = position % self.positions_per_beat
        self._velocity_at[beat, rank] = token
        self._velocity_on_beat[beat] = token

    def saw_duration(self, token: int, units: int, position: int, rank: int) -> None:
        hits = self._duration_hits
        hits[0] += self.duration == token
        hits[1] += self._same_place(self._duration_at, self._duration_on_beat, self.duration, position, rank) == token
        hits[2] += self._most_common() == token
        self._durations_seen += 1
        self.duration = token
        beat = position % self.positions_per_beat
        self._duration_at[beat, rank] = token
        self._duration_on_beat[beat] = token
        if len(self._recent) == RECENT_NOTES:
            self._counts[self._recent[0]] -= 1
        self._recent.append(token)
        self._counts[token] += 1
        self.shortest_here = units if self.shortest_here is None else min(self.shortest_here, units)

    def _same_place(self, at: dict[tuple[int, int], int], on_beat: dict[int, int], last: int, position: int,
                    rank: int) -> int:
        beat = position % self.positions_per_beat
        found = at.get((beat, rank))
        if found is None:
            found = on_beat.get(beat, last)
        return found

    def _most_common(self) -> int:
        if not self._recent:
            return self.duration
        return self._counts.most_common(1)[0][0]
