"""`python -m mmtx.train task=vit_cifar [overrides]`: one training run, read top to bottom.

compose config -> seed -> data -> model -> trainer (callbacks, logger) -> fit
(resuming if asked) -> test the best checkpoint -> summary.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.fabric.utilities.distributed import _destroy_dist_connection
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mmtx.cpu import keep_freed_memory
from mmtx.wiring import build_data, build_model, build_trainer
from mmtx.checkpoint import find_resume
from mmtx.data.cache import atomic_write_text
from mmtx.runinfo import run_info
from mmtx.config import config_dir

log = logging.getLogger("mmtx.train")

_DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK")


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train (and test) one run of `cfg` in `run_dir`; return its summary.

    `run_dir` defaults to Hydra's output directory for this job.
    """
    dist_env = {k: os.environ.get(k) for k in _DIST_ENV}
    run_dir = Path(run_dir or _hydra_run_dir())
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = find_resume(cfg.resume, cfg.paths.output_root, cfg.task_name, exclude=run_dir)
    info = run_info(cfg.seed)
    if rank_zero_only.rank == 0:  # other ranks (DDP) share the folder and write nothing here
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_text(run_dir / "run_info.json", json.dumps(info, indent=1))
    _ranks_share_this_job_dir(run_dir)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = build_data(cfg)
    model = build_model(cfg, datamodule.runtime_kwargs())
    model.run_info = info  # stored in every checkpoint
    trainer = build_trainer(cfg, run_dir, wandb_id=_wandb_id(ckpt_path))
    if cfg.get("cpu_keep_freed_memory", True) and trainer.strategy.root_device.type == "cpu":
        keep_freed_memory()
    for logger in trainer.loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "run_info": info})

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

    best = trainer.checkpoint_callback
    best_path = best.best_model_path if best is not None else ""
    test_metrics = {}
    if cfg.test_after_fit and not trainer.fast_dev_run and not trainer.interrupted:
        results = trainer.test(model, datamodule=datamodule, ckpt_path=best_path or None)
        test_metrics = results[0] if results else {}
    summary = {
        "run_dir": str(run_dir),
        "monitor": best.monitor if best is not None else None,
        "best_score": float(best.best_model_score) if best is not None and best.best_model_score is not None else None,
        "best_checkpoint": best_path or None,
        "last_checkpoint": _last_checkpoint(run_dir),
        "global_step": trainer.global_step,
        "resumed_from": ckpt_path,
        **{k: float(v) for k, v in test_metrics.items()},
    }
    if trainer.is_global_zero:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
        _print_summary(summary)
    for logger in trainer.loggers:  # end this run's W&B run: the next job of a multirun starts its own
        if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
            logger.experiment.finish()
    # Close this run's process group and forget the ranks Lightning's launcher set in this process's
    # environment: the next job of a multirun launches its own (it would otherwise wait for ranks that
    # were never started). Values set from outside (torchrun, SLURM) are kept.
    _destroy_dist_connection()
    for key, value in dist_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return summary


def _wandb_id(ckpt_path: str | None) -> str | None:
    """The W&B run id stored in the checkpoint being resumed, if it was logged to W&B."""
    if not ckpt_path:
        return None
    import torch

    return torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("mmtx_wandb_id")


def _ranks_share_this_job_dir(run_dir: Path) -> None:
    """Under a Hydra multirun, make the DDP processes that Lightning launches run this one job, in
    this job's folder.

    Lightning starts ranks > 0 by re-running the command line with `hydra.run.dir` set to the
    parent's `hydra.run.dir`. In a multirun that command line is the whole sweep (`-m`) and that
    folder is not the job's, so each rank would start a sweep of its own and the ranks would wait for
    each other forever. Here the command line becomes this job's overrides and `hydra.run.dir` this
    job's folder.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    if not HydraConfig.initialized() or os.environ.get("LOCAL_RANK") is not None:
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = str(run_dir)


def _hydra_run_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


def _last_checkpoint(run_dir: Path) -> str | None:
    last = run_dir / "checkpoints" / "last.ckpt"
    return str(last) if last.exists() else None


def _print_summary(summary: dict[str, Any]) -> None:
    lines = [f"run directory:   {summary['run_dir']}"]
    if summary["best_score"] is not None:
        lines.append(f"best {summary['monitor']}: {summary['best_score']:.4f}")
    for key, value in summary.items():
        if key.startswith("test/"):
            lines.append(f"{key}:{' ' * max(1, 15 - len(key))}{value:.4f}")
    lines.append(f"best checkpoint: {summary['best_checkpoint'] or '-'}")
    lines.append(f"last checkpoint: {summary['last_checkpoint'] or '-'}")
    print("\n".join(["", "mmtx run summary", *("  " + line for line in lines)]), flush=True)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    summary = train(cfg)
    # Returned to Hydra so sweepers (Optuna) can optimise the monitored metric.
    return summary["best_score"]


if __name__ == "__main__":
    main()
