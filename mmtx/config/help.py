"""`--help` of the entry points, answered before anything heavy is imported (torch, Lightning: seconds).

Each entry module calls `answer_help(name)` above its other imports. The text comes from the config files:
`mmtx.train`'s lists the tasks (the second line of each `conf/task/*.yaml`; files whose name starts with `_`
are shared pieces, not tasks) and the choices of each config group; the other programs' is the
`hydra.help.template` of their own `conf/<name>.yaml`. Hydra's own help stays at `--hydra-help`, and the
whole composed configuration at `--cfg job`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

GROUPS = ("data", "tokenizer", "backbone", "family", "optim", "trainer", "logger", "sweep", "launcher")

TRAIN = """\
usage: python -m mmtx.train [task=NAME] [KEY=VALUE ...]        (or: mmtx-train ...)
       python -m mmtx.train -m [task=NAME] KEY=A,B ...          (a sweep: one run per combination)

Trains a task: its data -> a tokenizer -> the shared transformer backbone -> the task's head, with Lightning.
Every key of the composed configuration can be set as KEY=VALUE; the run folder is outputs/<task>/<time>/.

examples:
  python -m mmtx.train task=vit_cifar_cpu data.root=~/data          # CIFAR-10 on a CPU (about 12 minutes)
  python -m mmtx.train task=gpt_shakespeare trainer.max_steps=2000  # a character GPT on a GPU
  python -m mmtx.train task=vit_cifar logger=[csv,tensorboard]      # several loggers
  python -m mmtx.train -m task=vit_cifar optim.lr=1e-3,3e-4         # a sweep
  python -m mmtx.train task=vit_cifar resume=auto                   # continue the newest run of a task
  python -m mmtx.train task=vit_cifar --cfg job                     # print every key and its value, and stop

tasks (task=NAME, conf/task/NAME.yaml):
{tasks}

config groups (GROUP=CHOICE):
{groups}

more:
  --cfg job            the composed configuration of a command line (add --resolve for resolved values)
  --config-dir DIR     your own configs beside mmtx's (a task of your own: DIR/task/NAME.yaml)
  --hydra-help         Hydra's own options; MMTX_DEBUG=1 shows a traceback behind a one-line error
  then: python -m mmtx.eval --help, mmtx.generate, mmtx.predict, mmtx.export
"""


def _conf() -> Path:
    from mmtx.files import config_dir  # light: no torch

    return Path(config_dir())


def task_summaries(conf: Path) -> list[tuple[str, str]]:
    """(name, one line) of every task: the comment on the second line of its file."""
    rows = []
    for path in sorted((conf / "task").glob("*.yaml")):
        if path.stem.startswith("_"):
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        summary = next((ln.lstrip("# ").strip() for ln in lines[1:2] if ln.startswith("#")), "")
        rows.append((path.stem, summary))
    return rows


def train_help() -> str:
    conf = _conf()
    tasks = task_summaries(conf)
    width = max(len(name) for name, _ in tasks)
    groups = []
    for group in GROUPS:
        choices = sorted(p.stem for p in (conf / group).glob("*.yaml") if not p.stem.startswith("_"))
        groups.append(f"  {group + ':':<10} {', '.join(choices)}")
    return TRAIN.format(tasks="\n".join(f"  {name:<{width}}  {summary}" for name, summary in tasks),
                        groups="\n".join(groups))


def app_help(name: str) -> str:
    """conf/<name>.yaml's help template, its config shown by key instead of Hydra's dump."""
    text = (_conf() / f"{name}.yaml").read_text(encoding="utf-8")
    from omegaconf import OmegaConf

    template = str(OmegaConf.select(OmegaConf.create(text), "hydra.help.template", default="") or "")
    template = template.split("== Config", 1)[0].rstrip()
    keys = [line for line in text.split("\nhydra:", 1)[0].splitlines()
            if line and not line.startswith((" ", "#", "defaults", "-"))]
    return f"{template}\n\nkeys (conf/{name}.yaml):\n" + "\n".join(f"  {line}" for line in keys) + "\n"


def answer_help(name: str) -> None:
    """When this process is `python -m mmtx.<name> --help` (or `mmtx-<name> --help`): print the help, exit 0."""
    args = sys.argv[1:]
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    ours = program in (f"{name}.py", f"mmtx-{name}") or sys.argv[0] == "-m"
    if not ours or not ({"--help", "-h"} & set(args)) or os.environ.get("MMTX_HYDRA_HELP"):
        return
    sys.stdout.write(train_help() if name == "train" else app_help(name))
    sys.stdout.flush()
    raise SystemExit(0)
