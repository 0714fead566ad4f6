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
    assert list(state["parts"]) == ["gpt2_small", "profile", "vit_cifar", "gpt2_eager", "gpt_60s", "audio_60s",
                                    "translate", "ddp_overhead"]  # the most informative first
    assert state["parts"]["gpt2_eager"]["figures"]["compiled / eager"] > 0
    assert state["parts"]["ddp_overhead"]["figures"]["ddp / plain"] > 0
    gpt2 = state["parts"]["gpt2_small"]["figures"]
    assert gpt2["mmtx tokens/s"] > 0 and gpt2["nanoGPT"].startswith("not run: --smoke")
    profiled = state["parts"]["profile"]["figures"]
    assert profiled["steps profiled"] == 5 and profiled["ms/step (wall)"] > 0 and profiled["gpu busy"] is None
    rows = (out / "figures.md").read_text().splitlines()
    assert len(rows) == 2 + 8 and all(row.count("|") == 8 for row in rows)
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
    assert again.returncode == 0 and ": done in" not in again.stdout  # every part was already done


def test_bench_gpu_fits_its_parts_to_the_budget():
    """A part that no longer fits is not started; one bounded by trainer.max_time is shortened to fit."""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_gpu

    assert bench_gpu.fit_limit("gpt2_small", 2000) is None  # fits: its own limit
    assert bench_gpu.fit_limit("gpt2_small", 100) == 0  # does not fit, cannot be shortened
    assert bench_gpu.fit_limit("vit_cifar", 300) == 300  # shortened: 300 - 90 s of start-up = 3.5 min of training
    assert "trainer.max_time=00:00:03:30" in bench_gpu.bounded(bench_gpu.PARTS["vit_cifar"][0], 300)
    assert bench_gpu.fit_limit("vit_cifar", 150) == 0  # under two minutes of training left: not run
