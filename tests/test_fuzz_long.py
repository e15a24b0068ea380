"""bench/fuzz_long.py stays working: a few hundred executions of each target, as a subprocess (seconds).

The long runs it makes (1,000,000 OSC and 300,000 MIDI executions) are recorded in docs/reliability.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXECUTIONS = 300


def test_the_long_run_fuzzer_runs_every_target_with_no_escape_and_no_hang(tiny_model, tmp_path):
    crashes = tmp_path / "crashes"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "fuzz_long.py"), "--target", "all",
                           "--executions", str(EXECUTIONS), "--seed", "7", "--crashes", str(crashes),
                           "--tokenizer", str(tiny_model / "tokenizer.json"), "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    output = done.stdout + done.stderr
    summaries = {m["target"]: m for m in re.finditer(
        r"^SUMMARY target=(?P<target>\w+) executions=(?P<executions>\d+) escapes=(?P<escapes>\d+) hangs=(?P<hangs>\d+)",
        done.stdout, re.MULTILINE)}
    assert set(summaries) == {"osc", "midi", "ingest"}, output[-3000:]
    for target, summary in summaries.items():
        assert int(summary["executions"]) == EXECUTIONS, target
        assert summary["escapes"] == "0" and summary["hangs"] == "0", output[-3000:]
    assert done.returncode == 0, output[-3000:]
    assert not crashes.exists()  # nothing was saved
    # every path still reaches past its first check for some inputs (else the fuzzer only tests refusals)
    rows = re.findall(r"^\| (osc|midi|ingest) \| (\w+) \| ([\d,]+) \| ([\d,]+) \|", done.stdout, re.MULTILINE)
    assert {path for _, path, _, _ in rows} == {"datagram", "body", "reply", "transport", "read", "ingest"}
    for target, path, executions, accepted in rows:
        assert int(accepted.replace(",", "")) > 0, f"{target} {path}: none of {executions} inputs was accepted"


def test_one_execution_replays_alone_from_its_seed_and_index(tmp_path):
    runs = [subprocess.run([sys.executable, str(ROOT / "bench" / "fuzz_long.py"), "--target", "osc", "--executions", "1",
                            "--seed", "7", "--only", "123", "--crashes", str(tmp_path)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT) for _ in range(2)]
    tables = [re.findall(r"^\| osc \| \w+ \| [\d,]+ \| [\d,]+ \|", run.stdout, re.MULTILINE) for run in runs]
    assert runs[0].returncode == 0, runs[0].stdout[-2000:] + runs[0].stderr[-2000:]
    assert tables[0] == tables[1] and sum(row.split("|")[3].strip() == "1" for row in tables[0]) == 1
