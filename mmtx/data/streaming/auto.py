"""A source too large to hold in memory (`data.resident_max_gb`), prepared into shards in the cache folder and
streamed instead, said in one line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mmtx.data.audio import AudioDataModule
from mmtx.data.seq2seq import Seq2SeqDataModule
from mmtx.data.shards import image_dims, prepare_pairs, prepare_shards
from mmtx.data.streaming.audio import StreamingAudio
from mmtx.data.streaming.base import _Streamed
from mmtx.data.streaming.images import StreamingImages
from mmtx.data.streaming.pairs import StreamingPairs

log = logging.getLogger(__name__)


def streamed_if_too_large(datamodule: Any, data_cfg: dict[str, Any]) -> _Streamed | None:
    """A streamed data module over shards prepared in the cache folder, when `datamodule`'s training split would
    decode to more than `data.resident_max_gb` (null: 80% of the memory available, where the cached path would
    refuse it): an image or audio folder (`StreamingImages`, `StreamingAudio`), speech-to-text pairs
    (`StreamingPairs`). None when it fits, or when the source is not files on a disk (the resident path, and its
    speed, stay). Said in one line."""
    from mmtx.data.audio_sources import decoded_bytes
    from mmtx.data.memory import resident_budget
    from mmtx.files import size_text

    source = datamodule.source
    splits = source.splits() if hasattr(source, "splits") else []
    if "train" not in splits:
        return None
    if isinstance(datamodule, Seq2SeqDataModule):
        if datamodule.text_source or not hasattr(source, "entries"):
            return None
        need = decoded_bytes((path for path, _, _ in source.entries("train")), source.sample_rate, source.max_seconds)
    elif isinstance(datamodule, AudioDataModule):
        if not hasattr(source, "_list"):
            return None
        need = decoded_bytes((f for f, _ in source._list()["train"]), source.sample_rate, source.max_seconds)
    elif hasattr(source, "_files"):
        files = source._files("train")
        width, height = (source.image_size,) * 2 if source.image_size else image_dims(files[0][0])
        need = len(files) * 3 * width * height  # uint8, decoded
    else:
        return None
    budget = resident_budget(datamodule.resident_max_gb, getattr(datamodule, "resident_gpu", False),
                             getattr(datamodule, "resident_processes", 1))
    if budget is None or need <= budget[0]:
        return None
    out = Path(datamodule.cache_dir) / f"{source.cache_name}-shards"
    log.info("data: %s decodes to %s, more than %s: streaming it from shards prepared in %s (once; python -m "
             "mmtx.prepare does the same ahead of time)", getattr(source, "path", source.cache_name), size_text(need),
             budget[1], out)
    # The cache follows its files, as the resident cache does; its shards' sizes are checked at every start, their
    # checksums by the workers that read them.
    keep = {k: data_cfg[k] for k in ("batch_size", "eval_batch_size", "seed", "root") if k in data_cfg}
    keep["on_bad_file"] = getattr(source, "on_bad_file", "skip")
    if isinstance(datamodule, Seq2SeqDataModule):
        prepare_pairs(datamodule, out, replace=True, verify=False)
        return StreamingPairs(str(out), **keep)
    meta = prepare_shards(source, out, replace=True, verify=False)
    if isinstance(datamodule, AudioDataModule):
        return StreamingAudio(str(out), **keep)
    images = ("mean", "std", "augment", "mixup", "cutmix")
    return StreamingImages(str(out), image_size=meta["image_size"], **keep, **{k: data_cfg[k] for k in images
                                                                                if k in data_cfg})
