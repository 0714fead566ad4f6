"""Sequence-to-sequence data: (text | audio) -> text pairs, cached once, padded per batch on the device.

Each split of the source is read once into a cache (`mmtx.data.cache`: the
sentence pairs, or the decoded waveforms and their transcripts). The
vocabularies are trained on the training split alone and kept in a cache
folder of their own (tokenizer.json files, written atomically); with
`shared_vocab` one byte-level BPE covers source and target (translation
between languages that share a script), otherwise each side has its own.
Token ids are made in `setup` (a few seconds for Multi30k).

As for images and audio, the DataLoader yields only index batches, grouped
by source length; `on_after_batch_transfer` cuts the samples out of the flat
copies on the training device. Batches are `PairBatch`es (`mmtx.batch`): the
source (a `TokenBatch` of (B, S) ids and their mask, or an `AudioBatch` of
(B, L) waveforms and lengths), the target (a `TokenBatch`: `tokens` = BOS +
target, padded with the pad id; `targets` = target + EOS, IGNORE_INDEX at
padding) and, for validation and test, `refs` and `sources`: the original
strings, so metrics are computed against the untokenized references.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

import numpy as np
import torch

from mmtx.batch import IGNORE_INDEX, PairBatch, TokenBatch
from mmtx.data.audio import audio_batch
from mmtx.data.base import CachedSplits, gather_padded
from mmtx.data.cache import cache_folder, digest, verified
from mmtx.data.memory import check_resident_max_gb
from mmtx.errors import ConfigError, Count, DataError, MaybeCount, Rate, integer
from mmtx.tokenizers.text import Vocab, build_vocab

log = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
# The target's special tokens (data.tgt_specials): padding, start, end, and a prefix of forced tokens after the
# start that the decoder is not trained to predict (Whisper: bos <|startoftranscript|>, prefix <|en|>
# <|transcribe|> <|notimestamps|>, eos and pad <|endoftext|>).
SPECIALS = {"pad": PAD, "bos": BOS, "eos": EOS, "prefix": []}


def specials_of(specials: dict[str, Any] | None) -> dict[str, Any]:
    """data.tgt_specials with the defaults filled in; an unknown key is named."""
    unknown = sorted(set(specials or {}) - set(SPECIALS))
    if unknown:
        raise ConfigError(f"data.tgt_specials: unknown key(s) {unknown}; the keys are {', '.join(SPECIALS)}")
    return {**SPECIALS, **{k: v for k, v in (specials or {}).items() if v is not None}}


def with_specials(spec: dict[str, Any], specials: dict[str, Any] | None = None) -> dict[str, Any]:
    """A vocabulary spec whose special tokens start with pad, bos, eos and the prefix (ids 0, 1, 2, ... for BPE)."""
    sp = specials_of(specials)
    own = list(dict.fromkeys([sp["pad"], sp["bos"], sp["eos"], *sp["prefix"]]))
    spec = dict(spec)
    spec["special_tokens"] = [*own, *[t for t in spec.get("special_tokens") or () if t not in own]]
    return spec


def special_ids(vocab: Vocab, specials: dict[str, Any] | None = None) -> dict[str, Any]:
    """{pad_id, bos_id, eos_id, prefix_ids} of the target vocabulary; a special token it lacks is named."""
    sp = specials_of(specials)
    names = {"pad_id": sp["pad"], "bos_id": sp["bos"], "eos_id": sp["eos"]}
    ids: dict[str, Any] = {key: vocab.token_id(tok) for key, tok in names.items()}
    ids["prefix_ids"] = [vocab.token_id(tok) for tok in sp["prefix"]]
    missing = [tok for tok, i in zip([*names.values(), *sp["prefix"]], [*list(ids.values())[:3], *ids["prefix_ids"]])
               if i is None]
    if missing:
        raise DataError(f"the target tokenizer has no special token(s) {missing}; an encoder-decoder needs its "
                        f"data.tgt_specials ({', '.join(f'{k}={v}' for k, v in sp.items())}) in its vocabulary")
    return ids


def seq2seq_runtime(tgt_vocab: Vocab, max_src_len: int, max_tgt_len: int, src_vocab: Vocab | None = None,
                    sample_rate: int | None = None, specials: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Run-time values of an encoder-decoder: the source tokenizer's vocabulary and length (text) or
    sample rate (audio); the target vocabulary, its BOS / EOS / prefix ids and the decoder's positions (family)."""
    tokenizer = {"vocab": src_vocab, "max_len": max_src_len} if src_vocab is not None else {"sample_rate": sample_rate}
    ids = special_ids(tgt_vocab, specials)  # the data pads with pad_id; the decoder needs BOS, EOS and the prefix
    family = {"vocab": tgt_vocab, "bos_id": ids["bos_id"], "eos_id": ids["eos_id"], "max_len": max_tgt_len,
              "prefix_ids": ids["prefix_ids"]}
    return {"tokenizer": tokenizer, "family": family}


def _encode_flat(vocab: Vocab, texts: list[str], limit: int, batch: int = 4096) -> tuple[dict[str, torch.Tensor], int]:
    """Texts -> flat int32 ids, offsets and lengths, each sequence cut to `limit`; also how many were cut. Encoded
    `batch` texts at a time, so the tokenizer's per-token objects never exist for the whole corpus at once."""
    ids, lengths, cut = [], [], 0
    for start in range(0, len(texts), batch):
        for seq in vocab.encode_batch(texts[start:start + batch]):
            cut += len(seq) > limit
            seq = seq[:limit]
            lengths.append(len(seq))
            ids.append(np.asarray(seq, dtype=np.int32))
    flat = torch.from_numpy(np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32))
    lengths = torch.tensor(lengths, dtype=torch.long)
    return {"ids": flat, "offsets": torch.cumsum(lengths, 0) - lengths, "lengths": lengths}, cut


class Seq2SeqDataModule(CachedSplits):
    """Pairs from a seq2seq source (see `mmtx.data.seq2seq_sources`).

    Batches are indices of pairs (`CachedSplits`: caching, hold-out, loaders), grouped by source length.

    src_vocab / tgt_vocab: vocabulary specs (as `tokenizer.vocab`: kind bpe |
    char | file, vocab_size, ...); src_vocab is unused for audio sources, and
    with shared_vocab the target spec serves both sides.
    max_src_len / max_tgt_len: longer sources are cut to max_src_len tokens,
    longer targets to max_tgt_len - 1 (room for BOS / EOS); cuts are counted
    in a warning. Audio is cropped by the source (`max_seconds`).
    val_fraction: the share of the training split held out for validation
    (seeded), for sources without a val split; with 0 the val split is used,
    or else the test split.
    """

    size_key = "tgt_lengths"
    lengths_key = "src_lengths"  # training batches group sources of similar length
    # Per pair; the flat ids and audio are shared. `rows`: the pair's row in its split's strings (`texts`).
    sample_keys = ("src_offsets", "src_lengths", "tgt_offsets", "tgt_lengths", "rows")

    def __init__(
        self,
        source,
        cache_dir: str,
        tgt_vocab: dict[str, Any],
        src_vocab: dict[str, Any] | None = None,
        shared_vocab: bool = True,
        root: str | None = None,
        max_src_len: Annotated[int, integer(2)] = 128,
        max_tgt_len: Annotated[int, integer(2)] = 128,
        batch_size: Count = 64,
        eval_batch_size: MaybeCount = None,
        val_fraction: Rate = 0.0,
        device_resident: bool = True,
        fixed_vocab: Vocab | None = None,
        fixed_tgt_vocab: Vocab | None = None,
        seed: int = 0,
        tgt_specials: dict[str, Any] | None = None,
        resident_max_gb: float | None = None,
    ) -> None:
        super().__init__(source, cache_dir, root, batch_size, eval_batch_size, val_fraction, device_resident, seed)
        # Speech: above this decoded size (GB; None: 80% of the memory available) the clips are streamed instead.
        self.resident_max_gb = check_resident_max_gb(resident_max_gb)
        for key, value in (("max_src_len", max_src_len), ("max_tgt_len", max_tgt_len)):
            if value < 2:
                raise ConfigError(f"data.{key} must be at least 2, got {value}")
        self.text_source = source.kind == "text"
        self.specials = specials_of(tgt_specials)
        self.tgt_spec = with_specials(tgt_vocab, self.specials)
        self.shared_vocab = shared_vocab and self.text_source
        self.src_spec = dict(src_vocab or tgt_vocab)
        self.fixed = (fixed_vocab, fixed_tgt_vocab)  # the vocabularies of a checkpoint being evaluated
        self.max_src_len, self.max_tgt_len = max_src_len, max_tgt_len
        self.src_vocab: Vocab | None = None
        self.tgt_vocab: Vocab | None = None
        self.special: dict[str, Any] = {}
        self._start: torch.Tensor | None = None  # _start_ids
        self.texts: dict[str, dict[str, list[str]]] = {}

    # -- reading and tokenizing ------------------------------------------------------

    def prepare_data(self) -> None:
        caches = {split: self._cache(split) for split in self.source.splits()}  # each split read once
        self._vocabs(caches["train"])

    def _vocabs(self, train: dict[str, Any]) -> tuple[Vocab | None, Vocab]:
        """(source, target) vocabularies: a checkpoint's, or trained on the training split once and cached."""
        fixed_src, fixed_tgt = self.fixed
        if fixed_tgt is not None:
            return (fixed_src if self.text_source else None), fixed_tgt
        specs = {"tgt": self.tgt_spec, "src": self.src_spec if self.text_source and not self.shared_vocab else None}
        key = digest(train["fingerprint"], json.dumps(specs, sort_keys=True), self.shared_vocab)
        folder = self.cache_dir / f"{self.source.cache_name}-vocab-{key}"
        if not verified(folder):  # a damaged folder is named, and rebuilt below
            tgt_text = "\n".join(train["tgt"])
            if self.shared_vocab:
                tgt = build_vocab(text="\n".join(train["src"]) + "\n" + tgt_text, **self.tgt_spec)
            else:
                tgt = build_vocab(text=tgt_text, **self.tgt_spec)
            src = build_vocab(text="\n".join(train["src"]), **self.src_spec) if specs["src"] else None
            with cache_folder(folder) as tmp:
                if tmp is not None:  # else: another process built it meanwhile
                    tgt.save(tmp / "tgt_tokenizer.json")
                    if src is not None:
                        src.save(tmp / "src_tokenizer.json")
            log.info("trained the tokenizer(s) of %s into %s", self.source.cache_name, folder)
        tgt = Vocab.from_file(folder / "tgt_tokenizer.json")
        if not self.text_source:
            return None, tgt
        return (tgt if self.shared_vocab else Vocab.from_file(folder / "src_tokenizer.json")), tgt

    def target_room(self) -> int:
        """The tokens a target keeps (`data.max_tgt_len` less BOS and the forced prefix, which come first); checks
        the target vocabulary's special tokens (`tgt_vocab` is set)."""
        self.special = special_ids(self.tgt_vocab, self.specials)  # fails early on a tokenizer file without them
        self._start = None
        room = self.max_tgt_len - 1 - len(self.special["prefix_ids"])
        if room < 1:
            raise ConfigError(f"data.max_tgt_len={self.max_tgt_len} leaves no room for a target after BOS and the "
                              f"{len(self.special['prefix_ids'])} prefix tokens of data.tgt_specials.prefix")
        return room

    def tensors(self, caches: dict[str, dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        """Token ids of every split (the vocabularies first), the audio as cached, and the strings in `texts`."""
        self.src_vocab, self.tgt_vocab = self._vocabs(caches["train"])
        room = self.target_room()
        splits = {}
        for split, data in caches.items():
            tgt, cut_tgt = _encode_flat(self.tgt_vocab, data["tgt"], room)
            tensors = {f"tgt_{k}": v for k, v in tgt.items()}
            if self.text_source:
                src, cut_src = _encode_flat(self.src_vocab, data["src"], self.max_src_len)
                tensors.update({f"src_{k}": v for k, v in src.items()})
                sources = list(data["src"])
            else:
                packed, cut_src = data["src"], 0
                tensors.update({"audio": packed["audio"], "src_offsets": packed["offsets"],
                                "src_lengths": packed["lengths"]})
                sources = list(data.get("names") or packed.get("names") or [""] * len(data["tgt"]))
            if cut_src or cut_tgt:
                log.warning("%s [%s]: cut %d source(s) to data.max_src_len=%d tokens and %d target(s) to "
                            "%d tokens (data.max_tgt_len less BOS and the prefix)", self.source.cache_name, split,
                            cut_src, self.max_src_len, cut_tgt, room)
            tensors["rows"] = torch.arange(len(data["tgt"]))
            splits[split] = tensors
            self.texts[split] = {"src": sources, "tgt": list(data["tgt"])}
        return splits

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.val_from is not None:  # validation pairs are rows of that split's strings
            self.texts["val"] = self.texts[self.val_from]

    def runtime_kwargs(self) -> dict[str, dict[str, Any]]:
        self.setup()
        return seq2seq_runtime(self.tgt_vocab, self.max_src_len, self.max_tgt_len, self.src_vocab,
                               getattr(self.source, "sample_rate", None), self.specials)

    # -- the device-side data path (loaders: IndexedSplits) ------------------------------

    def _start_ids(self, device: torch.device) -> torch.Tensor:
        """BOS and the prefix (1+k,) on `device`, made once per device rather than copied there every batch."""
        if self._start is None or self._start.device != device:
            self._start = torch.tensor([self.special["bos_id"], *self.special["prefix_ids"]], device=device)
        return self._start

    def gather(self, split: str, store: dict[str, torch.Tensor], index: torch.Tensor, device: torch.device) -> PairBatch:
        ids = self.special
        if self.text_source:
            offsets, lengths = store["src_offsets"][index], store["src_lengths"][index]
            src, mask = gather_padded(store["src_ids"], offsets, lengths, self.src_vocab.token_id(PAD) or 0)
            source = TokenBatch(src.long().to(device, non_blocking=True), mask.to(device, non_blocking=True))
        else:
            source = audio_batch(store, index, device, offsets="src_offsets", lengths="src_lengths")
        tgt_len = store["tgt_lengths"][index]
        tgt, inside = gather_padded(store["tgt_ids"], store["tgt_offsets"][index], tgt_len)
        tgt = tgt.long()
        B = tgt.shape[0]
        start = self._start_ids(tgt.device).expand(B, -1)  # (B, 1+k)
        k = start.shape[1] - 1
        tgt_in = torch.cat([start, tgt.masked_fill(~inside, ids["pad_id"])], 1)  # (B, 1+k+T)
        ignore = torch.full((B, 1), IGNORE_INDEX, dtype=torch.long, device=tgt.device)
        tgt_out = torch.cat([ignore.expand(B, k), tgt.masked_fill(~inside, IGNORE_INDEX), ignore], 1)  # the prefix
        tgt_out = tgt_out.scatter(1, tgt_len[:, None] + k, ids["eos_id"])  # is not predicted; EOS after each target
        target = TokenBatch(tgt_in.to(device, non_blocking=True), targets=tgt_out.to(device, non_blocking=True))
        if split == "train":
            return PairBatch(source, target)
        rows = store["rows"][index].tolist()
        return PairBatch(source, target, refs=[self.texts[split]["tgt"][i] for i in rows],
                         sources=[self.texts[split]["src"][i] for i in rows])
