"""mmtx's framework overhead: a training step through `mmtx.train`'s Trainer (Lightning, mmtx's callbacks, the
guard, clipping, logging) against the same model and optimizer in a plain PyTorch loop written out below.

    python scripts/bench_overhead.py [--runs 5] [--steps 200] [--block 10] [--no-floor]

One process; a tiny language model (dim 32, depth 1, block 32, batch 4) so that the framework, not the
arithmetic, is what is measured. The plain loop runs inside the same training, in blocks of `--block` steps
between blocks of mmtx's steps, on its own copy of the model; both are timed in main-thread CPU time
(`time.thread_time`). Prints each run's median step times and their ratio, then the median ratio of the runs.

Lightning's floor (unless --no-floor): after each mmtx run, the same model and optimizer trained by the least a
Lightning user writes (a LightningModule whose `training_step` returns the loss, `gradient_clip_val`, no logger,
no callbacks, no checkpoints, no progress bar, batches already made), interleaved with the plain loop the same
way: what any Lightning-based trainer pays before it does anything of its own.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


class Interleaved(L.Callback):
    """Times mmtx's steps (from one on_train_batch_start to the next) and, every `block` steps, runs `block` steps
    of the plain loop (not part of mmtx's time)."""

    def __init__(self, plain_step, block: int, warmup: int = 20) -> None:
        self.plain_step, self.block, self.warmup = plain_step, block, warmup
        self.mmtx: list[float] = []
        self.plain: list[float] = []
        self._start: float | None = None
        self._batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.thread_time()
        if self._start is not None and trainer.global_step > self.warmup:
            self.mmtx.append(now - self._start)
        self._batch = batch
        if trainer.global_step > self.warmup and trainer.global_step % (2 * self.block) == 0:
            for _ in range(self.block):  # a block of the plain loop, on the batch mmtx is about to train on
                start = time.thread_time()
                self.plain_step(batch)
                self.plain.append(time.thread_time() - start)
        self._start = time.thread_time()


def plain_loop(module, optim_cfg: dict, clip: float):
    """The same model and AdamW, trained by hand: forward, cross-entropy, backward, clipping, step."""
    from mmtx.training.optim import build_optimizer

    model = copy.deepcopy(module)
    optimizer, schedule = build_optimizer(model, total_steps=10_000, **optim_cfg)
    part, backbone = model.task, model.backbone

    def step(batch) -> None:
        logits = part(backbone, batch)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)

    return step


class BareLightning(L.LightningModule):
    """The least a Lightning user writes for this model: the loss from `training_step`, the optimizer and its
    per-step schedule from `configure_optimizers`; Lightning does the rest."""

    def __init__(self, module, optim_cfg: dict) -> None:
        super().__init__()
        self.model = copy.deepcopy(module)
        self.optim_cfg = optim_cfg

    def training_step(self, batch, batch_idx):
        logits = self.model.task(self.model.backbone, batch)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=-100)

    def configure_optimizers(self):
        from mmtx.training.optim import build_optimizer

        optimizer, schedule = build_optimizer(self.model, total_steps=10_000, **self.optim_cfg)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def lightning_floor(module, optim_cfg: dict, clip: float, batches: list, steps: int, block: int) -> tuple[float, float]:
    """Median step of a bare Lightning training of `module`'s copy, and of the plain loop interleaved with it."""
    timer = Interleaved(plain_loop(module, optim_cfg, clip), block)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, gradient_clip_val=clip, logger=False,
                        callbacks=[timer], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)
    trainer.fit(BareLightning(module, optim_cfg), train_dataloaders=loader)
    return statistics.median(timer.mmtx), statistics.median(timer.plain)


class Batches(L.Callback):
    """Keeps the first `n` training batches mmtx made (for Lightning's floor, which is handed them)."""

    def __init__(self, n: int) -> None:
        self.n, self.batches = n, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if len(self.batches) < self.n:
            self.batches.append(batch)


def run(steps: int, block: int, work: Path, floor: bool = False) -> tuple[float, ...]:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY_TEXT

    from mmtx import compose
    from mmtx.train import train
    import mmtx.config.wiring as wiring

    corpus = work / "corpus.txt"
    corpus.write_text(TINY_TEXT * 4)
    cfg = compose("gpt_shakespeare_cpu", [
        "backbone.dim=32", "backbone.depth=1", "backbone.num_heads=2", "data.block_size=32", "data.batch_size=4",
        "data=text_files", f"data.source.files={corpus}", f"paths.output_root={work}", f"paths.cache_dir={work / 'c'}",
        "trainer=cpu", f"trainer.max_steps={steps}", "trainer.val_check_interval=null", "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false", "test_after_fit=false", "print_config=false", "family.sample_tokens=8",
    ])
    holder: dict = {}
    build_model = wiring.build_model

    def capture(*args, **kwargs):
        model = build_model(*args, **kwargs)
        holder["model"] = model
        return model

    build_callbacks = wiring.build_callbacks

    def with_interleave(*args, **kwargs):
        step = plain_loop(holder["model"], dict(cfg.optim), float(cfg.trainer.gradient_clip_val or 1.0))
        holder["callback"] = Interleaved(step, block)
        holder["batches"] = Batches(steps)
        return [*build_callbacks(*args, **kwargs), holder["callback"], holder["batches"]]

    wiring.build_model, wiring.build_callbacks = capture, with_interleave
    import mmtx.train as train_module

    train_module.build_model = capture
    try:
        train(cfg, run_dir=work / "run")
    finally:
        wiring.build_model, wiring.build_callbacks = build_model, build_callbacks
        train_module.build_model = build_model
    callback = holder["callback"]
    figures = (statistics.median(callback.mmtx), statistics.median(callback.plain))
    if floor:
        batches = holder["batches"].batches
        figures += lightning_floor(holder["model"], dict(cfg.optim), float(cfg.trainer.gradient_clip_val or 1.0),
                                   batches, len(batches), block)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--no-floor", action="store_true", help="skip Lightning's floor")
    args = parser.parse_args()
    torch.set_num_threads(1)  # main-thread time: keep the work on it
    ratios, floors = [], []
    if args.no_floor:
        print("| run | mmtx step (median) | plain step (median) | ratio |\n| --- | --- | --- | --- |", flush=True)
    else:
        print("| run | mmtx step | plain step | ratio | bare Lightning step | plain step | Lightning's floor |\n"
              "| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            figures = run(args.steps, args.block, Path(tmp), floor=not args.no_floor)
        ratios.append(figures[0] / figures[1])
        row = f"| {i + 1} | {figures[0] * 1e3:.2f} ms | {figures[1] * 1e3:.2f} ms | {ratios[-1]:.3f} |"
        if not args.no_floor:
            floors.append(figures[2] / figures[3])
            row += f" {figures[2] * 1e3:.2f} ms | {figures[3] * 1e3:.2f} ms | {floors[-1]:.3f} |"
        print(row, flush=True)
    print(f"\nmedian ratio {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}, {args.runs} runs)")
    if floors:
        print(f"Lightning's floor: median {statistics.median(floors):.3f} (range {min(floors):.3f}-{max(floors):.3f})")


if __name__ == "__main__":
    main()
