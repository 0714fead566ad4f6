"""The contracts between pipeline stages.

raw sample --data--> batch (dict of tensors) --tokenizer--> Tokens --backbone--> (B, T, D) --head--> logits
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
