"""A training corpus of DAW material: drums, bass, comping and multi-track arrangements, rendered offline.

MMA (Musical MIDI Accompaniment, `apt-get install mma`) plays its library of about 1,200 human-written
grooves (rock, pop, funk, jazz, latin, ballads, marches, waltzes, drum-machine patterns...) over
chord progressions: common ones (I-V-vi-IV, ii-V-I, 12-bar blues, minor i-VI-III-VII...) and real
ones from the harmonic analyses in music21's corpus, in all twelve keys, at tempos that suit each
style, as loops and as songs with intro, fills and ending. Each groove is rendered a few times.

    python3 -m training.daw_corpus --out ~/.cache/segue/daw-midi            # everything, 2 workers
    python3 -m training.daw_corpus --grooves 50 --per-groove 2                # a quick sample
    python3 -m training.daw_corpus --list                                     # grooves, families, split

The build is deterministic (MMA's humanisation is seeded per file: same command, same bytes),
incremental (a journal remembers what was rendered; an interrupted build resumes) and parallel. The
output folder holds `train/` and `held-out/`: every groove of about 10% of the style families (chosen
by a hash of the family name) goes to `held-out/` only, so an evaluation can play grooves the model
never heard. `manifest.json` lists every file with its groove, family, progression, key, tempo,
meter, bars and sha256. See docs/data-card.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from training.daw_corpus_mma import EXCLUDED_FAMILIES, Groove, Library, MMAError, find_mma, render, scan_library
from training.daw_corpus_progressions import NAMES, Progression, common_progressions, music21_progressions, transposed
from training.daw_corpus_stats import FAMILIES, count_tokens, describe, format_table, problems

MANIFEST = "manifest.json"
JOURNAL = "renders.jsonl"
SPLITS = ("train", "held-out")
HELD_OUT_FRACTION = 0.10
PLAN_VERSION = 1  # bump when the song text or post-processing changes, so cached renders are redone
SONG_BARS = 32
LOOP_BARS = 16
PHRASE_BARS = 8


def default_out_dir() -> Path:
    """`$SEGUE_CACHE/daw-midi`, beside the music21 corpus cache (default ~/.cache/segue/daw-midi)."""
    from training.corpus import default_cache_dir

    return default_cache_dir().parent / "daw-midi"


def is_held_out(family: str, fraction: float = HELD_OUT_FRACTION) -> bool:
    """Whether a style family is held out: a pure function of its name, stable across builds and machines."""
    digest = hashlib.sha256(f"segue-daw-held-out:{family}".encode()).hexdigest()
    return int(digest[:8], 16) / 0xFFFFFFFF < fraction


def split_of(family: str, fraction: float = HELD_OUT_FRACTION) -> str:
    return "held-out" if is_held_out(family, fraction) else "train"


# --- styles: tempo ranges and the progressions that suit them ---------------------------------

# First keyword found in "family groove-name" (lower case) wins. Tempos are beats per minute of the
# groove's beat (MMA's quarter note; the dotted quarter of a 6/8 groove written in 2).
_STYLES: tuple[tuple[tuple[str, ...], tuple[int, int], tuple[str, ...]], ...] = (
    (("dnb",), (165, 176), ("minor", "pop")),
    (("bebop", "fastswing", "fastjazz", "fastbigband", "quickstep"), (180, 232), ("jazz",)),
    (("vienese", "fastwaltz"), (150, 190), ("classical", "folk")),
    (("fastblues",), (140, 176), ("blues",)),
    (("lullaby", "serenade", "ambient", "slowspiritual", "hymn"), (56, 80), ("classical", "folk", "pop")),
    (("ballad", "bald", "slow", "bolero", "spiritual", "oldie", "evans", "nite", "mellow"), (60, 88), ("pop", "jazz", "classical")),
    (("waltz", "34"), (96, 150), ("classical", "folk", "jazz")),
    (("blues", "boogie", "boggie", "shuffle", "shfl", "blus"), (76, 128), ("blues",)),
    (("bossa",), (118, 142), ("jazz", "latin")),
    (("samba",), (92, 112), ("latin", "jazz")),
    (("salsa", "mambo", "merengue"), (150, 190), ("latin", "minor")),
    (("chacha", "rhumba", "beguine", "calypso", "afro", "latin", "latn", "cuban", "tango", "son"), (96, 126), ("latin", "minor")),
    (("swing", "jazz", "bigband", "basie", "combo", "dixie", "charleston", "ragtime", "strut", "softshoe", "foxtrot",
      "showtune", "broadway", "gypsy", "trio", "bouncy"), (108, 176), ("jazz",)),
    (("funk", "soul", "rb", "rnb", "motown", "hiphop", "hip", "trip", "strut"), (84, 108), ("funk", "pop", "minor")),
    (("house", "hous", "techno", "tech", "trance", "rave", "dance", "danc", "disco"), (118, 132), ("pop", "minor")),
    (("reggae", "regg"), (70, 90), ("pop", "minor")),
    (("ska",), (120, 150), ("pop", "rock")),
    (("march", "polka", "68march"), (100, 124), ("folk", "classical")),
    (("bluegrass",), (140, 180), ("folk",)),
    (("country", "cntry", "western", "folk", "zydeco", "hillcountry"), (96, 146), ("folk", "pop")),
    (("metal", "mtl", "punk", "hrk", "thr"), (120, 168), ("rock", "minor")),
)
_DEFAULT_STYLE = ((90, 132), ("pop", "rock"))


def style_of(groove: Groove) -> tuple[tuple[int, int], tuple[str, ...]]:
    """(tempo range, progression tags) for a groove, from its family and name."""
    text = f"{groove.family} {groove.name.lower()}"
    for keywords, tempo, tags in _STYLES:
        if any(k in text for k in keywords):
            return tempo, tags
    return _DEFAULT_STYLE


# --- the plan -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RenderSpec:
    """One file to render: which grooves play which chords, in which key and tempo."""

    groove: Groove  # the main groove
    index: int  # the n-th render of this groove
    form: str  # "song" (intro, fills, ending) or "loop" (main groove only)
    progression: Progression  # already in the target key
    transpose: int
    tempo: int  # beats per minute of the notated beat (the dotted quarter in 6/8 and 12/8)
    bars: tuple[tuple[str, tuple[str, ...]], ...]  # (groove name, chords) for every bar of the song
    seed: int
    split: str
    drums: bool  # whether any groove used has drums

    @property
    def path(self) -> str:
        """Where the file goes, relative to the output folder."""
        safe = lambda s: re.sub(r"[^A-Za-z0-9.+-]+", "_", s.replace("#", "s"))
        name = f"{safe(self.groove.name)}.r{self.index}.{safe(self.progression.name)}.{safe(self.progression.key_name)}.{self.tempo}bpm.mid"
        return f"{self.split}/{self.groove.family}/{self.groove.file}/{name}"

    @property
    def mma_tempo(self) -> int:
        """MMA's `Tempo`: its quarter notes per minute."""
        return round(self.tempo * self.groove.beat_quarters)

    @property
    def grooves_used(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self.bars))


def _pick(rng: random.Random, items):
    """rng.random() is the one thing Python promises to reproduce across versions."""
    return items[min(len(items) - 1, int(rng.random() * len(items)))]


def _rng(*parts) -> random.Random:
    return random.Random(int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:16], 16))


def _window(progression: Progression, bars: int, rng: random.Random) -> list[tuple[str, ...]]:
    """`bars` bars of the progression: a window of a long one (starting on a 4-bar boundary), a short one repeated."""
    chart = list(progression.bars)
    if len(chart) > bars:
        start = _pick(rng, range(0, len(chart) - bars + 1, 4))
        return chart[start:start + bars]
    return [chart[i % len(chart)] for i in range(bars)]


def _same_meter(a: Groove, b: Groove) -> bool:
    return a.quarters_per_bar == b.quarters_per_bar and a.time_signature == b.time_signature


def main_grooves(library: Library) -> list[Groove]:
    return [g for g in library.grooves if g.role == "main" and g.family not in EXCLUDED_FAMILIES and "metronome" not in g.name.lower()
            and g.meter_fix is not None]


def choose_grooves(grooves: list[Groove], limit: int | None) -> list[Groove]:
    """At most `limit` grooves, spread over as many families as possible (one per family first)."""
    ordered = sorted(grooves, key=lambda g: (g.family, g.key))
    if limit is None or limit >= len(ordered):
        return ordered
    by_family: dict[str, list[Groove]] = defaultdict(list)
    for groove in ordered:
        by_family[groove.family].append(groove)
    chosen: list[Groove] = []
    depth = 0
    while len(chosen) < limit:
        for family in sorted(by_family):
            if depth < len(by_family[family]) and len(chosen) < limit:
                chosen.append(by_family[family][depth])
        depth += 1
    return sorted(chosen, key=lambda g: (g.family, g.key))


def plan(library: Library, progressions: list[Progression], per_groove: int = 4, grooves: int | None = None,
         seed: int = 0, held_out_fraction: float = HELD_OUT_FRACTION, only: list[str] | None = None) -> list[RenderSpec]:
    """Every render of the build. Each is decided by a hash of (seed, groove, render number) and by the
    progression list, so adding or removing grooves changes no other groove's renders."""
    if not progressions:
        raise ValueError("no progressions to render")
    candidates = main_grooves(library)
    if only:
        wanted = {o.lower() for o in only}
        candidates = [g for g in candidates if g.name.lower() in wanted or g.key.lower() in wanted or g.family in wanted]
    companions: dict[str, list[Groove]] = defaultdict(list)
    for groove in library.grooves:
        companions[groove.file].append(groove)
    specs = []
    for groove in choose_grooves(candidates, grooves):
        tempo_range, tags = style_of(groove)
        suited = [p for p in progressions if set(p.tags) & set(tags)] or progressions
        extras = {role: [g for g in companions[groove.file] if g.role == role and _same_meter(g, groove)]
                  for role in ("intro", "fill", "end")}
        for index in range(per_groove):
            rng = _rng(seed, PLAN_VERSION, groove.key, index)
            form = "song" if index % 2 == 0 else "loop"
            progression = _pick(rng, suited if rng.random() < 0.5 else progressions)
            target = _pick(rng, range(12))
            shift = (target - progression.tonic) % 12
            progression = transposed(progression, shift)
            low, high = tempo_range
            if groove.compound:  # beats are dotted quarters: slower pulses for the same feel
                low, high = round(low * 2 / 3), round(high * 2 / 3)
            tempo = low + _pick(rng, range(high - low + 1))
            body = _window(progression, SONG_BARS if form == "song" else LOOP_BARS, rng)
            bars: list[tuple[str, tuple[str, ...]]] = []
            intro = _pick(rng, extras["intro"]) if form == "song" and extras["intro"] else None
            fill = _pick(rng, [f for f in extras["fill"] if f.seq_size == 1] or [None]) if form == "song" else None
            end = _pick(rng, extras["end"]) if form == "song" and extras["end"] else None
            if intro:
                bars += [(intro.name, body[i % len(body)]) for i in range(min(max(intro.seq_size, 1), 8))]
            for i, chords in enumerate(body):
                phrase_end = (i + 1) % PHRASE_BARS == 0 and i + 1 < len(body)
                bars.append(((fill or groove).name if phrase_end else groove.name, chords))
            if end:
                tonic = NAMES[progression.tonic] + ("m" if progression.minor else "")
                bars += [(end.name, (tonic,))] * min(max(end.seq_size, 1), 4)
            used = {g.name: g for g in (groove, intro, fill, end) if g}
            specs.append(RenderSpec(
                groove=groove, index=index, form=form, progression=progression, transpose=shift, tempo=tempo,
                bars=tuple(bars), seed=int(rng.random() * 1_000_000), split=split_of(groove.family, held_out_fraction),
                drums=any(used[name].has_drums for name, _ in bars),
            ))
    return specs


def layout(spec: RenderSpec) -> dict:
    """The chart (chords of every bar) and the sections (groove, bars) of a render, for the manifest."""
    sections: list[list] = []
    for name, _ in spec.bars:
        if sections and sections[-1][0] == name:
            sections[-1][1] += 1
        else:
            sections.append([name, 1])
    return {"chart": [" ".join(chords) for _, chords in spec.bars], "sections": sections}


def song_text(spec: RenderSpec, library_root: Path) -> str:
    """The MMA source for one render."""
    groove = spec.groove
    q = groove.quarters_per_bar
    # A bar's second chord starts half way: on beat 3 of 4/4, 2 of 3/4, the second dotted quarter of 6/8.
    mid = 1 + q / 2 if groove.compound else int(q // 2) + 1
    mid_text = f"{mid:g}"
    lines = [
        f"// Segue DAW corpus: {groove.key} render {spec.index} ({spec.form}), {spec.progression.name} in {spec.progression.key_name}",
        f"RndSeed {spec.seed}",
        f"Tempo {spec.mma_tempo}",
        f"Use {library_root / (groove.file + '.mma')}",
    ]
    current = None
    for number, (name, chords) in enumerate(spec.bars, 1):
        if name != current:
            lines.append(f"Groove {name}")
            current = name
        chart = chords[0] if len(chords) == 1 or mid >= q + 1 else f"{chords[0]} {chords[1]}@{mid_text}"
        lines.append(f"{number} {chart}")
    return "\n".join(lines) + "\n"


def spec_hash(spec: RenderSpec, song: str, library: Library) -> str:
    """Changes whenever the rendered bytes could: the song, MMA's version, the groove file, the post-processing."""
    parts = [str(PLAN_VERSION), library.mma_version, library.sha256(spec.groove.file), song, json.dumps(spec.groove.meter_fix)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# --- one render, in a worker process -------------------------------------------------------------

_TOKENIZER = None


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from engine.tokens import ClipTokenizer

        _TOKENIZER = ClipTokenizer.default()
    return _TOKENIZER


def fix_meter(data: bytes, meter: tuple[int, int], scale: float) -> bytes:
    """Rewrite MMA's MIDI so its bar lines fall on the groove's bars (see `daw_corpus_mma.meter_fix`).
    Scaling changes ticks per quarter and the tempo together: no note moves in time."""
    import symusic

    score = symusic.Score.from_midi(data)
    if scale != 1.0:
        score.ticks_per_quarter = int(round(score.ticks_per_quarter / scale))
        for tempo in score.tempos:
            tempo.mspq = int(round(tempo.mspq / scale))
    score.time_signatures = [symusic.TimeSignature(0, meter[0], meter[1])]
    return score.dumps_midi()


def render_one(spec: RenderSpec, song: str, digest: str, out_dir: Path, mma: str, tokens: bool) -> dict:
    """Render, fix the meter, check and describe one file. Never raises: failures come back as records."""
    import symusic

    record = {
        "path": spec.path, "spec_hash": digest, "split": spec.split, "groove": spec.groove.name, "family": spec.groove.family,
        "library": spec.groove.library, "library_file": spec.groove.file, "grooves_used": spec.grooves_used, "form": spec.form,
        "progression": spec.progression.name, "progression_source": spec.progression.source, "key": spec.progression.key_name,
        "transpose": spec.transpose, "beat_bpm": spec.tempo, "tempo_bpm": round(spec.mma_tempo * spec.groove.meter_fix[1], 2),
        "mma_time": spec.groove.quarters_per_bar,
        "mma_time_signature": list(spec.groove.time_signature), "bars": len(spec.bars), "seed": spec.seed, "ok": False,
    }
    target = out_dir / spec.path
    tmp = target.with_name(target.name + ".part")
    try:
        result = render(song, tmp, mma)
        record["render_seconds"] = round(result.seconds, 3)
        record["warnings"] = result.warnings[:5]
        if not result.ok:
            record["error"] = f"MMA: {result.error}"
            return record
        meter, scale = spec.groove.meter_fix
        data = tmp.read_bytes()
        if (meter, scale) != (spec.groove.time_signature, 1.0):
            data = fix_meter(data, meter, scale)
        score = symusic.Score.from_midi(data)
        info = describe(score)
        found = problems(info, spec.drums, len(spec.bars))
        if found:
            record["error"] = "; ".join(found)
            return record
        if tokens:
            info.tokens, info.tokens_by_family = count_tokens(score, _tokenizer())
        tmp.write_bytes(data)
        os.replace(tmp, target)
        record.update(ok=True, sha256=hashlib.sha256(data).hexdigest(), time_signature=list(info.time_signature),
                      seconds=info.seconds, notes=info.notes, notes_by_family=info.notes_by_family,
                      tokens=info.tokens, tokens_by_family=info.tokens_by_family,
                      tracks=[asdict(t) for t in info.tracks])
        return record
    except Exception as exc:  # one broken render must never stop the build; the reason goes in the report
        record["error"] = f"{type(exc).__name__}: {exc}"[:300]
        return record
    finally:
        tmp.unlink(missing_ok=True)


# --- the build ------------------------------------------------------------------------------------

def _read_journal(path: Path) -> dict[str, dict]:
    records: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                records[record["spec_hash"]] = record
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interruption
    return records


def _still_valid(record: dict, out_dir: Path) -> bool:
    if not record.get("ok"):
        return "took longer" not in record.get("error", "")  # MMA's failures are deterministic; timeouts are not
    path = out_dir / record["path"]
    return path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == record.get("sha256")


def load_progressions(selection: list[str] | None, cache_dir: Path, workers: int) -> list[Progression]:
    """Progressions by set ('common', 'music21') or by name; all of them when `selection` is empty."""
    selection = selection or ["common", "music21"]
    common = common_progressions()
    pool: list[Progression] = list(common)
    wants_music21 = "music21" in selection or any(s.startswith("m21-") for s in selection)
    if wants_music21:
        pool += music21_progressions(cache_dir / "music21-progressions.json", workers)
    chosen: list[Progression] = []
    for item in selection:
        if item == "common":
            chosen += common
        elif item == "music21":
            chosen += [p for p in pool if p.source != "common"]
        else:
            match = [p for p in pool if p.name == item]
            if not match:
                raise SystemExit(f"error: unknown progression {item!r} (sets: common, music21; names: see --list)")
            chosen += match
    return list({p.name: p for p in chosen}.values())


@dataclass
class BuildReport:
    out_dir: Path
    records: list[dict]  # the files of this build, sorted by path
    failures: list[dict]  # renders that failed, with their reason
    library_failures: dict[str, str]
    rendered: int  # renders done by this run (the rest came from the journal)
    seconds: float
    held_out_families: list[str]


def build(out_dir: Path, specs: list[RenderSpec], library: Library, workers: int = 2, tokens: bool = True,
          prune: bool = False, progress: bool = True, mma: str | None = None) -> BuildReport:
    """Render every spec not already rendered, check them, and write the manifest."""
    started = time.perf_counter()
    mma = mma or find_mma()
    out_dir.mkdir(parents=True, exist_ok=True)
    journal_path = out_dir / JOURNAL
    journal = _read_journal(journal_path)
    songs = {spec.path: song_text(spec, library.root) for spec in specs}
    if len(songs) != len(specs):
        raise ValueError("two renders share one file name")
    digests = {spec.path: spec_hash(spec, songs[spec.path], library) for spec in specs}
    results: dict[str, dict] = {}
    todo = []
    for spec in specs:
        cached = journal.get(digests[spec.path])
        if cached is not None and cached.get("path") == spec.path and (not tokens or not cached.get("ok") or cached.get("tokens")) \
                and _still_valid(cached, out_dir):
            results[spec.path] = cached
        else:
            todo.append(spec)
    bar = None
    if progress and todo and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="rendering with MMA", unit="file", file=sys.stderr)
        except ImportError:
            bar = None
    if progress and todo:
        print(f"rendering {len(todo)} files with MMA on {workers} workers ({len(results)} already rendered)", file=sys.stderr)
    failed = 0
    with journal_path.open("a") as log, ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(render_one, s, songs[s.path], digests[s.path], out_dir, mma, tokens) for s in todo]
        for n, future in enumerate(as_completed(futures), 1):
            record = future.result()
            results[record["path"]] = record
            log.write(json.dumps(record, sort_keys=True) + "\n")
            log.flush()
            failed += not record["ok"]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(failed=failed)
            elif progress and (n % 250 == 0 or n == len(futures)):
                elapsed = time.perf_counter() - started
                print(f"rendered {n}/{len(futures)} ({failed} failed, {elapsed:.0f} s)", file=sys.stderr)
    if bar is not None:
        bar.close()
    ordered = [{**results[s.path], **layout(s)} for s in specs]
    records = sorted((r for r in ordered if r["ok"]), key=lambda r: r["path"])
    failures = sorted((r for r in ordered if not r["ok"]), key=lambda r: r["path"])
    held_out = sorted({s.groove.family for s in specs if s.split == "held-out"})
    write_manifest(out_dir, records, failures, library, held_out)
    _compact_journal(journal_path, ordered)
    stale = _stale_files(out_dir, {r["path"] for r in records})
    if stale and prune:
        for path in stale:
            path.unlink()
    elif stale:
        print(f"note: {len(stale)} .mid files under {out_dir} are not part of this build (use --prune to delete them)", file=sys.stderr)
    return BuildReport(out_dir, records, failures, library.failures, len(todo), time.perf_counter() - started, held_out)


def write_manifest(out_dir: Path, records: list[dict], failures: list[dict], library: Library, held_out: list[str]) -> Path:
    """The index of the corpus. Deterministic: no timings, no dates, sorted."""
    timing = {"render_seconds", "warnings"}
    manifest = {
        "format": 1,
        "source": "MMA (Musical MIDI Accompaniment) groove library, GPL-2+; see docs/data-card.md",
        "mma_version": library.mma_version,
        "splits": {split: sum(r["split"] == split for r in records) for split in SPLITS},
        "held_out_families": held_out,
        "files": [{k: v for k, v in r.items() if k not in timing} for r in records],
        "failures": [{"path": r["path"], "groove": r["groove"], "library_file": r["library_file"], "error": r.get("error", "")}
                     for r in failures],
        "library_failures": library.failures,
    }
    path = out_dir / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def _compact_journal(path: Path, records: list[dict]) -> None:
    """Keep one line per render of the current plan (older plans' lines would only grow the file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(records, key=lambda r: r["path"])))
    os.replace(tmp, path)


def _stale_files(out_dir: Path, keep: set[str]) -> list[Path]:
    return sorted(p for split in SPLITS for p in (out_dir / split).rglob("*.mid") if str(p.relative_to(out_dir)) not in keep)


# --- reports ---------------------------------------------------------------------------------------

def summary(report: BuildReport) -> str:
    records = report.records
    lines = []
    rows = []
    for split in SPLITS:
        part = [r for r in records if r["split"] == split]
        rows.append([split, len(part), len({r["family"] for r in part}), len({(r["library_file"], r["groove"]) for r in part}),
                     sum(r["seconds"] for r in part) / 3600, sum(r["notes"] for r in part), sum(r.get("tokens", 0) for r in part)])
    rows.append(["total", *[sum(row[i] for row in rows) for i in range(1, len(rows[0]))]])
    lines.append(format_table(rows, ["split", "files", "families", "grooves", "hours", "notes", "tokens"]))
    lines.append("")
    tracks: Counter = Counter()
    notes: Counter = Counter()
    toks: Counter = Counter()
    files_with: Counter = Counter()
    for r in records:
        for t in r["tracks"]:
            tracks[t["family"]] += 1
        notes.update(r["notes_by_family"])
        toks.update(r.get("tokens_by_family", {}))
        files_with.update(set(r["notes_by_family"]))
    total_tokens = sum(toks.values()) or 1
    fam_rows = [[f, files_with[f], tracks[f], notes[f], toks[f], f"{100 * toks[f] / total_tokens:.1f}%"]
                for f in FAMILIES if tracks[f]]
    if toks["time"]:
        fam_rows.append(["(timing: Bar/TimeSig/Position)", "", "", "", toks["time"], f"{100 * toks['time'] / total_tokens:.1f}%"])
    lines.append(format_table(fam_rows, ["instrument family", "files", "tracks", "notes", "tokens", "share"]))
    lines.append("")
    meters = Counter(f"{r['time_signature'][0]}/{r['time_signature'][1]}" for r in records)
    lines.append("meters: " + ", ".join(f"{m} {n}" for m, n in meters.most_common()))
    libraries = Counter(r["library"] for r in records)
    lines.append("library folders: " + ", ".join(f"{m} {n}" for m, n in sorted(libraries.items())))
    forms = Counter(r["form"] for r in records)
    lines.append("forms: " + ", ".join(f"{m} {n}" for m, n in sorted(forms.items())))
    sources = Counter("music21" if r["progression_source"].startswith("music21") else "common" for r in records)
    lines.append("progressions: " + ", ".join(f"{m} {n}" for m, n in sorted(sources.items())))
    timed = [r["render_seconds"] for r in records if "render_seconds" in r]
    if timed:
        lines.append(f"MMA render time per file: mean {sum(timed) / len(timed):.2f} s, max {max(timed):.2f} s "
                     f"(build: {report.rendered} rendered now, {len(records) + len(report.failures) - report.rendered} from the journal, "
                     f"{report.seconds:.0f} s wall)")
    warned = sum(1 for r in records if r.get("warnings"))
    lines.append(f"files with MMA warnings: {warned}")
    lines.append(f"held-out families ({len(report.held_out_families)}): {', '.join(report.held_out_families)}")
    if report.failures:
        reasons = Counter(re.sub(r"<Line \d+>", "<Line N>", r.get("error", ""))[:120] for r in report.failures)
        lines.append(f"failed renders: {len(report.failures)}")
        for reason, n in reasons.most_common(12):
            lines.append(f"  {n:5d} x {reason}")
    if report.library_failures:
        lines.append(f"grooves MMA could not load: {len(report.library_failures)}")
        for name, reason in sorted(report.library_failures.items())[:12]:
            lines.append(f"  {name}: {reason[:110]}")
    lines.append(f"-> {report.out_dir}")
    return "\n".join(lines)


def list_library(library: Library, progressions: list[Progression], held_out_fraction: float) -> str:
    mains = main_grooves(library)
    by_family: dict[str, list[Groove]] = defaultdict(list)
    for groove in library.grooves:
        by_family[groove.family].append(groove)
    rows = []
    for family, grooves in sorted(by_family.items()):
        main = [g for g in grooves if g in mains]
        meters = sorted({f"{g.meter_fix[0][0]}/{g.meter_fix[0][1]}" for g in main})
        status = "excluded" if family in EXCLUDED_FAMILIES else split_of(family, held_out_fraction)
        rows.append([family, status, " ".join(sorted({g.library for g in grooves})), len(main),
                     sum(g.role != "main" for g in grooves), " ".join(meters), "yes" if any(g.has_drums for g in main) else "no",
                     f"{style_of(main[0])[0][0]}-{style_of(main[0])[0][1]}" if main else ""])
    text = [format_table(rows, ["family", "split", "folders", "main grooves", "intro/fill/end", "meters", "drums", "bpm"]), ""]
    text.append(f"{len(mains)} main grooves in {len({g.family for g in mains})} families; "
                f"{len(library.failures)} grooves MMA could not load")
    text.append("")
    text.append(format_table([[p.name, p.key_name, len(p.bars), " ".join(p.tags), p.source] for p in progressions],
                             ["progression", "key", "bars", "tags", "source"]))
    return "\n".join(text)


def _scan_progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"\rscanning MMA's library: {done}/{total} files", end="" if done < total else "\n", file=sys.stderr)
    elif done % 50 == 0 or done == total:
        print(f"scanning MMA's library: {done}/{total} files", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Render MMA's groove library over chord progressions into a cached MIDI corpus of DAW material "
                    "(drums, bass, comping, multi-track), with a held-out set of style families.")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: $SEGUE_CACHE/daw-midi, ~/.cache/segue/daw-midi)")
    parser.add_argument("--grooves", type=int, default=None, help="render at most this many grooves, spread over the families")
    parser.add_argument("--only", nargs="*", default=None, help="only these grooves or families (names as in --list)")
    parser.add_argument("--per-groove", type=int, default=4, help="renders of each groove (default 4: two songs, two loops)")
    parser.add_argument("--progressions", nargs="*", default=None,
                        help="progression sets (common, music21) or names; default: all")
    parser.add_argument("--library-files", nargs="*", default=None, help="only these MMA library files, e.g. stdlib/ballad")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="changes every choice of progression, key, tempo and humanisation")
    parser.add_argument("--held-out-fraction", type=float, default=HELD_OUT_FRACTION)
    parser.add_argument("--no-tokens", action="store_true", help="skip counting REMI tokens per file (faster)")
    parser.add_argument("--prune", action="store_true", help="delete .mid files in the output folder that this build did not make")
    parser.add_argument("--list", action="store_true", help="list the groove families, their split and the progressions, then stop")
    args = parser.parse_args(argv)
    out_dir = (args.out or default_out_dir()).expanduser()
    try:
        mma = find_mma()
        started = time.perf_counter()
        library = scan_library(mma, cache=out_dir / "mma-library.json", files=args.library_files, workers=args.workers,
                               progress=_scan_progress)
        progressions = load_progressions(args.progressions, out_dir, args.workers)
        print(f"MMA {library.mma_version}: {len(library.grooves)} grooves in {len(library.files)} library files, "
              f"{len(progressions)} progressions ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        if args.list:
            print(list_library(library, progressions, args.held_out_fraction))
            return 0
        specs = plan(library, progressions, args.per_groove, args.grooves, args.seed, args.held_out_fraction, args.only)
        if not specs:
            print("error: nothing to render (check --only / --library-files)", file=sys.stderr)
            return 2
        report = build(out_dir, specs, library, args.workers, tokens=not args.no_tokens, prune=args.prune, mma=mma)
    except MMAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(report))
    return 0 if report.records else 1


if __name__ == "__main__":
    raise SystemExit(main())
