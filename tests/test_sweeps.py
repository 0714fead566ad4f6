"""One bad job does not end a sweep (docs/reliability.md): every job of a multirun runs, a failed one is a row of
summary.tsv with its status and error, and the command exits 1 when any job failed; mmtx.eval's multirun too."""

from __future__ import annotations

import re

from conftest import cli, folder_run
from mmtx.files import read_tsv


def test_a_bad_value_and_a_diverging_job_do_not_end_the_sweep(image_folder, tmp_path):
    args = [*folder_run(tmp_path, image_folder), "trainer.max_steps=6", "trainer.limit_val_batches=1",
            "optim.warmup_steps=0", "module.max_nonfinite_steps=1", "trainer.gradient_clip_val=null"]
    proc = cli("mmtx.train", "-m", "task=vit_cifar", *args, "optim.lr=abc,1e30,1e-3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "mmtx.train: error in job 0: optim.lr='abc' is not valid" in proc.stderr
    sweep = next((tmp_path / "outputs" / "vit_cifar" / "multirun").iterdir())
    header, *rows = read_tsv(sweep / "summary.tsv")
    rows = {row[header.index("job")]: dict(zip(header, row)) for row in rows}
    assert sorted(rows) == ["0", "1", "2"]  # every job ran
    assert rows["0"]["status"] == "failed" and "optim.lr='abc' is not valid" in rows["0"]["error"]
    assert rows["1"]["status"] == "diverged" and re.search(r"training stopped at step \d+", rows["1"]["error"])
    assert rows["2"]["status"] == "finished" and rows["2"]["error"] == "" and float(rows["2"]["test/acc"]) >= 0
    assert re.search(r"2 job\(s\) of the multirun failed: job 0: .*; job 1: ", proc.stderr), proc.stderr[-2000:]


def test_an_eval_multirun_runs_every_checkpoint_and_exits_1_if_one_fails(image_folder, tmp_path):
    from mmtx import compose
    from mmtx.train import train

    summary = train(compose("vit_cifar", [*folder_run(tmp_path, image_folder), "trainer.max_steps=1",
                                          "trainer.limit_val_batches=1"]), run_dir=tmp_path / "run")
    missing = tmp_path / "nowhere.ckpt"
    proc = cli("mmtx.eval", "-m", f"ckpt={missing},{summary['last_checkpoint']}",
               env={"MMTX_OUTPUT_DIR": str(tmp_path / "outputs")})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"mmtx.eval: error in job 0: checkpoint {missing} does not exist" in proc.stderr
    assert "test/acc:" in proc.stdout  # job 1 ran
