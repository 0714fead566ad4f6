"""The contracts between pipeline stages.

raw sample --data--> batch --tokenizer--> Tokens --backbone--> (B, T, D) --head--> logits

A batch is a small typed object, one per kind of input, built on the training device by the data
module (`on_after_batch_transfer`) and read by attribute: an `ImageBatch`, an `AudioBatch`, a
`TokenBatch`, a `PairBatch` (a source batch and target token ids, for encoder-decoders), or a `FusedBatch` (one
batch per field of multimodal samples: an image and a clip of the same sample).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

IGNORE_INDEX = -100  # a target position that carries no loss (cross_entropy's ignore_index)


@dataclass
class ImageBatch:
    """image: (B, C, H, W) float, normalised; label: (B,) class ids; soft_label: (B, K) class
    probabilities when Mixup/CutMix mixed the images (the loss uses it instead of `label`)."""

    image: torch.Tensor
    label: torch.Tensor | None = None
    soft_label: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.image.shape[0]


@dataclass
class AudioBatch:
    """audio: (B, L) float waveforms, zero-padded to the longest; lengths: (B,) samples of each clip;
    label: (B,) class ids, for classification."""

    audio: torch.Tensor
    lengths: torch.Tensor
    label: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.audio.shape[0]


@dataclass
class TokenBatch:
    """tokens: (B, T) ids; mask: (B, T) bool, True at real tokens (None: no padding); targets: (B, T)
    the ids to predict (next tokens for a language model; IGNORE_INDEX where there is no loss)."""

    tokens: torch.Tensor
    mask: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]


@dataclass
class PairBatch:
    """A sequence-to-sequence batch: `source` (text or audio) for the encoder; `target.tokens` (B, T) the
    decoder input (BOS + target, padded) and `target.targets` (B, T) what it must predict (target + EOS,
    IGNORE_INDEX at padding); `refs` and `sources`, the original strings (validation and test)."""

    source: TokenBatch | AudioBatch
    target: TokenBatch
    refs: list[str] | None = None
    sources: list[str] | None = None

    def __len__(self) -> int:
        return len(self.target)


@dataclass
class FusedBatch:
    """Samples with several fields, each a batch of its own modality: `fields` = {field name: batch} (the names are
    the run's `data.fields` keys, e.g. {"image": ImageBatch, "audio": AudioBatch}); `present` = {field name: (B,)
    bool}, False where a sample lacks that field (modality dropout, a field missing at test), None: every sample
    has every field; `label`: (B,) class ids of the samples."""

    fields: dict[str, "ImageBatch | AudioBatch | TokenBatch"]
    label: torch.Tensor | None = None
    present: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(next(iter(self.fields.values())))

    def has(self, name: str) -> torch.Tensor | None:
        """(B,) bool: which samples have field `name`; None when all do."""
        return None if self.present is None else self.present.get(name)


@dataclass
class Tokens:
    """What every tokenizer returns and the backbone consumes.

    x:    (B, T, D) token vectors, positions already added.
    mask: (B, T) bool, True where a token is real, False for padding; None when
          every token is real (the fast path: attention takes no mask at all).
    """

    x: torch.Tensor
    mask: torch.Tensor | None = None

    def prepend(self, prefix: torch.Tensor) -> "Tokens":
        """Put `prefix` (B, P, D) in front of the tokens (a CLS token, say)."""
        x = torch.cat([prefix, self.x], dim=1)  # (B, P + T, D)
        mask = self.mask
        if mask is not None:
            ones = mask.new_ones(mask.shape[0], prefix.shape[1])
            mask = torch.cat([ones, mask], dim=1)  # (B, P + T)
        return Tokens(x, mask)


Batch = ImageBatch | AudioBatch | TokenBatch | PairBatch | FusedBatch  # what a task's steps receive


def batch_to(batch, device: torch.device | str):
    """A copy of a batch (any of the dataclasses above) with each of its tensors on `device`."""
    if isinstance(batch, FusedBatch):
        present = None if batch.present is None else {k: v.to(device) for k, v in batch.present.items()}
        label = None if batch.label is None else batch.label.to(device)
        return FusedBatch({k: batch_to(v, device) for k, v in batch.fields.items()}, label, present)
    return replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in fields(batch)
                             if isinstance(getattr(batch, f.name), torch.Tensor)})
