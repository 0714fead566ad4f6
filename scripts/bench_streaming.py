"""Images streamed from shards (`data=streaming`) against torchvision's ImageFolder + DataLoader and against mmtx's
device-resident cache, on a synthetic ImageFolder of JPEGs: images/s delivered to the training step, and each
reader's peak memory.

    python scripts/bench_streaming.py [--images 20000] [--size 64] [--workers 2] [--batches 60] [--rounds 2]

The folder (`--images` JPEGs of `--size` px, 10 classes, smooth random patterns) and its shards (`mmtx.prepare`,
timed) are made once in a temporary folder. Each reader then runs in its own process (its peak resident memory is
its own), `--batches` batches of 128 after 5 of warm-up, with the same augmentation (random crop with 4 px padding,
horizontal flip, normalisation): torchvision's transforms in its loader workers; mmtx's on the device (here the
CPU) after the batch is gathered. The three run in turn, `--rounds` times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCH = 128


def make_folder(root: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", max(100, n // 50))):
        for i in range(count):
            label = i % 10
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 255, (4, 4, 3)).astype(np.uint8)
            image = Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)
            image.save(folder / f"{i:07d}.jpg", quality=90)
    return root


def reader(mode: str, folder: Path, shards: Path, workers: int, batches: int, cache: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    if mode == "torchvision":
        from torchvision import datasets, transforms

        tf = transforms.Compose([transforms.RandomCrop(folder_size(folder), padding=4), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
        loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(folder / "train"), tf), batch_size=BATCH,
                                             shuffle=True, num_workers=workers, drop_last=True,
                                             persistent_workers=workers > 0)
        step = lambda b: b  # noqa: E731 - already augmented and normalised in the workers
    else:
        from mmtx.data.image import ImageDataModule
        from mmtx.data.image_sources import ImageFolder
        from mmtx.data.streaming import StreamingImages

        augment = {"crop_padding": 4, "hflip": True}
        if mode == "streamed":
            dm = StreamingImages(str(shards), batch_size=BATCH, num_workers=workers, augment=augment)
        else:
            dm = ImageDataModule(ImageFolder(folder), str(cache), batch_size=BATCH, augment=augment)
        dm.setup()
        loader = dm.train_dataloader()
        cpu = torch.device("cpu")
        step = lambda b: dm.on_after_batch_transfer(dm.transfer_batch_to_device(b, cpu))  # noqa: E731
    seen, times = 0, []
    while len(times) < batches + 5:
        for batch in loader:
            start = time.perf_counter()
            out = step(batch)
            times.append(time.perf_counter() - start)
            if len(times) > 5:
                seen += BATCH
            if len(times) == 5:
                t0 = time.perf_counter()
            if len(times) >= batches + 5:
                break
    del out
    seconds = time.perf_counter() - t0
    return {"images/s": seen / seconds, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def folder_size(folder: Path) -> int:
    from PIL import Image

    first = next((folder / "train").rglob("*.jpg"))
    with Image.open(first) as image:
        return image.size[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reader", default=None, help=argparse.SUPPRESS)  # internal: one reader, in a child process
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reader:
        work = Path(args.work)
        result = reader(args.reader, work / "images", work / "shards", args.workers, args.batches, work / "cache")
        print(json.dumps(result))
        return
    work = Path(tempfile.mkdtemp(prefix="mmtx-bench-streaming-"))
    t0 = time.perf_counter()
    make_folder(work / "images", args.images, args.size)
    print(f"{args.images} JPEGs of {args.size} px written in {time.perf_counter() - t0:.0f} s under {work}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmtx.prepare", "data=imagefolder", f"data.source.path={work / 'images'}",
                    f"out={work / 'shards'}", f"num_workers={args.workers}"], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    print(f"prepare: {seconds:.1f} s, {args.images * 1.02 / seconds:.0f} images/s ({args.workers} workers)", flush=True)
    results: dict[str, list[dict]] = {"torchvision": [], "streamed": [], "resident": []}
    for r in range(args.rounds):
        for mode in results:
            cmd = [sys.executable, __file__, "--reader", mode, "--work", str(work), "--workers", str(args.workers),
                   "--batches", str(args.batches)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ))
            if proc.returncode:
                sys.exit(f"{mode} failed:\n{proc.stderr[-2000:]}")
            results[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {mode}: {results[mode][-1]['images/s']:.0f} images/s, peak "
                  f"{results[mode][-1]['peak_gb']:.2f} GB (the main process)", flush=True)
    rate = {m: statistics.mean(x["images/s"] for x in v) for m, v in results.items()}
    print("\nmean images/s: " + ", ".join(f"{m} {v:.0f}" for m, v in rate.items()))
    print(f"streamed / torchvision: {rate['streamed'] / rate['torchvision']:.2f} (target >= 1.5); "
          f"streamed / resident: {rate['streamed'] / rate['resident']:.2f}")


if __name__ == "__main__":
    main()
