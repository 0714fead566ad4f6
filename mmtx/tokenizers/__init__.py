"""Tokenizers: raw data of one modality -> `Tokens` for the shared backbone."""

from mmtx.tokenizers.audio import MelTokenizer
from mmtx.tokenizers.image import PatchTokenizer
from mmtx.tokenizers.text import TokenEmbedding, Vocab

__all__ = ["MelTokenizer", "PatchTokenizer", "TokenEmbedding", "Vocab"]
