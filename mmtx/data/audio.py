"""Audio classification data: decoded waveforms cached once, clips gathered and padded per batch on the device."""

from __future__ import annotations

from typing import Annotated, Any

import torch

from mmtx.batch import AudioBatch
from mmtx.data.base import LabelledSplits, gather_padded
from mmtx.data.memory import check_resident_max_gb
from mmtx.errors import Count, MaybeCount, Rate, number


class AudioDataModule(LabelledSplits):
    """Labelled clips of different lengths from an audio source (see `mmtx.data.audio_sources`).

    A split's cache is one flat float16 waveform with per-clip offsets and
    lengths; each batch is cut out of the copy on the training device and
    zero-padded to its longest clip. Batches are `AudioBatch`es: `audio` (B, L)
    float32, `lengths` (B,) and `label` (B,); the mel tokenizer turns the
    lengths into the key-padding mask.
    """

    sample_keys = ("offsets", "lengths", "labels")

    def __init__(self, source: Any, cache_dir: str, root: str | None = None, batch_size: Count = 128,
                 eval_batch_size: MaybeCount = None, val_fraction: Rate = 0.0, device_resident: bool = True,
                 seed: int = 0, resident_max_gb: float | None = None,
                 label_fraction: Annotated[float, number(0, 1, low_open=True)] = 1.0) -> None:
        super().__init__(source, cache_dir, root, batch_size, eval_batch_size, val_fraction, device_resident, seed)
        self.label_fraction = label_fraction
        # Above this decoded size (GB; None: 80% of the memory available) a folder is streamed instead (build_data).
        self.resident_max_gb = check_resident_max_gb(resident_max_gb)

    @property
    def sample_rate(self) -> int:
        return self.source.sample_rate

    def runtime_kwargs(self) -> dict[str, dict[str, Any]]:
        self.setup()
        return {
            "tokenizer": {"sample_rate": self.sample_rate},
            "family": {"num_classes": self.num_classes, "class_names": self.classes},
        }

    def gather(self, split: str, store: dict[str, torch.Tensor], index: torch.Tensor, device: torch.device) -> AudioBatch:
        batch = audio_batch(store, index, device)
        batch.label = store["labels"][index].to(device, non_blocking=True)
        return batch


def audio_batch(store: dict[str, torch.Tensor], index: torch.Tensor, device: torch.device,
                offsets: str = "offsets", lengths: str = "lengths") -> AudioBatch:
    """Clips `index` cut out of a split's flat waveform (`store["audio"]`, with per-clip `offsets` and
    `lengths`), zero-padded to the longest, as an `AudioBatch` on `device` (audio classification and
    speech-to-text batch audio this one way)."""
    n = store[lengths][index]  # (B,)
    audio, _ = gather_padded(store["audio"], store[offsets][index], n)  # zero-padded (B, L)
    return AudioBatch(audio=audio.float().to(device, non_blocking=True), lengths=n.to(device, non_blocking=True))
