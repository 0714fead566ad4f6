"""Several modalities in one sequence (early fusion): each field of a multimodal sample goes through its own
tokenizer, a learned segment embedding marks which field a token came from, and the fields' tokens are joined
into one `Tokens` that the shared backbone attends across (the picture of PerceiverIO, VATT's fusion baseline,
PaLI's image-then-text prefix).

A field a sample lacks (modality dropout in training, a field missing at test: `FusedBatch.present`) keeps its
place in the sequence but is masked out of attention and pooling, so one model serves samples with any subset of
its fields, and the shapes do not change from batch to batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.init import trunc_normal_

from mmtx.batch import FusedBatch, Tokens
from mmtx.errors import ConfigError, Count


def width(tokenizer: nn.Module) -> int | None:
    """The width of the tokens a tokenizer makes (its `dim`, or its embedding table's), if it says."""
    embed = getattr(tokenizer, "embed", None)
    return getattr(tokenizer, "dim", None) or getattr(embed, "embedding_dim", None)


class FusedTokenizer(nn.Module):
    """fields: {field name: that field's tokenizer} (built by `mmtx.config.wiring` from `tokenizer.fields`, each
    with the run-time values of its own data); dim: the backbone's width. The sequence is the fields' tokens in
    the order of `fields`, each plus its segment vector."""

    modality = "fused"  # mmtx.data.modalities builds its Modality from the fields' own
    adapts_by_name = frozenset({"segment"})  # init_from maps its rows by field name, whatever the shapes

    def __init__(self, fields: dict[str, nn.Module], dim: Count) -> None:
        super().__init__()
        if not fields:
            raise ConfigError("tokenizer.fields is empty: a fused tokenizer needs one tokenizer per field of the "
                              "data (data.fields)")
        widths = {name: width(tok) for name, tok in fields.items() if width(tok) is not None}
        odd = [name for name, w in widths.items() if w != dim]
        if odd:  # named against another field of another width, else against the backbone
            other = next((n for n in widths if widths[n] != widths[odd[0]]), None)
            against = f"tokenizer.fields.{other} {widths[other]}" if other else f"the backbone {dim}"
            raise ConfigError(f"tokenizer.fields.{odd[0]} makes tokens {widths[odd[0]]} wide and {against}: the fields "
                              f"of one sequence share the backbone's width (backbone.dim={dim}); drop the fields' own dim")
        self.fields = nn.ModuleDict(fields)
        self.dim = dim
        self.segment = nn.Parameter(torch.zeros(len(fields), dim))  # one learned vector per field (BERT's segments)
        trunc_normal_(self.segment, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"segment"}

    @property
    def names(self) -> list[str]:
        return list(self.fields)

    def adapt_loaded(self, name: str, tensor: torch.Tensor, source_keys: Sequence[str] = ()) -> torch.Tensor | None:
        """`init_from` a fused model of other fields (a one-field run, `data.use=[image]`, into a two-field one):
        the segment rows of the fields both have, by name, the others as initialised here; the same fields in another
        order are reordered. `source_keys`: the checkpoint's names under this tokenizer (`fields.image.proj.weight`,
        ...), in the checkpoint's field order."""
        if name != "segment" or tensor.ndim != 2 or tensor.shape[1] != self.segment.shape[1]:
            return None
        theirs = list(dict.fromkeys(k.split(".")[1] for k in source_keys if k.startswith("fields.")))
        if len(theirs) != tensor.shape[0]:
            return None  # the checkpoint's fields cannot be told apart: skipped, as before
        rows = self.segment.detach().clone()
        for i, field in enumerate(self.names):
            if field in theirs:
                rows[i] = tensor[theirs.index(field)]
        return rows

    def field_tokens(self, name: str, batch: FusedBatch) -> Tokens:
        """Field `name`'s tokens alone, with its segment vector; a sample that lacks the field has all of them
        masked out (the contrastive family encodes each field this way)."""
        if name not in batch.fields:
            raise ConfigError(f"the batch has no field {name!r} (it has {sorted(batch.fields)}): tokenizer.fields "
                              "and data.fields must name the same fields")
        tokens = self.fields[name](batch.fields[name])
        x = tokens.x + self.segment[self.names.index(name)].to(tokens.x.dtype)  # (B, T, D) + (D,)
        mask, present = tokens.mask, batch.has(name)
        if present is not None:
            real = mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            mask = real & present[:, None]  # (B, T): a missing field's tokens are padding
        return Tokens(x, mask)

    def forward(self, batch: FusedBatch) -> Tokens:
        parts = [self.field_tokens(name, batch) for name in self.names]
        x = torch.cat([t.x for t in parts], dim=1)  # (B, T_1 + ... + T_n, D)
        if all(t.mask is None for t in parts):
            return Tokens(x)
        masks = [t.mask if t.mask is not None else torch.ones(t.x.shape[:2], dtype=torch.bool, device=x.device)
                 for t in parts]
        return Tokens(x, torch.cat(masks, dim=1))  # (B, T)
