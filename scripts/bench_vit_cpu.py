"""vit_cifar_cpu on 2 CPU cores: test accuracy, wall time and peak memory, beside the day's machine speed.

1. Trains `task=vit_cifar_cpu` as shipped, `python -m mmtx.train task=vit_cifar_cpu seed=S`, once per seed
   (CIFAR-10 decoded into the benchmark's cache beforehand, untimed), and prints each run's wall time (the
   whole process), its training time (`trainer.fit`: training and validations, summary.json), the peak resident memory of the
   process and the test accuracy on CIFAR-10's 10,000 test images; then their mean and range.
2. With `--nanogpt DIR` (a checkout of karpathy/nanoGPT), runs nanoGPT's own README CPU command once, first,
   as the day's speed reference: this machine's speed drifts by up to 1.5x from one day to the next
   (nanoGPT's CPU run took 78 s one day and 123-193 s on others).

    python scripts/bench_vit_cpu.py --root ../shared/data [--seeds 1 2 3] [--nanogpt ~/src/nanoGPT]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
from pathlib import Path

from benchlib import run_train, warm_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--nanogpt", default=None, metavar="DIR")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every run (exploration only)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmtx-bench-vit-cpu-"))
    if args.nanogpt:
        from bench_gpt_cpu import NANOGPT_CPU, nanogpt_copy, timed

        text = Path(args.root or ".") / "tinyshakespeare" / "input.txt"
        copy = nanogpt_copy(Path(args.nanogpt).expanduser(), text, work)
        seconds = timed([sys.executable, "train.py", *NANOGPT_CPU, f"--out_dir={work / 'peer'}"], work / "peer.log", cwd=copy)
        print(f"speed reference: nanoGPT's README CPU run took {seconds:.1f} s on this machine today")
    warm_cache("vit_cifar_cpu", work, args.root)
    runs = []
    for seed in args.seeds:
        run = run_train("vit_cifar_cpu", seed, work, args.root, tuple(args.extra))
        run["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB, max so far
        runs.append(run)
        print(f"vit_cifar_cpu seed {seed}: test/acc {run['test/acc']:.4f}, {run['wall_s']:.1f} s wall (process), "
              f"fit {run['fit_seconds']:.1f} s, {run['global_step']} steps, peak RSS <= {run['peak_rss_gb']:.2f} GiB",
              flush=True)
    for key in ("test/acc", "wall_s", "fit_seconds"):
        values = [r[key] for r in runs if r[key] is not None]
        if values:
            print(f"vit_cifar_cpu {key} over seeds {args.seeds}: mean {statistics.mean(values):.4f}, "
                  f"range {min(values):.4f}-{max(values):.4f}")
    print(f"peak RSS of any run: {max(r['peak_rss_gb'] for r in runs):.2f} GiB")


if __name__ == "__main__":
    main()
