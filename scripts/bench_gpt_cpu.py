"""nanoGPT's CPU configuration of shakespeare_char, trained by mmtx and by a plain PyTorch loop, same run.

Configuration (nanoGPT README, "I only have a macbook"): character level,
4 layers, 4 heads, dim 128, block 64, batch 12, 2,000 iterations, AdamW
lr 1e-3 (100 warm-up iterations, cosine to 1e-4), weight decay 0.1,
betas (0.9, 0.99), gradient clipping 1.0, no dropout, no biases.

Peer: a plain loop written in nanoGPT's manner (random windows with
torch.randint, train/val loss estimates of 20 batches every 250 iterations)
around a GPT of the same shape; it stands in for nanoGPT, which reaches
validation loss 1.886 in 78 s on this machine (figure from the issue).
mmtx: `task=gpt_shakespeare_cpu` through Lightning (`mmtx.train.train`).
Both are scored on the same number at the end: the mean loss over every
non-overlapping 64-token window of the validation split (the last 10%).
Times are wall-clock seconds of training + evaluation, in one process, the
same machine, one after the other.

    python scripts/bench_gpt_cpu.py [--root ../shared/data] [--only mmtx|plain]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from mmtx import compose
from mmtx.data.sources import resolve_root
from mmtx.train import train

LAYERS, HEADS, DIM, BLOCK, BATCH, ITERS = 4, 4, 128, 64, 12, 2000
LR, MIN_LR, WARMUP, WD, BETAS, CLIP = 1e-3, 1e-4, 100, 0.1, (0.9, 0.99), 1.0
EVAL_INTERVAL, EVAL_ITERS = 250, 20


class PlainBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM, bias=False), nn.LayerNorm(DIM, bias=False)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM, bias=False), nn.Linear(DIM, DIM, bias=False)
        self.fc, self.out = nn.Linear(DIM, 4 * DIM, bias=False), nn.Linear(4 * DIM, DIM, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, HEADS, C // HEADS).transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class PlainGPT(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, DIM), nn.Embedding(BLOCK, DIM)
        self.blocks = nn.ModuleList(PlainBlock() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(DIM, bias=False)
        self.head = nn.Linear(DIM, vocab_size, bias=False)
        self.head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * LAYERS) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def lr_at(it: int) -> float:
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    ratio = (it - WARMUP) / (ITERS - WARMUP)
    return MIN_LR + 0.5 * (1 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def full_val_loss(logits_fn, val: torch.Tensor) -> float:
    """Mean loss over all non-overlapping BLOCK windows of the validation split."""
    n = (len(val) - 1) // BLOCK
    starts = torch.arange(n) * BLOCK
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in starts.split(256):
            w = val[chunk[:, None] + torch.arange(BLOCK + 1)]
            logits = logits_fn(w[:, :-1])
            total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
            count += w[:, 1:].numel()
    return total / count


def plain_run(text: str, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(data))
    splits = {"train": data[:cut], "val": data[cut:]}
    t0 = time.perf_counter()
    model = PlainGPT(len(chars))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS)

    def batch(split):
        d = splits[split]
        ix = torch.randint(len(d) - BLOCK, (BATCH,))
        return torch.stack([d[i:i + BLOCK] for i in ix]), torch.stack([d[i + 1:i + 1 + BLOCK] for i in ix])

    for it in range(ITERS + 1):
        if it % EVAL_INTERVAL == 0:
            model.eval()
            with torch.no_grad():
                for split in ("train", "val"):
                    sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                        for x, y in (batch(split) for _ in range(EVAL_ITERS)))
            model.train()
        if it == ITERS:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        x, y = batch("train")
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    val = full_val_loss(model, splits["val"])
    return time.perf_counter() - t0, val


def mmtx_run(root: str, seed: int) -> tuple[float, float]:
    out = tempfile.mkdtemp(prefix="mmtx-bench-gpt-")
    cfg = compose("gpt_shakespeare_cpu", [f"data.root={root}", "trainer=cpu", "trainer.enable_progress_bar=false",
                                          f"seed={seed}",
                                          f"paths.output_root={out}", f"paths.cache_dir={out}/cache", "logger=csv"])
    t0 = time.perf_counter()
    summary = train(cfg, run_dir=f"{out}/run")
    return time.perf_counter() - t0, summary["test/loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None)
    parser.add_argument("--only", choices=["mmtx", "plain"], default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
    args = parser.parse_args()
    root = resolve_root(args.root)
    text = (root / "tinyshakespeare" / "input.txt").read_text()
    results: dict[str, list[tuple[float, float]]] = {"plain": [], "mmtx": []}
    for seed in args.seeds:  # alternate the two, seed by seed, so drift hits both
        if args.only in (None, "plain"):
            results["plain"].append(plain_run(text, seed))
        if args.only in (None, "mmtx"):
            results["mmtx"].append(mmtx_run(str(root), seed))
    print(f"threads={torch.get_num_threads()} config: {LAYERS} layers, {HEADS} heads, dim {DIM}, block {BLOCK}, "
          f"batch {BATCH}, {ITERS} iterations; seeds {args.seeds}")
    for name, runs in results.items():
        for seed, (seconds, loss) in zip(args.seeds, runs):
            print(f"{name} seed {seed}: {seconds:.1f} s wall (training + evaluation), full validation loss {loss:.4f}")
        if runs:
            mean_s, mean_loss = (sum(r[i] for r in runs) / len(runs) for i in (0, 1))
            print(f"{name} mean: {mean_s:.1f} s, validation loss {mean_loss:.4f}")
    if results["plain"] and results["mmtx"]:
        ratio = sum(r[0] for r in results["mmtx"]) / sum(r[0] for r in results["plain"])
        print(f"ratio mmtx/plain (total wall time): {ratio:.3f}")
    print("anchor: nanoGPT, validation loss 1.886 in 78 s on this machine (issue 3)")


if __name__ == "__main__":
    main()
