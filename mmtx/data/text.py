"""Language-model data: text -> token ids once (a memory-mapped cache), random contiguous windows per batch.

The cache folder holds the trained tokenizer (tokenizer.json), one token file
per split (uint16 when the vocabulary fits, else uint32), meta.json and the
size and checksum of each (checksums.json, verified on every use: a damaged
cache is rebuilt); it is keyed by the source's fingerprint and the vocabulary
settings, built in a temporary folder and renamed into place. The text is read,
tokenized (a batch of pieces at a time, by the tokenizer's threads) and written as it goes, so memory does not grow
with it. As for every data module
(`IndexedSplits`), the DataLoader yields only window indices; `gather` cuts the
windows out of the split, which lives on the training device.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Iterator

import numpy as np
import torch

from mmtx.batch import TokenBatch
from mmtx.data.base import IndexedSplits, Source
from mmtx.data.cache import cache_folder, digest, verified
from mmtx.data.memory import check_resident_max_gb
from mmtx.errors import ConfigError, Count, DataError, MaybeCount, number
from mmtx.files import resolve_root
from mmtx.tokenizers.text import Vocab, build_vocab

log = logging.getLogger(__name__)

ENCODE_BATCH = 64  # pieces of about 64k characters encoded together, by the tokenizer's threads (4 MB of text)
NOTE_EVERY = 1 << 28  # characters between two progress lines while tokenizing


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
    device_resident: hold the token ids in memory (int64, on the training device); a split that would take more
    than `resident_max_gb` (null: 80% of the memory available) is read from the memory-mapped cache instead, said
    in one line.
    """

    def __init__(
        self,
        source: Source,
        cache_dir: str,
        vocab: dict[str, Any],
        root: str | None = None,
        block_size: Count = 256,
        batch_size: Count = 64,
        eval_batch_size: MaybeCount = None,
        val_fraction: Annotated[float, number(0, 1, low_open=True, high_open=True)] = 0.1,  # text needs a val split
        device_resident: bool = True,
        fixed_vocab: Vocab | None = None,
        seed: int = 0,
        resident_max_gb: float | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, device_resident, seed)
        self.resident_max_gb = check_resident_max_gb(resident_max_gb)
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

    def cache_key(self) -> str:
        """What the token files depend on: the source's files, the vocabulary settings and the validation cut."""
        if self.fixed_vocab is None and self.vocab_spec.get("kind") in ("file", "hf"):
            # A vocabulary read from a file or a model: the cache follows its contents, not its name.
            self.fixed_vocab = build_vocab(text="", **self.vocab_spec)
        vocab_key = self.fixed_vocab.to_json() if self.fixed_vocab is not None else sorted(
            (k, v) for k, v in self.vocab_spec.items() if k != "pad_to_multiple_of")  # the embedding's, not the ids'
        return digest(*(self.source.fingerprint(s) for s in self.source.splits()), vocab_key, self.val_fraction)

    def _cache_path(self) -> Path:
        return self.cache_dir / f"{self.source.cache_name}-{self.cache_key()}"

    def prepare_data(self) -> None:
        path = self._cache_path()
        if verified(path):  # a cache damaged on disk is named, and rebuilt below
            return
        with cache_folder(path) as tmp:
            if tmp is not None:  # else: another process built it meanwhile
                meta = self._tokenize(tmp)
                log.info("tokenized %s into %s: %s", self.source.cache_name, path, meta["splits"])

    def _texts(self) -> dict[str, Callable[[], Iterator[str]]]:
        """{split: a function giving its text as a stream of pieces}; a source with one split ("all") is cut by
        position, the first (1 - val_fraction) of its characters for training (counted in a first pass)."""
        splits = self.source.splits()
        if splits != ["all"]:
            return {split: (lambda split=split: self.source.chunks(split)) for split in splits}
        total, has_text = 0, False
        for piece in self.source.chunks("all"):
            total += len(piece)
            has_text = has_text or bool(piece.strip())
        if not has_text:
            raise DataError(f"the text of {self.source.cache_name} is empty (data.source)")
        cut = int(total * (1 - self.val_fraction))
        return {"train": lambda: _span(self.source.chunks("all"), 0, cut),
                "val": lambda: _span(self.source.chunks("all"), cut, None)}

    def _tokenize(self, folder: Path) -> dict[str, Any]:
        """Tokenize every split into `folder` (`<split>.bin`, tokenizer.json, meta.json), a piece at a time: memory
        stays that of a piece whatever the size of the text."""
        texts = self._texts()
        next_note = NOTE_EVERY
        vocab = self.fixed_vocab
        if vocab is None:
            # BPE learns its merges from the training split alone; a character vocabulary is the set of characters
            # of all splits (as nanoGPT's), so validation text is never unknown.
            kind = self.vocab_spec.get("kind")
            pieces = (p for split in texts for p in texts[split]()) if kind == "char" else texts["train"]()
            log.info("training the %s vocabulary of %s on its text (one pass; then the text is tokenized, with a "
                     "line every %s characters)", kind, self.source.cache_name, f"{NOTE_EVERY:,}")
            vocab = build_vocab(text=pieces, **self.vocab_spec)
        dtype = np.uint16 if len(vocab) <= np.iinfo(np.uint16).max + 1 else np.uint32
        meta: dict[str, Any] = {"dtype": np.dtype(dtype).name, "vocab_size": len(vocab), "splits": {}}
        for split, text in texts.items():
            tokens = chars = 0
            with open(folder / f"{split}.bin", "wb") as f:
                for batch in _batched(encoding_pieces(text(), safe=vocab.kind != "char"), ENCODE_BATCH):
                    for piece, ids in zip(batch, vocab.encode_arrays(batch)):
                        ids.astype(dtype).tofile(f)
                        tokens, chars = tokens + ids.size, chars + len(piece)
                    if chars >= next_note:
                        log.info("tokenizing %s [%s]: %s characters, %s tokens", self.source.cache_name, split,
                                 f"{chars:,}", f"{tokens:,}")
                        next_note = chars + NOTE_EVERY
            meta["splits"][split] = {"tokens": tokens, "chars": chars}
        vocab.save(folder / "tokenizer.json")
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
        return meta

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.prepare_data()
        path = self._cache_path()
        self.meta = json.loads((path / "meta.json").read_text())
        self.vocab = self.fixed_vocab or Vocab.from_file(path / "tokenizer.json")
        maps = {split: np.memmap(path / f"{split}.bin", dtype=self.meta["dtype"], mode="r") for split in ("train", "val")}
        for split, ids in maps.items():
            if ids.size < self.block_size + 2:
                raise DataError(
                    f"data.block_size={self.block_size} is longer than the {split} split "
                    f"({ids.size} tokens); use a smaller block_size or more text"
                )
        if self.device_resident:
            self.device_resident = self._fits(sum(ids.size for ids in maps.values()), path)
        for split, ids in maps.items():
            # Resident: one int64 copy (moved to the device once). Otherwise the memory map itself.
            self.splits[split] = {"ids": torch.from_numpy(ids.astype(np.int64)) if self.device_resident else ids}
        self.splits["test"] = self.splits["val"]

    def _fits(self, tokens: int, path: Path) -> bool:
        """Whether `tokens` ids held in memory as int64 fit `data.resident_max_gb`; if not, one line says that they
        are read from the memory map instead (the same windows in the same order, gathered on the CPU)."""
        from mmtx.data.memory import resident_budget
        from mmtx.files import size_text

        budget = resident_budget(self.resident_max_gb, getattr(self, "resident_gpu", False),
                                 getattr(self, "resident_processes", 1))
        if budget is None or tokens * 8 <= budget[0]:
            return True
        log.info("data: the %s tokens of %s take %s held in memory as int64, more than %s: reading their windows "
                 "from the memory-mapped token files instead (data.device_resident=false)", f"{tokens:,}", path,
                 size_text(tokens * 8), budget[1])
        return False

    # -- what the model needs to know ------------------------------------------------

    @property
    def chars_per_token(self) -> float:
        val = self.meta["splits"]["val"]
        return val["chars"] / max(1, val["tokens"])

    def runtime_kwargs(self) -> dict[str, dict[str, Any]]:
        self.setup()
        return text_runtime(self.vocab, self.block_size, self.chars_per_token, self.default_prompt())

    def default_prompt(self) -> str:
        """What a language model on this text continues when no prompt is given: a newline (nanoGPT's) when the
        vocabulary has one, else the first token of the training text."""
        self.setup()
        return default_prompt(self.vocab, [int(self.splits["train"]["ids"][0])])

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
        offsets = starts[:, None] + _positions(T + 1, index.device)  # (B, T+1)
        if isinstance(ids, torch.Tensor):
            window = ids[offsets]
        else:  # the memory map (not device-resident): gather on the CPU, then move
            window = torch.from_numpy(ids[offsets.numpy()].astype(np.int64))
        window = window.to(device, non_blocking=True)
        return TokenBatch(tokens=window[:, :-1], targets=window[:, 1:])  # (B, T) each


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    """`items` in lists of `n` (the last shorter)."""
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _positions(length: int, device: torch.device, _cache: dict = {}) -> torch.Tensor:  # noqa: B006 - the cache
    """0 .. length-1 on `device`, made once (every batch's windows add it to their starts)."""
    key = (length, device)
    if key not in _cache:
        _cache[key] = torch.arange(length, device=device)
    return _cache[key]


def _span(pieces: Iterator[str], start: int, stop: int | None) -> Iterator[str]:
    """Characters start..stop (stop None: to the end) of the text that `pieces` make up."""
    pos = 0
    for piece in pieces:
        lo, hi = max(start - pos, 0), len(piece) if stop is None else min(stop - pos, len(piece))
        if lo < hi:
            yield piece[lo:hi]
        pos += len(piece)
        if stop is not None and pos >= stop:
            return


# A boundary no tokenizer's pre-tokenization crosses: before a space between two non-spaces ("a| b": GPT-2's
# byte-level pieces start with their space), or after a newline between non-spaces ("a\n|b").
_SAFE_CUT = re.compile(r"(?<=\S)(?= \S)|(?<=\S\n)(?=\S)")


def encoding_pieces(pieces: Iterable[str], size: int = 1 << 16, safe: bool = True) -> Iterator[str]:
    """The text of `pieces` re-cut into pieces of about `size` characters for the tokenizer, which then holds one
    piece's tokens at a time. With `safe`, cuts fall where the tokenizer would split the whole text anyway (see
    `_SAFE_CUT`), so the ids are those of encoding the text in one call; a character vocabulary cuts anywhere."""
    buf = ""
    for piece in pieces:
        buf += piece
        start = 0
        while len(buf) - start >= 2 * size:
            cut = start + size
            if safe:
                found = _SAFE_CUT.search(buf, cut, start + 2 * size - 1)
                cut = found.start() if found else cut
            yield buf[start:cut]
            start = cut
        buf = buf[start:]
    if buf:
        yield buf


def _check_fits(split: str, tokens: int, path: Path) -> None:
    """A split held in memory (data.device_resident=true) takes 8 bytes a token (int64): refuse one that would not
    fit in the memory left, naming its size, before the machine runs out."""
    from mmtx.data.memory import refuse_if_too_large

    refuse_if_too_large(tokens * 8, f"the {split} split of {path} is {tokens:,} tokens: held in memory as int64 it",
                        "set data.device_resident=false to read it from the memory-mapped cache instead")


def default_prompt(vocab: Vocab, first_ids: list[int]) -> str:
    """A newline when `vocab` encodes one, else the text of `first_ids` (the first token of the training text)."""
    try:
        if vocab.encode("\n"):
            return "\n"
    except ConfigError:  # a character vocabulary of text without a newline
        pass
    return vocab.decode(first_ids)


def text_runtime(vocab: Vocab, block_size: int, chars_per_token: float | None = None,
                 default_prompt: str | None = None) -> dict[str, dict[str, Any]]:
    """Run-time values of a text model: its vocabulary and context length (tokenizer), characters per token and
    the prompt its samples continue by default (family)."""
    return {"tokenizer": {"vocab": vocab, "max_len": block_size},
            "family": {"chars_per_token": chars_per_token, "default_prompt": default_prompt}}
