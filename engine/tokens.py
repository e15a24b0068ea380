"""Clip <-> tokens with miditok REMI. The only module that knows miditok.

The token stream is REMI with programs in one stream and a time signature after every bar:

    Bar TimeSig_4/4 Position_0 Program_0 Pitch_60 Velocity_99 Duration_1.0.12 Pitch_64 ... Program_33 Pitch_36 ...

A `Program` token is written when the instrument changes and again before each bar's first note
(miditok's `program_changes`, plus the restating this module adds), so a window or a prompt that
starts at any `Bar` says which instrument plays, while a bar of one instrument spends one token on it
instead of one per note: a dense clip costs about a fifth fewer tokens (a 48-notes-per-bar ostinato:
649 tokens for 4 bars instead of 840). Models trained before this (`program_changes` false in their
`tokenizer.json`) have a `Program` before every note; the engine reads either from the tokenizer.

Positions are ticks at `ticks_per_quarter` (24 with the default config) from the start of the bar;
durations are `beats.sub.res` counted in beats of the time signature's denominator (an eighth note
in 6/8), which is why `duration_beats` needs the meter. The tokenizer is always rebuilt from the
`tokenizer.json` saved beside a model, never from code defaults, so a model and its vocabulary
cannot drift apart.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from symusic.core import ScoreTick


def _import_miditok_without_torch() -> None:
    """Import miditok without its PyTorch data helpers.

    `import miditok` also imports `miditok.pytorch_data` whenever torch is importable, which loads
    all of torch (seconds and hundreds of MB) into every `segue continue` and server start on a machine
    that also trains. The engine never uses those helpers, so while miditok's package is first
    imported the submodule is marked unavailable (miditok catches that ImportError itself), and the
    mark is removed at once, so training code can still import `miditok.pytorch_data` explicitly."""
    if "miditok" in sys.modules or "torch" in sys.modules:  # already paid for, or torch is loaded anyway
        return
    blocked = sys.modules.setdefault("miditok.pytorch_data", None)  # type: ignore[arg-type]  # None means "not importable"
    try:
        import miditok  # noqa: F401
    finally:
        if blocked is None and sys.modules.get("miditok.pytorch_data", 0) is None:
            del sys.modules["miditok.pytorch_data"]


_import_miditok_without_torch()

from miditok import REMI, TokenizerConfig  # noqa: E402  (after the guard above)

from engine.clip import Arrangement, Clip, ClipError  # noqa: E402

TOKENIZER_FILE = "tokenizer.json"


def default_tokenizer_config() -> TokenizerConfig:
    """The REMI configuration new models are trained with.

    12 positions per beat hold sixteenths and triplets; 32 velocity bins keep dynamics audible;
    the meters cover the corpus (alla breve and 3/2 for Renaissance polyphony, compound metres for
    jigs) and what DAW users play.
    """
    return TokenizerConfig(
        pitch_range=(21, 109),
        beat_res={(0, 4): 12, (4, 12): 4},
        num_velocities=32,
        use_velocities=True,
        use_programs=True,
        one_token_stream_for_programs=True,
        program_changes=True,  # Program only when the instrument changes (restated per bar, see encode_score)
        use_time_signatures=True,
        time_signature_range={8: [3, 5, 6, 7, 9, 12], 4: [1, 2, 3, 4, 5, 6, 7], 2: [1, 2, 3, 4]},
        use_tempos=False,
        use_chords=False,
        use_rests=False,
        use_sustain_pedals=False,
        use_pitch_bends=False,
        special_tokens=["PAD", "BOS", "EOS"],
    )


@dataclass(frozen=True)
class TokenKind:
    """Token ids grouped by type, and the value each id stands for (for the grammar and assembler)."""

    bar: int
    pad: int
    bos: int
    eos: int
    time_sig: dict[int, tuple[int, int]]  # id -> (numerator, denominator)
    position: dict[int, int]  # id -> position index in the bar (1/res of a beat each)
    program: dict[int, int]  # id -> program (-1 = drums)
    pitch: dict[int, int]  # id -> MIDI pitch
    pitch_drum: dict[int, int]
    velocity: dict[int, int]  # id -> velocity
    duration: dict[int, tuple[int, int, int]]  # id -> (beats, sub, resolution)


class ClipTokenizer:
    """REMI tokenization of clips, with the vocabulary facts the sampler and assembler need."""

    def __init__(self, tokenizer: REMI):
        self._tok = tokenizer
        cfg = tokenizer.config
        if not (cfg.use_programs and cfg.one_token_stream_for_programs and cfg.use_time_signatures):
            raise ValueError("Segue needs REMI with programs in one stream and time signature tokens")

    @classmethod
    def default(cls) -> ClipTokenizer:
        return cls(REMI(default_tokenizer_config()))

    @classmethod
    def from_bytes(cls, data: bytes) -> ClipTokenizer:
        """From the bytes of a tokenizer.json already read and checked (miditok reads only files)."""
        with tempfile.TemporaryDirectory(prefix="segue-tokenizer-") as folder:
            path = Path(folder) / TOKENIZER_FILE
            path.write_bytes(data)
            return cls.from_file(path)

    @classmethod
    def from_file(cls, path: str | Path) -> ClipTokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        return cls(REMI(params=path))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(folder, filename=TOKENIZER_FILE)
        return folder / TOKENIZER_FILE

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def ticks_per_quarter(self) -> int:
        return int(self._tok.time_division)

    @cached_property
    def kinds(self) -> TokenKind:
        groups: dict[str, dict[int, str]] = {}
        for token, index in self._tok.vocab.items():
            kind, _, value = token.partition("_")
            groups.setdefault(kind, {})[index] = value

        def single(kind: str) -> int:
            return next(iter(groups[kind]))

        def ratio(value: str) -> tuple[int, int]:
            numerator, denominator = value.split("/")
            return int(numerator), int(denominator)

        def duration(value: str) -> tuple[int, int, int]:
            beats, sub, res = value.split(".")
            return int(beats), int(sub), int(res)

        return TokenKind(
            bar=single("Bar"),
            pad=single("PAD"),
            bos=single("BOS"),
            eos=single("EOS"),
            time_sig={i: ratio(v) for i, v in groups.get("TimeSig", {}).items()},
            position={i: int(v) for i, v in groups["Position"].items()},
            program={i: int(v) for i, v in groups["Program"].items()},
            pitch={i: int(v) for i, v in groups["Pitch"].items()},
            pitch_drum={i: int(v) for i, v in groups.get("PitchDrum", {}).items()},
            velocity={i: int(v) for i, v in groups["Velocity"].items()},
            duration={i: duration(v) for i, v in groups["Duration"].items()},
        )

    def token_id(self, token: str) -> int:
        return self._tok.vocab[token]

    def time_sig_id(self, meter: tuple[int, int]) -> int:
        key = f"TimeSig_{meter[0]}/{meter[1]}"
        if key not in self._tok.vocab:
            supported = ", ".join(f"{n}/{d}" for n, d in sorted(self.kinds.time_sig.values(), key=lambda m: (m[1], m[0])))
            raise ClipError(f"time signature {meter[0]}/{meter[1]} is not supported by this model (supported: {supported})")
        return self._tok.vocab[key]

    def program_id(self, program: int, is_drum: bool) -> int:
        return self._tok.vocab[f"Program_{-1 if is_drum else program}"]

    @property
    def program_per_bar(self) -> bool:
        """True when a Program token opens each bar's notes and each change of instrument (the notes
        after it in that bar carry none); False for the older vocabularies with a Program before every note."""
        return bool(self._tok.config.program_changes)

    @property
    def positions_per_beat(self) -> int:
        return int(self._tok.config.max_num_pos_per_beat)

    def ticks_per_beat(self, meter: tuple[int, int]) -> int:
        """Ticks of one beat of the meter's denominator (an eighth note in 6/8)."""
        return self.ticks_per_quarter * 4 // meter[1]

    def bar_ticks(self, meter: tuple[int, int]) -> int:
        return meter[0] * self.ticks_per_beat(meter)

    def positions_per_bar(self, meter: tuple[int, int]) -> int:
        """How many Position tokens a bar of this meter has (Position_N counts 1/res of a beat)."""
        return meter[0] * self.positions_per_beat

    def position_ticks(self, index: int, meter: tuple[int, int]) -> int:
        return index * self.ticks_per_beat(meter) // self.positions_per_beat

    def duration_ticks(self, duration: tuple[int, int, int], meter: tuple[int, int]) -> int:
        """Duration token value -> ticks; its beats are beats of the meter's denominator."""
        beats, sub, res = duration
        return (beats * res + sub) * self.ticks_per_beat(meter) // res

    def tokens_to_text(self, ids) -> list[str]:
        return [self._tok[int(i)] for i in ids]

    # --- encoding ---------------------------------------------------------------------------

    def encode_score(self, score: ScoreTick) -> list[int]:
        """A whole score (all tracks in one stream) as token ids; for training data."""
        if score.ticks_per_quarter <= 0:
            raise ClipError("the MIDI file has 0 ticks per beat")
        seq = self._tok.encode(score)
        if isinstance(seq, list):  # defensive: one stream is configured, but be explicit
            seq = seq[0]
        ids = list(seq.ids)
        return self._restate_programs(ids) if self.program_per_bar else ids

    def _restate_programs(self, ids: list[int]) -> list[int]:
        """Insert the instrument's Program before each bar's first note where miditok left it implied.

        miditok writes a Program only when the instrument changes, so after a cut at a `Bar` (a
        training window, a prompt trimmed to the context) the first notes would have no instrument.
        Restating it once per bar keeps every bar self-contained; miditok decodes the extra token
        as a no-op program change."""
        kinds = self.kinds
        out: list[int] = []
        current: int | None = None
        stated = False  # whether this bar has named its instrument yet
        for token in ids:
            if token == kinds.bar:
                stated = False
            elif token in kinds.program:
                current, stated = token, True
            elif (token in kinds.pitch or token in kinds.pitch_drum) and not stated and current is not None:
                out.append(current)
                stated = True
            out.append(token)
        return out

    def encode_clip(self, clip: Clip | Arrangement) -> list[int]:
        """A clip (or all tracks of an arrangement, in one stream told apart by their Program
        tokens) as token ids, with empty bars appended so the stream spans exactly `clip.bars`.

        The result always ends at a bar boundary, ready for the continuation's first `Bar`.
        """
        arrangement = Arrangement.of(clip) if isinstance(clip, Clip) else clip
        arrangement.validate()
        self.time_sig_id(arrangement.time_signature)  # a clear error for meters the vocabulary lacks
        ids = self.encode_score(arrangement.to_score()) if arrangement.notes else []
        bars = sum(1 for i in ids if i == self.kinds.bar)
        # Notes past the clip length belong to later bars: keep them, the length grows to fit.
        filler = [self.kinds.bar, self.time_sig_id(arrangement.time_signature)]
        ids.extend(filler * max(0, arrangement.bars - bars))
        return ids

    def decode_to_score(self, ids) -> ScoreTick:
        return self._tok.decode([int(i) for i in ids])


def trim_to_context(ids: list[int], max_tokens: int, bar_id: int) -> list[int]:
    """The last `max_tokens` or fewer tokens, cut at a bar boundary so the prompt starts with `Bar`.

    Keeps the end of the clip, which is what a continuation must follow.
    """
    if len(ids) <= max_tokens:
        return list(ids)
    tail_start = len(ids) - max_tokens
    arr = np.asarray(ids)
    bars = np.flatnonzero(arr[tail_start:] == bar_id)
    if len(bars) == 0:
        raise ClipError(f"a single bar of the clip is longer than the model's context of {max_tokens} tokens")
    return list(ids[tail_start + int(bars[0]):])
