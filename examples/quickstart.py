"""mmtx from Python, top to bottom: compose a task, build its model and data, look at a real batch, train a
few steps with a plain Lightning Trainer, evaluate, and generate.

    python examples/quickstart.py --data-root ../shared/data --steps 300

The data root holds tinyshakespeare/input.txt. Everything `python -m mmtx.train task=gpt_shakespeare_cpu`
does (run folder, checkpoints, resume, summary) is left out on purpose: this is the model and the data as
plain Lightning objects.
"""

from __future__ import annotations

import argparse
import tempfile

import lightning as L
import torch

from mmtx import build, compose


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="the folder that holds tinyshakespeare/input.txt")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--work", default=None, help="where the token cache goes (default: a temporary folder)")
    args = parser.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="mmtx-example-")

    # 1. Compose the task as `python -m mmtx.train task=gpt_shakespeare_cpu ...` would, and build it.
    cfg = compose("gpt_shakespeare_cpu", [f"data.root={args.data_root}", f"paths.cache_dir={work}/cache"])
    model, datamodule = build(cfg)  # the LightningModule (backbone + task part) and the LightningDataModule
    print(f"{type(model.task).__name__} on a {cfg.backbone.depth}-layer backbone: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")

    # 2. A real batch outside Lightning. The loaders yield index batches ({"index": ..., "split": ...}); the
    #    samples are gathered (on the device the indices are on) by on_after_batch_transfer, into a typed batch.
    index_batch = next(iter(datamodule.train_dataloader()))
    batch = datamodule.on_after_batch_transfer(index_batch)
    logits = model(batch)  # (B, T, V): the task part runs tokenizer -> backbone -> head
    print(f"{type(batch).__name__}: tokens {tuple(batch.tokens.shape)}, targets {tuple(batch.targets.shape)}; "
          f"logits {tuple(logits.shape)}")

    # 3. Train with a plain Trainer (what mmtx.train adds: run folder, checkpoints, resume, the summary).
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=1, val_check_interval=min(100, args.steps),
                        default_root_dir=work, enable_model_summary=False)
    trainer.fit(model, datamodule=datamodule)

    # 4. Evaluate: the whole validation split (this task's test split).
    metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    print(f"after {args.steps} steps: test/loss {metrics['test/loss']:.3f}, test/bpc {metrics['test/bpc']:.3f}")

    # 5. Generate: the language model's one generation entry.
    generator = torch.Generator().manual_seed(0)
    text = model.task.complete(model.backbone, "First Citizen:", max_new_tokens=120, temperature=0.8, top_k=50,
                               generator=generator)
    print(text)
    return {"metrics": metrics, "text": text}


if __name__ == "__main__":
    main()
