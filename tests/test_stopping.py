"""Preemption that a scheduler understands (docs/reliability.md): SIGTERM and SIGUSR1 save last.ckpt, write the
summary and exit 128 + the signal; a job started again in its folder continues; under DDP a rank that dies ends the
run at once, named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ENV, REPO, folder_run, make_image_folder
from mmtx.checkpoints.io import load_checkpoint
from test_faults import strict_json, wait_for


def start(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmtx.train", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, **(env or {})})


def paused_run(tmp_path: Path, images: Path, step: int, *extra: str) -> list[str]:
    return ["task=vit_cifar", *folder_run(tmp_path, images), "trainer.max_steps=50", "trainer.limit_val_batches=1",
            "callbacks.last_checkpoint.every_n_steps=100", "+callbacks.pause._target_=conftest.PauseAtStep",
            f"+callbacks.pause.step={step}", f"hydra.run.dir={tmp_path / 'run'}", *extra]


def test_sigterm_saves_last_ckpt_exits_143_and_the_job_started_again_continues(image_folder, tmp_path):
    proc = start(*paused_run(tmp_path, image_folder, 3))
    wait_for("paused", tmp_path / "run", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]  # 143: a job script tells it from success
    summary = strict_json(tmp_path / "run" / "summary.json")
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM" and summary["global_step"] == 3
    assert load_checkpoint(summary["last_checkpoint"])["global_step"] == 3
    assert "interrupted at step 3 by SIGTERM" in out
    # The same command again (a requeued job, its hydra.run.dir fixed): it continues from its own last.ckpt.
    again = subprocess.run([sys.executable, "-m", "mmtx.train", *paused_run(tmp_path, image_folder, 1000)[:-3],
                            "trainer.max_steps=5", f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = strict_json(tmp_path / "run" / "summary.json")
    assert summary["status"] == "finished" and summary["global_step"] == 5
    assert summary["resumed_from"] == str(tmp_path / "run" / "checkpoints" / "last.ckpt")


def test_sigusr1_under_slurm_saves_and_requeues_the_job(image_folder, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # records what it was asked
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    proc = start(*paused_run(tmp_path, image_folder, 2), env=env)
    wait_for("paused", tmp_path / "run", proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1, err[-3000:]
    summary = strict_json(tmp_path / "run" / "summary.json")
    assert summary["signal"] == "SIGUSR1" and load_checkpoint(summary["last_checkpoint"])["global_step"] == 2
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]


@pytest.fixture(scope="module")
def ddp_images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ddp_images"), per_class=(16, 4))


def ddp_ranks(folder: Path, tmp_path: Path, images: Path) -> tuple[subprocess.Popen, dict[int, int]]:
    """A two-rank DDP run (CPU, gloo) paused at step 2 on both ranks; the launcher and {rank: pid}."""
    proc = start(*paused_run(tmp_path, images, 2, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                             "data.batch_size=4", "+callbacks.pause.seconds=300"))
    wait_for("paused", folder, proc)
    wait_for("paused1", folder, proc)
    pids = {0: proc.pid}
    for child in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if b"LOCAL_RANK=1" in environ:
            pids[1] = int(child)
    assert 1 in pids, "rank 1's process not found"
    return proc, pids


def test_a_rank_killed_ends_the_ddp_run_at_once_naming_the_rank(ddp_images, tmp_path):
    proc, pids = ddp_ranks(tmp_path / "run", tmp_path, ddp_images)
    killed = time.time()
    os.kill(pids[1], signal.SIGKILL)  # as the out-of-memory killer would
    _, err = proc.communicate(timeout=60)  # not the collective's timeout (30 min)
    assert time.time() - killed < 60 and proc.returncode != 0
    assert f"rank 1 (process {pids[1]}) was killed by SIGKILL" in err, err[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "rank 1" in summary["error"]


def test_when_rank_zero_dies_the_other_ranks_end_with_it(ddp_images, tmp_path):
    proc, pids = ddp_ranks(tmp_path / "run", tmp_path, ddp_images)
    os.kill(pids[0], signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline and Path(f"/proc/{pids[1]}").exists() and \
            "zombie" not in Path(f"/proc/{pids[1]}/status").read_text():
        time.sleep(0.2)
    assert not Path(f"/proc/{pids[1]}").exists() or "zombie" in Path(f"/proc/{pids[1]}/status").read_text()


def test_sigterm_under_ddp_saves_last_ckpt_on_every_rank_at_the_same_step(ddp_images, tmp_path):
    proc, pids = ddp_ranks(tmp_path / "run", tmp_path, ddp_images)
    os.kill(pids[0], signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    summary = strict_json(tmp_path / "run" / "summary.json")
    assert summary["status"] == "interrupted" and load_checkpoint(summary["last_checkpoint"])["global_step"] == 2
