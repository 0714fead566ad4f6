"""Two-process DDP (gloo) against one process on the CPU, same task, same global batch, same run.

Trains a small `task=vit_cifar` (dim 128, depth 4, 4x4 patches) for `--steps` optimizer steps
of a global batch of `--batch` images, once as one process and once as two DDP processes
(`trainer=ddp trainer.devices=2`, each with half the batch), and prints the training
throughput each logged (`train/samples_per_sec`, all ranks, averaged over windows of 20 steps,
the first window dropped) and their ratio. Threads: the one process uses all cores; each DDP
rank gets cores / 2 (OMP_NUM_THREADS), so both runs use the same cores.

    python scripts/bench_ddp_cpu.py --root ../shared/data [--steps 100] [--batch 64]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(out: Path, root: str, steps: int, batch: int, ranks: int, name: str) -> tuple[float, float]:
    run_dir = out / name
    args = [
        "task=vit_cifar", f"data.root={root}", "backbone.dim=128", "backbone.depth=4", "backbone.num_heads=4",
        f"data.batch_size={batch // ranks}", f"trainer.max_steps={steps}", "trainer.limit_val_batches=0",
        "test_after_fit=false", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.log_every_n_steps=20",
        "trainer.enable_progress_bar=false", "data.augment.randaugment=null", "callbacks.last_checkpoint=null",
        "callbacks.checkpoint=null", f"paths.cache_dir={out}/cache", f"hydra.run.dir={run_dir}",
        *(["trainer=ddp", f"trainer.devices={ranks}"] if ranks > 1 else ["trainer=cpu"]),
    ]
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // ranks))}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmtx.train", *args], env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    with open(next(run_dir.glob("metrics/*/metrics.csv"))) as f:
        rates = [float(r["train/samples_per_sec"]) for r in csv.DictReader(f) if r.get("train/samples_per_sec")]
    return (statistics.mean(rates[1:] or rates) if rates else float("nan")), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="data root holding cifar10/")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="mmtx-bench-ddp-"))
    run(out, args.root, 2, args.batch, 1, "warm-up")  # builds the data cache, so neither timed run pays for it
    one, wall1 = run(out, args.root, args.steps, args.batch, 1, "one")
    two, wall2 = run(out, args.root, args.steps, args.batch, 2, "ddp2")
    print(f"global batch {args.batch}, {args.steps} steps: 1 process {one:.1f} samples/s ({wall1:.1f} s wall), "
          f"2 DDP processes {two:.1f} samples/s ({wall2:.1f} s wall): DDP/1 = {two / one:.3f}")


if __name__ == "__main__":
    main()
