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
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from mmtx.config import config_dir
from mmtx.errors import ConfigError


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
        if not sep or arg.startswith(("-", "+", "~", "hydra.", "hydra/")):
            out.append(arg)
        elif key in verbatim and not value.startswith(("'", '"')):
            out.append(f"{key}={hydra_quote(value)}")
        elif pass_through and key.split(".", 1)[0] not in own_keys:
            out.append(f"++{arg}")
        else:
            out.append(arg)
    return out


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


def passed_through(cfg: DictConfig, name: str) -> DictConfig:
    """The part of `cfg` that is not a key of `conf/<name>.yaml` (the `++key=value` overrides)."""
    own = set(app_keys(name))
    return OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k not in own})
