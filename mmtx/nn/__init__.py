"""Layers of the shared backbone: attention, MLP, block, positional encodings."""

from mmtx.nn.attention import Attention, CrossAttention
from mmtx.nn.block import Block, PostNormBlock
from mmtx.nn.mlp import MixtureOfExperts, Mlp, MoeSpec

__all__ = ["Attention", "CrossAttention", "Block", "MixtureOfExperts", "Mlp", "MoeSpec", "PostNormBlock"]
