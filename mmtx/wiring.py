"""From a composed configuration to the objects of a run: data, model, trainer.

This is the wiring: Hydra instantiates the leaves, and values known only at
run time (the backbone width, the image size, the number of classes) are
passed here as keyword arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from mmtx.checkpoint import AtomicCheckpointIO
from mmtx.errors import user_error
from mmtx.module import SINGLE, MmtxModule


def instantiate(node: Any, **kwargs: Any) -> Any:
    """Hydra's instantiate, but an mmtx error raised while building (missing data, a bad value) comes out as
    itself, not wrapped in Hydra's InstantiationException."""
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        found = user_error(err)
        if found is None:
            raise
        raise found from None


def build_data(cfg: DictConfig, **kwargs: Any) -> L.LightningDataModule:
    """The task's data module, prepared and set up (`kwargs` override its config)."""
    datamodule = instantiate(cfg.data, _convert_="all", **kwargs)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def build_model(cfg: DictConfig, runtime: dict[str, dict[str, Any]]) -> L.LightningModule:
    """The LightningModule of `cfg`, given the run-time values `runtime` = {"tokenizer": kwargs, "family":
    kwargs} (from `datamodule.runtime_kwargs()`: image size, classes, vocabulary, ...).

    Built in data-flow order: the tokenizer, the shared backbone, then the task family's part (its
    head; an encoder-decoder's decoder stack is the backbone's spec with the non-null values of
    `family.decoder` on top).
    """
    dim = cfg.backbone.dim
    tokenizer = instantiate(cfg.tokenizer, dim=dim, **runtime.get("tokenizer", {}))
    backbone = instantiate(cfg.backbone)
    family: dict[str, Any] = dict(runtime.get("family", {}))
    if "decoder" in cfg.family:
        spec = OmegaConf.to_container(cfg.backbone, resolve=True)
        spec.update({k: v for k, v in OmegaConf.to_container(cfg.family.decoder, resolve=True).items() if v is not None})
        family["decoder"] = {k: v for k, v in spec.items() if k != "_target_"}
    part = instantiate(cfg.family, tokenizer=tokenizer, dim=dim, **family)
    module = cfg.get("module") or {}
    return MmtxModule(
        backbone=backbone,
        tasks={SINGLE: part},
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        compile=bool(module.get("compile", False)),
        max_nonfinite_steps=int(module.get("max_nonfinite_steps", 10)),
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )


def build(task: str | DictConfig = "vit_cifar", overrides: Sequence[str] = ()):
    """The model and data module of a task, built but not trained.

    `task` is a task name (composed with `overrides`, as on the command
    line) or an already composed configuration.

    >>> model, datamodule = build("vit_cifar", ["backbone=tiny"])
    """
    if isinstance(task, str):
        from mmtx.config import compose

        cfg = compose(task, overrides)
    else:
        cfg = task
    datamodule = build_data(cfg)
    return build_model(cfg, datamodule.runtime_kwargs()), datamodule


def resolve_precision(trainer_cfg: DictConfig) -> str:
    """`precision: auto` -> bf16 autocast where the GPU supports it, else full fp32."""
    if trainer_cfg.precision != "auto":
        return trainer_cfg.precision
    on_gpu = trainer_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def build_callbacks(cfg: DictConfig, run_dir: Path, has_logger: bool = True) -> list[L.Callback]:
    """One Lightning callback per entry of `cfg.callbacks` that has a `_target_` and is not `enabled: false`
    (EMA and early stopping are listed, off, so that `callbacks.ema.enabled=true` turns one on)."""
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or "_target_" not in node or node.get("enabled", True) is False:
            continue
        node = OmegaConf.create({k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "enabled"})
        if not has_logger and node._target_.endswith("LearningRateMonitor"):
            continue  # it has nowhere to write (and Lightning refuses it without a logger)
        extra: dict[str, Any] = {}
        if node._target_.endswith(("ModelCheckpoint", "BestCheckpoint", "LastCheckpoint")):
            extra["dirpath"] = str(run_dir / "checkpoints")
        callbacks.append(instantiate(node, **extra))
    return callbacks


def build_logger(cfg: DictConfig, run_dir: Path, wandb_id: str | None = None):
    node = cfg.get("logger")
    if not node or "_target_" not in node:  # logger=none or ~logger
        return False
    extra = {"id": wandb_id} if wandb_id and node._target_ == "mmtx.loggers.wandb" else {}
    return instantiate(node, save_dir=str(run_dir), **extra)


def build_trainer(cfg: DictConfig, run_dir: Path, wandb_id: str | None = None, **overrides: Any) -> L.Trainer:
    """The Lightning Trainer of `cfg.trainer`, with the run's callbacks and logger, atomic checkpoint writes,
    and how progress shows (mmtx.progress): a Rich bar on a terminal, plain log lines in a file or a pipe."""
    from mmtx.progress import ModelSummary, ProgressBar, ProgressLog, quiet_lightning, stdout_is_terminal

    quiet_lightning()
    logger = build_logger(cfg, run_dir, wandb_id)
    callbacks = build_callbacks(cfg, run_dir, has_logger=bool(logger))
    show_progress = bool(overrides.get("enable_progress_bar", cfg.trainer.get("enable_progress_bar", True)))
    if show_progress:
        callbacks.append(ProgressBar() if stdout_is_terminal() else ProgressLog(cfg.trainer.get("log_every_n_steps") or 50))
    if cfg.trainer.get("enable_model_summary", True) is not False:
        callbacks.append(ModelSummary())
    kwargs: dict[str, Any] = dict(
        precision=resolve_precision(cfg.trainer),
        default_root_dir=str(run_dir),
        callbacks=callbacks,
        logger=logger,
        plugins=[AtomicCheckpointIO()],
    )
    kwargs.update(overrides)
    kwargs["enable_progress_bar"] = show_progress and stdout_is_terminal()  # ProgressLog is not a Lightning bar
    return instantiate(cfg.trainer, **kwargs)
