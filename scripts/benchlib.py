"""What the task benchmarks share: run the shipped task exactly as a user does, `python -m mmtx.train
task=TASK seed=S`, one process per seed, time the whole process, read its summary.json, and report each
seed and the mean and range over the seeds."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def cli_overrides(work: Path, root: str | None) -> list[str]:
    """The benchmarks' overrides: their own cache and output folders, the CPU trainer, no progress bar."""
    extra = ["trainer=cpu", "trainer.enable_progress_bar=false", f"paths.cache_dir={work}/cache",
             f"paths.output_root={work}/outputs"]
    return extra + ([f"data.root={root}"] if root else [])


def run_train(task: str, seed: int, work: Path, root: str | None, extra: tuple[str, ...] = (),
              name: str | None = None) -> dict:
    """`python -m mmtx.train task=TASK seed=SEED ...` to its end: its summary plus `wall_s`, the process time.
    `name`: the run's folder and log under `work` (default: TASK), for several runs of one task."""
    run_dir = work / f"{name or task}-seed{seed}"
    done_file, wall_file = run_dir / "summary.json", work / f"{name or task}-seed{seed}.wall"
    finished = json.loads(done_file.read_text()) if done_file.is_file() and wall_file.is_file() else {}
    if finished.get("status") == "finished":
        # a benchmark started again in the same --work folder goes on from the runs it had finished
        return {"seed": seed, "wall_s": float(wall_file.read_text()), **moved(finished, run_dir)}
    cmd = [sys.executable, "-m", "mmtx.train", f"task={task}", f"seed={seed}", f"hydra.run.dir={run_dir}",
           *cli_overrides(work, root), *extra]
    log = work / f"{name or task}-seed{seed}.log"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}); see {log}")
    wall_file.write_text(f"{wall:.3f}")
    return {"seed": seed, "wall_s": wall, **json.loads((run_dir / "summary.json").read_text())}


def moved(summary: dict, run_dir: Path) -> dict:
    """A finished run's summary with its paths under `run_dir`, where the --work folder was moved since it ran."""
    recorded, run_dir = summary.get("run_dir"), run_dir.resolve()
    if not recorded or Path(recorded) == run_dir:
        return summary
    return {key: str(run_dir / Path(value).relative_to(recorded))
            if isinstance(value, str) and Path(value).is_relative_to(recorded) else value
            for key, value in summary.items()}


def warm_cache(task: str, work: Path, root: str | None) -> None:
    """Decode the task's data into the benchmark's cache once, untimed (every seed then starts warm)."""
    from mmtx import compose
    from mmtx.config.wiring import build_data

    build_data(compose(task, cli_overrides(work, root)))


def report(task: str, runs: list[dict], metrics: list[str], scale: dict[str, float] | None = None) -> None:
    """One line per seed, then the mean and range of the wall time and of each metric."""
    scale = scale or {}
    for r in runs:
        shown = ", ".join(f"test/{m} {r[f'test/{m}'] * scale.get(m, 1):.4f}" for m in metrics)
        print(f"{task} seed {r['seed']}: {r['wall_s']:.1f} s wall (process), {r['global_step']} steps; {shown}")
    for key in ["wall_s", *(f"test/{m}" for m in metrics)]:
        values = [r[key] * scale.get(key.removeprefix("test/"), 1) for r in runs]
        print(f"{task} {key} over seeds {[r['seed'] for r in runs]}: mean {statistics.mean(values):.4f}, "
              f"range {min(values):.4f}-{max(values):.4f}")
