"""`mmtx.eval`, `mmtx.generate` and `mmtx.predict` as Hydra applications, like `mmtx.train`: their own `conf/<name>.yaml`,
`--help`, `key=value` overrides checked against that file, multirun (`-m ckpt=a.ckpt,b.ckpt`), and the
same one-line errors.

Two things the command line of these programs needs that Hydra's grammar does not give by itself:
free text (`text=A dog, a cat.`: a comma would start a sweep, `${` an interpolation) is quoted for Hydra
before it parses it, and `mmtx.eval` passes keys of the stored run configuration (`data.root=...`),
which its own file cannot list, through as `++key=value`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from mmtx.errors import ConfigError, reported, run_cli
from mmtx.files import config_dir


def hydra_quote(value: str) -> str:
    """`value` as a Hydra quoted string that parses back to exactly `value` (no sweep, no interpolation)."""
    value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)  # backslashes before a quote double
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)  # and so do trailing ones
    return "'" + value.replace("${", "\\${") + "'"


def hydra_argv(argv: Sequence[str], own_keys: Sequence[str], verbatim: Sequence[str] = (),
               pass_through: bool = False) -> list[str]:
    """The command line Hydra should parse: `verbatim` keys' values quoted; with `pass_through`, a
    `key=value` whose first part is not one of `own_keys` is forced in (`++key=value`)."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and not arg.startswith(("-", "++", "~", "hydra.", "hydra/", "+hydra")):
            _check_app_key(key.lstrip("+"), own_keys, pass_through)
        if not sep or arg.startswith(("-", "+", "~", "hydra.", "hydra/")):
            out.append(arg)
        elif key in verbatim and not value.startswith(("'", '"')):
            out.append(f"{key}={hydra_quote(value)}")
        elif pass_through and key.split(".", 1)[0] not in own_keys:
            out.append(f"++{arg}")
        else:
            out.append(arg)
    return out


def _check_app_key(key: str, own_keys: Sequence[str], pass_through: bool) -> None:
    """An inference program's key that it does not have: one line naming the closest of its keys."""
    import difflib

    top = key.split(".", 1)[0]
    if top == "ckpt_path":
        raise ConfigError(f"{key}: this program takes the checkpoint as ckpt=PATH (Lightning's ckpt_path)")
    if top in own_keys or pass_through:  # eval: a key of the stored run (checked against it there)
        return
    close = difflib.get_close_matches(top, own_keys, n=2, cutoff=0.5)
    raise ConfigError(f"{key}: not a key of this program; " + (f"did you mean {' or '.join(close)}? " if close else "")
                      + f"its keys: {', '.join(own_keys)}")


def check_group_overrides(argv: Sequence[str]) -> None:
    """Refuse, in one line, a config group given on the command line as null (`tokenizer=null`, which makes Hydra
    fail with a traceback of its own) or as a choice it does not have (`logger=bogus`, which Hydra answers with its
    search path): the message names the group's choices, and `~group` to drop one. Skipped when the command adds
    config folders of its own (`--config-dir`, `hydra.searchpath`), whose choices mmtx does not know."""
    if any(a.startswith(("--config-dir", "-cd", "hydra.searchpath", "+hydra.searchpath")) for a in argv):
        return
    root = Path(config_dir())
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")
        if not sep or "." in key or not (root / key).is_dir() or re.search(r"[()\[\]{}$*]", value):
            continue
        choices = sorted(p.stem for p in (root / key).glob("*.yaml") if not p.stem.startswith("_"))
        listed = f"conf/{key}/: {', '.join(choices)}"
        if value.strip() in ("null", "None", "~"):
            raise ConfigError(f"{arg}: a config group takes no null on the command line; leave {key} out for its "
                              f"default, drop it with ~{key}, or pick one of {listed}")
        unknown = [v for v in value.split(",") if v.strip() not in choices]  # a sweep lists several
        if unknown:
            raise ConfigError(f"{arg}: {unknown[0].strip()!r} is not a choice of the config group {key}; pick one of "
                              f"{listed}")


def _dotted_keys(node, prefix: str = "") -> list[str]:
    """Every key of a config, dotted (`optim.lr`), interpolations left unresolved."""
    keys = []
    for key in node.keys() if isinstance(node, DictConfig) else []:
        path = f"{prefix}{key}"
        keys.append(path)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_interpolation():
            keys += _dotted_keys(child, f"{path}.")
    return keys


def _takes(target: str, name: str) -> bool:
    """Whether the class or function `target` (a `_target_`) takes a keyword argument `name`."""
    import inspect

    from hydra.utils import get_object

    try:
        params = inspect.signature(get_object(target)).parameters
    except Exception:  # noqa: BLE001 - not importable here: leave the key to the constructor's own check
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def unknown_key(cfg: DictConfig, key: str, adding: bool) -> str | None:
    """Why `key=...` (`+key=...` when `adding`) names nothing `cfg` uses, with the closest existing keys; None when
    it is fine. A `+key` may add what the node's `_target_` takes as a keyword argument (`+trainer.profiler=simple`),
    a new entry of `callbacks` (`+callbacks.mine._target_=...`) or a member's setting (checked by co-training)."""
    import difflib

    if key == "ckpt_path" or key.endswith(".ckpt_path"):
        return (f"{key}: mmtx calls Lightning's ckpt_path `resume`: resume=PATH/last.ckpt continues that run (its "
                "weights, optimizer, schedule and data order), resume=auto this task's newest run; init_from=PATH "
                "starts a new run from a checkpoint's weights")
    parent, _, leaf = key.rpartition(".")
    holder = OmegaConf.select(cfg, parent, default=None, throw_on_missing=False) if parent else cfg
    exists = (isinstance(holder, DictConfig) and leaf in holder.keys()) or (  # keys(): `in` skips ??? values
        isinstance(holder, ListConfig) and leaf.isdigit() and int(leaf) < len(holder))
    if exists:
        return None if not adding else (f"+{key}: {key} is already a key of the run (it is "
                                         f"{OmegaConf.select(cfg, key, throw_on_missing=False)}); set it without "
                                         f"the +: {key}=...")
    if adding:
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        if key.startswith("members.") and key.count(".") >= 2:
            return None  # a member's setting: co-training checks it against the member's own config
        entry = key.rsplit(".", 1)[0]
        if key.startswith("callbacks.") and key.count(".") >= 2 and OmegaConf.select(cfg, entry) is None:
            return None  # a new callback
        if isinstance(node, DictConfig) and "_target_" in node and _takes(str(node._target_), leaf):
            return None
    known = _dotted_keys(cfg)
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6) or difflib.get_close_matches(
        leaf, [k.rpartition(".")[2] for k in siblings], n=3, cutoff=0.5)
    close = [c if "." in c or not parent else f"{parent}.{c}" for c in close]
    close = [c for c in close if c != parent]
    hint = f"did you mean {' or '.join(close)}?" if close else (
        f"{parent or 'the run'} has {', '.join(k.rpartition('.')[2] for k in siblings[:12])}" if siblings else "")
    target = OmegaConf.select(cfg, f"{parent}._target_", default=None) if parent else None
    what = f" and {target} takes no {leaf}" if adding and target else ""
    return (f"{'+' if adding else ''}{key}: not a key of the run{what}; {hint} "
            "(python -m mmtx.train --cfg job lists every key; ++key=value forces one in)").replace(";  (", " (")


def check_keys(argv: Sequence[str], compose_run) -> None:
    """Refuse, in one line, an override on the command line that names no key of the run, also with `+` (which
    Hydra would add and nothing would read): the message names the closest keys. `compose_run(overrides)`
    composes the run from the command line's group choices (`task=`, `backbone=`, ...). Skipped with config
    folders of the user's own (`--config-dir`, `hydra.searchpath`); `++key=value` is never checked."""
    if any(a.startswith(("--config-dir", "-cd", "hydra.searchpath", "+hydra.searchpath", "--help", "-h",
                         "--hydra-help", "--info")) for a in argv):
        return
    root = Path(config_dir())
    groups, keys = [], []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith(("-", "++", "~", "hydra.", "hydra/", "+hydra")):
            continue
        name = key.lstrip("+")
        if "." not in name and ((root / name).is_dir() or name == "task"):
            if re.search(r"[(){}$*]", value):
                return  # a sweep function (range(...), glob(...)): the jobs' groups are not known here
            # a list of choices (logger=[csv,tensorboard]) as it is; a sweep (backbone=tiny,small) by its first
            groups.append(f"{key}={value if value.startswith('[') else value.split(',')[0]}")
        else:
            keys.append((name, key.startswith("+")))
    if not keys:
        return
    cfg = compose_run(groups)
    for name, adding in keys:
        problem = unknown_key(cfg, name, adding)
        if problem:
            raise ConfigError(problem)


def inference_device(name: str) -> str:
    """The device an inference program (generate, predict) runs on: `auto` is the GPU when there is one; a CUDA
    device asked for on a machine without one is one line naming `device=`."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: this machine has no CUDA device; use device=cpu (or auto)")
    return name


def compose_app(name: str, overrides: Sequence[str]) -> DictConfig:
    """`conf/<name>.yaml` with `overrides`, composed as the command line would (for calls from Python)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides))
    except HydraException as err:
        raise ConfigError(f"{' '.join(overrides)}: {err}".replace("\n", " ")) from None
    finally:
        GlobalHydra.instance().clear()


def app_keys(name: str) -> list[str]:
    """The top-level keys of `conf/<name>.yaml` (what the program itself takes)."""
    cfg = OmegaConf.load(Path(config_dir()) / f"{name}.yaml")
    return [k for k in cfg if k not in ("defaults", "hydra")]


def app_defaults(name: str) -> dict:
    """The values `conf/<name>.yaml` gives its own keys (those a call from Python leaves out take these)."""
    cfg = OmegaConf.load(Path(config_dir()) / f"{name}.yaml")
    return {k: cfg[k] for k in app_keys(name) if not OmegaConf.is_missing(cfg, k)}


def passed_through(cfg: DictConfig, name: str) -> DictConfig:
    """The part of `cfg` that is not a key of `conf/<name>.yaml` (the `++key=value` overrides)."""
    own = set(app_keys(name))
    return OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k not in own})


def run_app(name: str, run: Callable[[DictConfig, list[str]], Any], argv: Sequence[str] | None = None,
            verbatim: Sequence[str] = (), pass_through: bool = False) -> Any:
    """The one wrapper of the entry points other than training (`python -m mmtx.<name>`): `run(cfg, overrides)`
    on `conf/<name>.yaml` composed with the arguments (`hydra_argv`: free text quoted, unknown keys named).

    `argv` None: the process's command line, as a Hydra application (`--help`, `-m` multiruns, its output folder),
    a mistake ending it with one line (`reported`). From Python (`argv` a list): composed in-process, `run`'s
    result returned, and a mistake raised."""
    if argv is not None:
        overrides = hydra_argv(argv, app_keys(name), verbatim=verbatim, pass_through=pass_through)
        return run(compose_app(name, overrides), overrides)
    import hydra

    with reported(f"mmtx.{name}"):
        sys.argv = [sys.argv[0], *hydra_argv(sys.argv[1:], app_keys(name), verbatim=verbatim,
                                             pass_through=pass_through)]

    @hydra.main(version_base="1.3", config_path=config_dir(), config_name=name)
    def cli(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        with reported(f"mmtx.{name}"):
            run(cfg, list(HydraConfig.get().overrides.task))

    return run_cli(cli)
