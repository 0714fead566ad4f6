"""Memory that does not grow with the data: the peak memory of streamed training runs on data sets of different
sizes, and of preparing and training on a large text corpus.

    python scripts/bench_memory.py [--images 20000,200000] [--text-gb 1.0] [--steps 60] [--work DIR]

Images: synthetic ImageFolders of 64 px JPEGs (`--images` of each size; 10 classes), each prepared into shards
(`python -m mmtx.prepare`) and trained on for `--steps` steps of `vit_cifar_cpu`'s model (16 tokens an image, as on CIFAR-10:
16 px patches) with `data=streaming` and 2 loader workers. Text: a corpus of `--text-gb` GB in 16 files (words drawn
from Tiny Shakespeare's, Zipf-distributed by their rank there, when `--data-root` has it, else from a generated list), prepared with
`gpt_shakespeare_cpu`'s byte-level BPE (4,096 ids) and trained on for `--steps` steps from `data=streaming_text`.
Every command runs as the user would run it, in its own process; its memory is sampled every 0.2 s over the
whole process tree (the run and its loader workers): the sum of their proportional set sizes (PSS: a page shared
by n processes counts 1/n in each, so shared memory maps and libraries count once) and of their resident sizes
(RSS, which counts a shared page in every process). The folders are made once in `--work` (kept; a second call
reuses them).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO.parent / "shared" / "data"


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _tree(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += tree.get(p, [])
    return found


def _sizes(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of a process in bytes; (0, 0) once it is gone."""
    pss = rss = 0
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return pss, rss


def sampled(cmd: list[str], log_path: Path, env: dict | None = None) -> dict[str, float]:
    """Run `cmd` to its end (output to `log_path`); its wall time and the peaks over its process tree of summed
    PSS and summed RSS, in GB, sampled every 0.2 s."""
    t0 = time.perf_counter()
    peak_pss = peak_rss = 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        while proc.poll() is None:
            sizes = [_sizes(p) for p in _tree(proc.pid)]
            peak_pss = max(peak_pss, sum(s[0] for s in sizes))
            peak_rss = max(peak_rss, sum(s[1] for s in sizes))
            time.sleep(0.2)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log_path}")
    return {"seconds": time.perf_counter() - t0, "pss_gb": peak_pss / 1e9, "rss_gb": peak_rss / 1e9}


def _write_images(args: tuple[Path, int, int, int]) -> None:
    import numpy as np
    from PIL import Image

    root, start, stop, size = args
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        folder = root / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, (4, 4, 3)).astype(np.uint8)
        Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:07d}.jpg", quality=90)


def make_images(root: Path, n: int, size: int = 64) -> Path:
    """`n` training and n/50 test JPEGs (two processes write them), once."""
    from multiprocessing import Pool

    if (root / "done").is_file():
        return root
    jobs = []
    for split, count in (("train", n), ("test", max(100, n // 50))):
        step = max(1000, count // 20)
        jobs += [(root / split, s, min(s + step, count), size) for s in range(0, count, step)]
    with Pool(2) as pool:
        pool.map(_write_images, jobs)
    (root / "done").write_text("")
    return root


def make_text(root: Path, gigabytes: float, files: int = 16) -> Path:
    """A corpus of about `gigabytes` GB in `files` files of lines of Zipf-distributed words, once."""
    import numpy as np

    if (root / "done").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    shakespeare = DATA_ROOT / "tinyshakespeare" / "input.txt"
    if shakespeare.is_file():
        from collections import Counter

        words = [w for w, _ in Counter(shakespeare.read_text().split()).most_common()]  # rank 1: the most frequent
    else:
        rng = np.random.default_rng(1)
        words = ["".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(1, 10))) for _ in range(20000)]
    words = np.array(words, dtype=object)
    rng = np.random.default_rng(0)
    per_file = int(gigabytes * 1e9 / files)
    for f in range(files):
        with open(root / f"part-{f:03d}.txt", "w") as out:
            written = 0
            lines_at_once = max(100, min(100_000, per_file // 80))  # of 12 words, about 80 bytes
            while written < per_file:
                ids = rng.zipf(1.2, 12 * lines_at_once) - 1
                beyond = ids >= len(words)
                ids[beyond] = rng.integers(0, len(words), int(beyond.sum()))  # the tail: any word
                lines = words[ids].reshape(-1, 12)
                text = "\n".join(" ".join(line) for line in lines) + "\n"
                out.write(text)
                written += len(text)
    (root / "done").write_text("")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default="20000,200000", help="image counts, comma-separated (none: skip)")
    parser.add_argument("--text-gb", type=float, default=1.0, help="the text corpus's size (0: skip)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--work", default=None, help="where the data sets are made (default: a new temporary folder)")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mmtx-bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")  # each call's runs are new ones (a run folder that exists would resume)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    py = sys.executable
    common = [f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=0", "test_after_fit=false",
              "trainer.enable_progress_bar=false", "logger=csv", f"paths.cache_dir={work / 'cache'}"]
    rows = []
    counts = [int(n) for n in args.images.split(",") if n.strip().isdigit()]
    for n in counts:
        t0 = time.perf_counter()
        folder = make_images(work / f"images-{n}", n)
        print(f"{n} JPEGs of 64 px under {folder} ({time.perf_counter() - t0:.0f} s)", flush=True)
        shards = work / f"shards-{n}"
        prep = sampled([py, "-m", "mmtx.prepare", "data=imagefolder", f"data.source.path={folder}", f"out={shards}",
                        "num_workers=2"], work / f"prepare-{n}.log", env)
        print(f"prepare {n}: {prep['seconds']:.0f} s, peak PSS {prep['pss_gb']:.2f} GB, RSS {prep['rss_gb']:.2f} GB",
              flush=True)
        run = sampled([py, "-m", "mmtx.train", "task=vit_cifar_cpu", "data=streaming", f"data.path={shards}",
                       "data.num_workers=2", "tokenizer.patch_size=16", "data.batch_size=128", *common,
                       f"hydra.run.dir={work / f'run-images-{n}-{stamp}'}"], work / f"train-{n}.log", env)
        print(f"train {n}: {run['seconds']:.0f} s, peak PSS {run['pss_gb']:.2f} GB, RSS {run['rss_gb']:.2f} GB "
              "(the run and its 2 loader workers)", flush=True)
        rows.append((f"{n:,} images", prep, run))
    if len(counts) == 2:
        (_, _, small), (_, _, large) = rows
        print(f"images: training peak PSS {large['pss_gb']:.2f} / {small['pss_gb']:.2f} GB = "
              f"{large['pss_gb'] / small['pss_gb']:.3f} (target: within 10%, under 2 GB)", flush=True)
    if args.text_gb > 0:
        t0 = time.perf_counter()
        corpus = make_text(work / "text", args.text_gb)
        size = sum(f.stat().st_size for f in corpus.glob("*.txt"))
        print(f"text: {size / 1e9:.2f} GB in {len(list(corpus.glob('*.txt')))} files under {corpus} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        tokens_dir = work / "tokens"
        prep = sampled([py, "-m", "mmtx.prepare", "task=gpt_shakespeare_cpu", "tokenizer=bpe", "data=text_files",
                        f"data.source.files={corpus}/*.txt", f"paths.cache_dir={work / 'cache'}", f"out={tokens_dir}"],
                       work / "prepare-text.log", env)
        import json

        meta = json.loads((tokens_dir / "mmtx.json").read_text())
        tokens = sum(meta["tokens"].values())
        print(f"prepare text: {prep['seconds']:.0f} s for {tokens:,} tokens ({meta['dtype']}): "
              f"{tokens / prep['seconds']:,.0f} tokens/s, {size / prep['seconds'] / 1e6:.1f} MB/s of text (BPE "
              f"trained, then encoded); peak PSS {prep['pss_gb']:.2f} GB, RSS {prep['rss_gb']:.2f} GB", flush=True)
        run = sampled([py, "-m", "mmtx.train", "task=gpt_shakespeare_cpu", "data=streaming_text",
                       f"data.path={tokens_dir}", *common, f"hydra.run.dir={work / f'run-text-{stamp}'}"],
                      work / "train-text.log", env)
        print(f"train text: {run['seconds']:.0f} s, peak PSS {run['pss_gb']:.2f} GB, RSS {run['rss_gb']:.2f} GB "
              "(target: under 2 GB)", flush=True)


if __name__ == "__main__":
    main()
