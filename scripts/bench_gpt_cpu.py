"""nanoGPT's CPU configuration of shakespeare_char, trained by mmtx and by a nanoGPT-style loop, same run.

Configuration (nanoGPT README, "I only have a macbook"): character level,
4 layers, 4 heads, dim 128, block 64, batch 12, 2,000 iterations, AdamW
lr 1e-3 (100 warm-up iterations, cosine to 1e-4), weight decay 0.1,
betas (0.9, 0.99), gradient clipping 1.0, no dropout, no biases.

Peer (`--peer`): nanoGPT's train.py and model.py, restated in one function
(nanoGPT itself cannot be fetched onto the development machine): the same
GPT (learned positions, tied embeddings, 0.02 / sqrt(2 L) residual init,
dropout modules at p = 0), `get_batch` from uint16 train.bin / val.bin
mapped again for every batch, the warm-up/cosine `get_lr`, a 20-batch
train/val `estimate_loss` every 250 iterations with a checkpoint saved when
it improves, a log line with loss, step time and MFU every iteration
(`--log_interval=1`), and the loop's 2,001 optimizer steps. After the loop
it also scores the full validation split (nanoGPT does not), inside its
process time, so both sides report the same figure.

mmtx: `python -m mmtx.train task=gpt_shakespeare_cpu`, the command a user
runs, whose test at the end scores the full validation split.

Both run as separate processes, one after the other, seed by seed; a run's
time is its whole process, imports included, from start to exit (mmtx's token
cache and nanoGPT's prepare.py output are built once beforehand). The figure
both are scored on: the mean loss over every non-overlapping 64-token
window of the validation split (the last 10% of the text).

    python scripts/bench_gpt_cpu.py [--root ../shared/data] [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LAYERS, HEADS, DIM, BLOCK, BATCH, ITERS = 4, 4, 128, 64, 12, 2000
LR, MIN_LR, WARMUP, WD, BETAS, CLIP = 1e-3, 1e-4, 100, 0.1, (0.9, 0.99), 1.0
EVAL_INTERVAL, EVAL_ITERS = 250, 20
TARGET = 1.89


class NanoBlock(nn.Module):
    """nanoGPT's Block at bias=False, dropout 0: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(DIM, bias=False), nn.LayerNorm(DIM, bias=False)
        self.c_attn, self.attn_proj = nn.Linear(DIM, 3 * DIM, bias=False), nn.Linear(DIM, DIM, bias=False)
        self.c_fc, self.mlp_proj = nn.Linear(DIM, 4 * DIM, bias=False), nn.Linear(4 * DIM, DIM, bias=False)
        self.gelu = nn.GELU()
        self.resid_dropout, self.mlp_dropout = nn.Dropout(0.0), nn.Dropout(0.0)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, HEADS, C // HEADS).transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.resid_dropout(self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C)))  # (B, H, T, Dh) -> (B, T, C)
        return x + self.mlp_dropout(self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x)))))


class NanoGPT(nn.Module):
    """nanoGPT's GPT: learned positions, tied embeddings, N(0, 0.02) init, residual projections / sqrt(2 L)."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, DIM), nn.Embedding(BLOCK, DIM)
        self.drop = nn.Dropout(0.0)
        self.h = nn.ModuleList(NanoBlock() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(DIM, bias=False)
        self.lm_head = nn.Linear(DIM, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual = name.endswith(("attn_proj.weight", "mlp_proj.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * LAYERS) if residual else 0.02)

    def forward(self, idx, targets):
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1])))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def prepare(text_path: Path, data_dir: Path) -> int:
    """nanoGPT's data/shakespeare_char/prepare.py: characters -> uint16 train.bin / val.bin (90/10); the vocabulary size."""
    text = text_path.read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    cut = int(0.9 * len(ids))
    data_dir.mkdir(parents=True, exist_ok=True)
    ids[:cut].tofile(data_dir / "train.bin")
    ids[cut:].tofile(data_dir / "val.bin")
    return len(chars)


def peer(data_dir: str, vocab_size: int, seed: int, out_dir: str) -> dict:
    """nanoGPT's training loop and model at the CPU configuration; returns its losses and times."""
    t_start = time.perf_counter()
    torch.manual_seed(seed)

    def get_batch(split):
        # nanoGPT maps the file again for every batch (to avoid a memory leak of np.memmap)
        d = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
        ix = torch.randint(len(d) - BLOCK, (BATCH,))
        x = torch.stack([torch.from_numpy(d[i:i + BLOCK].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(d[i + 1:i + 1 + BLOCK].astype(np.int64)) for i in ix])
        return x, y

    def get_lr(it):
        if it < WARMUP:
            return LR * (it + 1) / (WARMUP + 1)
        if it > ITERS:
            return MIN_LR
        ratio = (it - WARMUP) / (ITERS - WARMUP)
        return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        out = {s: float(np.mean([model(*get_batch(s))[1].item() for _ in range(EVAL_ITERS)])) for s in ("train", "val")}
        model.train()
        return out

    model = NanoGPT(vocab_size)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=LR, betas=BETAS)
    X, Y = get_batch("train")
    iter_num, best_val, estimates = 0, 1e9, {}
    n_params = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    t0, running_mfu = time.time(), -1.0
    while True:
        for group in optimizer.param_groups:
            group["lr"] = get_lr(iter_num)
        if iter_num % EVAL_INTERVAL == 0:
            losses = estimate_loss()
            estimates[iter_num] = losses["val"]
            if losses["val"] < best_val:
                best_val = losses["val"]
                if iter_num > 0:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": iter_num},
                               os.path.join(out_dir, "ckpt.pt"))
        _, loss = model(X, Y)
        X, Y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t1 = time.time()  # --log_interval=1: nanoGPT logs the loss, step time and MFU every iteration
        dt, t0 = t1 - t0, t1
        lossf = loss.item()
        if iter_num >= 5:
            mfu = (6 * n_params + 12 * LAYERS * DIM * BLOCK) * BLOCK * BATCH / dt / 312e12
            running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
        print(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, mfu {running_mfu * 100:.2f}%")
        iter_num += 1
        if iter_num > ITERS:
            break
    loop_end = time.perf_counter()
    model.eval()
    val = np.fromfile(os.path.join(data_dir, "val.bin"), dtype=np.uint16).astype(np.int64)
    full = full_val_loss(lambda w: model(w[:, :-1], w[:, 1:])[0], torch.from_numpy(val))
    return {"estimates": estimates, "full_val_loss": full, "loop_s": loop_end - t_start}


def full_val_loss(logits_fn, val) -> float:
    """Mean loss over all non-overlapping BLOCK windows of the validation split."""
    n = (len(val) - 1) // BLOCK
    starts = torch.arange(n) * BLOCK
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in starts.split(256):
            w = val[chunk[:, None] + torch.arange(BLOCK + 1)]  # (b, BLOCK + 1)
            logits = logits_fn(w)
            total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
            count += w[:, 1:].numel()
    return total / count


def timed(cmd: list[str], log_path: Path) -> float:
    """Run `cmd` to its end (output to `log_path`); its wall time in seconds."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}); see {log_path}")
    return seconds


def mmtx_overrides(root: str, cache: str) -> list[str]:
    return [f"data.root={root}", f"paths.cache_dir={cache}", "trainer=cpu", "trainer.enable_progress_bar=false",
            "logger=csv"]


def mmtx_val_curve(run_dir: Path) -> dict[int, float]:
    """val/loss by step from the CSV logger (the in-training estimate: limit_val_batches windows)."""
    curve = {}
    for path in run_dir.glob("**/metrics.csv"):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("val/loss"):
                    curve[int(row["step"]) + 1] = float(row["val/loss"])
    return dict(sorted(curve.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
    parser.add_argument("--only", choices=["mmtx", "peer"], default=None)
    parser.add_argument("--mmtx-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra overrides for mmtx, e.g. tokenizer.pos_embed=learned backbone.rotary=false")
    parser.add_argument("--peer", default=None, metavar="DIR", help="internal: run the peer once on DIR/{train,val}.bin")
    parser.add_argument("--vocab-size", type=int, default=65, help="internal: the peer's vocabulary size")
    parser.add_argument("--seed", type=int, default=1337, help="internal: the peer's seed")
    parser.add_argument("--out", default=None, help="internal: the peer's checkpoint folder")
    args = parser.parse_args()
    if args.peer:  # before importing mmtx: the peer's process loads torch and numpy alone, as nanoGPT's does
        print("PEER " + json.dumps(peer(args.peer, args.vocab_size, args.seed, args.out)))
        return

    from mmtx.data.sources import resolve_root

    root = resolve_root(args.root)
    text_path = root / "tinyshakespeare" / "input.txt"
    if not text_path.is_file():
        sys.exit(f"{text_path} not found (give --root, or set MMTX_DATA_DIR)")

    from mmtx import compose
    from mmtx.wiring import build_data

    work = Path(tempfile.mkdtemp(prefix="mmtx-bench-gpt-"))
    cache = str(work / "cache")
    build_data(compose("gpt_shakespeare_cpu", mmtx_overrides(str(root), cache)))  # mmtx's token cache, and ...
    vocab_size = prepare(text_path, work / "shakespeare_char")  # ... nanoGPT's prepare.py: neither is timed
    results: dict[str, list[dict]] = {"peer": [], "mmtx": []}
    for seed in args.seeds:  # alternate the two, seed by seed, so drift hits both
        if args.only in (None, "peer"):
            out = work / f"peer-{seed}"
            out.mkdir()
            cmd = [sys.executable, __file__, "--peer", str(work / "shakespeare_char"), "--vocab-size", str(vocab_size),
                   "--seed", str(seed), "--out", str(out)]
            seconds = timed(cmd, out / "log.txt")
            line = next(l for l in (out / "log.txt").read_text().splitlines() if l.startswith("PEER "))
            results["peer"].append({"seed": seed, "wall_s": seconds, **json.loads(line[5:])})
        if args.only in (None, "mmtx"):
            run_dir = work / f"mmtx-{seed}"
            cmd = [sys.executable, "-m", "mmtx.train", "task=gpt_shakespeare_cpu", f"seed={seed}",
                   f"hydra.run.dir={run_dir}", *mmtx_overrides(str(root), cache), *args.mmtx_overrides]
            seconds = timed(cmd, work / f"mmtx-{seed}.log")
            summary = json.loads((run_dir / "summary.json").read_text())
            results["mmtx"].append({"seed": seed, "wall_s": seconds, "full_val_loss": summary["test/loss"],
                                    "curve": mmtx_val_curve(run_dir)})
    report(results, args.seeds, args.mmtx_overrides)


def report(results: dict[str, list[dict]], seeds: list[int], overrides: list[str]) -> None:
    print(f"threads={torch.get_num_threads()} config: {LAYERS} layers, {HEADS} heads, dim {DIM}, block {BLOCK}, "
          f"batch {BATCH}, {ITERS} iterations; seeds {seeds}; mmtx overrides {overrides or 'none'}")
    for r in results["peer"]:
        curve = ", ".join(f"{step}: {r['estimates'][str(step)]:.3f}" for step in range(500, ITERS + 1, 500))
        print(f"peer seed {r['seed']}: {r['wall_s']:.1f} s wall (process; its training loop ended at "
              f"{r['loop_s']:.1f} s), nanoGPT's 20-batch val estimate {r['estimates'][str(ITERS)]:.4f}, "
              f"full validation loss {r['full_val_loss']:.4f}; val estimate by step {{{curve}}}")
    for r in results["mmtx"]:
        curve = ", ".join(f"{step}: {loss:.3f}" for step, loss in r["curve"].items())
        print(f"mmtx seed {r['seed']}: {r['wall_s']:.1f} s wall (process), full validation loss "
              f"{r['full_val_loss']:.4f}; in-training val/loss by step {{{curve}}}")
    for name, runs in results.items():
        if runs:
            mean_s = sum(r["wall_s"] for r in runs) / len(runs)
            mean_loss = sum(r["full_val_loss"] for r in runs) / len(runs)
            print(f"{name} mean: {mean_s:.1f} s, full validation loss {mean_loss:.4f} (target <= {TARGET})")
    if results["peer"] and results["mmtx"]:
        ratio = sum(r["wall_s"] for r in results["mmtx"]) / sum(r["wall_s"] for r in results["peer"])
        print(f"wall-time ratio mmtx/peer (whole processes, all seeds): {ratio:.3f} (target <= 1.0)")
    print("anchor: nanoGPT, validation loss 1.886 (its 20-batch estimate) in 78 s on this machine (issue 3)")


if __name__ == "__main__":
    main()
