"""Pairs streamed from a prepared folder (`data=streaming_pairs`): translation pairs as token ids, speech-to-text
pairs as clips decoded in the loader workers with their transcripts' ids; batched into the in-memory path's
`PairBatch`es."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch

from mmtx.data.seq2seq import Seq2SeqDataModule
from mmtx.data.streaming.audio import _DecodeAudio
from mmtx.data.streaming.base import _remote, _Streamed, read_s3
from mmtx.errors import ConfigError, Count, MaybeCount, integer


class _DecodePair:
    """A shard's record -> {"src", "tgt": int32 ids, "src_text", "tgt_text"}; for speech-to-text pairs (`audio`:
    the prepared sample rate and crop) the source is the clip, decoded as `_DecodeAudio` decodes it, and its text the
    file's name; an unreadable clip is None (skipped) or, with on_bad_file=error, an error naming it."""

    def __init__(self, on_bad_file: str, audio: tuple[int, float | None] | None = None) -> None:
        self.on_bad_file = on_bad_file
        self.clip = _DecodeAudio(*audio, on_bad_file) if audio else None

    def __call__(self, item: dict[str, Any]) -> dict[str, Any] | None:
        pair = {"tgt": torch.frombuffer(bytearray(item["tgt"]), dtype=torch.int32),
                "tgt_text": item["tgt_text"].decode()}
        if self.clip is None:
            return {**pair, "src": torch.frombuffer(bytearray(item["src"]), dtype=torch.int32),
                    "src_text": item["src_text"].decode()}
        clip = self.clip({**item, "label": -1})
        return None if clip is None else {**pair, "audio": clip["audio"], "src_text": item["src_text"].decode()}


class _CollatePairs:
    """Pairs -> flat ids with offsets and lengths for each side, or the clips' samples in one flat tensor with
    theirs (the in-memory path's layout: `Seq2SeqDataModule.gather` pads them), and the strings."""

    def __init__(self, split: str) -> None:
        self.split = split

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        items = [i for i in items if i is not None]
        if not items:
            return None
        batch: dict[str, Any] = {"split": self.split}
        for side, key in (("src", "audio" if "audio" in items[0] else "src"), ("tgt", "tgt")):
            lengths = torch.tensor([len(i[key]) for i in items], dtype=torch.long)
            batch["audio" if key == "audio" else f"{side}_ids"] = torch.cat([i[key] for i in items])
            batch[f"{side}_offsets"] = torch.cumsum(lengths, 0) - lengths
            batch[f"{side}_lengths"] = lengths
            batch[f"{side}_texts"] = [i[f"{side}_text"] for i in items]
        return batch


class StreamingPairs(_Streamed, Seq2SeqDataModule):
    """Pairs streamed from a prepared folder (`_Streamed`; `python -m mmtx.prepare task=translate_multi30k ...`,
    `task=asr_fsdd ...`), batched into the in-memory path's `PairBatch`es (`data=streaming_pairs data.path=DIR`):
    translation pairs as the token ids made once with the vocabularies the folder holds; speech-to-text pairs as
    clips decoded, resampled and cropped by the loader workers (an unreadable one skipped, by `on_bad_file`) with
    their transcripts' ids. Batches are drawn in litdata's order, not grouped by length."""

    modality = "pairs"
    config_name = "streaming_pairs"

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
        fixed_vocab: Any = None,
        fixed_tgt_vocab: Any = None,
        max_src_len: Annotated[int | None, integer(2, optional=True)] = None,
        max_tgt_len: Annotated[int | None, integer(2, optional=True)] = None,
    ) -> None:
        from mmtx.data.base import IndexedSplits

        IndexedSplits.__init__(self, batch_size, eval_batch_size, False, seed)
        self._init_streamed(path, num_workers, on_bad_file, storage_options, cache_dir)
        self.text_source, self.val_from, self.texts = True, None, {}
        self.fixed = (fixed_vocab, fixed_tgt_vocab)  # the vocabularies of a checkpoint being evaluated
        self.wanted_lengths = {"max_src_len": max_src_len, "max_tgt_len": max_tgt_len}  # None: as prepared
        self.src_vocab = self.tgt_vocab = None
        self.special: dict[str, Any] = {}
        self._start = None

    def setup(self, stage: str | None = None) -> None:
        if self.meta:
            return
        from mmtx.data.seq2seq import special_ids, specials_of
        from mmtx.tokenizers.text import Vocab

        _Streamed.setup(self, stage)
        self.specials = specials_of(self.meta["tgt_specials"])
        for key, wanted in self.wanted_lengths.items():
            if wanted is not None and wanted != self.meta[key]:
                raise ConfigError(f"data.{key}={wanted}, but {self.path} was prepared with {key}={self.meta[key]} "
                                  f"(its pairs are cut to it): prepare it again with data.{key}={wanted} (and another "
                                  f"out=), or set data.{key}=null")
        self.max_src_len, self.max_tgt_len = self.meta["max_src_len"], self.meta["max_tgt_len"]
        self.shared_vocab = self.meta["shared_vocab"]
        self.text_source = self.meta.get("src_kind", "text") == "text"

        def vocab(name: str) -> Any:
            if _remote(self.path):
                return Vocab.from_json(read_s3(f"{self.path}/{name}", self.storage_options).decode())
            return Vocab.from_file(Path(self.path) / name)

        fixed_src, fixed_tgt = self.fixed
        self.tgt_vocab = fixed_tgt or vocab("tgt_tokenizer.json")
        if self.text_source:
            self.src_vocab = fixed_src or (self.tgt_vocab if self.shared_vocab else vocab("src_tokenizer.json"))
        self.special = special_ids(self.tgt_vocab, self.specials)

    def runtime_kwargs(self) -> dict[str, dict[str, Any]]:
        from mmtx.data.seq2seq import seq2seq_runtime

        self.setup()
        return seq2seq_runtime(self.tgt_vocab, self.max_src_len, self.max_tgt_len, self.src_vocab,
                               self.meta.get("sample_rate"), self.specials)

    def _decoder(self) -> _DecodePair:
        audio = None if self.text_source else (int(self.meta["sample_rate"]), self.meta.get("max_seconds"))
        return _DecodePair(self.on_bad_file, audio)

    def _collate(self, split: str) -> _CollatePairs:
        return _CollatePairs(split)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> Any:
        """The batch's flat ids -> a PairBatch, as `Seq2SeqDataModule.gather` makes it (BOS, prefix, EOS, padding;
        the strings for validation and test)."""
        if not isinstance(batch, dict):
            return batch
        split = batch["split"]
        B = len(batch["tgt_lengths"])
        index = torch.arange(B, device=batch["tgt_lengths"].device)
        store = {k: batch[k] for k in ("src_ids", "audio", "src_offsets", "src_lengths", "tgt_ids", "tgt_offsets",
                                       "tgt_lengths") if k in batch}
        store["rows"] = index
        self.texts[split] = {"src": batch["src_texts"], "tgt": batch["tgt_texts"]}
        return self.gather(split, store, index, index.device)
