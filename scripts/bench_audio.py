"""audio_fsdd on the CPU: test accuracy within the time budget, and the mel frontend's share of a step.

1. Trains `task=audio_fsdd` as shipped, `python -m mmtx.train task=audio_fsdd seed=S`, once per seed
   (the decoded cache built beforehand, untimed), and prints each run's wall time (the whole process:
   imports, set-up, training, validation, the final test) and test accuracy on the official split
   (takes 0-4, 300 clips), then their mean and range.
2. On a training batch of that task, times the mel frontend (waveform ->
   normalised log-mel frames, SpecAugment included) against a whole training
   step (tokenizer, backbone, head, loss, backward, AdamW update), same process.

    python scripts/bench_audio.py [--root ../shared/data] [--seeds 1 2 3] [--steps 30] [--skip-train]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchlib import cli_overrides, report, run_train, warm_cache
from mmtx import compose
from mmtx.config.wiring import build


def frontend_share(cfg, steps: int) -> None:
    model, dm = build(cfg)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [dm.on_after_batch_transfer(b, 0) for _, b in zip(range(steps), dm.train_dataloader())]
    tok = model.task.tokenizer
    front, step = [], []
    for batch in batches:
        t0 = time.perf_counter()
        tok.frames(batch.audio, batch.lengths)
        front.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        loss = model.task.loss(model(batch), batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step.append(time.perf_counter() - t0)
    f, s = statistics.median(front), statistics.median(step)
    padded = statistics.median(b.audio.shape[1] for b in batches)
    print(f"batches of {len(batches[0])} clips padded to a median {padded:.0f} samples; "
          f"mel frontend {f * 1000:.2f} ms, whole training step {s * 1000:.1f} ms: frontend share {f / s:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmtx-bench-audio-"))
    warm_cache("audio_fsdd", work, args.root)
    if not args.skip_train:
        report("audio_fsdd", [run_train("audio_fsdd", seed, work, args.root) for seed in args.seeds], ["acc"])
    frontend_share(compose("audio_fsdd", cli_overrides(work, args.root)), args.steps)


if __name__ == "__main__":
    main()
