"""From a composed configuration to the objects of a run: data, model, trainer.

This is the wiring: Hydra instantiates the leaves, and values known only at
run time (the backbone width, the image size, the number of classes) are
passed here as keyword arguments.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from mmtx.checkpoints.io import SINGLE, AtomicCheckpointIO
from mmtx.config.members import CoTrainScore, is_cotrain, member_settings, own_steps, resolved_members, run_members
from mmtx.data.cotrain import CoTrainData
from mmtx.errors import ConfigError, user_error
from mmtx.module import MmtxModule


def instantiate(node: Any, **kwargs: Any) -> Any:
    """Hydra's instantiate, but an mmtx error raised while building (missing data, a bad value) comes out as
    itself, not wrapped in Hydra's InstantiationException."""
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        found = user_error(err)
        if found is not None:
            raise found from None
        cause = err.__cause__
        # What a constructor says about the values it was given (Lightning's Trainer: `devices`, `precision`,
        # `strategy`, a missing package), or a misspelt key (an unexpected keyword argument): one line naming the
        # config node. An error of another kind is a bug, and keeps its traceback.
        if isinstance(cause, (TypeError, ValueError, ImportError)) or type(cause).__name__ == "MisconfigurationException":
            where = re.search(r"full_key: (\S+)", str(err))
            key = where.group(1) if where else "the config"
            hint = ("a key under it is misspelt, added or missing; compare it with python -m mmtx.train task=... "
                    "--cfg job" if "keyword argument" in str(cause) else "change the value named there")
            raise ConfigError(f"{key}: {str(cause).strip()} ({hint})") from None
        raise


def build_data(cfg: DictConfig, **kwargs: Any) -> L.LightningDataModule:
    """The task's data module, prepared and set up (`kwargs` override its config); for a co-training run,
    the members' data modules behind one (`mmtx.config.members.CoTrainData`)."""
    if is_cotrain(cfg):
        configs = resolved_members(cfg)
        members = {name: build_data(member) for name, member in configs.items()}
        settings = member_settings(cfg, configs)
        steps = {name: own_steps(configs[name], members[name]) for name in configs}
        for name, s in settings.items():
            if s["sample_weight"] == "steps" and steps[name] is None:
                raise ConfigError(f"members.{name}.sample_weight=steps: its task sets neither trainer.max_steps nor "
                                  "trainer.max_epochs, so it has no number of steps; give a number")
        weights = {name: steps[name] if s["sample_weight"] == "steps" else s["sample_weight"]
                   for name, s in settings.items()}
        return CoTrainData(members, schedule=cfg.cotrain.schedule, seed=cfg.cotrain.seed, sample_weights=weights,
                           own_steps=steps)
    datamodule = instantiate(cfg.data, _convert_="all", **kwargs)
    if getattr(datamodule, "resident_max_gb", False) is not False:  # data too large to hold is streamed
        datamodule.resident_gpu, datamodule.resident_processes = resident_placement(cfg)
        from mmtx.data.streaming import streamed_if_too_large

        datamodule = streamed_if_too_large(datamodule, OmegaConf.to_container(cfg.data, resolve=True)) or datamodule
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def resident_placement(cfg: DictConfig) -> tuple[bool, int]:
    """Where a device-resident data set of the run `cfg` lives: (on a CUDA GPU, copies in the machine's memory):
    the trainer's accelerator (auto: a GPU when there is one) and its processes on this machine (one a device)."""
    import torch

    trainer = cfg.get("trainer") or {}
    accelerator = str(trainer.get("accelerator", "auto"))
    gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    devices = trainer.get("devices", 1)
    if isinstance(devices, int) and devices > 0:
        processes = devices
    elif not isinstance(devices, str) and hasattr(devices, "__len__"):  # a list of device ids
        processes = len(devices)
    else:  # auto, -1: every GPU, or one process on the CPU
        processes = torch.cuda.device_count() if gpu else 1
    return gpu, max(1, processes)


def build_tokenizer(cfg: DictConfig, runtime: dict[str, Any]) -> Any:
    """The tokenizer of `cfg` for the backbone's width, with its run-time values (the vocabulary, image geometry);
    a text vocabulary's `pad_to_multiple_of` (a setting of the embedding's rows, not of the vocabulary the data
    module builds) goes to the embedding."""
    kwargs = dict(runtime.get("tokenizer", {}))
    if "fields" in kwargs:  # several fields in one sequence: each field's tokenizer, then the fused one over them
        return build_fused_tokenizer(cfg, kwargs.pop("fields"))
    wanted = getattr(get_object(cfg.family._target_), "vocab_tokens", ())  # tokens the family needs ([MASK])
    if wanted and hasattr(kwargs.get("vocab"), "with_tokens"):
        kwargs["vocab"] = kwargs["vocab"].with_tokens(wanted)
    spec = cfg.tokenizer.get("vocab")
    if isinstance(spec, DictConfig) and spec.get("pad_to_multiple_of") is not None:
        kwargs["pad_to_multiple_of"] = spec.pad_to_multiple_of
    return instantiate(cfg.tokenizer, dim=cfg.backbone.dim, **kwargs)


def build_fused_tokenizer(cfg: DictConfig, fields: dict[str, dict[str, Any]]) -> Any:
    """`tokenizer.fields.<name>` for each field the data gives (`fields`: their run-time values), built as a
    tokenizer of its own, then `cfg.tokenizer` (mmtx.tokenizers.fused.FusedTokenizer) over them."""
    spec = cfg.tokenizer.get("fields")
    if spec is None:
        raise ConfigError(f"the data gives samples with the fields {sorted(fields)}, but tokenizer "
                          f"{cfg.tokenizer.get('_target_')} reads one input; use tokenizer=fused with "
                          "tokenizer.fields.<name> for each field")
    missing = sorted(set(fields) - set(spec))
    if missing:
        raise ConfigError(f"data.fields.{missing[0]} has no tokenizer: add tokenizer.fields.{missing[0]} (e.g. "
                          f"/tokenizer@tokenizer.fields.{missing[0]}: patch in the task's defaults)")
    built = {name: instantiate(spec[name], dim=cfg.backbone.dim, **runtime) for name, runtime in fields.items()}
    node = OmegaConf.masked_copy(cfg.tokenizer, [k for k in cfg.tokenizer if k != "fields"])
    return instantiate(node, fields=built, dim=cfg.backbone.dim)


def build_part(cfg: DictConfig, runtime: dict[str, Any], tokenizer: Any = None) -> Any:
    """The task part of `cfg` (its family) on a backbone of `cfg.backbone`: its tokenizer (unless given: a
    tokenizer shared with another member), then its head; an encoder-decoder's decoder stack is the
    backbone's spec with the non-null values of `family.decoder` on top."""
    dim = cfg.backbone.dim
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg, runtime)
    family: dict[str, Any] = dict(runtime.get("family", {}))
    if "decoder" in cfg.family:
        spec = OmegaConf.to_container(cfg.backbone, resolve=True)
        spec.update({k: v for k, v in OmegaConf.to_container(cfg.family.decoder, resolve=True).items() if v is not None})
        family["decoder"] = {k: v for k, v in spec.items() if k != "_target_"}
    return instantiate(cfg.family, tokenizer=tokenizer, dim=dim, **family)


def build_model(cfg: DictConfig, runtime: dict[str, dict[str, Any]]) -> L.LightningModule:
    """The LightningModule of `cfg`, given the run-time values `runtime` = {"tokenizer": kwargs, "family":
    kwargs} (from `datamodule.runtime_kwargs()`: image size, classes, vocabulary, ...); for a co-training
    run, {member: that}: one part per member on the one backbone (a single-task run is the one member `main`).

    Built in data-flow order: the tokenizers, the shared backbone, then the task families' parts (their heads).
    """
    members, settings = run_members(cfg)
    runtimes = runtime if is_cotrain(cfg) else {SINGLE: runtime}
    tokenizers: dict[str, Any] = {}
    for name in sorted(members, key=lambda n: settings[n]["tokenizer_from"] is not None):  # owners before borrowers
        source = settings[name]["tokenizer_from"]
        tokenizers[name] = tokenizers[source] if source else build_tokenizer(members[name], runtimes[name])
    backbone = instantiate(cfg.backbone)
    tasks = {name: build_part(members[name], runtimes[name], tokenizers[name]) for name in members}
    module = cfg.get("module") or {}
    return MmtxModule(
        backbone=backbone,
        tasks=tasks,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        compile=bool(module.get("compile", False)),
        max_nonfinite_steps=int(module.get("max_nonfinite_steps", 10)),
        tf32=bool(module.get("tf32", True)),
        run_config=OmegaConf.to_container(cfg, resolve=True),
        loss_weights={name: s["loss_weight"] for name, s in settings.items()},
    )


def build(task: str | DictConfig = "vit_cifar", overrides: Sequence[str] = ()):
    """The model and data module of a task, built but not trained.

    `task` is a task name (composed with `overrides`, as on the command
    line) or an already composed configuration.

    >>> model, datamodule = build("vit_cifar", ["backbone=tiny"])
    """
    if isinstance(task, str):
        from mmtx.config.compose import compose

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


def build_logger(cfg: DictConfig, run_dir: Path, wandb_id: str | None = None) -> list:
    """Every logger the run names (`logger=[csv,tensorboard,wandb]` composes each under its own key:
    `logger.csv`, `logger.tensorboard`, `logger.wandb`), each writing under the run folder. An empty list:
    logger=none."""
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if not node or "_target_" not in node:
            continue
        extra = {"id": wandb_id} if wandb_id and node._target_ == "mmtx.training.loggers.wandb" else {}
        loggers.append(instantiate(node, save_dir=str(run_dir), **extra))
    return loggers


def build_trainer(cfg: DictConfig, run_dir: Path, wandb_id: str | None = None, **overrides: Any) -> L.Trainer:
    """The Lightning Trainer of `cfg.trainer`, with the run's callbacks and logger, atomic checkpoint writes,
    and how progress shows (mmtx.training.progress): a Rich bar on a terminal, plain log lines in a file or a pipe."""
    from mmtx.training.progress import (
        ModelSummary,
        ProgressBar,
        ProgressLog,
        ValidationLine,
        quiet_lightning,
        stdout_is_terminal,
    )

    quiet_lightning()
    logger = build_logger(cfg, run_dir, wandb_id)
    callbacks = build_callbacks(cfg, run_dir, has_logger=bool(logger))
    if is_cotrain(cfg) and cfg.cotrain.get("best", "mean") == "mean":
        callbacks.insert(0, CoTrainScore(member_settings(cfg, resolved_members(cfg))))
    show_progress = bool(overrides.get("enable_progress_bar", cfg.trainer.get("enable_progress_bar", True)))
    if show_progress:  # a bar on a terminal, lines in a pipe or file; train.log gets the lines either way
        every = cfg.trainer.get("log_every_n_steps") or 50
        terminal = stdout_is_terminal()
        callbacks += [*([ProgressBar()] if terminal else []), ProgressLog(every, to_stdout=not terminal), ValidationLine()]
    if cfg.trainer.get("enable_model_summary", True) is not False:
        callbacks.append(ModelSummary())
    plugins: list[Any] = [AtomicCheckpointIO()]
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        # mmtx handles SLURM's signals itself (mmtx.training.callbacks.stopping_signals: last.ckpt, requeue); Lightning's
        # auto-requeue would save an hpc_ckpt that the requeued job's new run folder never looks for.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    kwargs: dict[str, Any] = dict(
        precision=resolve_precision(cfg.trainer),
        default_root_dir=str(run_dir),
        callbacks=callbacks,
        logger=logger or False,
        plugins=plugins,
    )
    if is_cotrain(cfg) and cfg.trainer.get("strategy") == "ddp" and cfg.cotrain.schedule != "accumulate":
        # One member a step: the other members' parameters get no gradient that step, which DDP must expect.
        # (Every rank trains the same member at a step: the schedule is seeded alike on every rank.)
        kwargs["strategy"] = "ddp_find_unused_parameters_true"
    if cfg.trainer.get("profiler") is None:  # +trainer.profiler=simple|advanced|pytorch profiles as Lightning's does
        from mmtx.training.profiler import NoProfiler

        kwargs["profiler"] = NoProfiler()
    kwargs.update(overrides)
    kwargs["enable_progress_bar"] = show_progress and stdout_is_terminal()  # ProgressLog is not a Lightning bar
    return instantiate(cfg.trainer, **kwargs)
