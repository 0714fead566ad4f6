"""LightningDataModules and the decoded caches behind them."""

from mmtx.data.audio import AudioDataModule
from mmtx.data.fused import PairedDataModule
from mmtx.data.image import ImageDataModule
from mmtx.data.seq2seq import Seq2SeqDataModule
from mmtx.data.text import TextDataModule

__all__ = ["AudioDataModule", "ImageDataModule", "PairedDataModule", "Seq2SeqDataModule", "TextDataModule"]
