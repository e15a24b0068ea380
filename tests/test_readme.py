"""The README is the front door: its two set-up commands must stay true."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [readme_commands()[1]]


def test_main_command_uses_a_shipped_clip_and_the_shipped_model():
    main = readme_commands()[0]
    assert main.startswith('python3 -m pip install -e ".[cpu]" && segue continue ')
    args = shlex.split(main.split("&&", 1)[1])
    clip = ROOT / args[2]
    assert clip.is_file() and clip.read_bytes().startswith(b"MThd")
    manifest = json.loads((ROOT / "models" / "default" / "manifest.json").read_text())
    assert manifest["parity"]["passed"]
    size = sum((ROOT / "models" / "default" / name).stat().st_size for name in manifest["files"])
    assert size < 30 * 1024 * 1024


def test_shipped_default_model_verifies_and_continues_the_examples():
    from engine.generate import ContinuationRequest, Generator
    from engine.midi_file import read_clip

    generator = Generator.load(ROOT / "models" / "default")
    for clip_path in sorted((ROOT / "docs" / "examples").glob("*.mid")):
        clip = read_clip(clip_path)
        done = generator.generate(clip, ContinuationRequest(bars=2, variations=1, temperature=0.9, top_p=0.95, seed=1))[0]
        assert sum(1 for t in done.tokens if t == generator.vocab.bar) == 2
        assert done.clip.notes, f"the default model wrote two empty bars after {clip_path.name}"
