"""Behaviour kept through a refactor: the per-step training losses of short runs of shipped tasks, through
`python -m mmtx.train`, recorded before the change and compared, to the bit, after it.

    python scripts/same_losses.py --root ../shared/data --save /tmp/before.json     # on the old tree
    python scripts/same_losses.py --root ../shared/data --compare /tmp/before.json  # on the new one

Each task runs `--steps` steps (default 20) with its defaults, a train/loss logged at every step, no validation
and no test, its cache in `--cache` (kept between the two runs, so both read the same decoded data). Prints one
line a task: identical, or the first step that differs; exits 1 when any differs.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TASKS = ("gpt_shakespeare_cpu", "audio_fsdd", "vit_cifar_cpu")


def losses(task: str, root: str, cache: str, steps: int) -> list[str]:
    """The run's train/loss at each step, as the CSV logger wrote it (its repr: every digit it kept)."""
    with tempfile.TemporaryDirectory() as run:
        cmd = [sys.executable, "-m", "mmtx.train", f"task={task}", f"data.root={root}", f"paths.cache_dir={cache}",
               f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=0",
               "test_after_fit=false", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{task}: python -m mmtx.train failed:\n{done.stderr[-3000:]}")
        rows = list(csv.DictReader(next(Path(run).rglob("metrics.csv")).open()))
        return [r["train/loss"] for r in rows if r.get("train/loss")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="the data root (../shared/data)")
    parser.add_argument("--cache", default="outputs/same-losses-cache")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--save", help="write the losses here (JSON)")
    parser.add_argument("--compare", help="compare with the losses saved here")
    args = parser.parse_args()
    found = {task: losses(task, args.root, args.cache, args.steps) for task in args.tasks}
    if args.save:
        Path(args.save).write_text(json.dumps(found, indent=1))
    differ = False
    before = json.loads(Path(args.compare).read_text()) if args.compare else {}
    for task, values in found.items():
        if task not in before:
            print(f"{task}: {len(values)} steps, last train/loss {values[-1] if values else None}")
            continue
        first = next((i for i, (a, b) in enumerate(zip(before[task], values)) if a != b), None)
        if first is None and len(values) == len(before[task]):
            print(f"{task}: {len(values)} per-step losses identical to the bit")
        else:
            differ = True
            where = first if first is not None else min(len(values), len(before[task]))
            print(f"{task}: differs at step {where}: {before[task][where:where + 1]} -> {values[where:where + 1]}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
