"""Chord progressions for the DAW corpus: common ones written here, and real ones from music21.

A progression is a list of bars, each bar one chord or two (the second starts half way through the
bar), as MMA chord symbols in a home key. `transposed` moves it to any key. Two sources:

- `common`: the progressions working musicians play everywhere (I-V-vi-IV, ii-V-I, 12-bar blues,
  minor i-VI-III-VII, rhythm changes, the Andalusian cadence...), tagged by the styles they suit.
- `music21`: the human harmonic analyses (RomanText) shipped in music21's corpus, 20 Bach chorales
  and 48 Monteverdi madrigals, reduced to the chord on each downbeat and at mid-bar. Parsing them
  takes a few minutes, so the result is cached as JSON beside the corpus.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

NAMES = ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
_PITCH = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_SYMBOL = re.compile(r"^([A-G])([#b]?)([^/]*)(?:/([A-G][#b]?))?$")
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Progression:
    name: str
    bars: tuple[tuple[str, ...], ...]  # MMA chord symbols, one or two per bar
    tonic: int  # pitch class of the home key
    minor: bool
    tags: tuple[str, ...]  # styles it suits: pop, rock, jazz, blues, latin, folk, classical, minor
    source: str  # "common" or the music21 corpus file it was analysed from

    @property
    def key_name(self) -> str:
        return key_name(self.tonic, self.minor)


def key_name(tonic: int, minor: bool) -> str:
    return NAMES[tonic % 12] + ("m" if minor else "")


def pitch_class(name: str) -> int:
    """'C' -> 0, 'Bb' -> 10, 'F#' -> 6; music21's flats ('B-') too."""
    name = name.replace("-", "b")
    pc = _PITCH[name[0].upper()]
    for accidental in name[1:]:
        pc += {"#": 1, "b": -1}.get(accidental, 0)
    return pc % 12


def chord_root(symbol: str) -> int:
    match = _SYMBOL.match(symbol)
    if not match:
        raise ValueError(f"not a chord symbol: {symbol!r}")
    return pitch_class(match.group(1) + match.group(2))


def transpose_symbol(symbol: str, semitones: int) -> str:
    match = _SYMBOL.match(symbol)
    if not match:
        raise ValueError(f"not a chord symbol: {symbol!r}")
    root, accidental, quality, bass = match.groups()
    out = NAMES[(pitch_class(root + accidental) + semitones) % 12] + quality
    if bass:
        out += "/" + NAMES[(pitch_class(bass) + semitones) % 12]
    return out


def transposed(progression: Progression, semitones: int) -> Progression:
    bars = tuple(tuple(transpose_symbol(s, semitones) for s in bar) for bar in progression.bars)
    return Progression(progression.name, bars, (progression.tonic + semitones) % 12, progression.minor,
                       progression.tags, progression.source)


def _parse(text: str) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(bar.split()) for bar in text.split("|"))


# name, chart in its home key (bars split by |, two chords in a bar share it), tonic, minor, tags
_COMMON = (
    ("I-V-vi-IV", "C | G | Am | F", "C", False, ("pop", "rock")),
    ("I-vi-IV-V", "C | Am | F | G", "C", False, ("pop", "folk", "rock")),
    ("vi-IV-I-V", "Am | F | C | G", "C", False, ("pop", "rock")),
    ("I-IV-V-IV", "C | F | G | F", "C", False, ("rock", "folk", "pop")),
    ("I-bVII-IV-I", "C | Bb | F | C", "C", False, ("rock",)),
    ("I-iii-IV-V", "C | Em | F | G", "C", False, ("pop", "folk")),
    ("IV-V-iii-vi", "Fmaj7 | G7 | Em7 | Am7", "C", False, ("pop", "jazz")),
    ("canon", "C | G | Am | Em | F | C | F | G", "C", False, ("pop", "classical", "folk")),
    ("descending-bass", "C | G/B | Am | C/G | F | C/E | Dm | G7", "C", False, ("pop", "classical", "rock")),
    ("folk-I-IV-I-V", "C | F | C | G7 | C | F | G7 | C", "C", False, ("folk", "classical")),
    ("oom-pah", "C | C | G7 | G7 | G7 | G7 | C | C", "C", False, ("folk", "classical")),
    ("ii-V-I", "Dm7 | G7 | Cmaj7 | Cmaj7", "C", False, ("jazz",)),
    ("I-vi-ii-V", "Cmaj7 Am7 | Dm7 G7 | Em7 A7 | Dm7 G7", "C", False, ("jazz", "pop")),
    ("rhythm-changes-A", "C Am7 | Dm7 G7 | C Am7 | Dm7 G7 | C C7 | F F#dim7 | C G7 | C", "C", False, ("jazz",)),
    ("circle-of-fifths", "Am7 | D7 | Gmaj7 | Cmaj7 | F#m7b5 | B7 | Em | Em", "E", True, ("jazz", "latin", "minor")),
    ("minor-ii-V-i", "Dm7b5 | G7 | Cm7 | Cm7", "C", True, ("jazz", "latin", "minor")),
    ("bossa-vamp", "Cmaj7 | Cmaj7 | D7 | D7 | Dm7 | G7 | Cmaj7 | G7", "C", False, ("jazz", "latin")),
    ("12-bar-blues", "C7 | F7 | C7 | C7 | F7 | F7 | C7 | C7 | G7 | F7 | C7 | G7", "C", False, ("blues", "rock")),
    ("12-bar-quick-change", "C7 | F7 | C7 | C7 | F7 | F7 | C7 | A7 | Dm7 | G7 | C7 A7 | Dm7 G7", "C", False, ("blues", "jazz")),
    ("jazz-blues", "C7 | F7 | C7 | Gm7 C7 | F7 | F#dim7 | C7 | A7 | Dm7 | G7 | C7 A7 | Dm7 G7", "C", False, ("blues", "jazz")),
    ("minor-blues", "Cm7 | Fm7 | Cm7 | Cm7 | Fm7 | Fm7 | Cm7 | Cm7 | Ab7 | G7 | Cm7 | G7", "C", True, ("blues", "minor")),
    ("i-VI-III-VII", "Am | F | C | G", "A", True, ("minor", "pop", "rock")),
    ("i-iv-v-i", "Am | Dm | Em | Am", "A", True, ("minor", "folk")),
    ("i-iv-VII-III", "Am | Dm | G | C", "A", True, ("minor", "pop", "latin")),
    ("i-iv-V7-i", "Am | Dm | E7 | Am", "A", True, ("minor", "latin", "classical")),
    ("andalusian", "Am | G | F | E", "A", True, ("minor", "latin", "rock")),
    ("i-bVII-bVI-V", "Am | G | F | E7 | Am | G | F | E7", "A", True, ("minor", "latin", "rock")),
    ("dorian-vamp", "Dm7 | G7 | Dm7 | G7", "D", True, ("funk", "latin", "minor")),
    ("funk-i-IV", "Cm7 | Cm7 | F7 | F7", "C", True, ("funk", "blues", "minor")),
    ("one-chord-groove", "C7 | C7 | C7 | C7 | F7 | F7 | C7 | C7", "C", False, ("funk", "blues")),
    ("I-IV-vi-V", "C | F | Am | G", "C", False, ("pop", "rock")),
    ("gospel-IV-I", "F | C/E | Dm7 | C | F | C/G | G7 | C", "C", False, ("pop", "folk", "classical")),
)


def common_progressions() -> list[Progression]:
    return [Progression(name, _parse(chart), pitch_class(tonic), minor, tags, "common") for name, chart, tonic, minor, tags in _COMMON]


# --- music21 RomanText analyses -----------------------------------------------------------------

_QUALITY = {
    "major triad": "",
    "minor triad": "m",
    "diminished triad": "dim3",
    "augmented triad": "aug",
    "dominant seventh chord": "7",
    "incomplete dominant-seventh chord": "7",
    "minor seventh chord": "m7",
    "major seventh chord": "maj7",
    "half-diminished seventh chord": "m7b5",
    "diminished seventh chord": "dim7",
}
_FALLBACK = {"major": "", "minor": "m", "diminished": "dim3", "augmented": "aug"}


def _symbol(rn) -> str | None:
    """An MMA chord symbol for a music21 RomanNumeral, with the bass as a slash when inverted."""
    quality = _QUALITY.get(rn.commonName)
    if quality is None:
        quality = _FALLBACK.get(rn.quality)
    if quality is None:
        return None
    root = pitch_class(rn.root().name)
    symbol = NAMES[root] + quality
    bass = pitch_class(rn.bass().name)
    if bass != root:
        symbol += "/" + NAMES[bass]
    return symbol


def analyse_rntxt(path: str) -> dict | None:
    """One RomanText file -> {bars, tonic, minor} with the chord on each downbeat and at mid-bar."""
    import warnings

    from music21 import converter, roman

    warnings.filterwarnings("ignore")
    score = converter.parse(path)
    events = []
    for rn in score.recurse().getElementsByClass(roman.RomanNumeral):
        symbol = _symbol(rn)
        if symbol is None or rn.measureNumber is None or rn.measureNumber < 1:
            continue
        meter = rn.getContextByClass("TimeSignature")
        beats = meter.beatCount if meter is not None else 4
        events.append((rn.measureNumber, float(rn.beat), symbol, beats))
    if not events:
        return None
    events.sort(key=lambda e: (e[0], e[1]))
    first_key = next(iter(score.recurse().getElementsByClass(roman.RomanNumeral))).key
    bars: list[list[str]] = []
    current = events[0][2]
    index = 0
    for measure in range(events[0][0], events[-1][0] + 1):
        beats = next((e[3] for e in events if e[0] >= measure), 4)
        chords = []
        for beat in (1.0, float(beats // 2 + 1)) if beats >= 2 else (1.0,):
            while index < len(events) and (events[index][0], events[index][1]) <= (measure, beat):
                current = events[index][2]
                index += 1
            if not chords or chords[-1] != current:
                chords.append(current)
        bars.append(chords)
    return {"bars": bars, "tonic": pitch_class(first_key.tonic.name), "minor": first_key.mode == "minor"}


def music21_sources() -> list[Path]:
    from music21 import corpus

    return sorted(Path(p) for p in corpus.getCorePaths() if str(p).endswith(".rntxt"))


def _source_id(path: Path) -> str:
    parts = path.parts
    return "/".join(parts[parts.index("corpus") + 1:])


def music21_progressions(cache: Path | None = None, workers: int = 2) -> list[Progression]:
    """The music21 corpus's RomanText analyses as progressions (cached: parsing them takes minutes)."""
    import music21

    sources = music21_sources()
    data: dict | None = None
    if cache and cache.exists():
        try:
            data = json.loads(cache.read_text())
            if data.get("format") != CACHE_FORMAT or data.get("music21") != music21.__version__:
                data = None
        except (OSError, ValueError):
            data = None
    if data is None:
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            analysed = list(pool.map(analyse_rntxt, [str(p) for p in sources]))
        data = {"format": CACHE_FORMAT, "music21": music21.__version__,
                "pieces": {_source_id(p): a for p, a in zip(sources, analysed, strict=True) if a}}
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, cache)
    progressions = []
    for source, piece in sorted(data["pieces"].items()):
        collection = source.split("/", 1)[0]
        stem = re.sub(r"[^A-Za-z0-9.]+", "-", Path(source).stem)
        tags = ("classical", "minor") if piece["minor"] else ("classical", "folk")
        bars = tuple(tuple(bar) for bar in piece["bars"])
        progressions.append(Progression(f"m21-{collection}-{stem}", bars, piece["tonic"], piece["minor"], tags, f"music21:{source}"))
    return progressions
