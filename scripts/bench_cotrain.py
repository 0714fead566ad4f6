"""Co-training against the single-task runs of its members, in one run of this script, on this machine.

For every seed: each member trained alone (`python -m mmtx.train task=<member's task> seed=S` with the
member's own overrides and the co-training run's backbone settings, so the single-task model is the member's
model), then the co-training run (`python -m mmtx.train task=cotrain_<name> seed=S`), exactly as a user runs
them. Printed: each run's test metrics, wall time (the whole process) and steps; per member the mean and range
over the seeds, alone and co-trained; the parameters of the co-trained model against the members' models added
up; and the time of a training step by member (median over the run, after its first 20 steps), co-trained
against alone, from the `StepTimes` callback of this file.

`--transfer` adds, for every seed, `asr_fsdd` started from that seed's `audio_fsdd` checkpoint (fsdd:
`init_from=<audio run>/checkpoints/last.ckpt`) or from its co-training run's audio member (multimodal:
`init_from=<cotrain_multimodal run>/checkpoints/last.ckpt finetune.member=audio`, after `asr_fsdd` from scratch
with the co-training run's backbone), everything else as the single-task asr run, and compares its steps to
target with the from-scratch asr run's: the optimizer step of the first validation whose `val/wer` is at most
`--target` (0.02), from each run's metrics.csv, and each run's final test WER.

    python scripts/bench_cotrain.py fsdd --root ../shared/data [--seeds 1 2 3]
    python scripts/bench_cotrain.py multimodal --root ../shared/data [--seeds 1 2 3]
    python scripts/bench_cotrain.py fsdd --root ../shared/data --seeds 1 2 3 --transfer
    python scripts/bench_cotrain.py multimodal --root ../shared/data --seeds 1 --transfer \
        --transfer-extra optim.lr=2e-4 finetune.new_lr=2e-3     (asr_fsdd from the co-trained audio member)
    python scripts/bench_cotrain.py multimodal --root ../shared/data --seeds 1 2 3 --transfer-only \
        --transfer-extra optim.lr=2e-4 finetune.new_lr=2e-3     (the same without the members alone: the transfer only)
    python scripts/bench_cotrain.py fsdd --root ../shared/data --seeds 1 2 3 --transfer --work outputs/bench-fsdd \
        --transfer-extra optim.lr=2e-4 finetune.new_lr=2e-3     (a fine-tuning recipe, beside the runs already there)
    python scripts/bench_cotrain.py fsdd --root DIR --seeds 1 --extra trainer.max_steps=40   (a smoke run)

`--step-overhead ROUNDS` measures the co-training step against the member's step alone in alternating rounds
instead (this machine's speed drifts by a third within an hour, so medians of runs made half an hour apart
carry that drift): every round runs each member alone for `--overhead-steps` steps, then the co-training run
for that many steps a member, then each member alone again in reverse order, each `python -m mmtx.train` with
validation and the test off. A member's step alone is the mean of its two runs around the co-training run, so a
steady drift of the machine's speed cancels. Printed, per member, each round's median step time co-trained /
alone (after the first 20 steps of each run) and the median and mean over the rounds.

    python scripts/bench_cotrain.py fsdd --root ../shared/data --step-overhead 5
    python scripts/bench_cotrain.py multimodal --root ../shared/data --step-overhead 3 --work DIR \
        --cotrain-extra cotrain.schedule=round_robin     (overrides of the co-training runs alone; a new DIR)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
from benchlib import cli_overrides

HERE = Path(__file__).resolve().parent


class StepTimes(L.Callback):
    """Writes the wall time of every training step and the member(s) it trained to `<run>/step_times.json`."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        members = "+".join(batch) if isinstance(batch, dict) else "main"
        self.rows.append((members, time.perf_counter() - self._t0))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            Path(trainer.default_root_dir, "step_times.json").write_text(json.dumps(self.rows))


def run(name: str, args: list[str], work: Path) -> dict:
    """`python -m mmtx.train ARGS` to its end: its summary, `wall_s` and its step times. A run that finished
    in `work` before (`--work`: its summary.json and step_times.json are there) is read back, with the wall time
    kept in `<name>.wall` (None if that is missing)."""
    run_dir = work / name
    wall_file = work / f"{name}.wall"
    if (run_dir / "summary.json").is_file() and (run_dir / "step_times.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary.get("status") == "finished":
            times = json.loads((run_dir / "step_times.json").read_text())
            seconds = float(wall_file.read_text()) if wall_file.is_file() else None
            return {**summary, "wall_s": seconds, "step_times": times}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "mmtx.train", *args, f"hydra.run.dir={run_dir}",
           "+callbacks.step_times._target_=bench_cotrain.StepTimes"]
    t0 = time.perf_counter()
    with open(work / f"{name}.log", "w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}); see {work / f'{name}.log'}")
    summary = json.loads((run_dir / "summary.json").read_text())
    times = json.loads((run_dir / "step_times.json").read_text())
    wall_file.write_text(f"{seconds:.3f}\n")
    return {**summary, "wall_s": seconds, "step_times": times}


def median_step(times: list, member: str = "main", skip: int = 20) -> float:
    values = [t for m, t in times[skip:] if m == member]
    return statistics.median(values) if values else float("nan")


def steps_to(run_dir: Path, key: str, target: float) -> int | None:
    """The step of the first validation whose `key` is at most `target` (metrics.csv of the run's CSV logger)."""
    for path in sorted(run_dir.glob("metrics/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get(key) and float(row[key]) <= target:
                    return int(row["step"]) + 1  # the logged step is the last one trained (0-based)
    return None


def alone_overrides(cfg, member: str) -> list[str]:
    """The overrides that make a member's task, trained alone, the member's model: its own overrides and the
    co-training run's backbone."""
    spec = cfg.members[member]
    return [*(str(o) for o in spec.get("overrides") or []), *backbone_overrides(cfg)]


def backbone_overrides(cfg) -> list[str]:
    """The co-training run's backbone settings, as overrides of a single-task run."""
    from omegaconf import OmegaConf

    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    keep = ("dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "bias", "rotary", "dropout", "attn_dropout", "drop_path")
    return [f"backbone.{k}={backbone[k]}" for k in keep]


def parameters(task: str, overrides: list[str]) -> int:
    from mmtx import compose
    from mmtx.config.members import resolve_cotrain
    from mmtx.config.wiring import build

    model, _ = build(resolve_cotrain(compose(task, overrides)))
    return sum(p.numel() for p in model.parameters())


def wall(r: dict) -> str:
    return "read back, no" if r["wall_s"] is None else f"{r['wall_s']:.1f} s"


def slug(overrides: list[str]) -> str:
    """Overrides as part of a folder name: `optim.lr=2e-4 finetune.new_lr=2e-3` -> `optimlr2e-4-finetunenew_lr2e-3`."""
    return "-".join(o.replace("=", "").replace(".", "").replace("/", "") for o in overrides)


def joint_suffix(cotrain_extra: list[str]) -> str:
    """What `--cotrain-extra` adds to a co-training run's folder name (nothing without it)."""
    return f"-{slug(cotrain_extra)}" if cotrain_extra else ""


def spread(values: list[float]) -> str:
    return f"mean {statistics.mean(values):.4f} (range {min(values):.4f}-{max(values):.4f})"


def step_overhead(cfg, task: str, members: dict[str, str], work: Path, common: list[str], rounds: int,
                  steps: int, cotrain_extra: list[str]) -> None:
    """The co-training step against each member's step alone, in alternating rounds (see the module's text)."""
    short = ["trainer.max_epochs=-1", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
             "test_after_fit=false"]
    ratios: dict[str, list[float]] = {name: [] for name in members}

    def alone(i: int, name: str, when: str) -> float:
        r = run(f"overhead-r{i}-{name}-{when}", [f"task={members[name]}", "seed=1", *common,
                                                 *alone_overrides(cfg, name), *short, f"trainer.max_steps={steps}"], work)
        return median_step(r["step_times"])

    for i in range(1, rounds + 1):
        before = {name: alone(i, name, "before") for name in members}
        r = run(f"overhead-r{i}-{task}{joint_suffix(cotrain_extra)}",
                [f"task={task}", "seed=1", *common, *short, "cotrain.max_steps=null",
                 f"trainer.max_steps={steps * len(members)}", *cotrain_extra], work)
        after = {name: alone(i, name, "after") for name in reversed(members)}
        for name in members:
            solo = (before[name] + after[name]) / 2  # the runs either side: a steady drift cancels
            co = median_step(r["step_times"], name)
            count = sum(1 for m, _ in r["step_times"][20:] if m == name)
            ratios[name].append(co / solo)
            pairs = list(zip(r["step_times"][19:], r["step_times"][20:]))  # (the step before, the step)
            repeat = [t for (before_m, _), (m, t) in pairs if m == name and before_m == name]
            switch = [t for (before_m, _), (m, t) in pairs if m == name and before_m != name]
            split = ", ".join(f"{len(v)} {label} {statistics.median(v) * 1000:.1f} ms"
                              for label, v in (("after its own step", repeat), ("after another member's", switch)) if v)
            print(f"round {i} {name}: alone {before[name] * 1000:.1f} ms before, {after[name] * 1000:.1f} ms after, "
                  f"co-trained {co * 1000:.1f} ms ({count} steps: {split}) ratio {co / solo:.3f}", flush=True)
    for name, values in ratios.items():
        print(f"{name}: co-trained / alone step time, median over {rounds} rounds {statistics.median(values):.3f}, "
              f"mean {statistics.mean(values):.3f} (rounds {', '.join(f'{v:.3f}' for v in values)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["fsdd", "multimodal"])
    parser.add_argument("--root", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--transfer", action="store_true",
                        help="also asr_fsdd initialised from each seed's audio_fsdd checkpoint (fsdd) or from the "
                             "co-training run's audio member (multimodal)")
    parser.add_argument("--transfer-only", action="store_true",
                        help="only the runs the transfer comparison needs: fsdd, no co-training run; multimodal, no "
                             "members alone (and so no co-trained against alone table)")
    parser.add_argument("--target", type=float, default=0.02, help="--transfer: the val/wer to reach")
    parser.add_argument("--transfer-extra", nargs="*", default=[],
                        help="--transfer: overrides of the transfer run alone (a fine-tuning recipe, e.g. "
                             "optim.lr=2e-4 finetune.new_lr=2e-3); its folder is asr-from-audio-<recipe>-seedS")
    parser.add_argument("--work", type=Path, default=None,
                        help="the benchmark's folder (default: a new one in /tmp); runs finished there before "
                             "are read back, not run again, so seeds and recipes can be added to one table")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every run (smoke runs only)")
    parser.add_argument("--cotrain-extra", nargs="*", default=[],
                        help="overrides of the co-training runs alone (e.g. cotrain.schedule=round_robin); their folders "
                             "are <task>-<overrides>-seedS and overhead-rI-<task>-<overrides>")
    parser.add_argument("--step-overhead", type=int, default=0, metavar="ROUNDS",
                        help="measure only the step time co-trained against alone, in this many alternating rounds")
    parser.add_argument("--overhead-steps", type=int, default=100,
                        help="--step-overhead: the steps of a member alone in a round (the co-training run: this "
                             "many per member)")
    args = parser.parse_args()
    args.transfer = args.transfer or args.transfer_only
    from mmtx import compose

    task = f"cotrain_{args.which}"
    cfg = compose(task)
    work = args.work or Path(tempfile.mkdtemp(prefix=f"mmtx-bench-{task}-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"benchmark folder: {work}", flush=True)
    recipe = slug(args.transfer_extra)
    source = "audio_fsdd" if args.which == "fsdd" else f"{task}'s audio member"
    transfer_name = f"asr-from-audio-{recipe}-seed" if recipe else "asr-from-audio-seed"
    common = [*cli_overrides(work, args.root), *args.extra]
    members = {name: str(spec.task) for name, spec in cfg.members.items()}
    metric = {name: f"{name}/test/" for name in members}
    alone: dict[str, list[dict]] = {name: [] for name in members}
    joint: list[dict] = []
    transfer: list[dict] = []
    scratch: list[dict] = []  # --transfer: asr_fsdd from scratch (fsdd: the asr member alone)

    if args.step_overhead:
        step_overhead(cfg, task, members, work, common, args.step_overhead, args.overhead_steps, args.cotrain_extra)
        return

    def transfer_run(name: str, seed: int, init: list[str]) -> dict:
        r = run(name, ["task=asr_fsdd", f"seed={seed}", *init, *common, *backbone_overrides(cfg), *args.transfer_extra],
                work)
        print(f"asr from {source} seed {seed}: {wall(r)} wall, {r['global_step']} steps, test/wer {r['test/wer']:.4f}",
              flush=True)
        return r

    for seed in args.seeds:
        needed = [] if args.transfer_only and args.which == "multimodal" else members  # fsdd: the sources of the transfer
        for name in needed:
            member_task = members[name]
            r = run(f"{name}-seed{seed}", [f"task={member_task}", f"seed={seed}", *common,
                                           *alone_overrides(cfg, name)], work)
            alone[name].append(r)
            shown = {k: round(v, 4) for k, v in r.items() if k.startswith("test/")}
            print(f"{name} alone ({member_task}) seed {seed}: {wall(r)} wall, {r['global_step']} steps, {shown}",
                  flush=True)
        if args.transfer and args.which == "fsdd":
            scratch.append(alone["asr"][-1])
            ckpt = work / f"audio-seed{seed}" / "checkpoints" / "last.ckpt"
            transfer.append(transfer_run(f"{transfer_name}{seed}", seed, [f"init_from={ckpt}"]))
        if not (args.transfer_only and args.which == "fsdd"):
            r = run(f"{task}{joint_suffix(args.cotrain_extra)}-seed{seed}",
                    [f"task={task}", f"seed={seed}", *common, *args.cotrain_extra], work)  # paths reach the members
            joint.append(r)
            shown = {k: round(v, 4) for k, v in r.items() if "/test/" in k}
            print(f"{task} seed {seed}: {wall(r)} wall, {r['global_step']} steps, {shown}", flush=True)
        if args.transfer and args.which == "multimodal":
            r = run(f"asr-seed{seed}", ["task=asr_fsdd", f"seed={seed}", *common, *backbone_overrides(cfg)], work)
            scratch.append(r)
            print(f"asr_fsdd alone seed {seed}: {wall(r)} wall, {r['global_step']} steps, "
                  f"test/wer {r['test/wer']:.4f}", flush=True)
            ckpt = work / f"{task}{joint_suffix(args.cotrain_extra)}-seed{seed}" / "checkpoints" / "last.ckpt"
            transfer.append(transfer_run(f"{transfer_name}{seed}", seed, [f"init_from={ckpt}", "finetune.member=audio"]))

    print(f"\n{task} over seeds {args.seeds}:")
    for name in members if joint and all(alone.values()) else []:
        keys = sorted(k.removeprefix(metric[name]) for k in joint[0] if k.startswith(metric[name]))
        for key in keys:
            solo = [r[f"test/{key}"] for r in alone[name]]
            co = [r[f"{metric[name]}{key}"] for r in joint]
            print(f"  {name} test/{key}: alone {spread(solo)}; co-trained {spread(co)}")
        solo_steps = [r["global_step"] for r in alone[name]]
        co_steps = [sum(1 for m, _ in r["step_times"] if name in m.split("+")) for r in joint]
        print(f"  {name} optimizer steps: alone {statistics.mean(solo_steps):.0f}, co-trained {statistics.mean(co_steps):.0f}")
        a = [median_step(r["step_times"]) for r in alone[name]]
        c = [median_step(r["step_times"], name) for r in joint]
        print(f"  {name} step time: alone {statistics.mean(a) * 1000:.1f} ms, co-trained {statistics.mean(c) * 1000:.1f} ms "
              f"(ratio {statistics.mean(c) / statistics.mean(a):.3f})")
    walls = [i for i in range(len(joint)) if all(alone.values()) and None not in (joint[i]["wall_s"], *(alone[n][i]["wall_s"] for n in members))]
    if walls:
        print(f"  wall per run (seeds with every wall time): co-trained {spread([joint[i]['wall_s'] for i in walls])} s; "
              f"members alone added up {spread([sum(alone[n][i]['wall_s'] for n in members) for i in walls])} s")
    if transfer:
        print(f"  transfer (asr_fsdd from {source}{', ' + ' '.join(args.transfer_extra) if recipe else ''}), "
              f"steps to val/wer <= {args.target}:")
        ratios = []
        for seed, cold, warm in zip(args.seeds, scratch, transfer):
            a = steps_to(work / f"asr-seed{seed}", "val/wer", args.target)
            b = steps_to(work / f"{transfer_name}{seed}", "val/wer", args.target)
            if a and b:
                ratios.append(b / a)
            print(f"    seed {seed}: from scratch {a} steps (test/wer {cold['test/wer']:.4f}), from {source} {b} "
                  f"steps (test/wer {warm['test/wer']:.4f})" + (f", ratio {b / a:.3f}" if a and b else ""))
        print(f"    steps ratio {spread(ratios) if ratios else 'n/a (a run never reached the target)'}; test/wer "
              f"from scratch {spread([r['test/wer'] for r in scratch])}, from {source} "
              f"{spread([r['test/wer'] for r in transfer])}")
    n_joint = parameters(task, [*common, *args.cotrain_extra])
    n_alone = {name: parameters(members[name], [*common, *alone_overrides(cfg, name)]) for name in members}
    print(f"  parameters: co-trained {n_joint:,}; alone {', '.join(f'{n} {v:,}' for n, v in n_alone.items())} "
          f"(added up {sum(n_alone.values()):,}; ratio {n_joint / sum(n_alone.values()):.3f})")


if __name__ == "__main__":
    main()
