"""Every GPU figure docs/benchmarks.md lists as unmeasured, in one command, on one GPU, within 30 minutes.

    python scripts/bench_gpu.py --data-root /data                # all parts, attached (about 30 minutes)
    python scripts/bench_gpu.py --data-root /data --detach       # in the background; returns at once
    python scripts/bench_gpu.py --out outputs/bench-gpu --status # poll: what is done, the figures so far
    python scripts/bench_gpu.py --data-root /tmp/tiny --smoke    # every part a few steps on the CPU (a test runs it)

Each part is `python -m mmtx.train task=...` as a user runs it, under its own time limit; its figures are
read from the run's summary.json and logs. The state is kept in `<out>/state.json` after every part, so an
interrupted run (a lost GPU, Ctrl-C) started again with the same --out resumes at the next unfinished
part. The figures go to `<out>/figures.json` and `<out>/figures.md` (ready-to-paste table rows with the
device, versions and date).

Parts (limits are wall time for the whole part, start-up included):
  vit_cifar      task=vit_cifar with torch.compile for 6 minutes: best val/acc, minutes to 92% val/acc
  gpt_60s        task=gpt_shakespeare with torch.compile for 60 s: full validation loss
  gpt2_mfu       the GPT-2-small shape (backbone=base, block 1024, batch 16, BPE) for 200 steps: train/mfu
  audio_60s      task=audio_fsdd for 60 s of training (batch 128): test accuracy
  translate      task=translate_multi30k for 14 minutes of training: test BLEU
  ddp_overhead   vit_cifar for 300 steps, trainer=ddp devices=1 against no strategy: samples/s ratio
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name: (overrides of `python -m mmtx.train`, wall-time limit of the part in seconds)
PARTS: dict[str, tuple[list[str], int]] = {
    "vit_cifar": (["task=vit_cifar", "module.compile=true", "trainer.max_time=00:00:06:00", "logger=tensorboard"], 480),
    "gpt_60s": (["task=gpt_shakespeare", "module.compile=true", "trainer.max_time=00:00:01:00"], 150),
    "gpt2_mfu": (["task=gpt_shakespeare", "backbone=base", "data.block_size=1024", "data.batch_size=16",
                  "module.compile=true", "trainer.max_steps=200", "tokenizer=bpe", "test_after_fit=false",
                  "trainer.limit_val_batches=0"], 240),
    "audio_60s": (["task=audio_fsdd", "trainer.max_time=00:00:01:00", "data.batch_size=128", "trainer.max_epochs=70"],
                  150),  # 50 epochs (the task's own) took 39 s on an H200: 70 fill the minute
    "translate": (["task=translate_multi30k", "trainer.max_time=00:00:14:00"], 960),
    "ddp_overhead": ([], 240),  # two runs, see run_ddp_overhead
}
DDP_RUN = ["task=vit_cifar", "trainer.max_steps=300", "test_after_fit=false", "trainer.limit_val_batches=0"]
# --smoke: a few steps of each part on the CPU, with a tiny model (the data: --data-root in miniature)
SMOKE = ["trainer=cpu", "trainer.max_steps=3", "trainer.max_time=null", "module.compile=false", "backbone.dim=32",
         "backbone.depth=1", "backbone.num_heads=2", "data.batch_size=8", "data.eval_batch_size=8",
         "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.val_check_interval=null",
         "trainer.check_val_every_n_epoch=1", "callbacks.throughput.window=1", "trainer.log_every_n_steps=1"]
SMOKE_PART = {"vit_cifar": ["tokenizer.patch_size=4", "data.augment.randaugment=null"],
              "gpt2_mfu": ["data.block_size=16", "tokenizer.vocab.vocab_size=300", "trainer.limit_val_batches=0"],
              "gpt_60s": ["data.block_size=16"], "translate": ["tokenizer.vocab.vocab_size=300"],
              "ddp_overhead": ["tokenizer.patch_size=4", "data.augment.randaugment=null", "trainer.limit_val_batches=0",
                               "trainer.max_steps=7"]}  # three throughput windows: the first is dropped


def train(out: Path, name: str, overrides: list[str], args, limit: int) -> Path:
    """Run one `python -m mmtx.train` to its end (or its limit); its run folder."""
    run_dir = out / name
    if args.smoke:  # the smoke settings win over the part's own (one value per key)
        merged = {o.split("=", 1)[0]: o for o in overrides}
        for o in SMOKE + SMOKE_PART.get(name.split("-")[0], []):
            if not (o == "trainer=cpu" and "trainer" in merged):  # a part that picks its trainer (ddp) keeps it
                merged[o.split("=", 1)[0]] = o
        overrides = list(merged.values())
    extra = [f"data.root={args.data_root}"] if args.data_root else []
    cmd = [sys.executable, "-m", "mmtx.train", *overrides, f"hydra.run.dir={run_dir}",
           f"paths.cache_dir={out / 'cache'}", "trainer.enable_progress_bar=false", *extra]
    with open(out / f"{name}.log", "w") as log:
        try:
            done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{name} ran past its {limit} s limit; see {out / name}.log") from None
    if done.returncode:
        raise RuntimeError(f"{name} failed ({done.returncode}); see {out / name}.log")
    return run_dir


def csv_rows(run_dir: Path) -> list[dict]:
    rows = []
    for path in run_dir.glob("**/metrics.csv"):
        rows += list(csv.DictReader(open(path)))
    return rows


def tb_scalars(run_dir: Path, tag: str) -> list[tuple[float, float]]:
    """(wall time, value) of a TensorBoard scalar."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for events in run_dir.glob("**/events.out.tfevents*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            points += [(e.wall_time, e.value) for e in acc.Scalars(tag)]
    return sorted(points)


def figures_of(name: str, run_dir: Path, started: float) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    if name == "vit_cifar":
        accs = tb_scalars(run_dir, "val/acc")
        first = next((t for t, v in accs if v >= 0.92), None)
        return {"best val/acc": summary["best_score"], "test/acc": summary.get("test/acc"),
                "minutes to 92% val/acc": round((first - started) / 60, 2) if first else None}
    if name == "gpt_60s":
        return {"full val loss": summary.get("test/loss"), "steps": summary["global_step"]}
    if name == "gpt2_mfu":
        mfu = [float(r["train/mfu"]) for r in csv_rows(run_dir) if r.get("train/mfu")][1:]  # the first window warms up
        tps = [float(r["train/tokens_per_sec"]) for r in csv_rows(run_dir) if r.get("train/tokens_per_sec")][1:]
        return {"mfu": sum(mfu) / len(mfu) if mfu else None, "tokens/s": sum(tps) / len(tps) if tps else None}
    if name == "audio_60s":
        return {"test/acc": summary.get("test/acc"), "steps": summary["global_step"]}
    if name == "translate":
        return {"test/bleu": summary.get("test/bleu"), "steps": summary["global_step"]}
    raise KeyError(name)


def samples_per_sec(run_dir: Path) -> float | None:
    rates = [float(r["train/samples_per_sec"]) for r in csv_rows(run_dir) if r.get("train/samples_per_sec")]
    rates = rates[1:] if len(rates) > 1 else rates  # the first window warms up
    return sum(rates) / len(rates) if rates else None


def run_part(name: str, out: Path, args) -> dict:
    overrides, limit = PARTS[name]
    if name == "ddp_overhead":
        plain = samples_per_sec(train(out, "ddp_overhead-plain", DDP_RUN, args, limit // 2))
        ddp_cmd = [*DDP_RUN, "trainer=ddp", "trainer.devices=1"] + (["trainer.accelerator=cpu"] if args.smoke else [])
        ddp = samples_per_sec(train(out, "ddp_overhead-ddp", ddp_cmd, args, limit // 2))
        return {"samples/s, no strategy": plain, "samples/s, ddp devices=1": ddp,
                "ddp / plain": ddp / plain if plain and ddp else None}
    started = time.time()
    return figures_of(name, train(out, name, overrides, args, limit), started)


def environment() -> dict:
    import torch

    import lightning

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"device": device, "torch": torch.__version__, "lightning": lightning.__version__,
            "mmtx commit": commit.stdout.strip() or None, "date": datetime.date.today().isoformat()}


def write_figures(out: Path, state: dict) -> None:
    env = state["environment"]
    rows = ["| part | figures | wall | device | torch | commit | date |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in PARTS:
        part = state["parts"].get(name)
        if part and part["status"] == "done":
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in part["figures"].items())
            rows.append(f"| {name} | {shown} | {part['seconds']:.0f} s | {env['device']} | {env['torch']} | "
                        f"{env['mmtx commit']} | {env['date']} |")
    (out / "figures.json").write_text(json.dumps(state, indent=1))
    (out / "figures.md").write_text("\n".join(rows) + "\n")


def save(out: Path, state: dict) -> None:
    tmp = out / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, out / "state.json")
    write_figures(out, state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench-gpu", help="state, logs, runs and figures (resumes here)")
    parser.add_argument("--data-root", default=None, help="data root (default: $MMTX_DATA_DIR)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    parser.add_argument("--smoke", action="store_true", help="a few CPU steps of every part (tiny models)")
    parser.add_argument("--detach", action="store_true", help="run in the background; poll with --status")
    parser.add_argument("--status", action="store_true", help="print the state and the figures so far")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.status:
        state = json.loads((out / "state.json").read_text()) if (out / "state.json").is_file() else {"parts": {}}
        print(json.dumps(state.get("parts"), indent=1))
        print((out / "figures.md").read_text() if (out / "figures.md").is_file() else "no figures yet")
        return
    if args.detach:
        argv = [a for a in sys.argv[1:] if a != "--detach"]
        with open(out / "driver.log", "a") as log:
            proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=REPO)
        print(f"running in the background (pid {proc.pid}); poll: python scripts/bench_gpu.py --out {out} --status")
        return
    state = json.loads((out / "state.json").read_text()) if (out / "state.json").is_file() else {"parts": {}}
    state["environment"] = environment()
    for name in args.parts.split(","):
        if name not in PARTS:
            sys.exit(f"unknown part {name!r}; known: {', '.join(PARTS)}")
        if state["parts"].get(name, {}).get("status") == "done":
            continue  # resumed: this part finished earlier
        state["parts"][name] = {"status": "running", "started": time.time()}
        save(out, state)
        t0 = time.time()
        try:
            figures, status = run_part(name, out, args), "done"
        except (RuntimeError, KeyError, FileNotFoundError, ValueError) as err:
            figures, status = {"error": str(err)}, "failed"
        state["parts"][name] = {"status": status, "seconds": time.time() - t0, "figures": figures}
        save(out, state)
        print(f"{name}: {status} in {time.time() - t0:.0f} s: {figures}", flush=True)
    print((out / "figures.md").read_text())


if __name__ == "__main__":
    main()
