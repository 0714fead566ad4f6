"""Count the device reads of each training step: every call that brings a tensor's value to the host
(`item`, `tolist`, `__bool__`, `__float__`, `__int__`, and `cpu` of a tensor that is not already there), by step
and by call site. On a GPU each is a synchronisation that drains the device's queue; the same calls are counted
on the CPU, where they are cheap, so the count is measured here and holds there.

    python scripts/count_syncs.py [--task gpt_shakespeare_cpu] [--steps 12] [--log-every 4] [KEY=VALUE ...]

It trains the task tiny, on its own synthetic-free local data (the text task on a generated corpus), and prints,
for each step, whether it logs or validates and how many device reads it made, then the call sites of the reads
on steps that neither log nor validate (the target is none).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import traceback
from pathlib import Path

import lightning as L
import torch

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu")


class StepReads(L.Callback):
    """Attributes each counted read to the training step during which it happened (between one
    on_train_batch_start and the next), with the step's kind: log, validate or plain."""

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every
        self.steps: list[dict] = []
        self.current: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.current = {"step": trainer.global_step + 1, "reads": collections.Counter(), "validated": False}
        self.steps.append(self.current)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.current is not None:
            self.current["validated"] = True

    def kind(self, entry: dict) -> str:
        if entry["validated"]:
            return "validate"
        return "log" if entry["step"] % self.log_every == 0 else "plain"


def _host_number(tensor: torch.Tensor) -> bool:
    """A value mmtx already read from the device and hands Lightning's `self.log` as a number
    (`mmtx.module.host_number`: a float64 scalar on the CPU). Reading it is no device read on any machine; on this
    one, where every tensor is on the CPU, the dtype is what tells it apart from a device value."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.float64 and tensor.dim() == 0


def _site() -> str:
    """The innermost frame in mmtx, Lightning or torchmetrics: where the read was asked for."""
    frames = traceback.extract_stack()[:-2]
    for frame in reversed(frames):
        for package in ("/mmtx/", "/lightning/", "/torchmetrics/"):
            if package in frame.filename:
                return f"{package.strip('/')}/{frame.filename.split(package)[-1]}:{frame.lineno} ({frame.name})"
    return f"{frames[-1].filename}:{frames[-1].lineno}"


def counting(recorder: StepReads):
    """Patch the reading methods of torch.Tensor; returns a function that restores them."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, original):
        def read(self, *args, **kwargs):
            if recorder.current is not None and not (name == "cpu" and self.device.type == "cpu") \
                    and not _host_number(self):
                recorder.current["reads"][f"{name} at {_site()}"] += 1
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))

    def restore() -> None:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return restore


def count(task: str, steps: int, log_every: int, overrides: list[str], work: Path) -> StepReads:
    """Train `task` tiny for `steps` steps with the reads counted; the recorder holds each step's reads."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import TINY_TEXT, small_run

    from mmtx import compose
    from mmtx.train import train

    corpus = work / "corpus.txt"
    corpus.write_text(TINY_TEXT)
    recorder = StepReads(log_every)
    args = [*small_run(work, modality="text"), "data=text_files", f"data.source.files={corpus}",
            f"trainer.max_steps={steps}", f"trainer.log_every_n_steps={log_every}", "test_after_fit=false",
            "trainer.enable_progress_bar=false", *overrides]
    cfg = compose(task, args)
    import mmtx.config.wiring as wiring

    build = wiring.build_callbacks

    def with_recorder(*a, **k):
        return [*build(*a, **k), recorder]

    wiring.build_callbacks = with_recorder
    restore = counting(recorder)
    try:
        train(cfg, run_dir=work / "run")
    finally:
        restore()
        wiring.build_callbacks = build
    return recorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="gpt_shakespeare_cpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--log-every", type=int, default=4)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recorder = count(args.task, args.steps, args.log_every, args.overrides, Path(tmp))
    print("| step | kind | device reads |\n| --- | --- | --- |")
    for entry in recorder.steps:
        print(f"| {entry['step']} | {recorder.kind(entry)} | {sum(entry['reads'].values())} |")
    plain = collections.Counter()
    for entry in recorder.steps:
        if recorder.kind(entry) == "plain":
            plain.update(entry["reads"])
    print("\nreads on plain steps, by call site:" if plain else "\nno device read on a plain step")
    for site, n in plain.most_common():
        print(f"  {n:4d}  {site}")
    logs = collections.Counter()
    for entry in recorder.steps:
        if recorder.kind(entry) == "log":
            logs.update(entry["reads"])
    print("\nreads on log steps (not validating), by call site:")
    for site, n in logs.most_common():
        print(f"  {n:4d}  {site}")


if __name__ == "__main__":
    main()
