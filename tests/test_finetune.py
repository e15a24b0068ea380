"""segue finetune and the shared training loop, on the tiny model.

The ingest report over good and corrupt files, the content-hash split's stability, checkpoints that
survive SIGKILL, exact resume, `--from` a model folder (ONNX -> torch), the end-to-end fine-tune
with `--export`, early stopping, augmentation, and a two-process torchrun run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from make_tiny_model import write_piece
from safetensors.torch import load_file

from engine.manifest import ModelError, sha256_file, verify_model_folder
from engine.tokens import ClipTokenizer
from training.augment import AugmentConfig, TokenAugmenter, instrument_ranges, stretch_score
from training.checkpoint import load_checkpoint
from training.data import data_fingerprint, find_midi_files, load_corpus
from training.finetune import main as finetune_main
from training.from_onnx import OnnxImportError, load_model_folder, onnx_parity
from training.run_folder import read_log

REPO = Path(__file__).resolve().parents[1]
GOOD_FILES = 100


# --- MIDI files, good and bad -------------------------------------------------------------------

def _chunk(tag: bytes, data: bytes) -> bytes:
    return tag + struct.pack(">I", len(data)) + data


def _header(fmt: int = 0, tracks: int = 1, division: int = 480) -> bytes:
    return _chunk(b"MThd", struct.pack(">HHH", fmt, tracks, division))


def _vlq(n: int) -> bytes:
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(reversed(out))


def _track(events: list[bytes]) -> bytes:
    return _chunk(b"MTrk", b"".join(events) + b"\x00\xff\x2f\x00")


def _on(dt: int, pitch: int, velocity: int = 80) -> bytes:
    return _vlq(dt) + bytes([0x90, pitch, velocity])


def _off(dt: int, pitch: int) -> bytes:
    return _vlq(dt) + bytes([0x80, pitch, 0])


def _tempo(dt: int, microseconds: int) -> bytes:
    return _vlq(dt) + b"\xff\x51\x03" + microseconds.to_bytes(3, "big")


def corrupt_files(good: bytes) -> dict[str, bytes]:
    """23 broken files of different kinds (each a way real MIDI collections go wrong)."""
    rnd = random.Random(0)
    melody = [e for i in range(16) for e in (_on(0, 60 + i % 12), _off(240, 60 + i % 12))]
    return {
        "truncated_half.mid": good[: len(good) // 2],
        "truncated_header.mid": good[:10],
        "truncated_track.mid": good[:30],
        "random_1.mid": bytes(rnd.getrandbits(8) for _ in range(500)),
        "random_2.mid": bytes(rnd.getrandbits(8) for _ in range(4000)),
        "random_after_header.mid": _header() + bytes(rnd.getrandbits(8) for _ in range(300)),
        "zero_ticks_per_beat.mid": _header(division=0) + _track(melody),
        "text_renamed.mid": b"This is not a MIDI file, just notes about a song.\n" * 10,
        "empty.mid": b"",
        "header_only.mid": _header(),
        "tempo_zero.mid": _header() + _track([_tempo(0, 0)] + melody),
        "note_10M_ticks.mid": _header(division=960) + _track([_on(0, 60), _off(10_000_000, 60)] + melody),
        "empty_track.mid": _header() + _track([]),
        "no_tracks.mid": _header(fmt=1, tracks=0),
        "velocity_zero_only.mid": _header() + _track([_on(0, 60, 0), _on(240, 62, 0)]),
        "bad_header_length.mid": b"MThd" + struct.pack(">I", 0xFFFFFF) + good[8:],
        "track_length_overflow.mid": _header() + b"MTrk" + struct.pack(">I", 0x7FFFFFFF) + b"\x00\x90\x3c\x40",
        "smpte_division.mid": _header(division=0xE728) + _track(melody),
        "meta_only.mid": _header() + _track([_tempo(0, 500000)]),
        "running_status_garbage.mid": _header() + _track([b"\x00\x3c\x40" * 50]),
        "huge_delta.mid": _header() + _track([_vlq(0x0FFFFFFF) + bytes([0x90, 60, 80]), _off(240, 60)]),
        "wrong_magic.mid": b"RIFF" + good[4:],
        "pitches_outside_range.mid": _header() + _track([_on(0, 5), _off(240, 5), _on(0, 127), _off(240, 127)]),
    }


@pytest.fixture(scope="module")
def midi_folder(tmp_path_factory) -> Path:
    """100 good pieces (seeds unlike the base model's corpus) and 23 corrupt files in a subfolder."""
    folder = tmp_path_factory.mktemp("artist")
    for i in range(GOOD_FILES):
        write_piece(folder / f"piece_{i:03d}.mid", seed=100 + i)
    (folder / "inbox").mkdir()
    for name, data in corrupt_files((folder / "piece_000.mid").read_bytes()).items():
        (folder / "inbox" / name).write_bytes(data)
    return folder


def _run(main, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def finetuned(midi_folder, tiny_model, tmp_path_factory) -> dict:
    """One fine-tune of the tiny model folder on the mixed folder, exported at the end."""
    root = tmp_path_factory.mktemp("finetune")
    code, out, err = _run(finetune_main, [
        "--data", str(midi_folder), "--from", str(tiny_model), "--out", str(root / "run"),
        "--export", str(root / "models" / "artist"), "--max-steps", "8", "--eval-every", "4", "--batch-size", "4",
        "--warmup", "2", "--val-windows", "8", "--threads", "1", "--quiet",
    ])
    return {"code": code, "out": out, "err": err, "run": root / "run", "model": root / "models" / "artist"}


# --- ingest report ------------------------------------------------------------------------------

def test_ingest_reports_every_corrupt_file_and_training_goes_on(finetuned, midi_folder):
    assert finetuned["code"] == 0, finetuned["err"]
    report = json.loads((finetuned["run"] / "ingest_report.json").read_text())
    corrupt = set(corrupt_files(b"x" * 64))
    assert report["files_found"] == GOOD_FILES + len(corrupt) == 123
    assert report["ingested"] == GOOD_FILES
    assert report["train_files"] + report["val_files"] == GOOD_FILES
    assert {Path(s["path"]).name for s in report["skipped"]} == corrupt and len(report["skipped"]) == 23
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert all(reasons.values())
    assert reasons["zero_ticks_per_beat.mid"] == "0 ticks per beat"
    assert reasons["tempo_zero.mid"] == "a tempo of 0"
    assert "beats long" in reasons["note_10M_ticks.mid"]
    assert reasons["text_renamed.mid"].startswith("not a readable MIDI file")
    assert reasons["empty_track.mid"] == "no notes"
    text = (finetuned["run"] / "ingest_report.txt").read_text()
    for entry in report["skipped"]:  # the readable report and the terminal both list every file
        assert f"{entry['path']}: {entry['reason']}" in text
        assert entry["path"] in finetuned["err"]
    log = read_log(finetuned["run"] / "train_log.jsonl")
    assert [r["step"] for r in log if r["kind"] == "eval"] == [0, 4, 8]
    assert load_checkpoint(finetuned["run"] / "last.safetensors")[1]["step"] == "8"


def test_finetune_exports_a_verified_folder_naming_base_and_data(finetuned, tiny_model, midi_folder):
    manifest = verify_model_folder(finetuned["model"])
    base, finetune = manifest.base_model, manifest.finetune
    assert base is not None and finetune is not None and manifest.parity is not None
    assert base.sha256 == sha256_file(tiny_model / "model.onnx")
    assert base.kind == "model_folder" and base.path == str(tiny_model)
    assert base.data_fingerprint == verify_model_folder(tiny_model).training.data_fingerprint
    good_hashes = [sha256_file(p) for p in sorted(midi_folder.glob("piece_*.mid"))]
    assert finetune.data_fingerprint == data_fingerprint(good_hashes)
    assert manifest.training.data_fingerprint == finetune.data_fingerprint
    assert finetune.skipped == 23 and finetune.steps == 8 and finetune.lr == 1e-4  # fine-tuning's default rate
    assert finetune.train_files + finetune.val_files == GOOD_FILES and finetune.val_fraction == 0.2
    assert finetune.base_val_perplexity > 1
    assert manifest.parity.passed
    assert (finetuned["model"] / "tokenizer.json").read_text() == (tiny_model / "tokenizer.json").read_text()
    out = finetuned["out"]
    assert "best validation perplexity" in out and "starting model:" in out and "exported" in out
    assert (finetuned["run"] / "tensorboard").is_dir() and any((finetuned["run"] / "tensorboard").iterdir())


# --- split ----------------------------------------------------------------------------------------

def test_split_is_stable_across_directory_order_and_additions(midi_folder, tiny_model, tmp_path):
    tokenizer_file = tiny_model / "tokenizer.json"
    good = sorted(midi_folder.glob("piece_*.mid"))
    first = load_corpus(good[:80], tokenizer_file, 0.2, workers=1, progress=False)
    assert 5 <= len(first.val) <= 30

    # The same files under other names, in other folders, listed in another order.
    shuffled = tmp_path / "shuffled"
    order = list(good[:80])
    random.Random(3).shuffle(order)
    for i, path in enumerate(order):
        target = shuffled / f"d{i % 4}" / f"{999 - i:03d}_{path.stem[::-1]}.mid"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    again = load_corpus(find_midi_files(shuffled), tokenizer_file, 0.2, workers=1, progress=False)
    assert again.val_hashes == first.val_hashes and again.train_hashes == first.train_hashes
    assert all(np.array_equal(a, b) for a, b in zip(again.train, first.train, strict=True))  # same training stream

    # Add new files and copies of existing ones (from both sides of the split).
    grown_dir = tmp_path / "grown"
    shutil.copytree(shuffled, grown_dir)
    for path in good[80:]:
        shutil.copy(path, grown_dir / path.name)
    by_hash = {sha256_file(p): p for p in good[:80]}
    copies = [by_hash[h] for h in first.val_hashes[:3] + first.train_hashes[:3]]
    for i, path in enumerate(copies):
        shutil.copy(path, grown_dir / f"copy_{i}.mid")
    grown = load_corpus(find_midi_files(grown_dir), tokenizer_file, 0.2, workers=1, progress=False)
    assert set(first.val_hashes) <= set(grown.val_hashes)
    assert set(first.train_hashes) <= set(grown.train_hashes)
    assert not set(grown.val_hashes) & set(grown.train_hashes)  # duplicates never straddle
    assert len(grown.duplicates) == 6 and len(grown.val_hashes) + len(grown.train_hashes) == 100
    assert grown.fingerprint == data_fingerprint(sha256_file(p) for p in good)


# --- atomic checkpoints under SIGKILL -------------------------------------------------------------

WRITER = r"""
import os, sys
import torch
torch.set_num_threads(1)
from training.loop import make_optimizer
from training.model import GPT, preset
from training.train_state import save_training_checkpoint

path = sys.argv[1]
model = GPT(preset("tiny", 600, d_model=256, d_ff=1024, n_layer=4))  # ~40 MB with AdamW state
optimizer = make_optimizer(model, 1e-3, 0.1)
model(torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None])[0].sum().backward()
optimizer.step()

def write(n):
    save_training_checkpoint(path, model, optimizer, {"step": n}, [], {"write": n})

write(0)
print("ready", flush=True)
for rounds in range(1, 10_000):
    if not sys.stdin.readline().strip():
        break
    pid = os.fork()  # a fresh writer per kill, without paying the torch import again
    if pid == 0:
        n = rounds * 1_000_000
        while True:
            n += 1
            write(n)
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def test_checkpoint_always_loads_after_sigkill_mid_write(tmp_path):
    """20+ kills at random moments; most of a write cycle is serialising in memory, so the kills
    go on (up to 80) until at least 2 have landed while the temporary file was on disk."""
    path = tmp_path / "last.safetensors"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    rng = random.Random(11)
    kills, torn_temp_files, last_write = 0, 0, 0
    try:
        assert writer.stdout.readline().strip() == "ready"
        while kills < 20 or (torn_temp_files < 2 and kills < 80):
            writer.stdin.write("go\n")
            writer.stdin.flush()
            pid = int(writer.stdout.readline())
            time.sleep(rng.uniform(0.03, 0.2))  # one write takes ~50 ms: land anywhere in one
            os.kill(pid, signal.SIGKILL)
            assert writer.stdout.readline().strip() == "reaped"
            kills += 1
            # A writer killed mid-write leaves its uniquely named temp file behind (atomic_write).
            torn_temp_files = len(list(tmp_path.glob(".last.safetensors.*.tmp")))
            _, meta, extras = load_checkpoint(path)  # raises on a torn file
            assert int(meta["write"]) >= last_write and "optim/0/exp_avg" in extras
            last_write = int(meta["write"])
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.wait(timeout=30) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
    assert torn_temp_files >= 2, f"only {torn_temp_files} of {kills} kills landed during a write"
    assert last_write > 1_000_000  # the forked writers did replace the checkpoint


# --- exact resume ---------------------------------------------------------------------------------

def _resume_args(tiny_build: Path, out: Path) -> list[str]:
    # Dropout, transposition, velocity jitter and tempo copies on: every RNG matters.
    return ["--data", str(tiny_build / "midi"), "--from", str(tiny_build / "run" / "best.safetensors"), "--out", str(out),
            "--max-steps", "12", "--eval-every", "4", "--log-every", "1", "--batch-size", "4", "--warmup", "2",
            "--lr", "1e-3", "--dropout", "0.1", "--val-windows", "4", "--threads", "1", "--quiet"]


def test_resume_continues_the_same_loss_curve_bit_for_bit(tiny_build, tmp_path):
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    assert _run(finetune_main, _resume_args(tiny_build, straight))[0] == 0
    code, out, _ = _run(finetune_main, _resume_args(tiny_build, paused) + ["--stop-after", "6"])
    assert code == 0 and "--resume" in out
    assert max(r["step"] for r in read_log(paused / "train_log.jsonl")) == 6
    # A crashed run may have logged past its checkpoint: the resumed run replays those steps.
    with open(paused / "train_log.jsonl", "a") as log:
        log.write(json.dumps({"kind": "train", "step": 7, "loss": 0.0, "lr": 0.0}) + "\n" + '{"kind": "tr')
    code, _, err = _run(finetune_main, ["--out", str(paused), "--resume", "--quiet"])
    assert code == 0, err

    def curve(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in read_log(run / "train_log.jsonl")]

    assert curve(paused) == curve(straight) and len(curve(straight)) == 12 + 4  # 12 steps, 4 evaluations (0, 4, 8, 12)
    for name in ("last.safetensors", "best.safetensors"):  # weights and (in last) the optimizer state
        a, b = load_file(str(straight / name)), load_file(str(paused / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    state_a = json.loads(load_checkpoint(straight / "last.safetensors")[1]["train_state"])
    state_b = json.loads(load_checkpoint(paused / "last.safetensors")[1]["train_state"])
    assert {**state_a, "elapsed_s": 0} == {**state_b, "elapsed_s": 0}


# --- --from a model folder ------------------------------------------------------------------------

def test_from_model_folder_rebuilds_the_exported_weights(tiny_build, tiny_model):
    model, manifest, gap = load_model_folder(tiny_model)
    assert gap <= 1e-4
    reference, _, _ = load_checkpoint(tiny_build / "run" / "best.safetensors")
    rebuilt, expected = model.state_dict(), reference.state_dict()
    assert rebuilt.keys() == expected.keys() and all(torch.equal(rebuilt[k], expected[k]) for k in expected)
    assert onnx_parity(model, tiny_model / "model.onnx", seeds=(7, 8, 9), decode_steps=5) <= 1e-4


def test_from_refuses_a_folder_it_cannot_reproduce(model_copy, monkeypatch):
    import training.from_onnx as from_onnx

    real = from_onnx.state_dict_from_onnx

    def off_by_a_little(path, cfg):
        state = real(path, cfg)
        state["ln_f.bias"] = state["ln_f.bias"] + 0.01  # a mapping mistake the graph would not show
        return state

    monkeypatch.setattr(from_onnx, "state_dict_from_onnx", off_by_a_little)
    with pytest.raises(OnnxImportError, match="differs from ONNX Runtime"):
        load_model_folder(model_copy)
    monkeypatch.setattr(from_onnx, "state_dict_from_onnx", real)
    data = bytearray((model_copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (model_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="model.onnx"):  # hashes are checked before anything is read
        load_model_folder(model_copy)


# --- errors, early stopping -----------------------------------------------------------------------

def test_user_errors_are_one_clear_line(tiny_build, tiny_model, tmp_path):
    empty, broken = tmp_path / "empty", tmp_path / "broken"
    empty.mkdir()
    broken.mkdir()
    for name, data in list(corrupt_files((tiny_build / "midi" / "piece_000.mid").read_bytes()).items())[:3]:
        (broken / name).write_bytes(data)
    cases = [
        (["--data", str(tiny_build / "midi"), "--from", str(tmp_path / "no-such-model")], "does not exist"),
        (["--data", str(tiny_build / "midi"), "--from", str(tiny_build / "midi" / "piece_000.mid")], "neither a model folder"),
        (["--data", str(empty), "--from", str(tiny_model)], "no MIDI files"),
        (["--data", str(tmp_path / "missing"), "--from", str(tiny_model)], "does not exist"),
        (["--data", str(broken), "--from", str(tiny_model)], "none of the 3 MIDI files"),
        (["--out", str(tmp_path / "never-started"), "--resume"], None),
    ]
    for i, (argv, expected) in enumerate(cases):
        argv = argv + ([] if "--out" in argv else ["--out", str(tmp_path / f"run{i}")]) + ["--quiet", "--threads", "1"]
        try:
            code, _, err = _run(finetune_main, argv)
        except SystemExit as exc:  # argparse-level and resume errors exit with their message
            code, err = 1, str(exc.code)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code != 0 and len(errors) == 1 and "Traceback" not in err, (argv, err)
        assert expected is None or expected in errors[0], (argv, errors)


def test_early_stopping_stops(tiny_build, tmp_path):
    # lr 0: the validation loss cannot improve after the first evaluation.
    code, out, err = _run(finetune_main, [
        "--data", str(tiny_build / "midi"), "--from", str(tiny_build / "run" / "best.safetensors"), "--out", str(tmp_path),
        "--lr", "0", "--max-steps", "500", "--eval-every", "2", "--patience", "2", "--batch-size", "2", "--val-windows", "2",
        "--no-augment", "--threads", "1", "--quiet",
    ])
    assert code == 0, err
    evals = [r["step"] for r in read_log(tmp_path / "train_log.jsonl") if r["kind"] == "eval"]
    assert evals == [0, 2, 4, 6]
    assert "stopped early" in out
    assert json.loads(load_checkpoint(tmp_path / "last.safetensors")[1]["train_state"])["finished"] == "early_stop"


# --- augmentation ---------------------------------------------------------------------------------

def test_augmentation_keeps_instruments_in_range(tiny_model, tiny_build):
    tokenizer = ClipTokenizer.from_file(tiny_model / "tokenizer.json")
    kinds = tokenizer.kinds
    pitch_id = {p: i for i, p in kinds.pitch.items()}
    velocity_ids = sorted(kinds.velocity, key=kinds.velocity.get)
    bass, piano = tokenizer.program_id(32, False), tokenizer.program_id(0, False)
    low, high = instrument_ranges(tokenizer)
    row = [kinds.bar, bass, pitch_id[int(high[33]) - 1], velocity_ids[5], piano, pitch_id[60], velocity_ids[-1]]
    rows = np.array([row] * 400, dtype=np.int64)
    augmenter = TokenAugmenter(tokenizer, AugmentConfig(transpose=5, velocity_jitter=8))
    augmenter(rows, np.random.default_rng(0))
    bass_pitch = np.array([kinds.pitch[t] for t in rows[:, 2]])
    piano_pitch = np.array([kinds.pitch[t] for t in rows[:, 5]])
    assert bass_pitch.max() <= high[33] and bass_pitch.min() == int(high[33]) - 1 - 5  # up by 1 at most, down by 5
    assert np.array_equal(piano_pitch - 60, bass_pitch - (int(high[33]) - 1))  # one shift per window
    assert len(set(rows[:, 3])) > 3 and set(rows[:, 6]) <= set(velocity_ids[-3:])  # jittered, clamped at the top

    import symusic

    score = symusic.Score.from_midi((tiny_build / "midi" / "piece_001.mid").read_bytes())
    plain, slower = tokenizer.encode_score(score), tokenizer.encode_score(stretch_score(score, 1.2))
    assert plain != slower and slower.count(kinds.bar) > plain.count(kinds.bar)
    assert AugmentConfig(tempo_copies=2).tempo_factors == (0.8, 1.2)
    assert AugmentConfig(tempo_copies=4).tempo_factors == (0.8, 0.9, 1.1, 1.2)


# --- torchrun ---------------------------------------------------------------------------------------

def test_torchrun_two_processes_on_cpu(tiny_build, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "training.finetune", "--data", str(tiny_build / "midi"),
               "--from", str(tiny_build / "run" / "best.safetensors"), "--out", str(tmp_path),
               "--max-steps", "4", "--eval-every", "2", "--log-every", "1", "--batch-size", "2", "--val-windows", "4",
               "--threads", "1", "--quiet"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stderr
    log = read_log(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3, 4]  # rank 0 alone writes
    assert load_checkpoint(tmp_path / "best.safetensors")[1]["step"] in ("2", "4")


# --- --exclude and --precision --------------------------------------------------------------------

def test_exclude_keeps_a_test_set_out_of_training_and_the_manifest_says_so(midi_folder, tiny_model, tmp_path):
    """A held-out set (renamed copies, another folder) never reaches training or validation, and
    the exported manifest names what was left out and the split fraction; bf16 steps keep fp32 weights."""
    pieces = sorted(midi_folder.glob("piece_*.mid"))
    test_set = tmp_path / "test-set"
    test_set.mkdir()
    for i, path in enumerate(pieces[:10]):
        shutil.copy(path, test_set / f"renamed_{i}.mid")
    code, out, err = _run(finetune_main, [
        "--data", str(midi_folder), "--from", str(tiny_model), "--out", str(tmp_path / "run"),
        "--exclude", str(test_set), "--export", str(tmp_path / "model"), "--max-steps", "4", "--eval-every", "4",
        "--batch-size", "4", "--warmup", "1", "--val-windows", "4", "--threads", "1", "--precision", "bf16",
    ])
    assert code == 0, err
    assert "10 files left out" in err and "bf16 autocast" in err
    report = json.loads((tmp_path / "run" / "ingest_report.json").read_text())
    assert report["ingested"] == GOOD_FILES - 10
    left_out = sorted(sha256_file(p) for p in pieces[:10])
    manifest = verify_model_folder(tmp_path / "model")
    excluded = manifest.training.excluded
    assert excluded is not None and excluded.hashes == left_out and excluded.files_left_out == 10
    assert excluded.fingerprint == data_fingerprint(left_out) and excluded.folders == [str(test_set)]
    assert manifest.training.val_fraction == 0.2
    assert manifest.finetune.data_fingerprint == data_fingerprint(sha256_file(p) for p in pieces[10:])
    weights = load_file(str(tmp_path / "run" / "last.safetensors"))
    assert all(t.dtype == torch.float32 for name, t in weights.items() if t.is_floating_point()), "fp32 master weights"
    assert _run(finetune_main, ["--data", str(midi_folder), "--from", str(tiny_model), "--out", str(tmp_path / "r2"),
                                "--exclude", str(tmp_path / "missing")])[0] == 1


def test_precision_auto_takes_bf16_only_where_the_hardware_has_it():
    from training.loop import training_dtype

    cpu = torch.device("cpu")
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert training_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    assert training_dtype("fp32", cpu) is None and training_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision"):
        training_dtype("fp8", cpu)
