"""Masked modelling: hide part of the input, predict it from the rest, on the shared backbone run bidirectionally.

One family, one recipe a modality (the tokenizer's `modality` picks it):

- text (BERT, Devlin et al., 2019): `mask_ratio` of the tokens (default 15%) are chosen; of those 80% become
  `[MASK]`, 10% a random token, 10% stay; a head tied to the token embedding predicts the chosen tokens. The
  vocabulary gets `[MASK]` as one more id at its end (`vocab_tokens`), so no other token's id changes.
- images (MAE, He et al., 2022): `mask_ratio` of the patches (default 75%) are dropped before the encoder, which
  sees only the kept patches with their x/y positions (a quarter of the tokens at 75%; the dropped patches' pixels
  are zeroed before the tokenizer's stem, whose convolutions may reach across patches); a small decoder of its own
  width and depth (`family.decoder`) gets the encoded patches and a learned mask token at every dropped position,
  with fixed 2D sin-cos positions, and predicts the pixels of the dropped patches, each normalised by its own mean
  and variance (`norm_pix_loss`).
- audio (masked spectrogram modelling, as Audio-MAE and data2vec mask time spans): spans of `span` tokens are
  chosen until `mask_ratio` of the tokens (default 50%) are; their log-mel frames are replaced by a learned frame
  before the stem; a linear head predicts the frames of the chosen tokens.

Training masks come from the global random state (seeded by `seed`, restored on resume, as dropout's); validation
and test masks from a generator of their own, reset at every evaluation, so every validation scores the same masks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmtx.batch import IGNORE_INDEX, AudioBatch, ImageBatch, TokenBatch, Tokens
from mmtx.errors import ConfigError, Count, Natural, number
from mmtx.data.modalities import modality_of
from mmtx.nn.pos_embed import sincos_2d
from mmtx.tasks.base import StepContext, TaskPart, TiedOutput
from mmtx.tasks.reports import log_media, log_text_table

MASK = "[MASK]"
RATIOS = {"text": 0.15, "image": 0.75, "audio": 0.5}  # each recipe's default share of masked tokens
EVAL_SEED = 1234  # validation and test masks: the same at every evaluation


class MaskedOutputs(NamedTuple):
    """pred: (B, N, P) predictions (text: (B, T, V) logits); target: the same shape (text: (B, T) ids, IGNORE_INDEX
    where nothing was chosen); weight: (B, N) 1 where the loss counts (text: None)."""

    pred: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None


class Masked(TaskPart):
    """Masked modelling on the shared backbone (see the module's doc): the tokenizer's modality picks the recipe."""

    kind = "masked"
    vocab_tokens = (MASK,)  # added at the end of a text vocabulary when the model is built (mmtx.config.wiring)
    outputs_needed = ("val", "test")

    def __init__(
        self,
        tokenizer: nn.Module,
        dim: Count,
        mask_ratio: Annotated[float | None, number(0, 1, low_open=True, high_open=True, optional=True)] = None,
        span: Count = 4,
        norm_pix_loss: bool = True,
        decoder: dict[str, Any] | None = None,
        media_samples: Natural = 8,
        # What the data modules hand every family at run time (a classifier's classes, a language model's sampling
        # prompt): taken, and not needed here.
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        chars_per_token: float | None = None,
        default_prompt: str | None = None,
    ) -> None:
        super().__init__()
        modality = getattr(tokenizer, "modality", None)
        if modality not in RATIOS:
            raise ConfigError(f"family=masked masks text, image or audio tokens; tokenizer {type(tokenizer).__name__} "
                              f"reads {modality or 'an unnamed'} input: pick tokenizer=char, bpe, patch or mel")
        self.tokenizer, self.modality_name = tokenizer, modality
        self.mask_ratio = RATIOS[modality] if mask_ratio is None else float(mask_ratio)
        self.span, self.norm_pix_loss, self.media_samples = span, norm_pix_loss, media_samples
        self._generators: dict[torch.device, torch.Generator] = {}
        self._media: list[Any] = []
        if modality == "text":
            self._build_text(tokenizer)
        elif modality == "image":
            self._build_image(tokenizer, dim, decoder)
        else:
            self._build_audio(tokenizer, dim)

    # -- building -------------------------------------------------------------------------------------------------

    def _build_text(self, tokenizer: nn.Module) -> None:
        vocab = getattr(tokenizer, "vocab", None)
        mask_id = vocab.token_id(MASK) if vocab is not None else None
        if mask_id is None:
            raise ConfigError(f"family=masked on text needs a vocabulary with a {MASK} token; this tokenizer has "
                              f"{'none' if vocab is None else 'a vocabulary without it'} (tokenizer.vocab)")
        self.mask_id, self.vocab_size = mask_id, len(vocab)
        dim = tokenizer.embed.embedding_dim
        # BERT's prediction head: a dense layer, GELU and LayerNorm, then the tied embedding with a bias per token.
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=1e-12))
        self.head = TiedOutput(tokenizer.embed)
        self.head_bias = nn.Parameter(torch.zeros(tokenizer.embed.num_embeddings))

    def _build_image(self, tokenizer: nn.Module, dim: int, decoder: dict[str, Any] | None) -> None:
        from mmtx.backbone import Backbone

        if not hasattr(tokenizer, "patch_size"):
            raise ConfigError(f"family=masked on images needs a patch grid; {type(tokenizer).__name__} has none")
        spec = dict(decoder or {"dim": dim, "depth": 1, "num_heads": 4})
        width, heads = spec["dim"], spec["num_heads"]
        if width > dim:
            raise ConfigError(f"family.decoder.dim={width} is wider than the encoder (backbone.dim={dim}): MAE's "
                              f"decoder is narrower than its encoder; set family.decoder.dim <= {dim}")
        if width % heads:
            raise ConfigError(f"family.decoder.dim={width} is not divisible by family.decoder.num_heads={heads}")
        spec.update(causal=False, cross_attention=False, rotary=False)
        self.decoder_embed = nn.Linear(dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder = Backbone(**spec)
        patch = tokenizer.patch_size
        self.pixels = nn.Linear(width, patch * patch * tokenizer.in_channels)
        nn.init.normal_(self.mask_token, std=0.02)

    def _build_audio(self, tokenizer: nn.Module, dim: int) -> None:
        self.frames_per_token = tokenizer.stem.frames_per_token
        self.mask_frame = nn.Parameter(torch.zeros(tokenizer.n_mels))
        self.frames_head = nn.Linear(dim, self.frames_per_token * tokenizer.n_mels)

    # -- masks ------------------------------------------------------------------------------------------------------

    def _uniform(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Uniform noise of `shape`: the global random state in training, the evaluation generator otherwise."""
        if self.training:
            return torch.rand(shape, device=device)
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device).manual_seed(EVAL_SEED)
        return torch.rand(shape, device=device, generator=generator)

    def epoch_start_eval(self) -> None:
        self._generators.clear()  # the next evaluation draws the same masks again

    # -- forward ----------------------------------------------------------------------------------------------------

    def forward(self, backbone: nn.Module, batch: Any) -> MaskedOutputs:
        if self.modality_name == "text":
            return self._text(backbone, batch)
        if self.modality_name == "image":
            return self._image(backbone, batch)
        return self._audio(backbone, batch)

    def _text(self, backbone: nn.Module, batch: TokenBatch) -> MaskedOutputs:
        ids = batch.tokens  # (B, T)
        noise = self._uniform((3, *ids.shape), ids.device)
        chosen = noise[0] < self.mask_ratio  # (B, T)
        if batch.mask is not None:
            chosen &= batch.mask
        as_mask = chosen & (noise[1] < 0.8)
        as_random = chosen & ~as_mask & (noise[1] < 0.9)
        random_ids = (noise[2] * self.vocab_size).long().clamp_max(self.vocab_size - 1)
        corrupted = torch.where(as_mask, torch.full_like(ids, self.mask_id), torch.where(as_random, random_ids, ids))
        hidden = backbone(self.tokenizer(TokenBatch(corrupted, mask=batch.mask)), causal=False)  # (B, T, D)
        logits = (self.head(self.transform(hidden)) + self.head_bias)[..., : self.vocab_size]  # (B, T, V)
        return MaskedOutputs(logits, torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX)), None)

    def _image(self, backbone: nn.Module, batch: ImageBatch) -> MaskedOutputs:
        images = batch.image  # (B, C, H, W)
        p = self.tokenizer.patch_size
        B, gh, gw = images.shape[0], images.shape[-2] // p, images.shape[-1] // p
        N = gh * gw
        keep = max(1, round(N * (1 - self.mask_ratio)))
        order = self._uniform((B, N), images.device).argsort(dim=1)  # a random permutation a row
        kept = order[:, :keep]  # (B, K)
        weight = torch.ones(B, N, device=images.device)
        weight.scatter_(1, kept, 0.0)  # 1 where a patch was dropped
        # The dropped patches' pixels are zeroed (the normalised images' mean) before the stem: a convolutional
        # stem's receptive field reaches past its own patch (15 px for three stride-2 3x3 convolutions at 8 px
        # patches), so the kept tokens would otherwise carry the border pixels of the patches to reconstruct
        # (ConvMAE masks its convolutions for the same reason). A patch stem's kept tokens are unchanged by it.
        shown = 1.0 - weight.view(B, 1, gh, 1, gw, 1).expand(B, 1, gh, p, gw, p).reshape(B, 1, gh * p, gw * p)
        tokens = self.tokenizer(replace(batch, image=images * shown.to(images.dtype))).x  # (B, N, D), positions added
        D = tokens.shape[-1]
        encoded = backbone(Tokens(tokens.gather(1, kept[..., None].expand(-1, -1, D))), causal=False)  # (B, K, D)
        x = self.decoder_embed(encoded)  # (B, K, Dd)
        full = self.mask_token.to(x.dtype).expand(B, N, -1).clone()  # (B, N, Dd)
        full.scatter_(1, kept[..., None].expand(-1, -1, x.shape[-1]), x)
        full = full + sincos_2d(gh, gw, full.shape[-1], device=full.device).to(full.dtype)
        pred = self.pixels(self.decoder(Tokens(full), causal=False))  # (B, N, p*p*C)
        return MaskedOutputs(pred, self._patch_targets(images), weight)

    def _patch_targets(self, images: torch.Tensor, normalise: bool | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C) patches in row-major grid order, each normalised by its own mean and spread
        when `normalise` (default: `norm_pix_loss`)."""
        p = self.tokenizer.patch_size
        B, C, H, W = images.shape
        x = images.float().reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
        x = x.reshape(B, (H // p) * (W // p), p * p * C)
        if self.norm_pix_loss if normalise is None else normalise:
            x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()
        return x

    def _audio(self, backbone: nn.Module, batch: AudioBatch) -> MaskedOutputs:
        frames, frame_mask = self.tokenizer.frames(batch.audio, batch.lengths)  # (B, F, M), (B, F)
        B, n_frames, n_mels = frames.shape
        k = self.frames_per_token
        T = -(-n_frames // k)
        spans = -(-T // self.span)
        masked_spans = max(1, round(spans * self.mask_ratio))
        order = self._uniform((B, spans), frames.device).argsort(dim=1)
        chosen_spans = torch.zeros(B, spans, dtype=torch.bool, device=frames.device)
        chosen_spans.scatter_(1, order[:, :masked_spans], True)
        chosen = chosen_spans.repeat_interleave(self.span, dim=1)[:, :T]  # (B, T) tokens
        hidden_frames = chosen.repeat_interleave(k, dim=1)[:, :n_frames, None]  # (B, F, 1)
        corrupted = torch.where(hidden_frames, self.mask_frame.to(frames.dtype), frames) * frame_mask[..., None]
        tokens = self.tokenizer.tokens(corrupted, frame_mask)
        pred = self.frames_head(backbone(tokens, causal=False))  # (B, T, k*M)
        target = F.pad(frames, (0, 0, 0, T * k - n_frames)).reshape(B, T, k * n_mels)
        weight = chosen & (tokens.mask if tokens.mask is not None else True)
        return MaskedOutputs(pred, target, weight.float())

    # -- loss and metrics -------------------------------------------------------------------------------------------

    def loss(self, outputs: MaskedOutputs, batch: Any) -> torch.Tensor:
        pred, target, weight = outputs
        if weight is None:  # text: cross-entropy on the chosen tokens
            return F.cross_entropy(pred.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX)
        error = (pred.float() - target.float()).pow(2).mean(-1)  # (B, N)
        return (error * weight).sum() / weight.sum().clamp_min(1.0)

    def step(self, outputs: MaskedOutputs | None, batch: Any, stage: str, ctx: StepContext,
             loss: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.loss(outputs, batch) if loss is None else loss
        n = len(batch)
        if stage == "train":
            self.log_train_loss(loss, ctx)
            return loss
        ctx.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        if self.modality_name == "text":
            chosen = outputs.target != IGNORE_INDEX
            right = (outputs.pred.argmax(-1) == outputs.target) & chosen
            accuracy = right.sum().float() / chosen.sum().clamp_min(1)
            ctx.log(f"{stage}/acc", accuracy, on_epoch=True, prog_bar=True, batch_size=int(chosen.sum()), sync_dist=True)
        if stage == "val" and self.media_samples and not ctx.sanity_checking and not self._media:
            self._media = self._examples(outputs, batch, ctx)
        return loss

    def epoch_end(self, stage: str, ctx: StepContext) -> None:
        if stage in ("val", "test"):
            self.epoch_start_eval()
        media, self._media = self._media, []
        if stage != "val" or not media or ctx.sanity_checking:
            return
        if self.modality_name == "text":
            log_text_table(ctx.trainer, f"{ctx.prefix}val_masked", ["step", "input", "predicted", "original"],
                           [[ctx.global_step, *row] for row in media])
            return
        images, captions = media
        log_media(ctx.trainer, f"{ctx.prefix}val_reconstructions", captions, images=images)

    # -- media ------------------------------------------------------------------------------------------------------

    def _examples(self, outputs: MaskedOutputs, batch: Any, ctx: StepContext) -> Any:
        """The first validation batch's first `media_samples` inputs (the same every validation: its masks and
        order are fixed): (masked input, reconstruction, original) images for images and audio, rows of text."""
        n = min(self.media_samples, len(batch))
        if self.modality_name == "text":
            vocab = self.tokenizer.vocab
            rows = []
            for i in range(n):
                chosen = outputs.target[i] != IGNORE_INDEX
                shown = torch.where(chosen, torch.full_like(batch.tokens[i], self.mask_id), batch.tokens[i])
                guessed = torch.where(chosen, outputs.pred[i].argmax(-1), batch.tokens[i])
                rows.append([vocab.decode(shown.tolist()), vocab.decode(guessed.tolist()),
                             vocab.decode(batch.tokens[i].tolist())])
            return rows
        if self.modality_name == "image":
            return self._image_triplets(outputs, batch, n, ctx)
        return self._spectrogram_triplets(outputs, n)

    def _image_triplets(self, outputs: MaskedOutputs, batch: ImageBatch, n: int, ctx: StepContext):
        p, (C, H, W) = self.tokenizer.patch_size, batch.image.shape[1:]
        raw = self._patch_targets(batch.image[:n], normalise=False)
        pred = outputs.pred[:n].float()
        if self.norm_pix_loss:  # back to the patch's own mean and spread, to be seen
            mean, std = raw.mean(-1, keepdim=True), (raw.var(-1, keepdim=True) + 1e-6).sqrt()
            pred = pred * std + mean
        dropped = outputs.weight[:n, :, None].bool()
        shown = torch.where(dropped, torch.zeros_like(raw), raw)
        mixed = torch.where(dropped, pred, raw)

        def image(patches: torch.Tensor) -> torch.Tensor:  # (n, N, p*p*C) -> (n, C, H, W)
            x = patches.reshape(n, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)
            return x.reshape(n, C, H, W)

        trio = torch.stack([image(shown), image(mixed), image(raw)], dim=1).flatten(0, 1).cpu()
        datamodule = getattr(ctx.trainer, "datamodule", None)
        shown_images = modality_of(self.tokenizer).media_log(list(trio), datamodule, self.tokenizer)["images"]
        captions = [f"{i}: {what}" for i in range(n) for what in ("masked", "reconstructed", "original")]
        return shown_images, captions

    def _spectrogram_triplets(self, outputs: MaskedOutputs, n: int):
        k, M = self.frames_per_token, self.tokenizer.n_mels
        pieces = []
        for i in range(n):
            original = outputs.target[i].float().reshape(-1, M)  # (T*k, M)
            chosen = outputs.weight[i].bool().repeat_interleave(k)[:, None]
            shown = torch.where(chosen, torch.zeros_like(original), original)
            mixed = torch.where(chosen, outputs.pred[i].float().reshape(-1, M), original)
            for spectrogram in (shown, mixed, original):  # frequency up, time to the right, scaled to [0, 1]
                x = spectrogram.T.flip(0)
                pieces.append(((x - x.min()) / (x.max() - x.min()).clamp_min(1e-6))[None].expand(3, -1, -1))
        captions = [f"{i}: {what}" for i in range(n) for what in ("masked", "reconstructed", "original")]
        return torch.stack(pieces).cpu(), captions

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        """Besides the vocabulary (text), the input geometry a checkpoint alone rebuilds the part with."""
        state = super().extra_state()
        if self.modality_name != "text":
            geometry = modality_of(self.tokenizer).geometry(self.tokenizer)
            state["mmtx_runtime"] = {"tokenizer": geometry, "family": {}}
        return state

    @classmethod
    def runtime_from_checkpoint(cls, checkpoint: dict[str, Any], cfg: Any, path: str) -> dict[str, Any]:
        if "mmtx_runtime" in checkpoint:
            return checkpoint["mmtx_runtime"]
        if "mmtx_vocab" in checkpoint:
            from mmtx.data.text import text_runtime
            from mmtx.tokenizers.text import Vocab

            return text_runtime(Vocab.from_json(checkpoint["mmtx_vocab"]), cfg.data.block_size)
        return super().runtime_from_checkpoint(checkpoint, cfg, path)
