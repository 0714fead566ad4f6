"""Tokenizers: raw tensors of one modality -> `Tokens` for the shared backbone."""

from mmtx.tokenizers.image import PatchTokenizer

__all__ = ["PatchTokenizer"]
