"""nanoGPT's CPU configuration of shakespeare_char, trained by mmtx and by nanoGPT itself, same script.

Configuration (nanoGPT README, "I only have a macbook"): character level,
4 layers, 4 heads, dim 128, block 64, batch 12, 2,000 iterations, AdamW
lr 1e-3 (100 warm-up iterations, cosine to 1e-4), weight decay 0.1,
betas (0.9, 0.99), gradient clipping 1.0, no dropout, no biases.

Peer: karpathy/nanoGPT itself (`--nanogpt DIR`, a checkout of
https://github.com/karpathy/nanoGPT), run with its README's CPU command

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

in a copy of DIR whose data/shakespeare_char/ holds the output of its own
prepare.py, run once beforehand on the same input.txt (untimed). nanoGPT
fixes its seed (1337): its repeats differ in time only. After each run,
untimed, this script scores the checkpoint nanoGPT kept (ckpt.pt, the best
by its 20-batch estimate) with nanoGPT's own model.py on the full
validation split.

mmtx: `python -m mmtx.train task=gpt_shakespeare_cpu seed=S`, the command a
user runs, whose test at the end scores the full validation split.

Both run as separate processes, one after the other, seed by seed; a run's
time is its whole process, imports included, from start to exit (mmtx's token
cache and nanoGPT's prepare.py output are built once beforehand). The figure
both are scored on: the mean loss over every non-overlapping 64-token
window of the validation split (the last 10% of the text).

    python scripts/bench_gpt_cpu.py --nanogpt ~/src/nanoGPT [--root ../shared/data] [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

LAYERS, HEADS, DIM, BLOCK, BATCH, ITERS = 4, 4, 128, 64, 12, 2000
TARGET = 1.89
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
               "--log_interval=1", f"--block_size={BLOCK}", f"--batch_size={BATCH}", f"--n_layer={LAYERS}",
               f"--n_head={HEADS}", f"--n_embd={DIM}", f"--max_iters={ITERS}", f"--lr_decay_iters={ITERS}",
               "--dropout=0.0"]


def nanogpt_copy(checkout: Path, text_path: Path, work: Path) -> Path:
    """A copy of the nanoGPT checkout with prepare.py's output for `text_path` (its own prepare.py, untimed)."""
    if not (checkout / "train.py").is_file() or not (checkout / "data" / "shakespeare_char" / "prepare.py").is_file():
        sys.exit(f"{checkout} is not a nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT)")
    copy = work / "nanoGPT"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git", "out*"))
    data = copy / "data" / "shakespeare_char"
    shutil.copyfile(text_path, data / "input.txt")  # prepare.py downloads it only when it is missing
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    return copy


def nanogpt_full_val_loss(copy: Path, ckpt: Path) -> float:
    """The full validation loss of a nanoGPT checkpoint, computed with nanoGPT's own model.py."""
    sys.path.insert(0, str(copy))
    try:
        from model import GPT, GPTConfig  # nanoGPT's model.py
    finally:
        sys.path.remove(str(copy))
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    model.eval()
    val = torch.from_numpy(np.fromfile(copy / "data" / "shakespeare_char" / "val.bin", dtype=np.uint16).astype(np.int64))
    return full_val_loss(lambda w: model(w[:, :-1].contiguous(), w[:, 1:].contiguous())[0], val)  # all T logits


def nanogpt_estimates(log: str) -> dict[int, float]:
    """nanoGPT's 20-batch validation estimates by step, from its log lines."""
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)", log, re.M)}


def full_val_loss(logits_fn, val) -> float:
    """Mean loss over all non-overlapping BLOCK windows of the validation split."""
    n = (len(val) - 1) // BLOCK
    starts = torch.arange(n) * BLOCK
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in starts.split(256):
            w = val[chunk[:, None] + torch.arange(BLOCK + 1)]  # (b, BLOCK + 1)
            logits = logits_fn(w)
            total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
            count += w[:, 1:].numel()
    return total / count


def timed(cmd: list[str], log_path: Path, cwd: Path | None = None) -> tuple[float, float]:
    """Run `cmd` to its end (output to `log_path`); its wall time in seconds and its peak resident memory in GB
    (the process's own high-water mark, from the kernel's accounting when it is reaped: `os.wait4`)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log_path}")
    return seconds, usage.ru_maxrss / 1e6  # Linux: kilobytes


def mmtx_overrides(root: str, cache: str) -> list[str]:
    return [f"data.root={root}", f"paths.cache_dir={cache}", "trainer=cpu", "trainer.enable_progress_bar=false",
            "logger=csv"]


def mmtx_val_curve(run_dir: Path) -> dict[int, float]:
    """val/loss by step from the CSV logger (the in-training estimate: limit_val_batches windows)."""
    curve = {}
    for path in run_dir.glob("**/metrics.csv"):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("val/loss"):
                    curve[int(row["step"]) + 1] = float(row["val/loss"])
    return dict(sorted(curve.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", default=None, metavar="DIR", help="a checkout of karpathy/nanoGPT (the peer)")
    parser.add_argument("--root", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
    parser.add_argument("--only", choices=["mmtx", "peer"], default=None)
    parser.add_argument("--mmtx-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra overrides for mmtx, e.g. tokenizer.pos_embed=learned backbone.rotary=false")
    args = parser.parse_args()
    if args.only != "mmtx" and not args.nanogpt:
        sys.exit("give --nanogpt DIR, a checkout of https://github.com/karpathy/nanoGPT (or --only mmtx)")

    from mmtx.files import resolve_root

    root = resolve_root(args.root)
    text_path = root / "tinyshakespeare" / "input.txt"
    if not text_path.is_file():
        sys.exit(f"{text_path} not found (give --root, or set MMTX_DATA_DIR)")

    from mmtx import compose
    from mmtx.config.wiring import build_data

    work = Path(tempfile.mkdtemp(prefix="mmtx-bench-gpt-"))
    cache = str(work / "cache")
    build_data(compose("gpt_shakespeare_cpu", mmtx_overrides(str(root), cache)))  # mmtx's token cache, and ...
    copy = nanogpt_copy(Path(args.nanogpt).expanduser(), text_path, work) if args.only != "mmtx" else None  # ... nanoGPT's
    results: dict[str, list[dict]] = {"peer": [], "mmtx": []}
    for seed in args.seeds:  # alternate the two, seed by seed, so drift hits both
        if args.only in (None, "peer"):
            out = work / f"peer-{seed}"
            cmd = [sys.executable, "train.py", *NANOGPT_CPU, f"--out_dir={out}"]
            seconds, peak = timed(cmd, work / f"peer-{seed}.log", cwd=copy)
            estimates = nanogpt_estimates((work / f"peer-{seed}.log").read_text())
            results["peer"].append({"seed": seed, "wall_s": seconds, "peak_gb": peak, "estimates": estimates,
                                    "full_val_loss": nanogpt_full_val_loss(copy, out / "ckpt.pt")})
        if args.only in (None, "mmtx"):
            run_dir = work / f"mmtx-{seed}"
            cmd = [sys.executable, "-m", "mmtx.train", "task=gpt_shakespeare_cpu", f"seed={seed}",
                   f"hydra.run.dir={run_dir}", *mmtx_overrides(str(root), cache), *args.mmtx_overrides]
            seconds, peak = timed(cmd, work / f"mmtx-{seed}.log")
            summary = json.loads((run_dir / "summary.json").read_text())
            results["mmtx"].append({"seed": seed, "wall_s": seconds, "peak_gb": peak, "full_val_loss": summary["test/loss"],
                                    "curve": mmtx_val_curve(run_dir)})
    report(results, args.seeds, args.mmtx_overrides)


def report(results: dict[str, list[dict]], seeds: list[int], overrides: list[str]) -> None:
    print(f"threads={torch.get_num_threads()} config: {LAYERS} layers, {HEADS} heads, dim {DIM}, block {BLOCK}, "
          f"batch {BATCH}, {ITERS} iterations; seeds {seeds}; mmtx overrides {overrides or 'none'}")
    for r in results["peer"]:
        curve = ", ".join(f"{step}: {r['estimates'][step]:.3f}" for step in range(500, ITERS + 1, 500))
        print(f"peer (nanoGPT train.py) repeat {r['seed']}: {r['wall_s']:.1f} s wall (process), peak memory "
              f"{r['peak_gb']:.2f} GB, its 20-batch val "
              f"estimate {r['estimates'][ITERS]:.4f}, full validation loss of its ckpt.pt {r['full_val_loss']:.4f}; "
              f"val estimate by step {{{curve}}}")
    for r in results["mmtx"]:
        curve = ", ".join(f"{step}: {loss:.3f}" for step, loss in r["curve"].items())
        print(f"mmtx seed {r['seed']}: {r['wall_s']:.1f} s wall (process), peak memory {r['peak_gb']:.2f} GB, "
              "full validation loss "
              f"{r['full_val_loss']:.4f}; in-training val/loss by step {{{curve}}}")
    for name, runs in results.items():
        if runs:
            mean_s = sum(r["wall_s"] for r in runs) / len(runs)
            mean_loss = sum(r["full_val_loss"] for r in runs) / len(runs)
            print(f"{name} mean: {mean_s:.1f} s, full validation loss {mean_loss:.4f} (target <= {TARGET})")
    if results["peer"] and results["mmtx"]:
        ratio = sum(r["wall_s"] for r in results["mmtx"]) / sum(r["wall_s"] for r in results["peer"])
        print(f"wall-time ratio mmtx/peer (whole processes, all seeds): {ratio:.3f} (target <= 1.0)")
        memory = max(r["peak_gb"] for r in results["mmtx"]) / max(r["peak_gb"] for r in results["peer"])
        print(f"peak memory ratio mmtx/peer (the largest of each): {memory:.3f} (target <= 1.1)")
    print("anchor: nanoGPT's README, validation loss 1.88 (its 20-batch estimate) for this CPU configuration")


if __name__ == "__main__":
    main()
