"""Labelled clips streamed from a prepared folder (`data=streaming_audio`): each file's bytes decoded, resampled and
cropped in the loader workers as the cached path decodes them."""

from __future__ import annotations

import logging
from typing import Any

import torch

from mmtx.batch import AudioBatch
from mmtx.data.audio import AudioDataModule
from mmtx.data.streaming.base import _name, _Streamed
from mmtx.errors import Count, DataError, MaybeCount, MaybePositive

log = logging.getLogger(__name__)


class _DecodeAudio:
    """A shard's record -> {"audio": float16 (L,), "label"}, in a loader worker: decoded, mixed down, resampled and
    cropped as the cached path decodes a clip (`AudioDecoder`), and rounded to float16 as the cache holds it."""

    def __init__(self, sample_rate: Count, max_seconds: MaybePositive, on_bad_file: str) -> None:
        self.sample_rate, self.max_seconds, self.on_bad_file = sample_rate, max_seconds, on_bad_file

    def __call__(self, item: dict[str, Any]) -> dict[str, Any] | None:
        from mmtx.data.audio_sources import AudioDecoder

        name = _name(item)
        decoder = AudioDecoder(self.sample_rate, self.max_seconds, self.on_bad_file)
        try:
            wave = decoder.decode(item["data"], name)
        except DataError as err:  # on_bad_file=error; its key is data.on_bad_file here
            raise DataError(str(err).replace("data.source.on_bad_file", "data.on_bad_file")) from None
        if wave is None:
            log.warning("skipped an unreadable clip: %s (%s)", name, decoder.reasons.get(name, "unreadable"))
            return None
        return {"audio": wave.to(torch.float16), "label": item["label"]}


class _CollateAudio:
    """Decoded clips -> {"audio": (B, L) float16 zero-padded to the longest, "lengths", "labels", "split"}."""

    def __init__(self, split: str) -> None:
        self.split = split

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        items = [i for i in items if i is not None]
        if not items:
            return None
        lengths = torch.tensor([len(i["audio"]) for i in items], dtype=torch.long)
        audio = torch.nn.utils.rnn.pad_sequence([i["audio"] for i in items], batch_first=True)  # zeros after each
        return {"audio": audio, "lengths": lengths, "labels": torch.tensor([i["label"] for i in items]),
                "split": self.split}


class StreamingAudio(_Streamed, AudioDataModule):
    """Labelled clips streamed from a prepared folder (`_Streamed`; `python -m mmtx.prepare data=audio_folder ...`):
    each file's bytes as they were (WAV, FLAC), decoded, resampled to the prepared `sample_rate` and cropped to its
    `max_seconds` in the loader workers, padded into `AudioBatch`es as the cached path pads them
    (`data=streaming_audio data.path=DIR`). `on_bad_file=skip` leaves an unreadable clip out of its batch."""

    modality = "audio"
    config_name = "streaming_audio"

    def __init__(
        self,
        path: str,
        batch_size: Count = 64,
        eval_batch_size: MaybeCount = None,
        num_workers: int = 2,
        on_bad_file: str = "skip",
        seed: int = 0,
        root: str | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        AudioDataModule.__init__(self, source=None, cache_dir="", root=root, batch_size=batch_size,
                                 eval_batch_size=eval_batch_size, seed=seed)
        self._init_streamed(path, num_workers, on_bad_file, storage_options, cache_dir)

    @property
    def sample_rate(self) -> int:
        self.setup()
        return int(self.meta["sample_rate"])

    def _decoder(self) -> _DecodeAudio:
        return _DecodeAudio(self.sample_rate, self.meta.get("max_seconds"), self.on_bad_file)

    def _collate(self, split: str) -> _CollateAudio:
        return _CollateAudio(split)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> AudioBatch:
        if not isinstance(batch, dict):
            return batch
        return AudioBatch(audio=batch["audio"].float(), lengths=batch["lengths"], label=batch["labels"])
