"""Heads: backbone output -> logits (encoder-only classifier, decoder-only LM)."""

from mmtx.heads.classifier import ClassifierHead
from mmtx.heads.lm import LMHead

__all__ = ["ClassifierHead", "LMHead"]
