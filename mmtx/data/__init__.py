"""LightningDataModules and the decoded-tensor caches behind them."""

from mmtx.data.image import ImageDataModule

__all__ = ["ImageDataModule"]
