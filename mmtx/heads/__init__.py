"""Heads: backbone output -> logits (encoder-only classifier, decoder-only LM, encoder-decoder)."""

from mmtx.heads.classifier import ClassifierHead
from mmtx.heads.lm import LMHead
from mmtx.heads.seq2seq import Seq2SeqHead

__all__ = ["ClassifierHead", "LMHead", "Seq2SeqHead"]
