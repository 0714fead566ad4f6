"""The examples run top to bottom, so they cannot rot."""

import subprocess
import sys

from conftest import ENV, REPO, TINY_TEXT


def test_the_quickstart_example_runs(tmp_path):
    (tmp_path / "data" / "tinyshakespeare").mkdir(parents=True)
    (tmp_path / "data" / "tinyshakespeare" / "input.txt").write_text(TINY_TEXT * 40)
    proc = subprocess.run([sys.executable, "examples/quickstart.py", "--data-root", str(tmp_path / "data"),
                           "--steps", "3", "--work", str(tmp_path / "work")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("TokenBatch: tokens (12, 64)") for line in lines), proc.stdout
    assert any(line.startswith("after 3 steps: test/loss") for line in lines), proc.stdout
    assert "First Citizen:" in lines[-1] or any(line.startswith("First Citizen:") for line in lines)
