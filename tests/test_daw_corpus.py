"""The DAW corpus: real MMA renders of real library grooves, checked as music.

Renders a rock groove, a jazz waltz and a 6/8 march over short progressions with the `mma` binary
(`apt-get install mma`), and checks what a DAW user would hear: several tracks with drums, a bass
line in a bass register on the progression's roots, the chords of the chart, bar lines where the
groove's bars are, the same bytes every time. Also the held-out family split, the incremental
build, and that a broken groove is reported, not fatal.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import symusic

from training.daw_corpus import (
    RenderSpec,
    build,
    is_held_out,
    main_grooves,
    plan,
    render_one,
    song_text,
    spec_hash,
    split_of,
)
from training.daw_corpus_mma import Groove, family_of, find_library, messages, meter_fix, role_of, scan_library
from training.daw_corpus_progressions import Progression, chord_root, common_progressions, transpose_symbol, transposed
from training.daw_corpus_stats import coarse_family

# The README's test command installs MMA (Debian's `mma`); without it these tests fail, they do not skip.
assert shutil.which("mma") is not None, "MMA is not installed: apt-get install mma (the README's test command does)"

FILES = ["stdlib/rock-128", "stdlib/jazzwaltz", "stdlib/68march"]
CHART = Progression("test-I-IV-V-I", (("C",), ("F",), ("G",), ("C",)), 0, False, ("pop",), "common")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return scan_library(files=FILES, cache=tmp_path_factory.mktemp("scan") / "mma-library.json")


def groove(library, key: str) -> Groove:
    return next(g for g in library.grooves if g.key == key)


def loop_spec(g: Groove, progression: Progression = CHART, bars: int = 8, seed: int = 7) -> RenderSpec:
    chart = [progression.bars[i % len(progression.bars)] for i in range(bars)]
    return RenderSpec(groove=g, index=0, form="loop", progression=progression, transpose=0, tempo=110,
                      bars=tuple((g.name, chords) for chords in chart), seed=seed, split=split_of(g.family), drums=g.has_drums)


def render_spec(spec: RenderSpec, library, out: Path, tokens: bool = False) -> tuple[dict, symusic.Score]:
    song = song_text(spec, library.root)
    record = render_one(spec, song, spec_hash(spec, song, library), out, shutil.which("mma"), tokens)
    assert record["ok"], record.get("error")
    return record, symusic.Score(str(out / record["path"]))


def notes_by_bar(score: symusic.Score, family: str) -> dict[int, list]:
    meter = score.time_signatures[0]
    bar_ticks = score.ticks_per_quarter * 4 * meter.numerator // meter.denominator
    bars: dict[int, list] = {}
    for track in score.tracks:
        if coarse_family(track.program, track.is_drum) != family:
            continue
        for note in track.notes:
            bars.setdefault(note.time // bar_ticks, []).append(note)
    return bars


def test_library_scan_reads_grooves_meters_and_roles(library):
    assert not library.failures
    rock = groove(library, "stdlib/rock-128:Rock128")
    assert rock.role == "main" and rock.has_drums and rock.time_signature == (4, 4) and rock.quarters_per_bar == 4
    assert any(t.startswith("BASS") for t in rock.tracks)
    waltz = groove(library, "stdlib/jazzwaltz:JazzWaltz")
    assert waltz.meter_fix == ((3, 4), 1.0)
    assert groove(library, "stdlib/jazzwaltz:JazzWaltzIntro").role == "intro"
    assert groove(library, "stdlib/jazzwaltz:JazzWaltzEnd").role == "end"
    assert groove(library, "stdlib/jazzwaltz:JazzWaltzFill").role == "fill"
    # MMA's 6/8 march counts two beats of triplets as two quarter notes.
    assert groove(library, "stdlib/68march:68March").meter_fix == ((6, 8), 1.5)


def test_rock_groove_renders_drums_bass_and_chords_on_the_chart(library, tmp_path):
    spec = loop_spec(groove(library, "stdlib/rock-128:Rock128"))
    record, score = render_spec(spec, library, tmp_path)
    families = {coarse_family(t.program, t.is_drum) for t in score.tracks if len(t.notes)}
    assert len([t for t in score.tracks if len(t.notes)]) >= 3
    assert "drums" in families and "bass" in families
    assert any(t.is_drum and len(t.notes) >= 8 * 4 for t in score.tracks), "a drum track playing every beat"
    assert (score.time_signatures[0].numerator, score.time_signatures[0].denominator) == (4, 4)

    bass = [n.pitch for t in score.tracks if coarse_family(t.program, t.is_drum) == "bass" for n in t.notes]
    assert 28 <= sum(bass) / len(bass) <= 55 and max(bass) < 67, "the bass plays in a bass register"

    # Every bar's bass line starts on the chord's root, and its harmony holds the root.
    bass_bars, harmony_bars = notes_by_bar(score, "bass"), notes_by_bar(score, "keys") or notes_by_bar(score, "guitar")
    roots = [chord_root(chords[0]) for _, chords in spec.bars]
    on_root = sum(min(bass_bars[i], key=lambda n: n.time).pitch % 12 == root for i, root in enumerate(roots) if i in bass_bars)
    assert on_root >= 0.75 * len(roots)
    assert all(root in {n.pitch % 12 for n in harmony_bars.get(i, [])} for i, root in enumerate(roots) if i in harmony_bars)
    assert len(harmony_bars) >= 6
    assert record["notes"] == sum(len(t.notes) for t in score.tracks)


def test_waltz_in_three_and_march_in_six_eight_keep_their_bars(library, tmp_path):
    waltz = loop_spec(groove(library, "stdlib/jazzwaltz:JazzWaltz"))
    record, score = render_spec(waltz, library, tmp_path)
    assert record["time_signature"] == [3, 4] and 7 < record["bars"] <= 8

    march = loop_spec(groove(library, "stdlib/68march:68March"))
    record, score = render_spec(march, library, tmp_path)
    assert record["time_signature"] == [6, 8]
    bar_ticks = score.ticks_per_quarter * 3
    assert 7 < score.end() / bar_ticks <= 8.5, "one MMA bar is one 6/8 bar"
    drums = [n.time for t in score.tracks if t.is_drum for n in t.notes]
    eighth = score.ticks_per_quarter // 2
    on_eighths = sum(min(t % eighth, eighth - t % eighth) <= eighth // 8 for t in drums)
    assert on_eighths >= 0.9 * len(drums), "MMA's triplets became the eighth notes of 6/8"
    assert abs(record["seconds"] - 8 * 2 * 60 / 110) < 1.5, "the dotted quarter keeps the tempo"


def test_same_spec_renders_the_same_bytes_and_the_seed_matters(library, tmp_path):
    g = groove(library, "stdlib/rock-128:Rock128")
    first, _ = render_spec(loop_spec(g), library, tmp_path / "a")
    again, _ = render_spec(loop_spec(g), library, tmp_path / "b")
    other, _ = render_spec(loop_spec(g, seed=8), library, tmp_path / "c")
    data = [(tmp_path / d / r["path"]).read_bytes() for d, r in (("a", first), ("b", again), ("c", other))]
    assert data[0] == data[1] and first["sha256"] == hashlib.sha256(data[0]).hexdigest()
    assert data[0] != data[2], "MMA's humanisation is seeded, not switched off"


def test_held_out_split_is_whole_families_stable_and_about_a_tenth():
    assert split_of("68march") == "held-out" and split_of("jazzwaltz") == "train"  # pinned: a change would leak
    names = [f"family{i}" for i in range(3000)]
    held = [n for n in names if is_held_out(n)]
    assert 0.08 < len(held) / len(names) < 0.12
    assert held == [n for n in names if is_held_out(n)]
    assert family_of("casio/jazzwaltz") == family_of("stdlib/jazzwaltz") == family_of("yamaha/jazzwaltz") == "jazzwaltz"
    assert family_of("stdlib/blues128") == family_of("zoom/blues68") == "blues"


def test_plan_keeps_families_on_one_side_and_is_reproducible(library):
    specs = plan(library, common_progressions(), per_groove=2)
    assert specs == plan(library, common_progressions(), per_groove=2)
    sides = {}
    for spec in specs:
        sides.setdefault(spec.groove.family, set()).add(spec.split)
        assert spec.path.startswith(spec.split + "/" + spec.groove.family + "/")
    assert all(len(s) == 1 for s in sides.values())
    assert {s.groove.key for s in specs} == {g.key for g in main_grooves(library)}
    song = next(s for s in specs if s.form == "song" and s.groove.name == "JazzWaltz")
    used = song.grooves_used
    assert used[0].startswith("JazzWaltzIntro") and "JazzWaltz" in used and used[-1].endswith("End")
    assert plan(library, common_progressions(), per_groove=2, seed=1) != specs


def test_build_is_incremental_and_reports_a_broken_groove(library, tmp_path):
    good = loop_spec(groove(library, "stdlib/rock-128:Rock128"))
    real = groove(library, "stdlib/jazzwaltz:JazzWaltz")
    broken_groove = Groove("NoSuchGroove", real.file, "main", "", 4, 3.0, (3, 4), ("DRUM",))
    broken = loop_spec(broken_groove)
    report = build(tmp_path, [good, broken], library, workers=2, tokens=True, progress=False)
    assert [r["path"] for r in report.records] == [good.path]
    assert len(report.failures) == 1 and "NOSUCHGROOVE" in report.failures[0]["error"].upper()
    record = report.records[0]
    assert record["tokens"] > record["notes"] and record["tokens_by_family"]["drums"] > 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["files"][0]["sha256"] == hashlib.sha256((tmp_path / good.path).read_bytes()).hexdigest()
    assert manifest["failures"][0]["groove"] == "NoSuchGroove"
    assert manifest["files"][0]["chart"] == ["C", "F", "G", "C"] * 2 and manifest["files"][0]["sections"] == [["Rock128", 8]]
    first = (tmp_path / "manifest.json").read_bytes()

    again = build(tmp_path, [good, broken], library, workers=2, tokens=True, progress=False)
    assert again.rendered == 0 and (tmp_path / "manifest.json").read_bytes() == first

    (tmp_path / good.path).write_bytes(b"tampered")
    redone = build(tmp_path, [good], library, workers=1, tokens=True, progress=False)
    assert redone.rendered == 1 and (tmp_path / good.path).read_bytes() != b"tampered"


def test_progression_symbols_are_chords_mma_knows_in_every_key(library):
    symbols = {s for p in common_progressions() for shift in range(12) for bar in transposed(p, shift).bars for s in bar}
    symbols |= {f"{root}{quality}" for root in ("C", "F#", "Bb") for quality in ("", "m", "dim3", "aug", "7", "m7", "maj7", "m7b5", "dim7")}
    song = "Groove Rock128\n" + "".join(f"{n} {s}\n" for n, s in enumerate(sorted(symbols), 1))
    result = subprocess.run(["mma", "-n", "-"], input=song, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-500:]
    assert transpose_symbol("F#m7b5/A", 3) == "Am7b5/C" and transpose_symbol("Bb7", 2) == "C7"


def test_meter_rules_and_roles_for_odd_library_files():
    assert meter_fix(4.0, (4, 4)) == ((4, 4), 1.0)
    assert meter_fix(3.0, (4, 4)) == ((3, 4), 1.0)  # casio's waltzes set Time 3 and no TimeSig
    assert meter_fix(4.0, (6, 8)) == ((12, 8), 1.5)  # stdlib/ballad68: four beats of triplets
    assert meter_fix(6.0, (6, 8)) == ((6, 8), 0.5)  # stdlib/68swing writes eighths as quarters
    assert meter_fix(6.0, (4, 4), named_68=True) == ((6, 8), 0.5)
    assert role_of("rock1FA", "Rock 1, Section A Fill-in.") == "fill"
    assert role_of("rock1E", "Rock 1, Ending.") == "end"
    assert role_of("rock1A", "Rock 1, Section A.") == "main"
    assert role_of("fasttwistEndingB", "") == "end" and role_of("kbossaIntroA", "") == "intro"
    assert role_of("ENDING04", "") == "end" and role_of("RhumbaEnd1", "") == "end"
    assert role_of("DescendingJazz", "") == "main" and role_of("DescendingJazzEnd", "") == "end"


def test_bach_chorale_analysis_becomes_a_progression():
    from music21 import corpus  # the [train] extra, which the test command installs

    from training.daw_corpus_progressions import analyse_rntxt

    path = next(p for p in corpus.getCorePaths() if str(p).endswith("riemenschneider001.rntxt"))
    piece = analyse_rntxt(str(path))
    assert piece["tonic"] == 7 and not piece["minor"]  # G major
    assert piece["bars"][0] == ["G", "C/E"] and all(1 <= len(bar) <= 2 for bar in piece["bars"])


def test_a_broken_library_file_is_reported_and_the_scan_goes_on(tmp_path):
    lib = tmp_path / "lib"
    (lib / "mine").mkdir(parents=True)
    shutil.copy(find_library() / "stdlib" / "rock-128.mma", lib / "mine" / "rock.mma")
    (lib / "mine" / "broken.mma").write_text("Time 4\nBegin Drum-Snare\n  Sequence NoSuchPattern\nEnd\nDefGroove Broken  Never loads.\n")
    scanned = scan_library(library=lib)
    assert [f.file for f in scanned.files] == ["mine/broken", "mine/rock"]
    assert list(scanned.failures) == ["mine/broken:*"] and scanned.failures["mine/broken:*"]
    assert "Rock128" in {g.name for g in scanned.grooves} and all(g.file == "mine/rock" for g in scanned.grooves)


def test_mma_messages_are_read_with_their_continuation_lines():
    output = (
        "Warning:   PLUGIN '/usr/share/mma/plugins' does not exist.\n"
        "Warning: <Line 101> <File:hiphop.mma> Track CHORD-\n"
        "    SWEEPPADSUB is shared with CHORD-SWEEPPAD. Changing voice may create\n"
        "    conflict\n"
        "Creating new midi file (4 bars, 0.13 min / 0:08 m:s): 'x.mid'\n"
        "Error: <Line 1> <File:1> Groove 'NOSUCHGROOVE' could not be found in memory or\n"
        "    library files\n"
    )
    assert messages(output, "Warning") == [
        "<Line 101> <File:hiphop.mma> Track CHORD- SWEEPPADSUB is shared with CHORD-SWEEPPAD. Changing voice may create conflict"]
    assert messages(output, "Error") == ["<Line 1> <File:1> Groove 'NOSUCHGROOVE' could not be found in memory or library files"]


def test_library_is_found():
    assert (find_library() / "stdlib").is_dir()
