"""LightningDataModules and the decoded caches behind them."""

from mmtx.data.image import ImageDataModule
from mmtx.data.text import TextDataModule

__all__ = ["ImageDataModule", "TextDataModule"]
