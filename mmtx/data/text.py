"""Language-model data: text -> token ids once (a memory-mapped cache), random contiguous windows per batch.

The cache folder holds the trained tokenizer (tokenizer.json), one token file
per split (uint16 when the vocabulary fits, else int32) and meta.json; it is
keyed by the source's fingerprint and the vocabulary settings, built in a
temporary folder and renamed into place. As for every data module
(`IndexedSplits`), the DataLoader yields only window indices; `gather` cuts the
windows out of the split, which lives on the training device.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmtx.batch import TokenBatch
from mmtx.data.base import IndexedSplits, Source
from mmtx.data.cache import digest
from mmtx.errors import ConfigError, DataError
from mmtx.files import building_dir, resolve_root
from mmtx.tokenizers.text import Vocab, build_vocab

log = logging.getLogger(__name__)


class TextDataModule(IndexedSplits):
    """Token windows of `block_size` (+1 for the shifted targets) from a text source.

    Training: each epoch visits every block of the training split once, in a
    seeded random order, each shifted by a random offset within its block, so
    samples are random contiguous windows that cover the data evenly (and
    differ across DDP ranks). Validation and test: the non-overlapping windows
    of the validation split, in order (a deterministic loss).
    val_fraction: the last fraction of the text, when the source has no
    validation split (Tiny Shakespeare: the last 10%).
    vocab: the `tokenizer.vocab` settings (kind bpe | char | file | hf, ...).
    """

    def __init__(
        self,
        source: Source,
        cache_dir: str,
        vocab: dict[str, Any],
        root: str | None = None,
        block_size: int = 256,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        device_resident: bool = True,
        fixed_vocab: Vocab | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, device_resident, seed)
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.source = source
        self.root = resolve_root(root)
        self.cache_dir = Path(cache_dir)
        self.vocab_spec = dict(vocab)
        self.fixed_vocab = fixed_vocab  # e.g. the one stored in a checkpoint being evaluated
        self.block_size = block_size
        self.val_fraction = val_fraction
        self.vocab: Vocab | None = None
        self.meta: dict[str, Any] = {}

    # -- tokenizing once -------------------------------------------------------

    def _cache_path(self) -> Path:
        if self.fixed_vocab is None and self.vocab_spec.get("kind") in ("file", "hf"):
            # A vocabulary read from a file or a model: the cache follows its contents, not its name.
            self.fixed_vocab = build_vocab(text="", **self.vocab_spec)
        vocab_key = self.fixed_vocab.to_json() if self.fixed_vocab is not None else sorted(self.vocab_spec.items())
        key = digest(*(self.source.fingerprint(s) for s in self.source.splits()), vocab_key, self.val_fraction)
        return self.cache_dir / f"{self.source.cache_name}-{key}"

    def prepare_data(self) -> None:
        path = self._cache_path()
        if (path / "meta.json").is_file():
            return
        texts = {split: self.source.decode(split)["text"] for split in self.source.splits()}
        if "all" in texts:  # split by position: the first (1 - val_fraction) for training
            text = texts["all"]
            cut = int(len(text) * (1 - self.val_fraction))
            texts = {"train": text[:cut], "val": text[cut:]}
        # BPE learns its merges from the training split alone; a character vocabulary is the
        # set of characters of all splits (as nanoGPT's), so validation text is never unknown.
        vocab_text = "".join(texts.values()) if self.vocab_spec.get("kind") == "char" else texts["train"]
        vocab = self.fixed_vocab or build_vocab(text=vocab_text, **self.vocab_spec)
        dtype = np.uint16 if len(vocab) <= np.iinfo(np.uint16).max + 1 else np.int32
        meta: dict[str, Any] = {"dtype": np.dtype(dtype).name, "vocab_size": len(vocab), "splits": {}}
        with building_dir(path) as tmp:
            if tmp is None:  # another process built it meanwhile
                return
            for split, text in texts.items():
                ids = np.asarray(vocab.encode(text), dtype=dtype)
                ids.tofile(tmp / f"{split}.bin")
                meta["splits"][split] = {"tokens": int(ids.size), "chars": len(text)}
            vocab.save(tmp / "tokenizer.json")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        log.info("tokenized %s into %s: %s", self.source.cache_name, path, meta["splits"])

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.prepare_data()
        path = self._cache_path()
        self.meta = json.loads((path / "meta.json").read_text())
        self.vocab = self.fixed_vocab or Vocab.from_file(path / "tokenizer.json")
        for split in ("train", "val"):
            ids = np.memmap(path / f"{split}.bin", dtype=self.meta["dtype"], mode="r")
            if ids.size < self.block_size + 2:
                raise DataError(
                    f"data.block_size={self.block_size} is longer than the {split} split "
                    f"({ids.size} tokens); use a smaller block_size or more text"
                )
            # Resident: one int64 copy (moved to the device once). Otherwise the memory map itself.
            self.splits[split] = {"ids": torch.from_numpy(ids.astype(np.int64)) if self.device_resident else ids}
        self.splits["test"] = self.splits["val"]

    # -- what the model needs to know ------------------------------------------------

    @property
    def chars_per_token(self) -> float:
        val = self.meta["splits"]["val"]
        return val["chars"] / max(1, val["tokens"])

    def runtime_kwargs(self) -> dict[str, dict[str, Any]]:
        self.setup()
        return text_runtime(self.vocab, self.block_size, self.chars_per_token)

    # -- the device-side data path (loaders, device copy: IndexedSplits) ---------------------

    def num_samples(self, split: str) -> int:
        return (len(self.splits[split]["ids"]) - 1) // self.block_size  # whole windows (+1 for the targets)

    def gather(self, split: str, store: dict[str, Any], index: torch.Tensor, device: torch.device) -> TokenBatch:
        """Windows `index` of the split: window i starts at i * block_size, shifted by a random offset within
        its block for training; the targets are the tokens one position on."""
        ids, T = store["ids"], self.block_size
        starts = index * T  # (B,)
        if split == "train":
            starts = (starts + torch.randint(0, T, starts.shape, device=index.device)).clamp_max(len(ids) - T - 1)
        offsets = starts[:, None] + torch.arange(T + 1, device=index.device)  # (B, T+1)
        if isinstance(ids, torch.Tensor):
            window = ids[offsets]
        else:  # the memory map (not device-resident): gather on the CPU, then move
            window = torch.from_numpy(ids[offsets.numpy()].astype(np.int64))
        window = window.to(device, non_blocking=True)
        return TokenBatch(tokens=window[:, :-1], targets=window[:, 1:])  # (B, T) each


def text_runtime(vocab: Vocab, block_size: int, chars_per_token: float | None = None) -> dict[str, dict[str, Any]]:
    """Run-time values of a text model: its vocabulary and context length (tokenizer) and characters
    per token (family)."""
    return {"tokenizer": {"vocab": vocab, "max_len": block_size}, "family": {"chars_per_token": chars_per_token}}
