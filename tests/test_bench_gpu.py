"""scripts/bench_gpu.py --smoke: every GPU part runs a few steps on the CPU, figures are written, and a
second call resumes instead of running the finished parts again."""

import json
import subprocess
import sys

from conftest import ENV, REPO, TINY_TEXT, make_image_folder, make_parallel
from test_audio import make_tones


def test_bench_gpu_smoke_runs_every_part_and_resumes(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root / "cifar10", classes=[f"c{i}" for i in range(10)], per_class=(2, 1), size=32)
    make_tones(root / "fsdd" / "recordings", per_class=(10, 5))
    (root / "tinyshakespeare").mkdir()
    (root / "tinyshakespeare" / "input.txt").write_text(TINY_TEXT * 20)
    make_parallel(root / "multi30k")
    out = tmp_path / "bench"
    cmd = [sys.executable, "scripts/bench_gpu.py", "--smoke", "--data-root", str(root), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((out / "state.json").read_text())
    failed = {name: part["figures"] for name, part in state["parts"].items() if part["status"] != "done"}
    assert not failed, failed
    assert set(state["parts"]) == {"vit_cifar", "gpt_60s", "gpt2_mfu", "audio_60s", "translate", "ddp_overhead"}
    assert state["parts"]["ddp_overhead"]["figures"]["ddp / plain"] > 0
    rows = (out / "figures.md").read_text().splitlines()
    assert len(rows) == 2 + 6 and all(row.count("|") == 8 for row in rows)
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
    assert again.returncode == 0 and ": done in" not in again.stdout  # every part was already done
