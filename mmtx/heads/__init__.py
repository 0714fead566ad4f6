"""Heads: backbone output -> logits (classifier, and later LM and seq2seq)."""

from mmtx.heads.classifier import ClassifierHead

__all__ = ["ClassifierHead"]
