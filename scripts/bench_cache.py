"""What verifying a cache costs: the checksum check every load does (mmtx.data.cache), against the load itself.

    python scripts/bench_cache.py --root ../shared/data [--rounds 5] [--work /tmp/mmtx-bench-cache]

Builds, once, the CIFAR-10 training split's image cache (50,000 JPEG files decoded into one uint8 tensor) and Tiny
Shakespeare's token cache folder (character vocabulary), as `vit_cifar` and `gpt_shakespeare` build them. Then, in
interleaved rounds: the cache file's `torch.load` alone, the checksum of its contents (`content_checksum`, which
`load_or_build` computes on every load), and the whole `load_or_build` call; for the text cache, reading its split
into memory as the data module does (memory map, int64 copy) and checking its folder (`damage`: every file's size
and SHA-256). Prints each figure's mean and spread over the rounds and the check's share of a load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmtx.data import cache  # noqa: E402
from mmtx.data.cache import content_checksum, damage, load_or_build  # noqa: E402
from mmtx.data.image_sources import ImageFolder  # noqa: E402
from mmtx.data.text import TextDataModule  # noqa: E402
from mmtx.data.text_sources import TextFiles  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def show(name: str, values: list[float]) -> None:
    print(f"  {name:<46} mean {statistics.mean(values) * 1000:8.1f} ms   "
          f"range {min(values) * 1000:.1f}-{max(values) * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="../shared/data")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", default="/tmp/mmtx-bench-cache")
    args = parser.parse_args()
    root, work = Path(args.root), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    source = ImageFolder(root / "cifar10", image_size=32)
    path = work / "cifar10-train.pt"
    fingerprint = source.fingerprint("train")
    t0 = time.perf_counter()
    cached = load_or_build(path, fingerprint, lambda: source.decode("train"))
    print(f"image cache {path}: {path.stat().st_size / 1e6:.1f} MB on disk, "
          f"{content_checksum(cached)['bytes'] / 1e6:.1f} MB checksummed (ready in {time.perf_counter() - t0:.1f} s)")

    text = TextDataModule(TextFiles(str(root / "tinyshakespeare" / "input.txt")), cache_dir=str(work / "text"),
                          vocab={"kind": "char"}, block_size=256)
    text.prepare_data()
    folder = text._cache_path()
    print(f"text cache {folder}: {sum(p.stat().st_size for p in folder.iterdir()) / 1e6:.2f} MB")

    results: dict[str, list[float]] = {k: [] for k in ("load", "check", "load_or_build", "text_read", "text_check")}
    for _ in range(args.rounds):  # interleaved: a drift of the machine's speed touches every figure alike
        results["load"].append(timed(lambda: torch.load(path, map_location="cpu", weights_only=True)))
        results["check"].append(timed(lambda: content_checksum(cached)))
        cache._WHOLE.clear()  # as a new run's first load: the check runs once a process
        results["load_or_build"].append(timed(lambda: load_or_build(path, fingerprint, lambda: source.decode("train"))))
        results["text_read"].append(timed(lambda: np.memmap(folder / "train.bin", dtype="uint16", mode="r").astype(np.int64)))
        results["text_check"].append(timed(lambda: damage(folder)))  # what verified() runs once a process

    print(f"\n{args.rounds} interleaved rounds:")
    show("image cache: torch.load alone", results["load"])
    show("image cache: checksum of its contents", results["check"])
    show("image cache: load_or_build (load + checksum)", results["load_or_build"])
    show("text cache: read the training split (int64)", results["text_read"])
    show("text cache: check every file (size, SHA-256)", results["text_check"])
    share = [c / l for c, l in zip(results["check"], results["load_or_build"])]
    print(f"\nthe checksum's share of an image-cache load: mean {statistics.mean(share):.1%}, "
          f"range {min(share):.1%}-{max(share):.1%}")
    mb_s = [content_checksum(cached)["bytes"] / 1e6 / c for c in results["check"]]
    print(f"checksum throughput: mean {statistics.mean(mb_s):.0f} MB/s (range {min(mb_s):.0f}-{max(mb_s):.0f})")


if __name__ == "__main__":
    main()
