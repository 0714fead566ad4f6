"""What masked pretraining buys, measured with the shipped tasks run as a user runs them (`python -m mmtx.train`).

    python scripts/bench_masked.py speed --root ../shared/data [--rounds 5]
        MAE's training step (the encoder on the kept quarter of the patches, the decoder on all of them) against
        vit_cifar_cpu's (the encoder on every patch), same backbone and batch, in alternating rounds; and the
        encoder's forward alone on the kept patches against on all of them.
    python scripts/bench_masked.py images --root ../shared/data [--seeds 1 2 3] [--pretrain-epochs 100] [--epochs 16 30]
        CIFAR-10 with data.label_fraction=0.1: A, vit_cifar_cpu from scratch on the labelled tenth; B, mae_cifar_cpu
        on every training image (no labels), then vit_cifar_cpu on the same tenth from its checkpoint (with
        --layer-decay, optim.layer_decay), the same fine-tuning steps as A: one A and one B for each --epochs (default
        16, vit_cifar_cpu's own schedule), all from the seed's one pretraining. --equal-time adds A trained for B's
        whole time.
    python scripts/bench_masked.py audio --root ../shared/data [--seeds 1 2 3] [--pretrain-epochs 50] [--epochs 50]
        The same for FSDD: audio_fsdd against mask_fsdd then audio_fsdd.
    python scripts/bench_masked.py text --root ../shared/data [--seeds 1 2 3]
        bert_shakespeare: masked-token accuracy on the validation split against the unigram baseline (always the
        most frequent training character), and the validation loss curve.

Each run's test metrics, wall time (the whole process) and steps; the mean and range over the seeds.
Runs are named after their length (A-16ep-seed1, pretrain-100ep-seed1, ...): started again with the same --work, a
benchmark reuses the runs it has finished (a longer pretraining or another fine-tuning length is a new run).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import run_train, warm_cache


def summary_line(name: str, runs: list[dict], key: str) -> str:
    values = [r[key] for r in runs]
    walls = [r["wall_s"] for r in runs]
    return (f"{name}: {key} mean {statistics.mean(values):.4f} range {min(values):.4f}-{max(values):.4f} "
            f"(seeds {[r['seed'] for r in runs]}: {[round(v, 4) for v in values]}); wall mean "
            f"{statistics.mean(walls):.0f} s, steps {[r['global_step'] for r in runs]}")


def low_label(args, scratch_task: str, masked_task: str, metric: str) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix=f"bench-masked-{scratch_task}-"))
    work.mkdir(parents=True, exist_ok=True)
    warm_cache(scratch_task, work, args.root)  # one data cache for every run, decoded before any is timed
    key = f"test/{metric}"
    a_runs, b_runs = {n: [] for n in args.epochs}, {n: [] for n in args.epochs}
    pre_runs, equal_runs = [], []
    decay = (f"optim.layer_decay={args.layer_decay}",) if args.layer_decay else ()
    for seed in args.seeds:
        pre = run_train(masked_task, seed, work, args.root,
                        (f"trainer.max_epochs={args.pretrain_epochs}", *args.extra, *args.pretrain_extra),
                        name=f"pretrain-{args.pretrain_epochs}ep")
        pre_runs.append(pre)
        print(f"seed {seed} pretrain: {pre['wall_s']:.0f} s, {pre['global_step']} steps, test loss {pre['test/loss']:.4f}",
              flush=True)
        for n in args.epochs:
            few = ("data.label_fraction=0.1", f"trainer.max_epochs={n}", *args.extra)
            a = run_train(scratch_task, seed, work, args.root, few, name=f"A-{n}ep")
            b = run_train(scratch_task, seed, work, args.root, (*few, f"init_from={pre['last_checkpoint']}", *decay),
                          name=f"B-{n}ep")
            a_runs[n].append(a), b_runs[n].append(b)
            print(f"seed {seed}, {n} epochs: A {a['wall_s']:.0f} s, {a['global_step']} steps, test {a[key]:.4f}; "
                  f"B {b['wall_s']:.0f} s, test {b[key]:.4f}; B - A {(b[key] - a[key]) * 100:+.2f} points", flush=True)
        if args.equal_time:  # A with as many epochs as B's whole time buys it, at A's own speed
            n = args.epochs[0]
            a, b = a_runs[n][-1], b_runs[n][-1]
            epochs = max(1, round(n * (pre["wall_s"] + b["wall_s"]) / a["wall_s"]))
            eq = run_train(scratch_task, seed, work, args.root,
                           ("data.label_fraction=0.1", f"trainer.max_epochs={epochs}", *args.extra),
                           name=f"A-{epochs}ep-equal-time")
            print(f"seed {seed} A at B's time: {epochs} epochs, {eq['wall_s']:.0f} s, test {eq[key]:.4f}")
            equal_runs.append(eq)
    print(summary_line(f"B's pretraining ({args.pretrain_epochs} epochs)", pre_runs, "test/loss"))
    for n in args.epochs:
        print(f"-- fine-tuning {n} epochs")
        print(summary_line("A from scratch", a_runs[n], key))
        print(summary_line("B pretrained + fine-tuned", b_runs[n], key))
        gain = [b[key] - a[key] for a, b in zip(a_runs[n], b_runs[n])]
        print(f"B - A: mean {statistics.mean(gain) * 100:+.2f} points, range {min(gain) * 100:+.2f} to "
              f"{max(gain) * 100:+.2f}")
    if equal_runs:
        print(summary_line("A at B's total time", equal_runs, key))


def text(args) -> None:
    import torch

    from mmtx import compose
    from mmtx.config.wiring import build_data

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-masked-text-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        run = run_train("bert_shakespeare", seed, work, args.root, tuple(args.extra))
        with open(Path(run["run_dir"]) / "metrics" / "version_0" / "metrics.csv") as f:
            curve = [(int(r["step"]), float(r["val/loss"]), float(r["val/acc"])) for r in csv.DictReader(f) if r.get("val/loss")]
        print(f"seed {seed}: {run['wall_s']:.0f} s, test/acc {run['test/acc']:.4f}, test/loss {run['test/loss']:.4f}; "
              f"validation (step, loss, acc): {curve}", flush=True)
        runs.append(run)
    dm = build_data(compose("bert_shakespeare", [f"data.root={args.root}", f"paths.cache_dir={work}/cache"]))
    split = "test" if "test" in dm.splits else "val"  # the split test/acc was scored on
    train_ids, held_ids = (torch.as_tensor(dm.splits[s]["ids"]).long() for s in ("train", split))
    top = int(torch.bincount(train_ids).argmax())
    baseline = float((held_ids == top).float().mean())
    print(f"unigram baseline (always {dm.vocab.decode([top])!r}, the most frequent training token): accuracy "
          f"{baseline:.4f} on the {split} split's text (masked positions are drawn uniformly, so this is its "
          "expected masked-token accuracy)")
    print(summary_line("bert_shakespeare", runs, "test/acc"))


def speed(args) -> None:
    import torch

    from mmtx import build, compose

    torch.manual_seed(0)
    common = [f"data.root={args.root}", "paths.cache_dir=.cache/mmtx"]
    mae, _ = build(compose("mae_cifar_cpu", common))
    vit, _ = build(compose("vit_cifar_cpu", common))
    from mmtx.batch import ImageBatch

    batch = ImageBatch(torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,)))

    def step(model) -> None:
        _, loss = model.task.forward_loss(model.backbone, batch, keep_outputs=False)
        loss.backward()

    def encoder(model, tokens) -> None:
        with torch.no_grad():
            model.backbone(tokens)

    from mmtx.batch import Tokens

    full = Tokens(torch.randn(128, 17, mae.backbone.dim))  # 16 patches and CLS: vit_cifar_cpu's encoder input
    kept = Tokens(torch.randn(128, 4, mae.backbone.dim))  # the 4 of 16 patches MAE keeps at 75%
    ratios, encoder_ratios = [], []
    for r in range(args.rounds):
        times = {}
        for name, fn in (("vit", lambda: step(vit)), ("mae", lambda: step(mae)), ("full", lambda: encoder(mae, full)),
                         ("kept", lambda: encoder(mae, kept))):
            fn()  # warm
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name] = (time.perf_counter() - t0) / args.steps
        ratios.append(times["mae"] / times["vit"])
        encoder_ratios.append(times["kept"] / times["full"])
        print(f"round {r}: MAE step {times['mae'] * 1000:.1f} ms, vit_cifar_cpu step {times['vit'] * 1000:.1f} ms, ratio "
              f"{ratios[-1]:.3f}; encoder forward kept {times['kept'] * 1000:.1f} ms / all {times['full'] * 1000:.1f} ms "
              f"= {encoder_ratios[-1]:.3f}", flush=True)
    for name, values in (("MAE step / full step", ratios), ("encoder on kept / on all", encoder_ratios)):
        print(f"{name}: mean {statistics.mean(values):.3f}, range {min(values):.3f}-{max(values):.3f} over "
              f"{len(values)} rounds of {args.steps} steps (batch 128, {torch.get_num_threads()} threads)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["speed", "images", "audio", "text"])
    parser.add_argument("--root", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, nargs="+", default=None,
                        help="fine-tuning epochs, one A and one B for each (images 16, audio 50)")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="images 100, audio 50 (mask_fsdd's own)")
    parser.add_argument("--equal-time", action="store_true")
    parser.add_argument("--layer-decay", type=float, default=None, help="optim.layer_decay of B's fine-tuning")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--work", default=None)
    parser.add_argument("--extra", nargs="*", default=[], help="overrides of every run")
    parser.add_argument("--pretrain-extra", nargs="*", default=[],
                        help="overrides of the masked pretraining runs only (family.mask_ratio=0.8 family.span=8)")
    args = parser.parse_args()
    if args.what == "speed":
        return speed(args)
    if args.what == "text":
        return text(args)
    images = args.what == "images"
    args.epochs = args.epochs or [16 if images else 50]
    args.pretrain_epochs = args.pretrain_epochs or (100 if images else 50)
    low_label(args, "vit_cifar_cpu" if images else "audio_fsdd", "mae_cifar_cpu" if images else "mask_fsdd", "acc")


if __name__ == "__main__":
    sys.exit(main())
