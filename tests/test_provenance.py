"""Provenance in every .mid Segue writes, and `segue provenance` reproducing a file note for note."""

from __future__ import annotations

import mido
from test_multitrack import band
from test_service import Inbox

from engine.midi_file import read_clip, write_clip, write_tracks
from engine.provenance import PREFIX, read_provenance
from plugin_bridge.provenance_cli import main as provenance_main


def test_continue_writes_provenance_that_reproduces_the_file(tiny_model, tmp_path, capsys):
    from plugin_bridge.cli import main as segue_main

    clip_path = write_tracks(tmp_path / "band.mid", band()[:2], ["Drums", "Bass"])
    out = tmp_path / "out"
    assert segue_main(["continue", str(clip_path), "--bars", "2", "--variations", "2", "--seed", "11",
                       "--min-notes-per-bar", "1", "--out", str(out), "--model", str(tiny_model)]) == 0
    take = out / "band-continuation-2.mid"
    record = read_provenance(take)
    assert record is not None and record.seed == 11 and record.variation == 2 and record.continued == [0, 1]
    assert record.request["bars"] == 2 and record.request["constraints"] == {"min_notes_per_bar": 1}
    assert len(record.manifest_sha256) == 64 and record.data_fingerprint
    capsys.readouterr()

    assert provenance_main([str(take)]) == 0
    printed = capsys.readouterr().out
    assert "variation 2 of 2, seed 11" in printed and record.manifest_sha256 in printed

    assert provenance_main([str(take), "--clip", str(clip_path), "--model", str(tiny_model)]) == 0
    assert "reproduced note for note" in capsys.readouterr().out

    edited = mido.MidiFile(str(take))  # one note moved a semitone: no longer what the model wrote
    for track in edited.tracks:
        for i, message in enumerate(track):
            if message.type == "note_on" and message.velocity:
                track[i] = message.copy(note=message.note + 1)
                break
    edited.save(str(tmp_path / "edited.mid"))
    assert provenance_main([str(tmp_path / "edited.mid"), "--clip", str(clip_path), "--model", str(tiny_model)]) == 1
    assert "differs" in capsys.readouterr().err

    other = write_tracks(tmp_path / "other.mid", band()[1:3], ["Bass", "Keys"])
    assert provenance_main([str(take), "--clip", str(other), "--model", str(tiny_model)]) == 1
    assert "is not the clip this file continued" in capsys.readouterr().err


def test_the_server_records_the_seed_it_drew(service, models_dir, tmp_path, capsys):
    from conftest import clip_payload

    inbox = Inbox()
    service.handle("a", {"type": "continue", "id": "r1", "clip": clip_payload(), "bars": 1,
                         "constraints": {"min_notes_per_bar": 1}}, inbox)  # no seed: the engine draws one
    done = [e for e in inbox.until("finished", "r1") if e["type"] == "done"]
    record = read_provenance(done[0]["path"])
    assert record is not None and isinstance(record.seed, int) and record.model_name
    prompt = write_clip(tmp_path / "prompt.mid", _clip_of(clip_payload()))  # the DAW's clip, saved as a file
    assert read_clip(prompt).notes
    capsys.readouterr()
    assert provenance_main([done[0]["path"], "--clip", str(prompt), "--models-dir", str(models_dir)]) == 0, \
        capsys.readouterr().err


def test_files_without_a_record_say_so(tmp_path, capsys):
    plain = mido.MidiFile()
    track = mido.MidiTrack([mido.MetaMessage("text", text=PREFIX + "{not json"), mido.Message("note_on", note=60)])
    plain.tracks.append(track)
    plain.save(str(tmp_path / "plain.mid"))
    assert read_provenance(tmp_path / "plain.mid") is None  # a damaged record is no record
    assert provenance_main([str(tmp_path / "plain.mid")]) == 1
    assert "carries no Segue provenance record" in capsys.readouterr().out
    assert provenance_main([str(tmp_path / "missing.mid")]) == 1
    assert "cannot read" in capsys.readouterr().err


def _clip_of(payload: dict):
    from plugin_bridge.protocol import parse_clip

    return parse_clip(payload, "r1")


def test_the_variant_served_is_recorded_and_old_records_read_as_fp32():
    import json

    from engine.provenance import PREFIX, Provenance

    record = Provenance("m", "a" * 64, None, 7, 1, {"bars": 2}, "b" * 64, [0], variant="int8")
    assert Provenance.from_text(record.to_text()) == record
    old = json.loads(record.to_text()[len(PREFIX):])
    del old["variant"]  # written before variants existed
    back = Provenance.from_text(PREFIX + json.dumps(old))
    assert back is not None and back.variant == "fp32"
