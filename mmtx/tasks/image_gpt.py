"""Images generated as tokens (iGPT, Chen et al. 2020): a decoder-only model over [class token; the image's palette
ids in raster order] (`mmtx.data.image_tokens`), trained with the language model's next-token loss, that draws an
image pixel by pixel for a class prompt, or completes the lower part of a given image.

Metric: bits per dimension, iGPT's measure: the test loss in bits per pixel token divided by the 3 colour values a
pixel has, of the palette-quantized image (not comparable with figures on the raw 8-bit pixels, which a 512-colour
palette does not keep). Sample grids (`family.samples_per_class` for each of the first `family.sample_classes`
classes) go to W&B and TensorBoard at each validation end.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mmtx.errors import CheckpointError, ConfigError, Count, Natural, NonNegative
from mmtx.tasks.base import StepContext, evaluating, whole_weights
from mmtx.tasks.decoding import generate
from mmtx.tasks.language_model import CausalLM, LanguageModel
from mmtx.tasks.reports import log_media
from mmtx.tokenizers.palette import START, class_token, dequantize, palette_of, quantize


class PaletteDecoder(CausalLM):
    """The language model as a decoder that only ever draws colours: every other token's logit is -inf."""

    def __init__(self, part: "ImageGPT", backbone: nn.Module) -> None:
        super().__init__(part, backbone)
        self.first_colour = part.first_colour

    def decode(self, ids: torch.Tensor, caches=None, start: int = 0) -> torch.Tensor:
        logits = super().decode(ids, caches, start)  # (B, T, V)
        logits[..., :self.first_colour] = float("-inf")
        return logits


class ImageGPT(LanguageModel):
    """Next-pixel-token prediction over palette-quantized images (the tokenizer's vocabulary is a palette,
    `mmtx.tokenizers.palette`). image_size: (H, W) of the token grid; class_names: the classes whose tokens prompt
    a class's image (conditional data), else images start from `<image>`."""

    kind = "image_gpt"
    can = frozenset({"generate"})

    def __init__(
        self,
        tokenizer: nn.Module,
        dim: Count,
        image_size: list[int],
        class_names: list[str] | None = None,
        conditional: bool = True,
        sample_classes: Natural = 10,
        samples_per_class: Natural = 1,
        sample_temperature: NonNegative = 1.0,
        sample_top_k: int | None = None,
    ) -> None:
        vocab = getattr(tokenizer, "vocab", None)
        if vocab is None or vocab.kind != "palette":
            raise ConfigError("family=image_gpt draws images from palette tokens: use data=image_tokens (its vocabulary "
                              "is the palette), with tokenizer=image_tokens")
        self.height, self.width = (int(v) for v in image_size)
        self.class_names = [str(c) for c in (class_names or [])] if conditional else []
        prompts = [class_token(c) for c in self.class_names[:sample_classes]] or [START]
        super().__init__(tokenizer, dim, sample_prompts=prompts, sample_tokens=self.height * self.width,
                         sample_temperature=sample_temperature, sample_top_k=sample_top_k)
        self.conditional = conditional
        self.samples_per_class = samples_per_class
        palette, self.first_colour = palette_of(vocab)
        self.register_buffer("palette", palette, persistent=False)  # (k, 3), from the vocabulary

    def step(self, logits: torch.Tensor | None, batch, stage: str, ctx: StepContext,
             loss: torch.Tensor | None = None) -> torch.Tensor:
        loss = super().step(logits, batch, stage, ctx, loss)
        if stage != "train":
            bpd = loss / math.log(2) / 3  # bits per pixel token / its 3 colour values
            ctx.log(f"{stage}/bpd", bpd, on_epoch=True, prog_bar=True, batch_size=batch.targets.numel(), sync_dist=True)
        return loss

    def epoch_end(self, stage: str, ctx: StepContext) -> None:
        if stage != "val" or ctx.sanity_checking or not self.samples_per_class or not self.sample_prompts:
            return
        generator = torch.Generator(self.palette.device).manual_seed(ctx.global_step)
        with whole_weights(ctx.trainer):
            images = self.draw(ctx.backbone, self.sample_prompts, self.samples_per_class,
                               temperature=self.sample["temperature"], top_k=self.sample["top_k"], generator=generator)
        captions = [p for p in self.sample_prompts for _ in range(self.samples_per_class)]
        log_media(ctx.trainer, f"{ctx.prefix}samples", captions, images=images.float() / 255)

    @torch.no_grad()
    def draw(self, backbone: nn.Module, prompts: str | list[str], num: int = 1, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             image: torch.Tensor | None = None, keep_rows: int | None = None, use_cache: bool = True) -> torch.Tensor:
        """`num` images of each class of `prompts` (class names; `<image>` unconditioned), drawn pixel by pixel, all
        in one batch: (len(prompts) * num, 3, H, W) uint8, a prompt's images together. With `image` (3, H, W) uint8
        at the model's size: its first `keep_rows` rows (default: half) are kept and the rest completed."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        starts = []
        for prompt in prompts:
            ids = self.vocab.encode(class_token(prompt) if prompt != START else START)
            if len(ids) != 1:
                raise ConfigError(f"prompt={prompt!r} must be one class name of this model: {self.class_names or [START]}")
            starts += ids * num
        device = self.palette.device
        ids = torch.tensor(starts, device=device)[:, None]  # (len(prompts) * num, 1)
        kept = 0
        if image is not None:
            if tuple(image.shape) != (3, self.height, self.width):
                raise ConfigError(f"image= is {image.shape[-2]}x{image.shape[-1]} pixels of {image.shape[0]} channels, "
                                  f"and this model draws {self.height}x{self.width} RGB images")
            kept = self.width * (self.height // 2 if keep_rows is None else keep_rows)
            given = quantize(image[None].to(device), self.palette)[:, :kept] + self.first_colour  # (1, kept)
            ids = torch.cat([ids, given.expand(len(ids), -1)], dim=1)
        with evaluating(self, backbone):
            out = generate(PaletteDecoder(self, backbone), ids, self.height * self.width - kept, temperature, top_k,
                           top_p, use_cache=use_cache, generator=generator)
        pixels = out[:, 1:] - self.first_colour  # (N, H*W) palette ids
        return dequantize(pixels, self.palette, self.height, self.width)

    def check_transfer(self, checkpoint: dict[str, Any], path: Any) -> None:
        """`init_from` another image-token model: its token ids are colours of its own palette, so a checkpoint whose
        palette differs from this run's (another data set, palette_size, image_size) is refused, naming both,
        instead of loading embeddings whose rows now mean other colours."""
        from mmtx.checkpoints.io import with_members
        from mmtx.tokenizers.text import Vocab

        members = (with_members(checkpoint).get("mmtx_members") or {}) if "state_dict" in checkpoint else {}
        vocabs = [Vocab.from_json(m["mmtx_vocab"]) for m in members.values() if m.get("mmtx_vocab")]
        theirs = [v for v in vocabs if v.kind == "palette"]
        if not theirs:
            return
        if not any(v.tokenizer.get_vocab() == self.vocab.tokenizer.get_vocab() for v in theirs):
            other, _ = palette_of(theirs[0])
            raise ConfigError(f"init_from checkpoint {path} draws with a palette of {len(other)} colours (and its "
                              f"classes) that is not this run's ({len(self.palette)} colours fitted on this data, "
                              "data.palette_size, data.image_size): its token ids would mean other colours; "
                              "fine-tune with the data, palette_size and image_size it was trained with")

    def extra_state(self) -> dict[str, Any]:
        family = {"image_size": [self.height, self.width], "class_names": self.class_names,
                  "conditional": self.conditional}
        return {**super().extra_state(), "mmtx_runtime": {"tokenizer": {"max_len": self.tokenizer.max_len},
                                                          "family": family}}

    @classmethod
    def runtime_from_checkpoint(cls, checkpoint: dict[str, Any], cfg: Any, path: str) -> dict[str, Any]:
        from mmtx.tokenizers.text import Vocab

        if "mmtx_vocab" not in checkpoint or "mmtx_runtime" not in checkpoint:
            raise CheckpointError(f"checkpoint {path} has no palette or image size (it was not written by an image_gpt "
                                  "run)")
        runtime = checkpoint["mmtx_runtime"]
        return {"tokenizer": {**runtime["tokenizer"], "vocab": Vocab.from_json(checkpoint["mmtx_vocab"])},
                "family": dict(runtime["family"])}
