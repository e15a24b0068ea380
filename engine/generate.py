"""Continue a clip: prompt -> KV-cached, grammar-constrained decoding -> notes, streamed.

    generator = Generator.load("models/default")
    for event in generator.stream(clip, ContinuationRequest(bars=8, variations=3, seed=7)):
        ...  # NoteEvent as each note completes, then VariationDone per variation

All variations share one prefill of the prompt and then decode in one batch, one token per
variation per step. Each variation has its own grammar state and its own random generator
(seeded by (seed, variation)), so variation 2 of seed 7 is the same however many were asked for.
When the context fills up, each variation's history is cut at a bar boundary and re-prefilled.

A multi-track clip (an `Arrangement`) is prompted as one stream of all its tracks, and its continued
tracks are written the same way, as one interleaved stream per variation (engine/interleaved.py):
the model learned a band with drums, bass and chords taking turns at each position, and writes it
that way. Tracks the model would hear as one Program (two kits) go to separate streams
(`track_groups`).

`mode="beam"` searches for the most likely continuations instead (engine/beam.py): variation k
is the k-th best distinct finished hypothesis of one search of `beam_width` hypotheses, so
variations <= beam_width. Temperature, top-k, top-p and seed do not apply; the result is
deterministic. A hypothesis is only final when the search ends, so beam mode streams at the end:
all notes of variation 0, its VariationDone (with the score), then variation 1, ... The first note
therefore waits for the whole search, about `beam_width` times the model work of one sampled
variation in one batch, where sampling streams its first note after one prefill and a few steps
(`segue continue --mode beam` prints the time to first note on your machine). Summed
log-probabilities favour sparse music: an empty bar costs a
few tokens, a full one dozens, and a weak model's best guess is often silence. Ask for
`constraints=Constraints(min_notes_per_bar=...)` with beam mode.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from engine.assembler import NoteAssembler
from engine.beam import RepetitionPenalty, beam_search, scored_log_probs
from engine.clip import Arrangement, Clip, ClipError, Note
from engine.clip_guidance import TrackGuidance, guide, steer_chord
from engine.grammar import ContinuationGrammar, Expect, Vocabulary
from engine.guesses import POSITION_GUESS_MIN_RATE, GuessRecord, NoteHabits
from engine.interleaved import BandAssembler, InterleavedGrammar
from engine.manifest import MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE, ModelError, read_model_folder
from engine.prefill_cache import Ahead, PrefillCache, Prefilled
from engine.request import ContinuationRequest, RequestError  # noqa: F401  (re-exported: part of this module's API)
from engine.sampling import SamplingParams, masked_log_probs, sample
from engine.session import KVCache, OnnxDecoder
from engine.signing import check_signature
from engine.tokens import ClipTokenizer, trim_to_context

LOOKAHEAD_MIN_P = 0.02  # below this chance of another note at a position, no chord lookahead (see _choose)
AHEAD_TOKENS = 3  # at most this many tokens of a prepared prompt's look ahead (its Position and what is forced)
KEPT_GRAMMARS = 16  # fresh grammars kept for requests that ask for one again (see _grammar)


def fresh_seed() -> int:
    """A seed for a request that names none: drawn from the OS's entropy, below 2**31."""
    return int(np.random.SeedSequence().generate_state(1)[0] % (2**31))


@dataclass(frozen=True)
class NoteEvent:
    variation: int
    note: Note  # in beats from the start of the prompt clip
    track: int = 0  # index of the arrangement's track this note continues


@dataclass(frozen=True)
class VariationDone:
    """One track of one variation, finished (a single-track clip has one per variation)."""

    variation: int
    clip: Clip  # the continuation alone, its notes placed after the prompt (the track's program, drum flag, name)
    tokens: tuple[int, ...]  # the opening Bar and TimeSig included, the ending Bar not
    log_prob: float | None = None  # beam mode: the summed log-probability the search ranked it by
    track: int = 0  # index of the arrangement's track
    seed: int | None = None  # sampling: the request's seed, or the one drawn for it (beam search draws nothing)


@dataclass
class _Row:
    """One variation of one group of tracks (written as one stream) in flight."""

    variation: int
    tracks: tuple[int, ...]  # the arrangement's tracks this row writes, in the grammar's track order
    grammar: ContinuationGrammar | InterleavedGrammar
    assembler: BandAssembler
    rng: np.random.Generator
    history: list[int]  # prompt + generated tokens, for re-prefill when the context fills
    generated: list[int] = field(default_factory=list)
    notes: dict[int, list[Note]] = field(default_factory=dict)  # per track
    habits: NoteHabits | None = None  # a one-track stream's notes so far, for its guesses (Generator._guess)
    velocity_guesses: GuessRecord = field(default_factory=GuessRecord)  # tokens fed on a guess
    duration_guesses: GuessRecord = field(default_factory=GuessRecord)
    position_guesses: GuessRecord = field(default_factory=GuessRecord)  # where the note ends (a Position, or Bar)

    def guesses_of(self, token: int) -> GuessRecord | None:
        """The record a guessed `token` counts in; None for a token the grammar forces (TimeSig, a bar's
        Program), which comes with the guess before it and saves no call of its own."""
        grammar = self.grammar
        vocab = grammar.vocab
        if vocab.velocity_value[token] >= 0:
            return self.velocity_guesses
        if vocab.duration_mask[token]:
            return self.duration_guesses
        if isinstance(grammar, ContinuationGrammar) and token in (grammar.time_sig_id, grammar.program_id):
            return None
        return self.position_guesses

    def feed(self, token: int) -> tuple[int, Note | None]:
        """Record an accepted token: the track it belongs to and the note it completes, if any."""
        self.generated.append(token)
        self.history.append(token)
        habits = self.habits
        if habits is not None:  # (after the grammar accepted it: its position and chord count are this note's)
            grammar = _single(self.grammar)
            vocab = grammar.vocab
            if vocab.velocity_value[token] >= 0:
                habits.saw_velocity(token, grammar.position, grammar.notes_here)
            elif vocab.duration_mask[token]:
                habits.saw_duration(token, int(vocab.duration_units[token]), grammar.position, grammar.notes_here)
            elif token == vocab.bar or vocab.position_index[token] >= 0:
                habits.moved()
        track = self.tracks[self.grammar.active_track]
        note = self.assembler.feed(token, self.grammar.active_track)
        if note is not None:
            self.notes.setdefault(track, []).append(note)
        return track, note


@dataclass
class _Lane:
    """Rows decoded together in one batch with one KV cache (rows of equal history length)."""

    rows: list[_Row]
    cache: KVCache
    logits: np.ndarray  # [len(rows), vocab]: the next-token distribution of each row
    stepped: tuple[KVCache, np.ndarray] | None = None  # cache and logits after this step's tokens, when already fed
    # A one-row lane whose last step also fed guessed next tokens: the guesses and the logits after each.
    # `cache` then holds them too, and `logits` are those before the first.
    guess: tuple[list[int], list[np.ndarray]] | None = None
    ahead: _AheadUse | None = None  # set while `guess` is a prepared prompt's look ahead (prefill_cache.Ahead)


@dataclass
class _AheadUse:
    """Whether a stream left its prepared prompt's look ahead as it found it: False once it drew another
    token than the look ahead's and wrote over its positions."""

    intact: bool = True


class Generator:
    def __init__(self, decoder: OnnxDecoder, tokenizer: ClipTokenizer, manifest_sha256: str = ""):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.manifest_sha256 = manifest_sha256  # names this exact model in the provenance of what it writes
        self.signed_by: str | None = None  # fingerprint of the key its signature verified with, if signed
        self.vocab = Vocabulary.of(tokenizer)
        self._grammars: OrderedDict[tuple, ContinuationGrammar] = OrderedDict()  # fresh grammars by their arguments
        self._position_token = {int(index): token for token, index in enumerate(self.vocab.position_index) if index >= 0}
        self._grammars_lock = threading.Lock()
        if tokenizer.vocab_size != decoder.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model expects {decoder.vocab_size}")

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None, trusted_keys: Sequence[Path] = (),
             require_signed: bool = False, variant: str | None = None) -> Generator:
        """A verified model folder's generator: its signature checked when it has one (engine/signing.py),
        then the session and tokenizer built from the very bytes whose hashes were checked. `variant`:
        the model file to serve (fp32, int8...; default as engine/session.py chooses)."""
        signed_by = check_signature(Path(folder), trusted_keys, require_signed)
        manifest, files = read_model_folder(Path(folder))
        try:  # the defaults every request without options gets must be a request the engine accepts
            ContinuationRequest.from_options(manifest.search)
        except RequestError as exc:
            raise ModelError(f"{Path(folder) / 'manifest.json'}: its search defaults are not a valid request ({exc})") from None
        decoder = OnnxDecoder.from_bytes(Path(folder), manifest, files[MODEL_FILE], threads=threads, variant=variant)
        generator = cls(decoder, ClipTokenizer.from_bytes(files[TOKENIZER_FILE]), hashlib.sha256(files[MANIFEST_FILE]).hexdigest())
        generator.signed_by = signed_by
        return generator

    @property
    def max_prompt_tokens(self) -> int:
        # Leave room for the continuation's first bar or two before the first re-prefill: a quarter
        # of a short context, 128 tokens of a long one, so a dense 4-bar clip reaches a 1024-token
        # model whole (a 48-notes-per-bar ostinato is about 840 tokens).
        context = self.decoder.max_context
        return context - min(context // 4, 128)

    def model_program(self, clip: Clip) -> int:
        """The program the model sees for this clip (or track).

        A model trained mostly on a few instruments has never seen most Program tokens; feeding it
        one would push it off its training distribution. Programs the model was trained on are
        kept; another is played to the model as the most trained program of the same General MIDI
        family (eight programs: pianos, basses, guitars, strings...), and only when the model knows
        none of that family as its most trained program overall. Drums stay drums. The notes
        written back always carry the clip's own program."""
        programs = self.decoder.manifest.seen_programs
        if clip.is_drum or not programs or clip.program in programs:
            return clip.program
        melodic = {p: n for p, n in programs.items() if p >= 0}
        family = {p: n for p, n in melodic.items() if p // 8 == clip.program // 8}
        choices = family or melodic
        return max(choices, key=lambda p: choices[p]) if choices else clip.program

    def prompt_tokens(self, clip: Clip | Arrangement) -> tuple[list[int], int]:
        """The clip's tokens (every track's, in one stream) cut to fit the context, and how many bars the full clip spans."""
        arrangement = _arranged(clip)
        heard = replace(arrangement, tracks=tuple(replace(t, program=self.model_program(t)) for t in arrangement.tracks))
        ids = self.tokenizer.encode_clip(heard)
        bars = sum(1 for i in ids if i == self.vocab.bar)
        return trim_to_context(ids, self.max_prompt_tokens, self.vocab.bar), bars

    def stream(self, clip: Clip | Arrangement, request: ContinuationRequest,
               should_stop: Callable[[], bool] | None = None,
               prefills: PrefillCache | None = None) -> Iterator[NoteEvent | VariationDone]:
        """Notes as they complete, then one VariationDone per variation and continued track (beam
        mode: at the end).

        An arrangement's continued tracks are written as one interleaved stream after one prefill of
        all its tracks (`track_groups`), each note told to its track. `should_stop` is
        polled before every decode step; when it returns True the stream ends at once (a cancelled
        request frees the engine within one step). With `prefills`, a prompt prefilled before (by
        `prefill`, or by an earlier request for the same clip) is not prefilled again, and a new one is
        kept there: the notes are the same either way."""
        request.validate()
        arrangement = _arranged(clip)
        prompt, offset = self._prompt_via(arrangement, prefills)
        if request.mode == "beam":
            yield from self._stream_beam(arrangement, request, prompt, offset, should_stop, prefills)
        else:
            yield from self._stream_samples(arrangement, request, prompt, offset, should_stop, prefills)

    # --- prepared prompts (engine/prefill_cache.py) ---------------------------------------------------

    @property
    def cache_identity(self) -> str:
        """Names the exact computation a prefill of this generator is: the model folder (its manifest's
        sha256 covers every file), the variant served and the device. What a PrefillCache keys on."""
        decoder = self.decoder
        model = self.manifest_sha256 or f"unnamed-{id(decoder):x}"
        return f"{model}/{getattr(decoder, 'variant', 'fp32')}/{getattr(decoder, 'device', 'cpu')}"

    def prefill(self, clip: Clip | Arrangement, prefills: PrefillCache | None = None) -> Prefilled:
        """The clip's prompt run through the model, exactly as `stream` would before its first step,
        and kept in `prefills` (or found there: `reused`). Raises RequestError for a clip `stream`
        would refuse (code "bad_clip": a meter the model lacks, a bar longer than the context)."""
        arrangement = _arranged(clip)
        prompt, _ = self._prompt_via(arrangement, prefills)
        opening = [self.vocab.bar, self.tokenizer.time_sig_id(arrangement.time_signature)]  # grammar.forced_opening()
        prefilled = self._prefill(prompt + opening, prefills, lease=True, promote=True)
        ahead = None
        try:
            if prefilled.lease is not None and prefilled.ahead is None:
                ahead = self._look_ahead(arrangement, prefilled)
        except RequestError:  # a grammar the defaults cannot build: the continue will say why; the prefill stands
            ahead = None
        finally:
            prefilled.release(ahead=ahead)
        return replace(prefilled, lease=None)  # its cache is the kept buffer's: for reading, not for decoding from

    def _look_ahead(self, arrangement: Arrangement, prefilled: Prefilled) -> Ahead | None:
        """The most likely first Position of a one-track continuation and the tokens the grammar forces
        after it (its Program), run through the model after the prompt in the prompt's own buffer."""
        if len(arrangement.continued) != 1 or not getattr(self.decoder, "shared", False):
            return None
        grammar = self._grammar(arrangement.tracks[arrangement.continued[0]], ContinuationRequest())
        grammar.forced_opening()
        allowed = grammar.allowed()
        tokens = [int(np.argmax(np.where(allowed, prefilled.logits[0], -np.inf)))]
        grammar.accept(tokens[0])
        while len(tokens) < AHEAD_TOKENS:
            forced = _forced_token(grammar)
            if forced is None:
                break
            tokens.append(forced)
            grammar.accept(forced)
        if prefilled.cache.length + len(tokens) > self.decoder.max_context:
            return None
        every, cache = self.decoder.forward(np.asarray([tokens]), prefilled.cache)
        return Ahead(tuple(tokens), tuple(every[:, i, :] for i in range(len(tokens))), cache)

    def _prompt_via(self, arrangement: Arrangement, prefills: PrefillCache | None) -> tuple[list[int], float]:
        if prefills is None:
            return self._prompt(arrangement)
        ids, offset = prefills.prompt(self.cache_identity, arrangement, self._prompt)
        return list(ids), offset

    def _prefill(self, ids: list[int], prefills: PrefillCache | None, lease: bool = False,
                 promote: bool = False) -> Prefilled:
        """One prefill of `ids` from an empty cache (batch 1), or the same from `prefills` (`lease`, `promote`:
        see PrefillCache.fetch; the caller then calls the result's `release()` when it is done decoding).
        With `prefills`, a prompt that begins like a kept one is computed from where they differ (in whole
        steps of the decoder's `prefill_chunk`): the same logits and cache, bit for bit."""
        def run() -> tuple[np.ndarray, KVCache]:
            return self.decoder.step(np.asarray([ids]), self.decoder.empty_cache(1))

        def rest(prefix: KVCache) -> tuple[np.ndarray, KVCache]:
            logits, cache = self.decoder.forward(np.asarray([ids[prefix.length:]]), prefix, rest_of_prompt=True, last=1)
            return logits[:, -1, :], cache

        if prefills is not None:
            in_buffer = getattr(self.decoder, "in_buffer", None) if promote else None
            align = getattr(self.decoder, "prefill_chunk", 0)
            return prefills.fetch(self.cache_identity, ids, run, lease=lease, promote=in_buffer,
                                  extend=rest if align else None, align=align,
                                  rest=getattr(self.decoder, "prefill_rest", 1))
        logits, cache = run()
        return Prefilled(tuple(ids), logits, cache, 0.0)

    def _prompt(self, arrangement: Arrangement) -> tuple[list[int], float]:
        """The prompt tokens and the beat where the continuation starts."""
        try:
            arrangement.validate()
            if not arrangement.notes:
                raise ClipError("the clip has no notes to continue")
            prompt, prompt_bars = self.prompt_tokens(arrangement)  # a meter the model lacks, a bar longer than the context
        except ClipError as exc:
            raise RequestError(str(exc), code="bad_clip") from exc
        return prompt, prompt_bars * arrangement.beats_per_bar

    def track_groups(self, arrangement: Arrangement) -> list[tuple[int, ...]]:
        """The continued tracks, grouped into streams the model writes as one (engine/interleaved.py).

        The model learned a band as one interleaved stream, so all continued tracks are one group,
        except that tracks the model would hear as the same Program (two drum kits, two pianos)
        cannot share a stream and go to the next group. Vocabularies with a Program before every
        note (models before the interleaved decoder) continue each track in its own stream."""
        if not self.vocab.program_per_bar:
            return [(track,) for track in arrangement.continued]
        groups: list[list[int]] = []
        programs: list[set[int]] = []
        for track in arrangement.continued:
            clip = arrangement.tracks[track]
            program = self.tokenizer.program_id(self.model_program(clip), clip.is_drum)
            place = next((i for i, used in enumerate(programs) if program not in used), None)
            if place is None:
                groups.append([])
                programs.append(set())
                place = len(groups) - 1
            groups[place].append(track)
            programs[place].add(program)
        return [tuple(group) for group in groups]

    def _group_grammar(self, arrangement: Arrangement, tracks: tuple[int, ...],
                       request: ContinuationRequest) -> ContinuationGrammar | InterleavedGrammar:
        if len(tracks) == 1:
            return self._grammar(arrangement.tracks[tracks[0]], request)
        clips = [arrangement.tracks[track] for track in tracks]
        # A band's chords come in any pitch order: what the model learned from humanised multi-track
        # material (engine/grammar.py). A track alone keeps the rising order single-track clips always had.
        return InterleavedGrammar([self._grammar(clip, request, ascending_chords=False) for clip in clips],
                                  notes_per_bar=[len(clip.notes) / clip.bars for clip in clips])

    def _band_assembler(self, arrangement: Arrangement, tracks: tuple[int, ...], offset: float) -> BandAssembler:
        return BandAssembler([self._assembler(arrangement.tracks[track], offset) for track in tracks])

    def _grammar(self, clip: Clip, request: ContinuationRequest, ascending_chords: bool = True) -> ContinuationGrammar:
        meter = clip.time_signature
        arguments = (self.tokenizer.time_sig_id(meter), self.tokenizer.program_id(self.model_program(clip), clip.is_drum),
                     self.tokenizer.positions_per_bar(meter), request.bars, clip.is_drum, request.constraints,
                     self._longest_drum_note(clip), ascending_chords)
        # A new grammar builds a dozen tables from the vocabulary and the constraints (0.1-0.2 ms, on the
        # way to a prepared clip's first note); the same clip continued again asks for the same ones.
        with self._grammars_lock:
            template = self._grammars.get(arguments)
            if template is not None:
                self._grammars.move_to_end(arguments)
        if template is None:
            try:
                template = ContinuationGrammar(self.vocab, *arguments)
            except ValueError as exc:
                raise RequestError(str(exc)) from exc
            with self._grammars_lock:
                self._grammars[arguments] = template
                while len(self._grammars) > KEPT_GRAMMARS:
                    self._grammars.popitem(last=False)
        grammar = template.copy()  # an unused grammar: its state is the fresh one
        position_step = 4 / meter[1] / self.tokenizer.positions_per_beat  # quarter notes, as note starts are
        grammar.guidance = TrackGuidance.of([note.pitch for note in clip.notes], clip.is_drum, request.stay_with_clip,
                                            grammar.pitch_table, [note.start for note in clip.notes], position_step)
        return grammar

    def _longest_drum_note(self, clip: Clip) -> int | None:
        """For a drum track, the longest note the continuation may write, in grammar time units: one
        beat, or the clip's longest drum note if that is longer. A drum hit's length is only when its
        note-off comes, but a 12-beat hi-hat note blocks that sound from being struck again in a DAW's
        piano roll and in the grammar; the clip shows how long this player's notes are."""
        if not clip.is_drum:
            return None
        denominator_beats = max([1.0] + [n.duration * clip.time_signature[1] / 4 for n in clip.notes])
        units_per_beat = self.vocab.units_per_position * self.tokenizer.positions_per_beat
        return int(math.ceil(denominator_beats * units_per_beat - 1e-9))

    def _assembler(self, clip: Clip, offset: float) -> NoteAssembler:
        return NoteAssembler(self.tokenizer, clip.time_signature, offset, channel=9 if clip.is_drum else 0)

    def _stream_samples(self, arrangement: Arrangement, request: ContinuationRequest, prompt: list[int], offset: float,
                        should_stop: Callable[[], bool] | None,
                        prefills: PrefillCache | None = None) -> Iterator[NoteEvent | VariationDone]:
        seed = request.seed if request.seed is not None else fresh_seed()
        rows = []
        opening: list[int] = []
        groups = self.track_groups(arrangement)
        velocity = next((t for t in reversed(prompt) if self.vocab.velocity_value[t] >= 0), -1)  # the guesses' start
        duration = next((t for t in reversed(prompt) if self.vocab.duration_mask[t]), -1)
        for variation in range(request.variations):
            for group in groups:
                grammar = self._group_grammar(arrangement, group, request)
                opening = grammar.forced_opening()
                assembler = self._band_assembler(arrangement, group, offset)
                for token in opening:
                    assembler.feed(token, 0)
                # Variation k of a one-track clip draws from (seed, k) however many variations were asked for.
                rng = np.random.default_rng([seed, variation] if len(arrangement.tracks) == 1 else [seed, variation, group[0]])
                habits = (NoteHabits(self.tokenizer.positions_per_beat, velocity, duration)
                          if isinstance(grammar, ContinuationGrammar) else None)
                rows.append(_Row(variation, group, grammar, assembler, rng, prompt + opening, list(opening),
                                 habits=habits))
        # One prefill for the shared prompt (or the one kept in `prefills`), then the cache is copied for every
        # variation. One row decodes from it as it is (a step never changes the cache it is given), in the
        # kept prompt's own buffer, leased until the stream ends and made the model's hot one if it was not
        # (the copy the row would have made anyway): Generate again on it then starts without a copy too.
        prefilled = self._prefill(prompt + opening, prefills, lease=True, promote=len(rows) == 1)
        use = _AheadUse()
        try:
            ahead = prefilled.ahead
            if ahead is not None and len(rows) == 1 and isinstance(rows[0].grammar, ContinuationGrammar):
                # The first tokens were fed on a guess in the background (`prepare`): one model call fewer
                # before the first note, whenever the drawn ones are the look ahead's.
                lanes = [_Lane(rows, ahead.cache, prefilled.logits, guess=(list(ahead.tokens), list(ahead.logits)),
                               ahead=use)]
            else:
                cache = prefilled.cache if len(rows) == 1 else prefilled.cache.repeat(len(rows))
                lanes = [_Lane(rows, cache, np.repeat(prefilled.logits, len(rows), axis=0))]
            yield from self._decode_samples(arrangement, lanes, request.sampling, seed, should_stop)
        finally:
            prefilled.release(ahead_intact=use.intact)

    def _decode_samples(self, arrangement: Arrangement, lanes: list[_Lane], params: SamplingParams, seed: int,
                        should_stop: Callable[[], bool] | None) -> Iterator[NoteEvent | VariationDone]:
        while lanes:
            if should_stop is not None and should_stop():
                return
            next_lanes = []
            for lane in lanes:
                tokens = self._choose(lane, params)
                alive = []
                for index, (row, token) in enumerate(zip(lane.rows, tokens, strict=True)):
                    if not row.grammar.accept(token):
                        for track in row.tracks:
                            yield VariationDone(row.variation, arrangement.tracks[track].with_notes(row.notes.get(track, [])),
                                                tuple(row.generated), track=track, seed=seed)
                        continue
                    track, note = row.feed(token)
                    if note is not None:
                        yield NoteEvent(row.variation, note, track)
                    alive.append(index)
                if not alive:
                    continue
                rows_alive = [lane.rows[i] for i in alive]
                if lane.stepped is not None:  # the lookahead already fed these tokens
                    cache, logits = lane.stepped
                    next_lanes.append(_Lane(rows_alive, cache.select(alive) if len(alive) < len(lane.rows) else cache,
                                            logits[alive]))
                    continue
                discarded = None
                if lane.guess is not None:  # a one-row lane: its last step also fed guessed tokens
                    guessed_tokens, after = lane.guess
                    if tokens[0] == guessed_tokens[0]:  # drawn as guessed: the model has read it already
                        record = rows_alive[0].guesses_of(tokens[0])
                        if record is not None:
                            record.right += 1
                        rest = (guessed_tokens[1:], after[1:]) if len(guessed_tokens) > 1 else None
                        next_lanes.append(_Lane(rows_alive, lane.cache, after[0], guess=rest,
                                                ahead=lane.ahead if rest is not None else None))
                        continue
                    discarded = lane.cache  # the drawn token is fed over the guesses' positions
                    if lane.ahead is not None:
                        lane.ahead.intact = False
                    cache = self.decoder.shortened(lane.cache, lane.cache.length - len(guessed_tokens))
                else:
                    cache = lane.cache if len(alive) == len(lane.rows) else lane.cache.select(alive)
                if cache.length + 1 > self.decoder.max_context:
                    next_lanes.extend(self._reprefill(rows_alive))
                    continue
                fed = [[tokens[i]] for i in alive]
                guesses: list[int] = []
                if len(alive) == 1:  # tokens the grammar forces next go into the same step (one row: no padding)
                    yield from self._forced(rows_alive[0], fed[0], cache.length)
                    guesses = self._guess(rows_alive[0], cache.length + len(fed[0]))
                if not guesses and discarded is None:
                    logits, cache = self.decoder.step(np.asarray(fed), cache)
                    next_lanes.append(_Lane(rows_alive, cache, logits))
                    continue
                fed[0] += guesses
                for token in guesses:
                    record = rows_alive[0].guesses_of(token)
                    if record is not None:
                        record.made += 1
                if discarded is not None:
                    every, cache = self.decoder.step_instead(np.asarray(fed), cache, discarded, every_position=True)
                else:
                    every, cache = self.decoder.forward(np.asarray(fed), cache)
                k = len(guesses)  # the last k positions read guesses: logits before them, and after each
                guessed_lane = (guesses, [every[:, i, :] for i in range(-k, 0)]) if k else None
                next_lanes.append(_Lane(rows_alive, cache, every[:, -1 - k, :], guess=guessed_lane))
            lanes = next_lanes

    def _forced(self, row: _Row, fed: list[int], length: int) -> Iterator[NoteEvent]:
        """Accept the tokens the grammar forces after `fed` (the Program after a bar's first Position, the
        TimeSig after a Bar), appending them to `fed`, so that they go into the model with it in one
        step instead of one step each: the same tokens (a forced token is never drawn, so the seed's
        numbers are not used), one decode step fewer per bar, and one fewer before the first note. A
        forced Bar that ends the continuation is left to the sampling loop, which ends it there."""
        while length + len(fed) < self.decoder.max_context:
            token = _forced_token(row.grammar)
            if token is None:
                return
            row.grammar.accept(token)
            track, note = row.feed(token)
            if note is not None:
                yield NoteEvent(row.variation, note, track)
            fed.append(token)

    def _guess(self, row: _Row, length: int) -> list[int]:
        """Tokens to feed on a guess after this step's tokens, so that the step also reads them (one-track
        streams on a shared-buffer cache, which can write over a guess in place).

        When a Velocity comes next: the note's Velocity and Duration as the stream's own notes suggest
        (`NoteHabits`). After its first note, a row also feeds where that note ends
        (`_where_it_ends`), and it does so after a Duration it drew instead of the guessed one too.
        Guesses are not checked against the grammar: one it forbids is never drawn, a miss that costs no
        call. The model still draws each token from its own distribution (the logits before the guess);
        each guess it draws saves a model call, and at the first it does not draw, the drawn token is fed
        over the remaining guesses' positions (`step_instead`), in the call it would have taken anyway.
        A call that reads three to six positions costs 1.0-1.3x one that reads one (the weights are read
        once either way), so a row guesses each kind while enough of its guesses of that kind come true
        (`engine/guesses.py`)."""
        grammar = row.grammar
        habits = row.habits
        if habits is None or not getattr(self.decoder, "shared", False) or not isinstance(grammar, ContinuationGrammar):
            return []
        if grammar.expect is Expect.VELOCITY:
            velocity = habits.velocities.guess(grammar.position, grammar.notes_here)
            if velocity < 0 or not habits.velocities.worth_guessing() or not grammar.allowed()[velocity]:
                return []  # a Duration is guessed only after a guessed Velocity: it is read after that one
            duration = habits.durations.guess(grammar.position, grammar.notes_here)
            if duration < 0 or not habits.durations.worth_guessing():
                guesses = [velocity]
            elif not row.notes:  # the first note's call stays short: it is the one a musician waits for
                guesses = [velocity, duration]
            else:
                guesses = [velocity, duration] + self._where_it_ends(row, duration)
        elif grammar.expect is Expect.NOTE_END and habits.duration >= 0:  # a Duration drawn, not guessed
            guesses = self._where_it_ends(row, habits.duration, drawn=True)
        else:
            return []
        return guesses if length + len(guesses) <= self.decoder.max_context else []

    def _where_it_ends(self, row: _Row, duration: int, drawn: bool = False) -> list[int]:
        """The Position where the shortest note begun at this position ends, counting one of `duration`
        (guessed, or `drawn`: already counted): where the next note of a line starts (74-85 % of the folk
        tunes' notes), and where a chord's voices move on (its shortest note).
        At the bar line, the next bar's opening: Bar, its TimeSig, Position 0 and the bar's Program, the
        second and fourth forced (fed with the others, as `_forced` would). Nothing when the row's
        Position guesses miss too often (POSITION_GUESS_MIN_RATE), when the end is off the grid or
        later, at the Bar that ends the continuation, or in vocabularies with a Program before every
        note."""
        vocab = self.vocab
        grammar = _single(row.grammar)
        habits = row.habits
        if not vocab.program_per_bar or habits is None or not row.position_guesses.worth_it(POSITION_GUESS_MIN_RATE):
            return []
        units = int(vocab.duration_units[duration])
        if habits.shortest_here is not None and (drawn or habits.shortest_here < units):
            units = habits.shortest_here
        unit = vocab.units_per_position
        end, off_grid = divmod(grammar.position * unit + units, unit)
        if off_grid or end > grammar.positions_per_bar:
            return []
        if end < grammar.positions_per_bar:
            position = self._position_token.get(end)
            return [] if position is None else [position]
        if grammar.ends_continuation(vocab.bar) or 0 not in self._position_token:
            return []
        return [vocab.bar, grammar.time_sig_id, self._position_token[0], grammar.program_id]

    @staticmethod
    def _worth_a_lookahead(row: _Row, logits: np.ndarray) -> bool:
        """Whether Program is a real option here. The lookahead can only lower its probability, so
        below LOOKAHEAD_MIN_P (monophonic lines, mostly) it would change almost nothing and cost a
        decode step per note. Vocabularies that state the Program once per bar never need it: there
        the next note's Pitch is itself a choice after a note, masked and weighed in one step."""
        grammar = row.grammar
        if not isinstance(grammar, ContinuationGrammar) or grammar.vocab.program_per_bar:
            return False
        if grammar.expect is not Expect.NOTE_END or not grammar.allowed()[grammar.program_id]:
            return False
        return masked_log_probs(logits, grammar.allowed())[grammar.program_id] >= np.log(LOOKAHEAD_MIN_P)

    def _choose(self, lane: _Lane, params: SamplingParams) -> list[int]:
        """The next token of every row of a lane.

        After a note, "another note at this position" (Program) is weighed by how likely the model
        finds a pitch the grammar still allows there (above the chord's highest, in the constraints).
        Without this, the model's mass on pitches already used would be renormalised onto the few
        left, and a chord would climb to the top of the keyboard whenever the model half-expected
        one more note. The weight needs the model's pitch distribution after Program, so rows that
        could add a note feed Program speculatively in one batched step; a row that then chooses
        something else is fed its real token from the cache as it was before.
        """
        rows = lane.rows
        lane.stepped = None
        speculating = [i for i, row in enumerate(rows) if self._worth_a_lookahead(row, lane.logits[i])]
        if not speculating or lane.cache.length + 1 > self.decoder.max_context:
            return [sample(_guided(lane.logits[i], row.grammar, params), row.grammar.allowed(), params, row.rng)
                    for i, row in enumerate(rows)]
        # Only single-track grammars of the per-note vocabulary speculate (_worth_a_lookahead).
        tokens = [_single(rows[i].grammar).program_id if i in speculating else -1 for i in range(len(rows))]
        for i, row in enumerate(rows):  # rows with nothing to weigh are sampled as usual, in row order
            if tokens[i] < 0:
                tokens[i] = sample(_guided(lane.logits[i], row.grammar, params), row.grammar.allowed(), params, row.rng)
        logits, cache = self.decoder.step(np.asarray(tokens)[:, None], lane.cache)
        redo = []
        for i in speculating:
            row = rows[i]
            grammar = _single(row.grammar)
            after = grammar.copy()
            after.accept(grammar.program_id)
            pitch_mass = float(np.exp(np.logaddexp.reduce(logits[i][after.allowed()].astype(np.float64))
                                      - np.logaddexp.reduce(logits[i].astype(np.float64))))
            weighted = lane.logits[i].astype(np.float64)  # p(Program) * p(an allowed pitch | Program), at temperature T
            weighted[grammar.program_id] += np.log(max(pitch_mass, 1e-12)) * (params.temperature or 1.0)
            tokens[i] = sample(weighted, grammar.allowed(), params, row.rng)
            if tokens[i] != grammar.program_id:
                redo.append(i)
        if redo:
            # The whole lane steps again with its real tokens in place of the speculative one (one decode
            # step as before; the rows that kept Program get it again): on the shared buffer that writes
            # over the discarded position instead of copying the history for the redone rows and patching
            # them back (three copies of the cache).
            logits, cache = self.decoder.step_instead(np.asarray(tokens)[:, None], lane.cache, cache)
        lane.stepped = (cache, logits)
        return tokens

    def _stream_beam(self, arrangement: Arrangement, request: ContinuationRequest, prompt: list[int], offset: float,
                     should_stop: Callable[[], bool] | None,
                     prefills: PrefillCache | None = None) -> Iterator[NoteEvent | VariationDone]:
        def prefill(ids: list[int]) -> tuple[np.ndarray, KVCache]:
            prefilled = self._prefill(ids, prefills)
            return prefilled.logits, prefilled.cache

        for group in self.track_groups(arrangement):  # one search per stream, each hearing the whole clip
            found = beam_search(self.decoder, prompt, self._group_grammar(arrangement, group, request), self.vocab.bar,
                                request.beam_width, request.variations, should_stop, prefill)
            if found is None:  # cancelled
                return
            for variation in range(request.variations):
                # Fewer distinct continuations than variations only under very tight constraints: repeat the last.
                best = found[min(variation, len(found) - 1)]
                row = _Row(variation, group, self._group_grammar(arrangement, group, request),
                           self._band_assembler(arrangement, group, offset), np.random.default_rng(0), [])
                for token in row.grammar.forced_opening():
                    row.assembler.feed(token, 0)
                for token in best.tokens[2:]:  # replayed through a fresh grammar to tell each note its track
                    row.grammar.accept(token)
                    track, note = row.feed(token)
                    if note is not None:
                        yield NoteEvent(variation, note, track)
                for track in group:
                    yield VariationDone(variation, arrangement.tracks[track].with_notes(row.notes.get(track, [])),
                                        tuple(best.tokens), best.score, track)

    def log_prob(self, clip: Clip, request: ContinuationRequest, tokens: Sequence[int]) -> float:
        """The score beam search ranks a finished continuation (`VariationDone.tokens`) by: its summed
        log-probability under the masked, renormalised distribution, its ending Bar included, less the
        repetition penalty (`engine.beam.scored_log_probs`); one scale for greedy, sampled and beam
        results. Prompt plus tokens must fit the model's context."""
        request.validate()
        prompt, _ = self._prompt(Arrangement.of(clip))
        grammar = self._grammar(clip, request)
        opening = grammar.forced_opening()
        ids = prompt + [int(t) for t in tokens]
        if list(tokens[:len(opening)]) != opening:
            raise RequestError("the tokens do not start with the continuation's opening Bar and TimeSig")
        if len(ids) > self.decoder.max_context:
            raise RequestError(f"{len(ids)} tokens of prompt and continuation exceed the model context of "
                               f"{self.decoder.max_context}; they cannot be scored in one pass")
        logits, _ = self.decoder.forward(np.asarray([ids]), self.decoder.empty_cache(1))
        total = 0.0
        repetition = RepetitionPenalty()
        # logits[0, i] is the distribution of ids[i + 1]; after the last token comes the ending Bar.
        for i in range(len(prompt) + len(opening) - 1, len(ids)):
            token = ids[i + 1] if i + 1 < len(ids) else self.vocab.bar
            if grammar.done:
                raise RequestError("the tokens go on after the requested number of bars")
            total += float(scored_log_probs(logits[0, i], grammar, repetition)[token])
            repetition = repetition.after(token, grammar)
            grammar.accept(token)  # raises if the token breaks the grammar or the constraints
        if not grammar.done:
            raise RequestError("the tokens end before the requested number of bars")
        return total

    def _reprefill(self, rows: list[_Row]) -> list[_Lane]:
        """Cut each row's history at a bar boundary to half the context and prefill it again.

        Rows whose cut histories have the same length stay batched together."""
        by_length: dict[int, list[tuple[_Row, list[int]]]] = {}
        for row in rows:
            half = self.decoder.max_context // 2
            try:
                kept = trim_to_context(row.history, half, self.vocab.bar)
            except ClipError:  # one bar longer than half the context: cut mid-bar rather than fail
                kept = row.history[-half:]
            row.history = kept
            by_length.setdefault(len(kept), []).append((row, kept))
        lanes = []
        for group in by_length.values():
            ids = np.asarray([kept for _, kept in group])
            logits, cache = self.decoder.step(ids, self.decoder.empty_cache(len(group)))
            lanes.append(_Lane([row for row, _ in group], cache, logits))
        return lanes

    def generate(self, clip: Clip | Arrangement, request: ContinuationRequest) -> list[VariationDone]:
        """All variations (and continued tracks), complete, in variation then track order (a convenience over `stream`)."""
        done = [event for event in self.stream(clip, request) if isinstance(event, VariationDone)]
        return sorted(done, key=lambda d: (d.variation, d.track))


# A one-track grammar's states in which no Pitch can come next: clip guidance moves only pitch tokens
# (which pitch, and whether a chord grows after a note), so it leaves these tokens' scores as they are.
_NO_PITCH_NEXT = frozenset({Expect.TIME_SIG, Expect.BAR_START, Expect.PROGRAM, Expect.VELOCITY, Expect.DURATION})


def _guided(logits: np.ndarray, grammar: ContinuationGrammar | InterleavedGrammar, params: SamplingParams) -> np.ndarray:
    """The scores to sample from: a band stream's presence guidance added (InterleavedGrammar.presence_bias),
    scaled by the temperature so that it adds exactly its log-odds after sampling divides by it, then
    the clip guidance of the track whose pitch comes next (engine/clip_guidance.py): whether its chord
    grows, then which pitch."""
    if isinstance(grammar, ContinuationGrammar) and grammar.expect in _NO_PITCH_NEXT:
        return logits  # nothing for the guidance to move: spares most tokens its mask arithmetic
    bias = grammar.presence_bias() if isinstance(grammar, InterleavedGrammar) else None
    if bias is not None:
        logits = logits + bias * (params.temperature or 1.0)
    for notes, target, weight in grammar.chord_steers:
        logits = steer_chord(logits, grammar.allowed(), notes, target, weight, params.temperature)
    if grammar.preference is not None:
        logits = guide(logits, grammar.allowed(), grammar.preference, grammar.pitch_table, params.temperature)
    return logits


def _forced_token(grammar: ContinuationGrammar | InterleavedGrammar) -> int | None:
    """The one token the grammar allows next, unless there is a choice or it is the Bar that ends the continuation."""
    candidates = grammar.allowed().nonzero()[0]
    if len(candidates) != 1 or grammar.ends_continuation(int(candidates[0])):
        return None
    return int(candidates[0])


def _single(grammar: ContinuationGrammar | InterleavedGrammar) -> ContinuationGrammar:
    if not isinstance(grammar, ContinuationGrammar):
        raise TypeError("only a single-track grammar has one Program to speculate with")
    return grammar


def _arranged(clip: Clip | Arrangement) -> Arrangement:
    return Arrangement.of(clip) if isinstance(clip, Clip) else clip

