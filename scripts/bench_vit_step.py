"""Train-step time of the mmtx ViT against timm's VisionTransformer with identical dimensions.

Both models: 32x32 images, patch 4, dim 192, depth 6, 3 heads, MLP ratio 4,
CLS token, 10 classes; one step is forward, cross-entropy, backward and an
AdamW update on a batch of 128. The two are timed in alternating rounds in
the same process, and the figure is the ratio of their median step times
(mmtx / timm), since absolute times drift on a shared machine.

    python scripts/bench_vit_step.py [--rounds 5 --steps 5 --batch 128 --device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from mmtx.backbone import Backbone
from mmtx.batch import ImageBatch
from mmtx.module import MmtxModule
from mmtx.tasks import Classification
from mmtx.tokenizers import PatchTokenizer

DIM, DEPTH, HEADS, PATCH, SIZE, CLASSES = 192, 6, 3, 4, 32, 10


class MmtxViT(torch.nn.Module):
    """The model `task=vit_cifar` trains (MmtxModule: backbone + classification part), at these sizes."""

    def __init__(self) -> None:
        super().__init__()
        tokenizer = PatchTokenizer(DIM, patch_size=PATCH, image_size=SIZE)
        backbone = Backbone(DIM, DEPTH, HEADS)
        part = Classification(tokenizer, DIM, CLASSES, pool="cls", confusion_matrix=False, media_samples=0)
        self.model = MmtxModule(backbone, {"main": part}, optim={})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(ImageBatch(images))


def timm_vit() -> torch.nn.Module:
    return VisionTransformer(
        img_size=SIZE, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES
    )


def step_times(model, optimizer, images, labels, steps, sync) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    images = torch.randn(args.batch, 3, SIZE, SIZE, device=device)
    labels = torch.randint(0, CLASSES, (args.batch,), device=device)
    models = {"mmtx": MmtxViT().to(device), "timm": timm_vit().to(device)}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    for name, model in models.items():  # warm-up: allocator, kernels, first-touch pages
        step_times(model, optims[name], images, labels, 2, sync)

    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for name in order:
            times[name] += step_times(models[name], optims[name], images, labels, args.steps, sync)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"threads={torch.get_num_threads()} device={device} batch={args.batch} "
          f"steps={args.rounds * args.steps} per model, params mmtx={params['mmtx']:,} timm={params['timm']:,}")
    for name in models:
        print(f"{name}: {med[name] * 1000:.1f} ms/step, {args.batch / med[name]:.1f} images/s")
    print(f"ratio mmtx/timm (step time): {med['mmtx'] / med['timm']:.3f}")


if __name__ == "__main__":
    main()
