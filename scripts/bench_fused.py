"""Several modalities in one sequence, measured with the shipped tasks run as a user runs them (`python -m mmtx.train`,
`python -m mmtx.eval`), one process each, on the same paired samples and the same number of steps.

    python scripts/bench_fused.py av --root ../shared/data [--seeds 1 2 3] [--epochs 15] [--noise 1.0] [--dropout 0.5]
            [--subsets]
        av_digits: the written digit alone (data.use=[image]), the spoken digit alone (data.use=[audio]) and both in
        one sequence (with data.field_dropout, or with --subsets data.field_subsets=true), test accuracy of each; the fused model evaluated with one field missing
        (mmtx.eval data.eval_missing=[...]) against the model of the other field alone; and the image alone and the
        fused model again with the written digits noised (data.noise.image, in every split: AV-MNIST's setting).
    python scripts/bench_fused.py clip --root ../shared/data [--seeds 1 2 3] [--epochs 15] [--image-first 10]
            [--clip-extra optim.lr=1e-3]
        av_digits_clip: audio->image and image->audio recall@1/@5 on the test pairs (a digit of the right class
        counts) and zero-shot spoken-digit accuracy by the nearest written-digit class prototype. --image-first N:
        LiT's and ImageBind's recipe: the written-digit tower trained first (av_digits data.use=[image], N epochs, the
        image labels), then av_digits_clip from its checkpoint (init_from); the spoken digits' labels are never used.
    python scripts/bench_fused.py words --root ../shared/data [--seeds 1 2 3] [--epochs 15] [--dropout 0.5] [--subsets]
        av_digits_words: a prefix LM writes the digit's word after both fields; test word and character error rates
        with both fields, and with each missing at test (mmtx.eval data.eval_missing=[...]).

Each run's test metrics and wall time (the whole process); the mean and range over the seeds.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import cli_overrides, run_train, warm_cache


def evaluate(ckpt: str, work: Path, root: str, *overrides: str) -> dict[str, float]:
    """`python -m mmtx.eval ckpt=CKPT ...`: its printed test metrics."""
    keep = [o for o in cli_overrides(work, root) if o.startswith(("paths.cache_dir", "data.root"))]
    cmd = [sys.executable, "-m", "mmtx.eval", f"ckpt={ckpt}", "trainer.accelerator=cpu", *keep, *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(test/\S+): ([-\d.]+)$", done.stdout, re.M)}


def line(name: str, values: list[float], seeds: list[int], points: bool = True) -> str:
    scale, unit = (100, "%") if points else (1, "")
    shown = [round(v * scale, 2) for v in values]
    return (f"{name}: mean {statistics.mean(values) * scale:.2f}{unit}, range {min(values) * scale:.2f}-"
            f"{max(values) * scale:.2f}{unit} (seeds {seeds}: {shown})")


def av(args, work: Path) -> None:
    epochs = (f"trainer.max_epochs={args.epochs}", *args.extra)
    drop = "data.field_subsets=true" if args.subsets else f"data.field_dropout={args.dropout}"
    fused = "fused-subsets" if args.subsets else "fused"  # the run folders: other runs than the dropout ones
    noised = f"data.noise.image={args.noise}"
    rows: dict[str, list[float]] = {}
    walls: dict[str, list[float]] = {}
    for seed in args.seeds:
        runs = {
            "image alone": run_train("av_digits", seed, work, args.root, (*epochs, "data.use=[image]"), name="image"),
            "audio alone": run_train("av_digits", seed, work, args.root, (*epochs, "data.use=[audio]"), name="audio"),
            "fused": run_train("av_digits", seed, work, args.root, (*epochs, drop), name=fused),
            "image alone, noised": run_train("av_digits", seed, work, args.root, (*epochs, "data.use=[image]", noised),
                                             name="image-noised"),
            "fused, image noised": run_train("av_digits", seed, work, args.root, (*epochs, drop, noised),
                                             name=f"{fused}-noised"),
        }
        for name, run in runs.items():
            rows.setdefault(name, []).append(run["test/acc"])
            walls.setdefault(name, []).append(run["wall_s"])
        for missing, name in (("image", "fused, image missing at test"), ("audio", "fused, audio missing at test")):
            rows.setdefault(name, []).append(
                evaluate(runs["fused"]["last_checkpoint"], work, args.root, f"data.eval_missing=[{missing}]")["test/acc"])
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1] * 100:.2f}%" for k, v in rows.items())
              + f"; {runs['fused']['global_step']} steps each", flush=True)
    seeds = list(args.seeds)
    for name, values in rows.items():
        wall = f"; wall mean {statistics.mean(walls[name]):.0f} s" if name in walls else ""
        print(line(name, values, seeds) + wall)
    best = [max(i, a) for i, a in zip(rows["image alone"], rows["audio alone"])]
    print(line("fused - the better single modality", [f - b for f, b in zip(rows["fused"], best)], seeds))
    print(line("noised: fused - image alone", [f - i for f, i in zip(rows["fused, image noised"], rows["image alone, noised"])], seeds))
    print(line("noised: fused - the better single modality",
               [f - max(i, a) for f, i, a in zip(rows["fused, image noised"], rows["image alone, noised"],
                                                 rows["audio alone"])], seeds))
    print(line("image missing: fused - audio alone",
               [f - a for f, a in zip(rows["fused, image missing at test"], rows["audio alone"])], seeds))
    print(line("audio missing: fused - image alone",
               [f - i for f, i in zip(rows["fused, audio missing at test"], rows["image alone"])], seeds))


def words(args, work: Path) -> None:
    drop = "data.field_subsets=true" if args.subsets else f"data.field_dropout={args.dropout}"
    rows: dict[str, list[float]] = {}
    walls = []
    for seed in args.seeds:
        run = run_train("av_digits_words", seed, work, args.root, (f"trainer.max_epochs={args.epochs}", drop,
                                                                    *args.extra))
        walls.append(run["wall_s"])
        results = {"both fields": run}
        for missing in ("image", "audio"):
            results[f"{missing} missing at test"] = evaluate(run["last_checkpoint"], work, args.root,
                                                            f"data.eval_missing=[{missing}]")
        for name, result in results.items():
            for key in ("test/wer", "test/cer"):
                rows.setdefault(f"{name}: {key}", []).append(result[key])
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1] * 100:.2f}%" for k, v in rows.items())
              + f"; {run['global_step']} steps, {run['wall_s']:.0f} s", flush=True)
    for name, values in rows.items():
        print(line(name, values, list(args.seeds)))
    print(f"wall mean {statistics.mean(walls):.0f} s")


def clip(args, work: Path) -> None:
    keys = ["test/audio_to_image_r@1", "test/audio_to_image_r@5", "test/image_to_audio_r@1",
            "test/image_to_audio_r@5", "test/zero_shot_acc"]
    runs = []
    for seed in args.seeds:
        extra: tuple[str, ...] = (f"trainer.max_epochs={args.epochs}", *args.extra)
        first = None
        if args.image_first:
            first = run_train("av_digits", seed, work, args.root, (f"trainer.max_epochs={args.image_first}",
                                                                   "data.use=[image]", *args.extra), name="image-tower")
            extra = (*extra, f"init_from={first['last_checkpoint']}")
        run = run_train("av_digits_clip", seed, work, args.root, (*extra, *args.clip_extra))
        if first is not None:
            run["wall_s"] += first["wall_s"]
            run["image_tower_acc"] = first["test/acc"]
        runs.append(run)
        tower = f", image tower test/acc {first['test/acc'] * 100:.2f}%" if first else ""
        print(f"seed {seed}: " + ", ".join(f"{k} {run[k] * 100:.2f}%" for k in keys)
              + f"; {run['global_step']} steps, {run['wall_s']:.0f} s{tower}", flush=True)
    for key in keys + (["image_tower_acc"] if args.image_first else []):
        print(line(key, [r[key] for r in runs], list(args.seeds)))
    both = " (the tower's run and the CLIP run)" if args.image_first else ""
    print(f"wall mean {statistics.mean(r['wall_s'] for r in runs):.0f} s{both}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["av", "clip", "words"])
    parser.add_argument("--root", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--noise", type=float, default=1.0, help="data.noise.image of the noised runs")
    parser.add_argument("--dropout", type=float, default=0.5, help="data.field_dropout of the fused runs")
    parser.add_argument("--subsets", action="store_true",
                        help="av: the fused runs with data.field_subsets=true (every sample with both fields and with "
                             "each alone) instead of field dropout")
    parser.add_argument("--image-first", type=int, default=0,
                        help="clip: epochs of the written-digit tower trained first (0: CLIP from scratch)")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides of every run")
    parser.add_argument("--clip-extra", nargs="*", default=[], help="clip: overrides of the av_digits_clip runs only")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix=f"bench-fused-{args.what}-"))
    work.mkdir(parents=True, exist_ok=True)
    warm_cache("av_digits", work, args.root)  # one data cache for every run, decoded before any is timed
    {"av": av, "clip": clip, "words": words}[args.what](args, work)


if __name__ == "__main__":
    sys.exit(main())
