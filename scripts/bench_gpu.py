"""Every GPU figure docs/benchmarks.md lists as unmeasured, in priority order, within a time budget on one GPU.

    python scripts/bench_gpu.py --data-root /data                  # within 12 minutes (--budget-min), attached
    python scripts/bench_gpu.py --data-root /data --detach         # in the background; returns at once
    python scripts/bench_gpu.py --out outputs/bench-gpu --status   # poll: what is done, the figures so far
    python scripts/bench_gpu.py --data-root /tmp/tiny --smoke      # every part a few steps on the CPU (a test runs it)

GPU time comes in stretches of 15 minutes, start-up included: the parts run most informative first, each under
its own wall-time limit, and a part that no longer fits the budget left is not started (it is listed as such).
Each training part is `python -m mmtx.train task=...` as a user runs it; its figures are read from the run's
summary.json and logs. The state is kept in `<out>/state.json` after every part, so a run cut short leaves its
figures, and one started again with the same --out resumes at the next unfinished part. The figures go to
`<out>/figures.json` and `<out>/figures.md` (ready-to-paste table rows with the device, versions and date).

Parts, in order (limits: wall time of the part, start-up included):
  gpt2_small     task=gpt2_small (124 M, bf16, B 16 x T 1,024, synthetic tokens, compiled) for 120 steps beside
                 nanoGPT's own bench.py (same shape: --batch_size=16 --bias=True --real_data=False, compiled),
                 on the same card: MFU of each against the card's dense bf16 peak, and their ratio. nanoGPT is
                 looked for in .gpu/nanoGPT (git-ignored; a checkout of karpathy/nanoGPT, carried to the GPU)
  profile        5 steady steps of the same run under torch.profiler, with torch.cuda.set_sync_debug_mode("warn"):
                 GPU busy fraction, synchronisations and device-to-host copies a step, the attention kernel that
                 ran, GPU time in the loss's and the optimizer's kernels
  vit_cifar      task=vit_cifar, compiled, bounded: minutes to 92% val/acc, or the best it reached
  gpt2_eager     the gpt2_small run without torch.compile (module.compile=false): tokens/s, and compiled / eager
  gpt_60s        task=gpt_shakespeare with torch.compile for 60 s: full validation loss
  audio_60s      task=audio_fsdd for 60 s of training (batch 128): test accuracy
  translate      task=translate_multi30k for 14 minutes of training: test BLEU (beyond a 15-minute loan)
  ddp_overhead   vit_cifar for 300 steps, trainer=ddp devices=1 against no strategy: samples/s ratio
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NANOGPT = REPO / ".gpu" / "nanoGPT"
# Dense bf16 peaks, TFLOP/s (the vendors' datasheets, without sparsity), by a name the device name contains.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0}
NANOGPT_PEAK = 312.0  # nanoGPT's estimate_mfu divides by an A100's 312 TFLOP/s whatever the card

GPT2 = ["task=gpt2_small", "trainer.max_steps=120", "trainer.limit_val_batches=0", "test_after_fit=false",
        "callbacks.throughput.window=20", "trainer.log_every_n_steps=20", "family.sample_tokens=0",
        "data.train_tokens=2097152"]
# name: (overrides of `python -m mmtx.train`, wall-time limit of the part in seconds), in priority order
PARTS: dict[str, tuple[list[str], int]] = {
    "gpt2_small": (GPT2, 300),  # nanoGPT's bench.py and mmtx's run, each about 2 minutes with compilation
    "profile": (GPT2, 180),  # in-process, see profile_worker
    "vit_cifar": (["task=vit_cifar", "module.compile=true", "trainer.max_time=00:00:05:00", "logger=tensorboard"], 390),
    "gpt2_eager": ([*GPT2, "module.compile=false", "trainer.max_steps=80"], 150),  # is compiling worth a default?
    "gpt_60s": (["task=gpt_shakespeare", "module.compile=true", "trainer.max_time=00:00:01:00"], 150),
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
SMOKE_GPT2 = ["data.block_size=16", "data.vocab_size=300", "data.train_tokens=4096", "data.val_tokens=1024",
              "trainer.limit_val_batches=0", "trainer.max_steps=12"]
SMOKE_PART = {"vit_cifar": ["tokenizer.patch_size=4", "data.augment.randaugment=null"],
              "gpt2_small": SMOKE_GPT2, "profile": SMOKE_GPT2, "gpt2_eager": SMOKE_GPT2,
              "gpt_60s": ["data.block_size=16"], "translate": ["tokenizer.vocab.vocab_size=300"],
              "ddp_overhead": ["tokenizer.patch_size=4", "data.augment.randaugment=null", "trainer.limit_val_batches=0",
                               "trainer.max_steps=7"]}  # three throughput windows: the first is dropped
PROFILE_START, PROFILE_STEPS = 40, 5  # steady steps: compiled, warmed up


def with_smoke(name: str, overrides: list[str]) -> list[str]:
    """The part's overrides with the smoke settings on top (one value per key)."""
    merged = {o.split("=", 1)[0]: o for o in overrides}
    for o in SMOKE + SMOKE_PART.get(name.split("-")[0], []):
        if not (o == "trainer=cpu" and "trainer" in merged):  # a part that picks its trainer (ddp) keeps it
            merged[o.split("=", 1)[0]] = o
    return list(merged.values())


def train(out: Path, name: str, overrides: list[str], args, limit: int) -> Path:
    """Run one `python -m mmtx.train` to its end (or its limit); its run folder."""
    run_dir = out / name
    if args.smoke:  # the smoke settings win over the part's own
        overrides = with_smoke(name, overrides)
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
    if name in ("gpt2_small", "gpt2_eager"):
        rows = csv_rows(run_dir)
        mfu = [float(r["train/mfu"]) for r in rows if r.get("train/mfu")][2:]  # windows 1-2: compiling, warming
        tps = [float(r["train/tokens_per_sec"]) for r in rows if r.get("train/tokens_per_sec")][2:]
        return {"mmtx mfu": sum(mfu) / len(mfu) if mfu else None, "mmtx tokens/s": sum(tps) / len(tps) if tps else None}
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


def card_peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def run_nanogpt(out: Path, args, limit: int) -> dict:
    """nanoGPT's own bench.py at GPT-2 small's shape with mmtx's batch (its 20 timed steps after 10 of burn-in);
    its MFU re-expressed against this card's peak (bench.py divides by an A100's)."""
    if args.smoke:
        return {"nanoGPT": "not run: --smoke (bench.py needs a GPU: it calls torch.cuda.synchronize)"}
    if not (NANOGPT / "bench.py").is_file():
        return {"nanoGPT": f"not run: no checkout at {NANOGPT} (git clone https://github.com/karpathy/nanoGPT there)"}
    cmd = [sys.executable, "bench.py", "--batch_size=16", "--block_size=1024", "--bias=True", "--real_data=False",
           "--compile=True", "--profile=False"]
    with open(out / "nanogpt.log", "w") as log:
        try:
            done = subprocess.run(cmd, cwd=NANOGPT, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
        except subprocess.TimeoutExpired:
            return {"nanoGPT": f"ran past {limit} s; see {out / 'nanogpt.log'}"}
    text = (out / "nanogpt.log").read_text()
    found = re.findall(r"time per iteration: ([\d.]+)ms, MFU: ([\d.]+)%", text)
    if done.returncode or not found:
        return {"nanoGPT": f"failed ({done.returncode}); see {out / 'nanogpt.log'}"}
    ms, mfu = float(found[-1][0]), float(found[-1][1]) / 100
    peak = card_peak_tflops()
    return {"nanoGPT ms/step": ms, "nanoGPT tokens/s": 16 * 1024 / (ms / 1000),
            "nanoGPT mfu": mfu * NANOGPT_PEAK / peak if peak else None}


def profile_worker(out_json: Path, overrides: list[str]) -> None:
    """In this process: train `overrides` and profile steps PROFILE_START.. (+PROFILE_STEPS) with torch.profiler and
    the CUDA sync debug mode; write the figures to `out_json`."""
    import warnings

    import lightning as L
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from mmtx import compose
    import mmtx.train as train_module
    import mmtx.config.wiring as wiring

    class ProfileSteps(L.Callback):
        def __init__(self) -> None:
            self.prof = None
            self.caught: list = []
            self._warnings = None
            self.wall = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == PROFILE_START:
                cuda = torch.cuda.is_available()
                if cuda:
                    torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])])
                self.prof.__enter__()
                self._warnings = warnings.catch_warnings(record=True)
                self.caught = self._warnings.__enter__()
                warnings.simplefilter("always")
                if cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                self.wall = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.prof is None or trainer.global_step != PROFILE_START + PROFILE_STEPS:
                return
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.wall
            self._warnings.__exit__(None, None, None)
            self.prof.__exit__(None, None, None)
            events = self.prof.events()
            gpu = [e for e in events if e.device_type == DeviceType.CUDA]
            spans = sorted((e.time_range.start, e.time_range.end) for e in gpu)
            busy, end = 0.0, None  # the union of the kernels' intervals, in microseconds
            for a, b in spans:
                if end is None or a > end:
                    busy, end = busy + (b - a), b
                elif b > end:
                    busy, end = busy + (b - end), b
            syncs = [e for e in events if re.search(r"Synchronize", e.name)]
            d2h = [e for e in gpu if "DtoH" in e.name or "Device -> Pageable" in e.name]
            attention = sorted({e.name for e in gpu if re.search(r"flash|fmha|attention|sdpa|cudnn.*mha", e.name, re.I)})
            loss = sum(e.time_range.elapsed_us() for e in gpu if re.search(r"log_softmax|nll|cross_entropy", e.name, re.I))
            optim = sum(e.time_range.elapsed_us() for e in gpu if re.search(r"adam|multi_tensor", e.name, re.I))
            sync_warnings = [str(w.message).splitlines()[0] for w in self.caught if "synchroniz" in str(w.message)]
            n = PROFILE_STEPS
            figures = {"steps profiled": n, "ms/step (wall)": 1000 * wall / n,
                       "gpu busy": busy / (wall * 1e6) if gpu else None,
                       "synchronisations/step": len(syncs) / n, "device-to-host copies/step": len(d2h) / n,
                       "sync warnings/step": len(sync_warnings) / n, "sync warnings (first)": sync_warnings[:3],
                       "attention kernels": attention[:4], "loss kernels ms/step": loss / 1000 / n,
                       "optimizer kernels ms/step": optim / 1000 / n,
                       "top gpu kernels": [(a.key[:80], round(a.device_time_total / 1000 / n, 3)) for a in sorted(
                           self.prof.key_averages(), key=lambda a: -a.device_time_total)[:8]] if gpu else []}
            out_json.write_text(json.dumps(figures, indent=1))
            self.prof = None

    callback = ProfileSteps()
    build_callbacks = wiring.build_callbacks
    wiring.build_callbacks = lambda *a, **k: [*build_callbacks(*a, **k), callback]
    train_module.build_callbacks = wiring.build_callbacks
    steps = PROFILE_START + PROFILE_STEPS + 1
    cfg = compose(overrides[0].split("=", 1)[1], [*overrides[1:], f"trainer.max_steps={steps}"])
    train_module.train(cfg, run_dir=out_json.parent / "profile-run")
    if not out_json.is_file():
        sys.exit(f"the run ended before step {PROFILE_START + PROFILE_STEPS}")


def run_profile(out: Path, overrides: list[str], args, limit: int) -> dict:
    if args.smoke:
        overrides = with_smoke("profile", overrides)
    extra = [f"data.root={args.data_root}"] if args.data_root else []
    target = out / "profile.json"
    cmd = [sys.executable, __file__, "--profile-worker", str(target), "--", *overrides,
           f"paths.cache_dir={out / 'cache'}", "trainer.enable_progress_bar=false", *extra]
    with open(out / "profile.log", "w") as log:
        try:
            done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"profile ran past its {limit} s limit; see {out / 'profile.log'}") from None
    if done.returncode or not target.is_file():
        raise RuntimeError(f"profile failed ({done.returncode}); see {out / 'profile.log'}")
    return json.loads(target.read_text())


MAX_TIME_MARGIN = 90  # seconds a time-bounded part takes beyond its trainer.max_time: start-up, compiling, the test


def fit_limit(name: str, left: float) -> int | None:
    """The limit a part runs under with `left` seconds of the budget: its own (None) when it fits, a shorter one
    when it is bounded by trainer.max_time and at least two minutes of training fit, else 0 (not run)."""
    overrides, limit = PARTS[name]
    if limit <= left:
        return None
    if any(o.startswith("trainer.max_time=") for o in overrides) and left - MAX_TIME_MARGIN >= 120:
        return int(left)
    return 0


def bounded(overrides: list[str], limit: int) -> list[str]:
    """`overrides` with trainer.max_time shortened to fit `limit` seconds."""
    seconds = max(60, limit - MAX_TIME_MARGIN)
    max_time = f"trainer.max_time=00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    return [max_time if o.startswith("trainer.max_time=") else o for o in overrides]


def run_part(name: str, out: Path, args, limit: int | None = None) -> dict:
    overrides, own_limit = PARTS[name]
    if limit is not None and limit < own_limit:  # shortened to fit the budget
        overrides = bounded(overrides, limit)
    limit = own_limit if limit is None else limit
    if name == "gpt2_small":  # the peer first (its figures stand even if mmtx's run fails), then mmtx
        peer = run_nanogpt(out, args, limit // 2)
        ours = figures_of(name, train(out, name, overrides, args, limit // 2), time.time())
        ratio = ours["mmtx mfu"] / peer["nanoGPT mfu"] if ours.get("mmtx mfu") and peer.get("nanoGPT mfu") else None
        if ratio is None and ours.get("mmtx tokens/s") and peer.get("nanoGPT tokens/s"):
            ratio = ours["mmtx tokens/s"] / peer["nanoGPT tokens/s"]  # no known peak (the CPU): by tokens/s
        return {**ours, **peer, "mmtx / nanoGPT": ratio}
    if name == "profile":
        return run_profile(out, overrides, args, limit)
    if name == "gpt2_eager":
        eager = figures_of(name, train(out, name, overrides, args, limit), time.time())
        compiled = json.loads((out / "state.json").read_text())["parts"].get("gpt2_small", {}).get("figures", {})
        tps = compiled.get("mmtx tokens/s")
        return {"eager tokens/s": eager["mmtx tokens/s"], "eager mfu": eager["mmtx mfu"],
                "compiled / eager": tps / eager["mmtx tokens/s"] if tps and eager["mmtx tokens/s"] else None}
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
        if part and part["status"] != "running":
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in part["figures"].items())
            shown = shown if part["status"] == "done" else f"{part['status']}: {shown}"
            rows.append(f"| {name} | {shown.replace('|', '/')} | {part['seconds']:.0f} s | {env['device']} | "
                        f"{env['torch']} | {env['mmtx commit']} | {env['date']} |")
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
    parser.add_argument("--budget-min", type=float, default=12.0,
                        help="total minutes for the parts (start-up excluded); a part that no longer fits is not "
                             "started, a time-bounded one (trainer.max_time) is shortened to fit")
    if sys.argv[1:2] == ["--profile-worker"]:  # internal: run_profile's process
        profile_worker(Path(sys.argv[2]), sys.argv[4:])
        return
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
    deadline = time.time() + 60 * args.budget_min
    names = args.parts.split(",")
    for name in names:
        if name not in PARTS:
            sys.exit(f"unknown part {name!r}; known: {', '.join(PARTS)}")
    for name in names:
        if state["parts"].get(name, {}).get("status") == "done":
            continue  # resumed: this part finished earlier
        left = deadline - time.time()
        limit = fit_limit(name, left) if not args.smoke else None
        if limit == 0:
            state["parts"][name] = {"status": "not run", "seconds": 0.0,
                                    "figures": {"reason": f"needs {PARTS[name][1]} s, {left:.0f} s of the "
                                                          f"{args.budget_min:g}-minute budget left"}}
            save(out, state)
            print(f"{name}: not run ({left:.0f} s left in the budget)", flush=True)
            continue
        state["parts"][name] = {"status": "running", "started": time.time()}
        save(out, state)
        t0 = time.time()
        try:
            figures, status = run_part(name, out, args, limit), "done"
        except (RuntimeError, KeyError, FileNotFoundError, ValueError) as err:
            figures, status = {"error": str(err)}, "failed"
        state["parts"][name] = {"status": status, "seconds": time.time() - t0, "figures": figures}
        save(out, state)
        print(f"{name}: {status} in {time.time() - t0:.0f} s: {figures}", flush=True)
    print((out / "figures.md").read_text())


if __name__ == "__main__":
    main()
