"""Mixture of experts against the dense backbone, with the shipped tasks run as a user runs them (`python -m
mmtx.train`), one process each; dense and MoE runs interleaved seed by seed, so a slow spell of the machine falls
on both.

    python scripts/bench_moe.py lm --root ../shared/data [--seeds 1 2 3]
        gpt_shakespeare_cpu (dense) against gpt_shakespeare_moe_cpu (8 experts, top-1, every other block: the same
        FLOPs a token, the same steps): test loss (the whole validation split), training throughput (median
        tokens/s of the logged windows) and fit time, parameters (all, and those a token meets).
    python scripts/bench_moe.py upcycle --root ../shared/data [--seeds 1 2 3] [--steps 400] [--lr 3e-4] [--extra ...]
            [--moe-extra backbone.moe.top_k=2]
        From each seed's dense gpt_shakespeare_cpu checkpoint (the `lm` runs': the same --work folder): the dense
        model trained --steps more (init_from, a new schedule), against the MoE model upcycled from it (every expert a
        copy of the dense MLP, the router new) trained the same steps with the same schedule.
    python scripts/bench_moe.py cotrain --root ../shared/data [--seeds 1] [--dense]
        cotrain_multimodal with backbone.mlp=moe (--dense: the dense co-training run too): each member's test
        figure, and each member's expert load at the last validation (which experts its tokens go to).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

from benchlib import run_train, warm_cache

MOE = ("backbone.mlp=moe",)


def read_metrics(run_dir: Path) -> list[dict]:
    with open(next(run_dir.glob("metrics/*/metrics.csv"))) as f:
        return list(csv.DictReader(f))


def tokens_per_second(run_dir: Path, key: str = "train/tokens_per_sec") -> float:
    values = [float(r[key]) for r in read_metrics(run_dir) if r.get(key)]
    return statistics.median(values[1:] or values)  # the first window holds the warm-up steps


def parameters(ckpt: str) -> tuple[int, int]:
    """(all parameters, those a token meets) of a checkpoint's model."""
    from mmtx.checkpoints import load
    from mmtx.nn.mlp import active_parameters

    module = load(ckpt, device="cpu").module
    return sum(p.numel() for p in module.parameters()), active_parameters(module)


def spread(name: str, values: list[float], fmt: str = ".4f") -> str:
    return (f"{name}: mean {statistics.mean(values):{fmt}}, range {min(values):{fmt}}-{max(values):{fmt}} "
            f"({', '.join(format(v, fmt) for v in values)})")


def lm(args, work: Path) -> None:
    warm_cache("gpt_shakespeare_cpu", work, args.root)
    rows = []
    for seed in args.seeds:
        dense = run_train("gpt_shakespeare_cpu", seed, work, args.root, name="dense")
        moe = run_train("gpt_shakespeare_moe_cpu", seed, work, args.root, name="moe")
        tps = [tokens_per_second(Path(r["run_dir"])) for r in (dense, moe)]
        rows.append({"seed": seed, "dense": dense["test/loss"], "moe": moe["test/loss"], "tps": tps,
                     "fit": [dense["fit_seconds"] / dense["global_step"], moe["fit_seconds"] / moe["global_step"]]})
        print(f"seed {seed}: test/loss dense {dense['test/loss']:.4f}, MoE {moe['test/loss']:.4f} "
              f"(diff {moe['test/loss'] - dense['test/loss']:+.4f}); tokens/s dense {tps[0]:.0f}, MoE {tps[1]:.0f} "
              f"(step time ratio {tps[0] / tps[1]:.3f}); fit s/step dense {rows[-1]['fit'][0] * 1000:.1f} ms, "
              f"MoE {rows[-1]['fit'][1] * 1000:.1f} ms", flush=True)
    print(spread("test/loss dense", [r["dense"] for r in rows]))
    print(spread("test/loss MoE", [r["moe"] for r in rows]))
    print(spread("test/loss MoE - dense", [r["moe"] - r["dense"] for r in rows], "+.4f"))
    print(spread("step time MoE / dense (median tokens/s)", [r["tps"][0] / r["tps"][1] for r in rows], ".3f"))
    print(spread("step time MoE / dense (fit seconds a step)", [r["fit"][1] / r["fit"][0] for r in rows], ".3f"))
    for name in ("dense", "moe"):
        total, active = parameters(str(work / f"{name}-seed{args.seeds[0]}" / "checkpoints" / "last.ckpt"))
        print(f"parameters {name}: {total:,} ({active:,} a token meets)")


def upcycle(args, work: Path) -> None:
    steps = (f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}", f"optim.lr={args.lr}",
             *args.extra)
    rows = []
    for seed in args.seeds:
        base = run_train("gpt_shakespeare_cpu", seed, work, args.root, name="dense")
        start = f"init_from={Path(base['run_dir']) / 'checkpoints' / 'last.ckpt'}"
        dense = run_train("gpt_shakespeare_cpu", seed, work, args.root, (start, *steps), name="dense-longer")
        moe = run_train("gpt_shakespeare_moe_cpu", seed, work, args.root, (start, *steps, *args.moe_extra),
                        name="upcycled" + "".join("-" + o.rsplit(".", 1)[-1].replace("=", "") for o in args.moe_extra))
        rows.append((base["test/loss"], dense["test/loss"], moe["test/loss"]))
        print(f"seed {seed}: test/loss at {base['global_step']} steps {base['test/loss']:.4f}; +{args.steps} dense "
              f"{dense['test/loss']:.4f}, +{args.steps} upcycled MoE {moe['test/loss']:.4f} "
              f"(diff {moe['test/loss'] - dense['test/loss']:+.4f})", flush=True)
    print(spread("test/loss dense start", [r[0] for r in rows]))
    print(spread(f"test/loss dense +{args.steps}", [r[1] for r in rows]))
    print(spread(f"test/loss upcycled MoE +{args.steps}", [r[2] for r in rows]))
    print(spread("upcycled - dense", [r[2] - r[1] for r in rows], "+.4f"))


def cotrain(args, work: Path) -> None:
    members = {"image": "test/acc", "audio": "test/acc", "text": "test/loss"}
    for seed in args.seeds:
        runs = {"MoE": run_train("cotrain_multimodal", seed, work, args.root, MOE, name="cotrain-moe")}
        if args.dense:
            runs["dense"] = run_train("cotrain_multimodal", seed, work, args.root, name="cotrain-dense")
        for name, run in runs.items():
            shown = ", ".join(f"{m} {run[f'{m}/{k}']:.4f}" for m, k in members.items())
            print(f"seed {seed} {name}: {shown}; {run['wall_s']:.0f} s", flush=True)
        rows = read_metrics(Path(runs["MoE"]["run_dir"]))
        for member in members:
            last = [r for r in rows if r.get(f"{member}/val/moe/block1/load0")][-1]
            for block in ("block1", "block3"):
                loads = [float(last[f"{member}/val/moe/{block}/load{e}"]) for e in range(8)]
                print(f"seed {seed} {member} {block} expert load (last validation): "
                      + " ".join(f"{v:.2f}" for v in loads), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["lm", "upcycle", "cotrain"])
    parser.add_argument("--root", default=None, help="data root (default: MMTX_DATA_DIR or ./data)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=400, help="upcycle: the steps after the dense run's 2,000")
    parser.add_argument("--lr", type=float, default=3e-4, help="upcycle: the peak learning rate of those steps")
    parser.add_argument("--extra", nargs="*", default=[], help="upcycle: more overrides for both continued runs")
    parser.add_argument("--moe-extra", nargs="*", default=[], help="upcycle: overrides for the MoE run alone "
                        "(backbone.moe.top_k=2)")
    parser.add_argument("--dense", action="store_true", help="cotrain: the dense co-training run too")
    parser.add_argument("--work", type=Path, default=None, help="runs and cache (default: a new temporary folder)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_moe_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"runs in {work}", file=sys.stderr)
    {"lm": lm, "upcycle": upcycle, "cotrain": cotrain}[args.what](args, work)


if __name__ == "__main__":
    main()
