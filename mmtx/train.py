"""`python -m mmtx.train task=vit_cifar [overrides]`: one training run, read top to bottom.

compose config -> seed -> data -> model -> trainer (callbacks, logger) -> fit
(resuming if asked) -> test the best checkpoint -> summary.
"""

from __future__ import annotations

from mmtx.config.help import answer_help

answer_help("train")  # `--help` is answered here, before the imports below (torch, Lightning) take seconds

import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import hydra
import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mmtx.checkpoints.io import check_model_matches, find_resume
from mmtx.config.apps import check_group_overrides, check_keys
from mmtx.config.compose import claimed_folders, compose, missing_parents
from mmtx.config.members import compose_task, resolve_cotrain, with_total_steps
from mmtx.config.validate import check_run_keys, validate
from mmtx.config.wiring import build_data, build_model, build_trainer
from mmtx.errors import ConfigError, DataError, multirun_job, reported, run_cli
from mmtx.files import atomic_write_text, check_writable, config_dir, remove_written
from mmtx.interop.registry import is_pretrained, load_pretrained, take_architecture
from mmtx.training.callbacks import stopping_signals
from mmtx.training.cpu import keep_freed_memory
from mmtx.training.distributed import die_with_launcher, watch_ranks
from mmtx.training.preflight import check_steps, trained_nothing
from mmtx.training.progress import console_log, print_run_header, quiet_lightning
from mmtx.training.runinfo import run_info
from mmtx.training.summary import finish_wandb, log_final_metrics, print_summary, summarise, write_summary
from mmtx.training.transfer import freeze, init_from, report

log = logging.getLogger("mmtx.train")

_DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK")


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train (and test) one run of `cfg` in `run_dir`; return its summary.

    `run_dir` defaults to Hydra's output directory for this job. The summary is written (and printed)
    however fit ends: finished, stopped by Ctrl-C or a scheduler's signal, diverged or crashed; in those
    last cases the error is raised again afterwards, so the process exits non-zero (a signal: 128 + its number).
    A run that fails before training starts removes the folder it made (and only what it wrote there).
    """
    run_dir = run_dir or _hydra_run_dir()
    if run_dir is None:  # called from Python outside a Hydra application: the mistakes first, then this one
        _checked(cfg)
        raise ConfigError("train(cfg) outside a Hydra application needs run_dir= (the folder of the run)")
    run_dir = Path(os.path.abspath(run_dir))
    made = claimed_folders(run_dir) if run_dir.is_dir() else [run_dir, *missing_parents(run_dir)]
    with _discarded_if_failing(run_dir, made) as started:
        cfg = _checked(cfg)
        check_writable(run_dir, "the run folder", hint="paths.output_root or hydra.run.dir")
        with _restored_dist_env(), console_log(run_dir, rank_zero_only.rank):  # progress + summary in train.log
            return _train(cfg, run_dir, started)


def _checked(cfg: DictConfig) -> DictConfig:
    """The run's configuration with its values checked (before any data is read) and, for a co-training run, every
    member's composed config and the checkpoint's monitor (`resolve_cotrain`)."""
    validate(cfg)
    cfg = resolve_cotrain(cfg)
    check_run_keys(cfg)
    return cfg


def _train(cfg: DictConfig, run_dir: Path, started: Callable[[], None]) -> dict[str, Any]:
    die_with_launcher()  # a rank > 0: ends when rank 0 does
    if rank_zero_only.rank == 0:
        watch_ranks(run_dir)  # a rank that dies ends the run at once, named in a message and the summary
    ckpt_path, resumed = find_resume(cfg.resume, cfg.paths.output_root, cfg.task_name, exclude=run_dir, own=run_dir,
                                     job=_sweep_settings(cfg))
    cfg, datamodule, model, trainer, hparams = _build_run(cfg, run_dir, ckpt_path, resumed)

    started()
    fit_start = time.perf_counter()
    test_metrics = {}
    with stopping_signals(trainer) as stops:  # the final test, too, stops cleanly on a scheduler's signal
        failure = None if cfg.get("eval_only") else _fit(trainer, model, datamodule, ckpt_path)
        fit_seconds = time.perf_counter() - fit_start
        if failure is None and not cfg.get("eval_only"):
            failure = trained_nothing(trainer, resumed)
        if failure is None:
            try:
                test_metrics = _test(cfg, trainer, model, datamodule)
            except (Exception, KeyboardInterrupt, SystemExit) as err:  # the summary is written all the same
                signal.signal(signal.SIGINT, signal.default_int_handler)
                failure = err
    summary = summarise(trainer, run_dir, ckpt_path, test_metrics, failure, stops.signal if failure else None)
    if cfg.get("eval_only") and failure is None:
        summary["status"] = "evaluated"
    summary["fit_seconds"] = round(fit_seconds, 1)  # trainer.fit: training and its validations
    if test_metrics:
        summary["tested"] = "initial" if cfg.get("eval_only") else cfg.get("test_ckpt", "best")
    if trainer.is_global_zero:
        print_summary(summary)  # first: a full disk may refuse the file, not the terminal
        write_summary(run_dir, summary)
        log_final_metrics(trainer, hparams, summary)
    finish_wandb(trainer)
    if failure is not None:
        stops.finish(trainer.is_global_zero)  # stopped by a scheduler's signal: requeue where asked, exit 128 + it
        raise failure
    return summary


def _build_run(cfg: DictConfig, run_dir: Path, ckpt_path: str | None, resumed: dict[str, Any] | None):
    """The run's pieces, in data-flow order, before anything trains: pretrained weights (and what they dictate),
    the run's folder files, the seed, data, model (its `init_from` weights), trainer and logged hyperparameters."""
    pretrained = None
    if is_pretrained(cfg.get("init_from")):  # timm:<name>: loaded, and checked against this run, before any data
        pretrained = load_pretrained(cfg.init_from, (cfg.get("finetune") or {}).get("pretrained_file"))
        take_architecture(cfg, pretrained, _task_alone(cfg))
    info = run_info(cfg.seed)
    if rank_zero_only.rank == 0:  # other ranks (DDP) share the folder and write nothing here
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_text(run_dir / "run_info.json", json.dumps(info, indent=1))
        if cfg.get("print_config", True):
            print_run_header(cfg, run_dir)
    _ranks_share_this_job_dir(run_dir)
    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True)

    datamodule = build_data(cfg)
    cfg = with_total_steps(cfg, datamodule)  # co-training with cotrain.max_steps=sum
    model = build_model(cfg, datamodule.runtime_kwargs())
    _transfer(cfg, model, run_dir, pretrained)
    if resumed is not None:
        check_model_matches(model, resumed["state_dict"], ckpt_path)
    model.run_info = info  # stored in every checkpoint
    wandb_id = resumed.get("mmtx_wandb_id") if resumed is not None else None  # continue that W&B run
    trainer = build_trainer(cfg, run_dir, wandb_id=wandb_id)
    check_steps(cfg, datamodule, trainer.world_size, ckpt_path, resumed)
    if cfg.get("cpu_keep_freed_memory", True) and trainer.strategy.root_device.type == "cpu":
        keep_freed_memory()
    hparams = {**OmegaConf.to_container(cfg, resolve=True), "run_info": info}
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)
    return cfg, datamodule, model, trainer, hparams


def _transfer(cfg: DictConfig, model: L.LightningModule, run_dir: Path, source: dict[str, Any] | None = None) -> None:
    """`init_from`: the checkpoint's (or pretrained `source`'s) matching weights (the table printed and saved),
    the learning rate of the parameters it did not set; `finetune.freeze`: the parts that do not train."""
    finetune = cfg.get("finetune") or {}
    if cfg.get("init_from"):
        result = init_from(model, cfg.init_from, finetune.get("member"), preloaded=source,
                           merge_experts=bool(finetune.get("merge_experts", False)))
        report(result, cfg.init_from, run_dir if rank_zero_only.rank == 0 else None)
        model.new_parameters = set(result["new"])
        model.new_lr = finetune.get("new_lr")
    frozen = freeze(model, list(finetune.get("freeze") or []))
    if frozen:
        log.info("frozen (finetune.freeze=%s): %s parameters", list(finetune.freeze), f"{frozen:,}")


def _task_alone(cfg: DictConfig) -> DictConfig | None:
    """The run's task composed without the command line's overrides: what the task file and the defaults give
    (`take_architecture` tells a value chosen for this run from one the weights may replace); None when the task
    name is not a task file."""
    try:
        return compose_task(cfg.task_name, [])
    except Exception:  # a task_name of the user's own, not a file of conf/task: every value counts as chosen
        return None


def _fit(trainer: L.Trainer, model: L.LightningModule, datamodule, ckpt_path: str | None) -> BaseException | None:
    """Run `trainer.fit`; return what stopped it early (Ctrl-C, divergence, a crash), if anything did.
    (Lightning has already saved last.ckpt through LastCheckpoint.on_exception by then.)"""
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except (Exception, KeyboardInterrupt, SystemExit) as err:  # Lightning turns Ctrl-C into SystemExit(1)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores Ctrl-C from then on
        return err
    return None


def _test(cfg: DictConfig, trainer: L.Trainer, model: L.LightningModule, datamodule) -> dict[str, float]:
    """Test the best checkpoint (else the last weights; `test_ckpt=last`: the last weights) on the test split, if
    the data has one."""
    eval_only = bool(cfg.get("eval_only"))
    if not eval_only and (not cfg.test_after_fit or trainer.fast_dev_run or trainer.interrupted):
        return {}
    if hasattr(datamodule, "has_split") and not datamodule.has_split("test"):
        if eval_only:
            raise DataError("eval_only=true: the data has no test split to test the initial weights on")
        log.warning("the data has no test split: skipping the final test (the validation metrics stand; "
                    "test_after_fit=false silences this)")
        return {}
    best = trainer.checkpoint_callback
    ckpt = None  # the model as it is
    if best is not None and cfg.get("test_ckpt", "best") == "best" and not eval_only:
        ckpt = best.best_model_path
    # verbose=False: the figures are printed once, in the run summary, not also in Lightning's table
    results = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt or None, weights_only=True, verbose=False)
    return {k: v for member in results for k, v in member.items()}  # one dict per loader (co-training: per member)


def _job_failed(message: str) -> None:
    """A job of a multirun that failed before it wrote a summary: its folder gets one (status failed, the error),
    which is its row in the sweep's summary.tsv."""
    folder = _hydra_run_dir()
    run_dir = Path(folder) if folder else None
    if run_dir is None or (run_dir / "summary.json").is_file() or not run_dir.is_dir():
        return
    write_summary(run_dir, {"status": "failed", "error": message, "run_dir": str(run_dir), "monitor": None,
                             "best_score": None, "best_checkpoint": None, "last_checkpoint": None, "global_step": 0,
                             "resumed_from": None})


@contextlib.contextmanager
def _restored_dist_env():
    """Close this run's process group and forget the ranks Lightning's launcher set in this process's
    environment, however the run ends: the next job of a multirun launches its own (it would otherwise
    wait for ranks that were never started). Values set from outside (torchrun, SLURM) are kept."""
    dist_env = {k: os.environ.get(k) for k in _DIST_ENV}
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in dist_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# What a run folder holds before training starts; a run that fails by then leaves no folder behind.
_STARTUP_FILES = (".hydra", "config.yaml", "run_info.json", "train.log")


@contextlib.contextmanager
def _discarded_if_failing(run_dir: Path, made: list[Path]):
    """If the run fails before training starts (a bad value, missing data, a bad checkpoint), remove what it
    wrote in `run_dir` and the folders `made` for it (`run_dir` and its new parents, deepest first), each only if
    nothing else is left in it: never a folder the run did not make, nor a file it did not write. A job of a
    multirun keeps its folder (its summary.json names the error); yields the function that marks the start of
    training."""
    state = {"started": False}
    try:
        yield lambda: state.update(started=True)
    except BaseException:
        if not state["started"] and rank_zero_only.rank == 0 and multirun_job() is None and run_dir in made:
            if remove_written(run_dir, _STARTUP_FILES):
                for parent in made[1:]:
                    with contextlib.suppress(OSError):
                        parent.rmdir()  # only while empty
        raise


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


# Keys a resumed job may change without becoming another job: where it writes, how long it trains, resume itself.
_NOT_THE_JOB = ("resume", "paths.", "hydra.", "trainer.max_", "callbacks.", "print_config", "test_after_fit")


def _sweep_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """In a job of a multirun, the values its command line set (`optim.lr=0.001`; `backbone=small`: each value
    of the group), as this run resolves them, dotted: what makes it this job and not another. None outside one."""
    if multirun_job() is None:
        return None
    from hydra.core.hydra_config import HydraConfig

    settings: dict[str, Any] = {}
    for override in HydraConfig.get().overrides.task:
        key = override.partition("=")[0].lstrip("+~")
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        leaves = ({f"{key}.{k}": v for k, v in _leaves(value).items()} if isinstance(value, DictConfig)
                  else {key: value})
        settings.update({k: v for k, v in leaves.items() if not k.startswith(_NOT_THE_JOB) and k != "task"})
    return settings


def _leaves(node: DictConfig, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in node.keys():
        value = node[key]
        if isinstance(value, DictConfig):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out


def _hydra_run_dir() -> str | None:
    """This Hydra job's output folder; None outside a Hydra application."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _cli(cfg: DictConfig) -> float:
    summary = None
    with reported("mmtx.train", on_job_failure=_job_failed):
        summary = train(cfg)
    # Returned to Hydra so sweepers (Optuna) can optimise the monitored metric; NaN marks a failed job (a trial
    # Optuna records as failed, and the sweep goes on).
    best = summary.get("best_score") if summary else None
    return float("nan") if best is None else best


def _compose_groups(groups: list[str]) -> DictConfig:
    """The run composed from the command line's group choices only (`task=gpt_shakespeare`, `backbone=small`)."""
    task = next((g.split("=", 1)[1] for g in groups if g.startswith("task=")), None)
    rest = [g for g in groups if not g.startswith("task=")]
    return compose(task, rest) if task else compose(overrides=rest)


def main() -> float | None:
    """The command line (`python -m mmtx.train`, `mmtx-train`): one run, or a sweep with `-m`, whose exit status
    is 1 when any of its jobs failed."""
    with reported("mmtx.train"):
        check_group_overrides(sys.argv[1:])
        check_keys(sys.argv[1:], _compose_groups)
    return run_cli(_cli)


if __name__ == "__main__":
    main()
