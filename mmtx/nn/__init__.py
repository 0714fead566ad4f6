"""Layers of the shared backbone: attention, MLP, block, positional encodings."""

from mmtx.nn.attention import Attention, CrossAttention
from mmtx.nn.block import Block, PostNormBlock
from mmtx.nn.mlp import Mlp

__all__ = ["Attention", "CrossAttention", "Block", "Mlp", "PostNormBlock"]
