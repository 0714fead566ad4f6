"""Images generated as tokens (iGPT), measured with the shipped task run as a user runs it (`python -m mmtx.train
task=igpt_cifar_cpu seed=S`, one process a seed).

    python scripts/bench_igpt.py --root ../shared/data [--seeds 1 2 3] [--steps N] [--rounds 3]

Reports, for each seed and as the mean and range: test bits per dimension (the token loss in bits / 3 colour values
a token stands for), against two baselines on the same quantized test images: the uniform palette (log2 k / 3) and a
unigram model of the palette tokens (the training tokens' frequencies, add-one smoothed: its cross-entropy on the
test tokens / 3). Then, from the first seed's checkpoint, generation speed in tokens a second, with and without the
KV cache, for one image and for a batch of one image a class (alternating, `--rounds` rounds), and a grid of samples
(4 a class) written as a PNG file.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import cli_overrides, run_train, warm_cache


def baselines(work: Path, root: str) -> tuple[float, float]:
    """(uniform, unigram) bits per dimension on the test split's tokens."""
    import torch

    from mmtx import compose
    from mmtx.config.wiring import build_data

    dm = build_data(compose("igpt_cifar_cpu", cli_overrides(work, root)))
    k = dm.palette_size
    train = torch.bincount(dm.splits["train"]["ids"].long().flatten(), minlength=k).double()
    probs = (train + 1) / (train.sum() + k)  # add-one smoothing: every colour possible
    test = dm.splits["test"]["ids"].long().flatten()
    unigram = float(-(probs[test].log2()).mean()) / 3
    return math.log2(k) / 3, unigram


def speed(ckpt: str, rounds: int, out: Path) -> None:
    import torch
    from PIL import Image

    import mmtx

    model = mmtx.load(ckpt, device="cpu")
    task, backbone = model.part, model.module.backbone
    classes = task.class_names or ["<image>"]
    tokens = task.height * task.width
    results: dict[tuple[str, bool], list[float]] = {}
    for r in range(rounds):
        for what, prompts in (("1 image", classes[:1]), (f"{len(classes)} images (one a class)", classes)):
            for cache in (True, False):
                generator = torch.Generator().manual_seed(r)
                t0 = time.perf_counter()
                task.draw(backbone, prompts, 1, temperature=1.0, generator=generator, use_cache=cache)
                rate = len(prompts) * tokens / (time.perf_counter() - t0)
                results.setdefault((what, cache), []).append(rate)
                print(f"round {r}: {what}, KV cache {'on' if cache else 'off'}: {rate:.0f} tokens/s", flush=True)
    for (what, cache), rates in results.items():
        print(f"generation, {what}, KV cache {'on' if cache else 'off'}: mean {statistics.mean(rates):.0f} tokens/s, "
              f"range {min(rates):.0f}-{max(rates):.0f} over {rounds} rounds ({torch.get_num_threads()} threads)")
    grid = task.draw(backbone, classes, 4, temperature=1.0, generator=torch.Generator().manual_seed(0))  # (C*4, 3, H, W)
    c, h, w = len(classes), task.height, task.width
    picture = grid.view(c, 4, 3, h, w).permute(0, 3, 1, 4, 2).reshape(c * h, 4 * w, 3)  # one row of 4 a class
    path = out / "igpt_samples.png"
    Image.fromarray(picture.numpy()).resize((4 * w * 4, c * h * 4), Image.NEAREST).save(path)
    print(f"samples (4 a class, rows in class order {classes}): {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the task's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-igpt-"))
    work.mkdir(parents=True, exist_ok=True)
    warm_cache("igpt_cifar_cpu", work, args.root)  # the palette and the quantized splits, once, untimed
    uniform, unigram = baselines(work, args.root)
    extra = (f"trainer.max_steps={args.steps}",) if args.steps else ()
    runs = []
    for seed in args.seeds:
        run = run_train("igpt_cifar_cpu", seed, work, args.root, extra)
        runs.append(run)
        print(f"seed {seed}: test/bpd {run['test/bpd']:.4f}, test/loss {run['test/loss']:.4f}, {run['global_step']} "
              f"steps, {run['wall_s']:.0f} s", flush=True)
    bpd = [r["test/bpd"] for r in runs]
    print(f"uniform palette: {uniform:.4f} bits per dimension; unigram of the palette tokens: {unigram:.4f}")
    print(f"igpt_cifar_cpu test/bpd: mean {statistics.mean(bpd):.4f}, range {min(bpd):.4f}-{max(bpd):.4f} (seeds "
          f"{list(args.seeds)}: {[round(b, 4) for b in bpd]}); below the unigram by {unigram - statistics.mean(bpd):.4f} "
          f"(range {unigram - max(bpd):.4f}-{unigram - min(bpd):.4f}); wall mean "
          f"{statistics.mean(r['wall_s'] for r in runs):.0f} s")
    speed(runs[0]["last_checkpoint"], args.rounds, work)


if __name__ == "__main__":
    sys.exit(main())
