"""Checkpoints that survive being killed mid-write, and finding the one to resume from."""

from __future__ import annotations

import logging
import pickle
import re
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mmtx.errors import CheckpointError, ConfigError, MissingError
from mmtx.files import atomic_save

SINGLE = "main"  # the member name of a run with one task part: its parameters are tasks.main.*
# A checkpoint's own entries; every other `mmtx_*` entry is a task part's (`TaskPart.extra_state`), kept under
# `mmtx_members[name]` for one member as for several.
RUN_ENTRIES = frozenset({"mmtx_config", "mmtx_run_info", "mmtx_wandb_id", "mmtx_members", "mmtx_export",
                         "mmtx_pretrained"})

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, but local files are written to a temporary name beside the target and
    renamed, so a run killed while saving leaves the previous `last.ckpt` intact rather than a truncated one.

    Lightning's own save (`_atomic_save`, Lightning 2.6) writes local files through an fsspec transaction,
    whose temporary file is made in the system temp folder and moved with `shutil.move`: when that folder
    is on another filesystem than the run (a tmpfs /tmp, a network home), the move is a copy into place,
    and a kill during it leaves a partial checkpoint. `os.replace` within one folder is atomic.
    """

    seconds = 0.0  # wall time spent saving, all saves together (mmtx.training.callbacks.Throughput leaves it out)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        start = time.perf_counter()
        try:
            if "://" in str(path):  # remote storage: Lightning's own fsspec path
                return super().save_checkpoint(checkpoint, path, storage_options)
            atomic_save(checkpoint, path)
        finally:
            self.seconds += time.perf_counter() - start


def check_checkpoint(path: str | Path) -> Path:
    """Fail with one clear message if `path` is missing or not a readable checkpoint."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder without mmtx.json: give a checkpoint file (a run's "
                              "checkpoints/*.ckpt) or a folder written by python -m mmtx.export")
    if not path.is_file():
        raise MissingError(f"checkpoint {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:  # torch.save writes a zip archive
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch checkpoint ({err})") from err
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt (member {bad} fails its CRC check)")
    return path


def safe_load(path: str | Path, what: str = "checkpoint", mmap: bool = False) -> Any:
    """`torch.load` restricted to tensors and plain values (`weights_only=True`): a file that needs any
    other global (a class, a function such as `os.system`) is refused, naming the path and the global,
    and nothing in it runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL\s+([\w.]+)", str(err))
        name = found.group(1) if found else "an object that is not a tensor or a plain value"
        raise CheckpointError(
            f"refusing to load {what} {path}: it needs the Python global {name}, and mmtx loads only "
            "tensors and plain values (torch.load weights_only=True), so that no file can run code. "
            "Checkpoints written by mmtx.train never need one; do not use a file from an untrusted source"
        ) from None


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint written by mmtx.train, checked and loaded safely onto the CPU, with its run configuration;
    or a folder written by mmtx.export, read as a checkpoint of weights and configuration only."""
    from mmtx.checkpoints.exported import is_export, load_export

    if is_export(path):
        return load_export(path)
    path = check_checkpoint(path)
    checkpoint = safe_load(path, mmap=mmap)
    if not isinstance(checkpoint, dict) or "mmtx_config" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} has no mmtx run configuration (was it written by mmtx.train?)")
    for key, value in checkpoint.items():
        if key.startswith("mmtx_") and isinstance(value, (dict, list)):
            current_targets(value)
    return with_members(checkpoint)


def with_members(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """`checkpoint` (changed in place) in the one layout of task parts' entries, `mmtx_members` = {member: its
    entries}: a single-task checkpoint written before it (vocabularies and the like at the top level) has them
    moved under `mmtx_members["main"]`."""
    if "mmtx_members" not in checkpoint:
        own = [k for k in checkpoint if k.startswith("mmtx_") and k not in RUN_ENTRIES]
        checkpoint["mmtx_members"] = {SINGLE: {k: checkpoint.pop(k) for k in own}}
    return checkpoint


# Where classes and functions named by `_target_` in a stored run configuration lived before the package layout
# of 2026-12 (mmtx/<module>.py -> a folder named for its role); a checkpoint written before it still loads.
MOVED = {
    "mmtx.callbacks.": "mmtx.training.callbacks.", "mmtx.progress.": "mmtx.training.progress.",
    "mmtx.loggers.": "mmtx.training.loggers.", "mmtx.optim.": "mmtx.training.optim.",
    "mmtx.transfer.": "mmtx.training.transfer.", "mmtx.distributed.": "mmtx.training.distributed.",
    "mmtx.sweep.": "mmtx.config.sweep.", "mmtx.checkpoint.": "mmtx.checkpoints.io.",
    "mmtx.data.sources.": "mmtx.data.image_sources.", "mmtx.generation.": "mmtx.tasks.decoding.",
    "mmtx.cotrain.": "mmtx.config.members.", "mmtx.pretrained.": "mmtx.interop.timm.",
    "mmtx.data.text.StreamingText": "mmtx.data.token_files.StreamingText",
}


def current_targets(config: Any) -> Any:
    """`config` (nested dicts and lists, changed in place) with every `_target_` of an old module path (`MOVED`)
    renamed to where it is now."""
    stack = [config]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if key == "_target_" and isinstance(value, str):
                old = next((o for o in MOVED if value.startswith(o)), None)
                if old is not None:
                    node[key] = MOVED[old] + value[len(old):]
            elif isinstance(value, (dict, list)):
                stack.append(value)
    return config


def cotrained(checkpoint: dict[str, Any]) -> bool:
    """Whether `checkpoint` is a co-training run's (members' configurations stored, or several members)."""
    return "member_configs" in (checkpoint.get("mmtx_config") or {}) or len(checkpoint.get("mmtx_members") or {}) > 1


def member_view(checkpoint: dict[str, Any], member: str | None, path: str | Path) -> dict[str, Any]:
    """The checkpoint as one member's: the shared backbone and `member`'s part (`tasks.<member>.*` ->
    `tasks.main.*`), with that member's configuration (a co-training run's: with the run's trainer) and its
    entries (vocabularies and the like, `mmtx_members[member]`) at the top level, as mmtx.eval, mmtx.generate and
    mmtx.predict read them. `member` may be left out when the checkpoint has one member, and must be for a
    single-task run."""
    members = with_members(checkpoint)["mmtx_members"]
    run = checkpoint["mmtx_config"]
    several = cotrained(checkpoint)
    if not several and member:
        raise ConfigError(f"member={member}: checkpoint {path} is of a single-task run, not a co-training run; "
                          "leave member= out")
    member = member or (next(iter(members)) if len(members) == 1 else None)
    if member not in members:
        what = f"has no member {member!r}" if member else "is a co-training run"
        raise ConfigError(f"checkpoint {path} {what}: pick one of its members with member=NAME "
                          f"(members: {', '.join(members)})")
    config = run
    if "member_configs" in run:
        config = dict(run["member_configs"][member])
        config["trainer"] = run["trainer"]
    prefix = f"tasks.{member}."
    state = {}
    for key, value in checkpoint["state_dict"].items():
        if key.startswith("backbone."):
            state[key] = value
        elif key.startswith(prefix):
            state[f"tasks.{SINGLE}.{key[len(prefix):]}"] = value
    view = {k: v for k, v in checkpoint.items() if k not in ("mmtx_members", "state_dict", "mmtx_config")}
    view.update(members[member])
    view.update(state_dict=state, mmtx_config=config)
    return view


def find_resume(resume: str | None, output_root: str | Path, task_name: str, exclude: Path | None = None,
                own: Path | None = None, job: dict[str, Any] | None = None) -> tuple[str | None, dict[str, Any] | None]:
    """The checkpoint to resume from and its contents (loaded once, safely, memory-mapped): (None, None), an
    explicit path, or `auto` (the task's newest last.ckpt). It must belong to `task_name`.

    `job`: the settings that make this run one job of a sweep (`{"optim.lr": 0.001}`); `auto` then picks only a
    run whose config.yaml has the same values (the same job of an earlier launch of the sweep), never another job's.

    A run whose own folder `own` already holds a `checkpoints/last.ckpt` (a requeued SLURM job, a job started
    again in the same `hydra.run.dir`) continues from it, with `resume` null or `auto`: starting afresh would
    overwrite that run's work at its first save.
    """
    own_last = Path(own) / "checkpoints" / "last.ckpt" if own is not None else None
    if resume in (None, "", False, "auto") and own_last is not None and own_last.is_file():
        log.warning("the run folder %s already holds checkpoints/last.ckpt: continuing that run from it (give the "
                    "new run another folder to start afresh)", own)
        resume = str(own_last)
    if resume in (None, "", False):
        return None, None
    if resume == "auto":
        root = Path(output_root) / task_name
        found = [
            p for p in root.glob("**/checkpoints/last.ckpt")
            if exclude is None or exclude.resolve() not in p.resolve().parents
        ]
        if job and found:
            differs = {p: _job_difference(p.parent.parent / "config.yaml", job) for p in found}
            same = [p for p, difference in differs.items() if difference is None]
            if not same:
                newest = max(found, key=lambda p: p.stat().st_mtime)
                raise MissingError(
                    f"resume=auto in a sweep: none of the {len(found)} earlier run(s) of task {task_name!r} under "
                    f"{root} is this job (the newest, {newest.parent.parent}, {differs[newest]}); a job resumes only "
                    "its own run. Drop resume=auto to start this job afresh, or give it resume=PATH/last.ckpt")
            found = same
        if not found:
            raise MissingError(
                f"resume=auto: no previous run of task {task_name!r} with a checkpoints/last.ckpt under {root}"
            )
        resume = str(max(found, key=lambda p: p.stat().st_mtime))
        log.info("resuming from %s", resume)
    checkpoint = load_checkpoint(resume, mmap=True)
    if checkpoint.get("mmtx_export"):
        raise CheckpointError(f"resume={resume} is an exported model (weights only, no optimizer or data position "
                              f"to continue from): start a new run from its weights with init_from={resume}")
    stored = (checkpoint["mmtx_config"] or {}).get("task_name")
    if stored != task_name:
        raise CheckpointError(
            f"resume={resume} is a checkpoint of task {stored!r}, not of {task_name!r}: resume it with "
            f"task={stored}, or give resume= a checkpoint of {task_name!r}"
        )
    return str(Path(resume).expanduser()), checkpoint


def _job_difference(config: Path, job: dict[str, Any]) -> str | None:
    """None when the run whose resolved configuration is `config` has every value of `job`; else the first
    that differs, as "has optim.lr=0.001 where this job has 0.0003"."""
    from omegaconf import OmegaConf

    try:
        stored = OmegaConf.load(config)
    except (OSError, ValueError):
        return "has no readable config.yaml"
    for key, value in job.items():
        have = OmegaConf.select(stored, key, default=None)
        have = OmegaConf.to_container(have) if OmegaConf.is_config(have) else have
        if have != value:
            return f"has {key}={have} where this job has {value}"
    return None


def check_model_matches(model: torch.nn.Module, stored: dict[str, torch.Tensor], ckpt_path: str) -> None:
    """Fail naming the first parameters whose shapes differ between `model` and the checkpoint's state
    dict `stored` (a run resumed with other model sizes), before Lightning would dump its list of
    mismatched keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(stored))
    unexpected = sorted(set(stored) - set(own))
    shapes = [f"{k}: {tuple(stored[k].shape)} in the checkpoint, {tuple(v.shape)} now"
              for k, v in own.items() if k in stored and tuple(stored[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        detail = "; ".join(shapes[:3] + [f"missing {missing[:3]}"] * bool(missing)
                           + [f"unexpected {unexpected[:3]}"] * bool(unexpected))
        raise CheckpointError(
            f"resume={ckpt_path} holds a model of another shape ({detail}); resume with the configuration it was "
            "trained with (its config.yaml), or start a new run without resume="
        )

