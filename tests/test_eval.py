"""`segue eval` and `segue render`: style metrics on hand-built clips, the n-gram baseline, the
originality check, audio rendering, and the whole report end to end on the tiny model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import symusic

from engine.clip import Clip, Note
from engine.midi_file import read_clip, write_clip
from engine.render import RenderError, render_midi, wav_level
from engine.sampling import SamplingParams
from engine.tokens import ClipTokenizer
from training.data import ingest_file, is_validation
from training.eval_measures import model_perplexity, repeat_last_bar
from training.eval_report import REPORT_SECTIONS
from training.held_out import held_out_examples, split_folder
from training.metrics import (
    HISTOGRAM_METRICS,
    IOI_LABELS,
    SCALAR_METRICS,
    metric_distances,
    style_metrics,
    total_variation,
    train_style_classifier,
)
from training.ngram import NgramModel, continue_clip
from training.originality import CopyIndex, copy_summary


def segue(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plugin_bridge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def c_major_scale(offset: float = 0.0) -> Clip:
    """C4 D4 E4 F4 G4 A4 B4 C5 in quarter notes: two bars of 4/4."""
    pitches = [60, 62, 64, 65, 67, 69, 71, 72]
    return Clip(tuple(Note(p, 80, offset + i, 1.0) for i, p in enumerate(pitches)))


@pytest.fixture(scope="session")
def tokenizer(tiny_model) -> ClipTokenizer:
    return ClipTokenizer.from_file(tiny_model)


@pytest.fixture(scope="session")
def pieces(tiny_model, example_midi) -> list[np.ndarray]:
    """Token ids of every synthetic piece, tokenized by the model's own tokenizer."""
    results = [ingest_file(path, str(tiny_model / "tokenizer.json")) for path in example_midi]
    assert all(not r.reason for r in results)
    return [r.tokens.astype(np.int64) for r in results]


# --- style metrics -------------------------------------------------------------------------------

def test_metrics_of_a_c_major_scale_are_the_hand_computed_values():
    m = style_metrics(c_major_scale(), bars=2, start=0.0)
    expected_classes = np.zeros(12)
    expected_classes[[0, 2, 4, 5, 7, 9, 11]] = 1 / 8
    expected_classes[0] = 2 / 8  # C4 and C5
    assert m["notes"] == 8
    assert m["pitch_class_histogram"] == pytest.approx(expected_classes)
    assert m["pitch_range"] == 12
    assert m["mean_pitch"] == pytest.approx(530 / 8)
    assert m["notes_per_bar"] == 4
    assert m["polyphony"] == pytest.approx(1.0)  # one note at a time, always
    assert m["ioi_histogram"][IOI_LABELS.index("1")] == 1.0  # seven onsets one beat apart
    assert m["pitch_entropy"] == pytest.approx(3.0)  # 8 distinct pitches, equally often
    assert m["rhythm_entropy"] == pytest.approx(2.0)  # beats 1-4 of the bar, twice each
    assert m["velocity_mean"] == 80 and m["velocity_std"] == 0
    assert m["velocity_histogram"][(80 - 1) // 16] == 1.0


def test_metrics_of_chords_and_the_measured_span():
    # A C major triad for two beats, then one G for two beats: 8 note-beats over 4 sounding beats.
    notes = [Note(60, 100, 0, 2), Note(64, 100, 0, 2), Note(67, 100, 0, 2), Note(67, 60, 2, 2)]
    m = style_metrics(Clip(tuple(notes)), bars=1, start=0.0)
    assert m["polyphony"] == pytest.approx(2.0)
    assert m["ioi_histogram"][IOI_LABELS.index("2")] == 1.0
    assert m["rhythm_entropy"] == pytest.approx(1.0)  # onsets on beats 1 and 3
    assert m["pitch_class_histogram"][7] == pytest.approx(0.5)
    assert m["velocity_mean"] == pytest.approx(90) and m["velocity_std"] == pytest.approx(math.sqrt(300))
    # A continuation placed after a 4-bar prompt is measured from its own first bar by default.
    later = style_metrics(c_major_scale(offset=16.0), bars=2)
    assert later == style_metrics(c_major_scale(), bars=2, start=0.0)
    # Only notes starting inside the span count; a note ringing past its end is cut for polyphony.
    first_bar = style_metrics(c_major_scale(), bars=1, start=0.0)
    assert first_bar["notes"] == 4 and first_bar["pitch_range"] == 5
    empty = style_metrics(Clip(()), bars=4, start=0.0)
    assert empty["notes"] == 0 and sum(empty["pitch_class_histogram"]) == 0 and empty["polyphony"] == 0


def test_distances_are_zero_for_identical_and_positive_otherwise():
    a = style_metrics(c_major_scale(), bars=2, start=0.0)
    assert set(metric_distances(a, a)) == set(HISTOGRAM_METRICS) | set(SCALAR_METRICS)
    assert all(v == 0 for v in metric_distances(a, a).values())
    shifted = c_major_scale().with_notes(replace(n, pitch=n.pitch + 1, velocity=50, duration=0.5)
                                         for n in c_major_scale().notes[:6])
    b = style_metrics(shifted, bars=2, start=0.0)
    d = metric_distances(a, b)
    assert d == metric_distances(b, a)
    assert all(d[name] > 0 for name in ("pitch_class_histogram", "velocity_histogram", "pitch_range", "notes_per_bar",
                                        "velocity_mean", "mean_pitch", "pitch_entropy"))
    assert total_variation([1, 0], [0, 1]) == 1.0 and total_variation([0, 0], [0, 0]) == 0.0
    assert total_variation([0, 0], [0.5, 0.5]) == 1.0


def _style_piece(style: str, rng: np.random.Generator, bars: int = 8) -> Clip:
    notes = []
    for bar in range(bars):
        if style == "runs":  # quiet stepwise eighth notes, high
            start_pitch = int(rng.integers(72, 80))
            notes += [Note(start_pitch + int(rng.integers(-2, 3)) + i % 5, int(rng.integers(40, 60)), bar * 4 + i / 2, 0.5)
                      for i in range(8)]
        else:  # loud block chords in half notes, low
            for half in range(2):
                root = int(rng.integers(40, 50))
                notes += [Note(root + step, int(rng.integers(95, 120)), bar * 4 + half * 2, 2.0) for step in (0, 4, 7)]
    return Clip(()).with_notes(notes)


def test_style_classifier_tells_two_styles_apart():
    rng = np.random.default_rng(0)
    classifier = train_style_classifier({style: [_style_piece(style, rng) for _ in range(4)] for style in ("runs", "chords")})
    for style in ("runs", "chords"):
        for _ in range(3):
            piece = _style_piece(style, rng, bars=4).shifted(16.0)  # like a continuation after a 4-bar prompt
            assert classifier.predict(piece) == style
            assert classifier.predict(piece, bars=4, start=16.0) == style
            assert sum(classifier.predict_proba(piece).values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two labels"):
        train_style_classifier({"runs": [c_major_scale()]})


# --- n-gram baseline -----------------------------------------------------------------------------

def test_ngram_is_a_normalised_distribution_and_scores_like_its_sampler(pieces, tokenizer):
    kinds = tokenizer.kinds
    ngram = NgramModel.train(pieces[:30], tokenizer.vocab_size, kinds.bos, kinds.eos, order=5)
    for context in ([], [kinds.bos], list(pieces[31][:40]), [kinds.eos] * 9):  # the last one was never seen
        assert np.exp(ngram.log_probs(context)).sum() == pytest.approx(1.0, abs=1e-9)
    piece = pieces[31][:120]
    padded = [kinds.bos] * 4 + list(piece) + [kinds.eos]
    stepwise = [ngram.log_probs(padded[:i])[padded[i]] for i in range(4, len(padded))]
    assert ngram.token_log_probs([piece]) == pytest.approx(stepwise)


def test_ngram_perplexity_is_lower_on_its_training_data_than_on_shuffled_tokens(pieces, tokenizer):
    kinds = tokenizer.kinds
    ngram = NgramModel.train(pieces, tokenizer.vocab_size, kinds.bos, kinds.eos, order=6)
    own, scored = ngram.perplexity(pieces)
    rng = np.random.default_rng(1)
    shuffled, _ = ngram.perplexity([rng.permutation(p) for p in pieces])
    assert scored == sum(len(p) + 1 for p in pieces)  # every token and each piece's EOS
    assert 1 < own < shuffled / 5
    assert shuffled < tokenizer.vocab_size * 10  # smoothed: nothing gets probability ~0


def test_ngram_continuations_decode_with_exact_bar_counts(pieces, tokenizer, example_midi):
    kinds = tokenizer.kinds
    ngram = NgramModel.train(pieces, tokenizer.vocab_size, kinds.bos, kinds.eos, order=6)
    for index, path in enumerate(example_midi[:9]):  # 4/4, 3/4 and 6/8 pieces
        clip = read_clip(path)
        prompt = replace(clip, length=4 * clip.beats_per_bar).with_notes(n for n in clip.notes if n.start < 4 * clip.beats_per_bar)
        bars = 1 + index % 4
        done = continue_clip(ngram, tokenizer, prompt, bars, SamplingParams(1.0, 0, 1.0), seed=index)
        assert sum(1 for t in done.tokens if t == kinds.bar) == bars
        decoded = tokenizer.decode_to_score(done.tokens)
        assert sum(len(t.notes) for t in decoded.tracks) == len(done.clip.notes) > 0
        start = 4 * clip.beats_per_bar
        assert all(start <= n.start < start + bars * clip.beats_per_bar for n in done.clip.notes)
        again = continue_clip(ngram, tokenizer, prompt, bars, SamplingParams(1.0, 0, 1.0), seed=index)
        assert again.tokens == done.tokens  # a seed reproduces a continuation


# --- originality ---------------------------------------------------------------------------------

def _fresh_bar(rng: np.random.Generator, bar: int) -> list[Note]:
    """Three high notes on positions no synthetic piece plays (a quarter beat off the eighth-note grid)."""
    return [Note(int(rng.integers(90, 100)), 70, bar * 4 + 0.25 + i * 1.25, 0.75) for i in range(3)]


def test_originality_finds_a_planted_two_bar_copy_and_nothing_in_a_fresh_one(pieces, tokenizer, example_midi):
    index = CopyIndex(pieces, tokenizer)
    source = read_clip(example_midi[0])  # a 4/4 piece of the index
    beats = source.beats_per_bar
    copied = [replace(n, start=n.start - beats) for n in source.notes if 2 * beats <= n.start < 4 * beats]  # its bars 3-4
    rng = np.random.default_rng(5)
    planted = Clip((), source.tempo, source.time_signature, 4 * beats).with_notes(
        _fresh_bar(rng, 0) + copied + _fresh_bar(rng, 3))
    fresh = Clip((), source.tempo, source.time_signature, 4 * beats).with_notes(
        [n for bar in range(4) for n in _fresh_bar(rng, bar)])
    assert index.longest_copy(tokenizer.encode_clip(planted)) == 2
    assert index.longest_copy(tokenizer.encode_clip(fresh)) == 0
    transposed = planted.with_notes(replace(n, pitch=n.pitch + 3) if beats <= n.start < 3 * beats else n
                                    for n in planted.notes)
    assert index.longest_copy(tokenizer.encode_clip(transposed)) < 2
    assert CopyIndex(pieces, tokenizer, transpose=True).longest_copy(tokenizer.encode_clip(transposed)) == 2
    summary = copy_summary([2, 0, 0, 3])
    assert summary["copying_fraction"] == 0.5 and summary["max_longest_copy"] == 3


# --- the evaluation protocol ---------------------------------------------------------------------

def test_model_perplexity_scores_every_token_once_whatever_the_stride(generator, pieces):
    decoder = generator.decoder
    kinds = generator.tokenizer.kinds
    long_piece = np.concatenate(pieces[:3])[: decoder.max_context * 2]  # needs several windows
    results = {stride: model_perplexity(decoder, [long_piece], kinds.bos, kinds.eos, stride)
               for stride in (decoder.max_context, decoder.max_context // 2, decoder.max_context // 4)}
    assert {count for _, count in results.values()} == {len(long_piece) + 1}
    short = pieces[0][: decoder.max_context // 2]  # fits one window: the stride cannot matter
    one, _ = model_perplexity(decoder, [short], kinds.bos, kinds.eos, 7)
    other, _ = model_perplexity(decoder, [short], kinds.bos, kinds.eos, None)
    assert one == pytest.approx(other)
    seq = np.concatenate([[kinds.bos], short, [kinds.eos]])
    logits, _ = decoder.forward(seq[None, :-1], decoder.empty_cache(1))
    logp = logits[0] - np.log(np.exp(logits[0].astype(np.float64)).sum(axis=1, keepdims=True))
    assert one == pytest.approx(math.exp(-logp[np.arange(len(seq) - 1), seq[1:]].mean()), rel=1e-5)


def test_repeat_last_bar_plays_the_last_bar_again():
    prompt = replace(c_major_scale(), length=8.0)
    repeated = repeat_last_bar(prompt, prompt_bars=2, bars=3)
    assert [n.pitch for n in repeated.notes] == [67, 69, 71, 72] * 3
    assert [n.start for n in repeated.notes] == [8.0 + i for i in range(12)]


def test_held_out_clips_come_from_held_out_pieces_and_depend_on_nothing_else(tiny_build, tiny_model, tokenizer):
    """The selection `segue eval` and the style experiment share: the training split rule, hash
    order, and a clip per piece fixed by the seed and the piece's own hash."""
    split = split_folder(tiny_build / "midi", tiny_model / "tokenizer.json", 0.2)
    assert split.val and [p.hash for p in split.val] == sorted(p.hash for p in split.val)
    assert all(is_validation(p.hash, 0.2) for p in split.val) and not any(is_validation(p.hash, 0.2) for p in split.train)
    skipped: list = []
    examples = list(held_out_examples(split.val, tokenizer, 4, 2, seed=3, skipped=skipped))
    assert examples and len(examples) + len(skipped) == len(split.val)
    for example in examples:
        beats = example.prompt.beats_per_bar
        assert example.path in {p.path for p in split.val} and example.prompt.length == 4 * beats
        assert example.prompt.notes and all(0 <= n.start < 4 * beats for n in example.prompt.notes)
        assert example.reference.notes and all(4 * beats - 1e-6 <= n.start < 6 * beats for n in example.reference.notes)
        alone = [p for p in split.val if p.path == example.path]
        assert next(held_out_examples(alone, tokenizer, 4, 2, seed=3, skipped=[])) == example
    skipped = []
    assert list(held_out_examples(split.val, tokenizer, 4, 5, seed=0, skipped=skipped)) == []  # 9 bars of 8-bar pieces
    assert [name for name, _ in skipped] == [p.path.name for p in split.val]
    assert all(why.startswith("no 4+5 bars with notes") for _, why in skipped)


def test_segue_eval_writes_the_report_plots_and_audio(tiny_model, tiny_build, tmp_path):
    out = tmp_path / "eval"
    result = segue("eval", "--model", tiny_model, "--data", tiny_build / "midi", "--out", out, "--max-clips", 4,
                   "--audio", 1, "--seed", 3)
    assert result.returncode == 0, result.stderr
    report = (out / "report.md").read_text()
    for section in REPORT_SECTIONS:
        assert f"\n## {section}\n" in report, section
    for name in ("pitch_classes.png", "ioi.png", "velocity.png", "daw_measures.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{name})" in report
    metrics = json.loads((out / "metrics.json").read_text())
    # The DAW measures: every system on the same clips, the baselines included, and the model's verdicts.
    daw = metrics["daw"]
    assert {row["system"] for row in daw} == {"model", "n-gram", "repeat last bar", "loop the clip"}
    assert all(row["clips"] == 4 for row in daw if row["family"] == "all pitched")
    loop = next(row for row in daw if row["family"] == "all pitched" and row["system"] == "loop the clip")
    assert loop["copied_bars_mean"] == 1.0  # looping the clip copies every bar, by definition
    assert "| all pitched, model: mean \\|pitch offset\\| (semitones) |" in report
    ppl = metrics["perplexity"]
    assert 1 < ppl["model"] < ppl["uniform"] and 1 < ppl["ngram"] < ppl["uniform"]
    assert len(metrics["clips"]) == 4
    for system in ("model", "ngram", "repeat"):
        assert set(metrics["distances"][system]) == set(HISTOGRAM_METRICS) | set(SCALAR_METRICS)
        assert 0 <= metrics["originality"][system]["copying_fraction"] <= 1
    wavs = sorted((out / "audio").glob("*.wav"))
    assert len(wavs) == 3 and all(wav_level(w)[1] > 1e-3 for w in wavs)  # the real, model and n-gram continuation
    assert all(f"(audio/{w.name})" in report for w in wavs)


def test_segue_eval_explains_a_missing_data_folder(tiny_model, tmp_path):
    result = segue("eval", "--model", tiny_model, "--data", tmp_path / "nowhere", "--out", tmp_path / "eval")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: data folder {tmp_path / 'nowhere'} does not exist"


# --- audio ---------------------------------------------------------------------------------------

def test_segue_render_writes_a_non_silent_wav(tmp_path):
    midi = write_clip(tmp_path / "scale.mid", c_major_scale())
    result = segue("render", midi, "--out", tmp_path / "out" / "scale.wav")
    assert result.returncode == 0, result.stderr
    seconds, rms = wav_level(tmp_path / "out" / "scale.wav")
    assert 3.5 < seconds < 8  # 8 beats at 120 BPM is 4 s, plus the release tail
    assert rms > 1e-3
    assert str(tmp_path / "out" / "scale.wav") in result.stdout


def test_segue_render_names_the_missing_soundfont_in_one_line(tmp_path):
    midi = write_clip(tmp_path / "scale.mid", c_major_scale())
    result = segue("render", midi, "--soundfont", tmp_path / "missing.sf2")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.sf2" in lines[0] and "apt-get install -y fluidsynth fluid-soundfont-gm" in lines[0]


def test_render_names_the_apt_command_when_fluidsynth_is_missing(tmp_path, monkeypatch):
    midi = write_clip(tmp_path / "scale.mid", c_major_scale())
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without fluidsynth
    with pytest.raises(RenderError, match=r"fluidsynth is not installed: install it with `apt-get install -y fluidsynth"):
        render_midi(midi)


def test_render_refuses_silence(tmp_path):
    empty = write_clip(tmp_path / "empty.mid", Clip((), length=4.0))
    with pytest.raises(RenderError, match="silent"):
        render_midi(empty)


def test_segue_continue_render_writes_a_wav_beside_each_midi(tiny_model, example_midi, tmp_path):
    result = segue("continue", example_midi[0], "--bars", 2, "--variations", 2, "--seed", 4, "--out", tmp_path,
                   "--model", tiny_model, "--render")
    assert result.returncode == 0, result.stderr
    midis = sorted(tmp_path.glob("*.mid"))
    assert len(midis) == 2
    for midi in midis:
        if symusic.Score(str(midi)).note_num():  # an empty continuation is written but not rendered
            assert wav_level(midi.with_suffix(".wav"))[1] > 1e-3
            assert str(midi.with_suffix(".wav")) in result.stdout
