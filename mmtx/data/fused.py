"""Multimodal samples: several labelled data sources, one a field, paired into samples with one field each.

`PairedDataModule(fields={"image": <an ImageDataModule>, "audio": <an AudioDataModule>})` makes samples whose
fields are an image and a clip of the same class: the AV-MNIST protocol (Vielzeuf et al., 2018: a written digit
paired with a spoken digit of the same class), or, with `pair="index"`, sources whose i-th samples belong together
(the same recording's frames and sound). Each field keeps its own data module (its cache, hold-out, label
fraction, augmentation, device-resident copy); this module only holds, per split, which sample of each field makes
up each paired sample, and gathers the fields' batches into one `FusedBatch`.

What it adds over its fields:
- field_dropout: in training, the probability that a sample loses one of its fields (chosen uniformly), so that
  one model serves samples with either field or both (modality dropout, as in Neverova et al.'s ModDrop);
- field_subsets: in training, every sample shown with all its fields and again with each field alone, in one batch
  of (1 + fields) x batch_size samples (their losses averaged), so the model learns each field alone as much as
  together, at that many times the compute of a step;
- eval_missing: fields left out of every validation and test sample (how a model does when one modality is missing);
- noise: {field: std} Gaussian noise added to a field's input in every split (AV-MNIST's corrupted images), in the
  field's normalised units, drawn from a seed fixed per batch in validation and test;
- use: the fields a sample carries ([image]: the same samples, the same steps, the written digit alone);
- captions: {class name: text}: each sample's text is its class's, and batches become `PairBatch`es whose source is
  the `FusedBatch` and whose target is that text (a prefix LM writes it after the fields' tokens: `family=prefix_lm`,
  `task=av_digits_words`); the text's character vocabulary is made from the captions.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Annotated, Any

import lightning as L
import torch

from mmtx.batch import IGNORE_INDEX, FusedBatch, PairBatch, TokenBatch
from mmtx.data.base import IndexedSplits
from mmtx.data.seq2seq import special_ids, with_specials
from mmtx.errors import ConfigError, Count, DataError, MaybeCount, NonNegative, Rate, one_of
from mmtx.tokenizers.text import Vocab, build_vocab

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SIGNAL = {"ImageBatch": "image", "AudioBatch": "audio"}  # the batch attribute noise is added to, by batch type


def pair_by_class(labels: dict[str, torch.Tensor], anchor: str, seed: int, split: str) -> dict[str, torch.Tensor]:
    """For the samples of field `anchor` whose class every field has, one sample of each other field with the same
    label: {field: (N,) indices}, N those anchor samples. A class's samples of a field are dealt out in a seeded
    random order, round and round, so every sample is used about equally often. Anchor samples of a class some field
    lacks in this split are left out, with a warning (a small hold-out may miss a class); none left is a DataError."""
    generator = torch.Generator().manual_seed(seed)
    anchor_labels = labels[anchor]
    shared = set(anchor_labels.unique().tolist())
    for name, field_labels in labels.items():
        lacking = shared - set(field_labels.unique().tolist())
        if lacking:
            log.warning("data.fields.%s has no %s sample of class id(s) %s: the %d %s samples of data.fields.%s of "
                        "those classes are left out of the paired %s split", name, split, sorted(lacking),
                        int(torch.isin(anchor_labels, torch.tensor(sorted(lacking))).sum()), split, anchor, split)
            shared -= lacking
    kept = torch.isin(anchor_labels, torch.tensor(sorted(shared), dtype=anchor_labels.dtype)).nonzero().flatten()
    if not len(kept):
        raise DataError(f"the fields' {split} splits share no class: data.fields.{anchor} and the others must have "
                        "samples of the same classes to be paired by class")
    pairs = {anchor: kept}
    for name, field_labels in labels.items():
        if name == anchor:
            continue
        picked = torch.empty(len(kept), dtype=torch.long)
        for c in sorted(shared):
            want = (anchor_labels[kept] == c).nonzero().flatten()
            have = (field_labels == c).nonzero().flatten()
            have = have[torch.randperm(len(have), generator=generator)]
            picked[want] = have[torch.arange(len(want)) % len(have)]
        pairs[name] = picked
    return pairs


class PairedDataModule(IndexedSplits):
    """Samples whose fields come from separate labelled data modules (`fields`), paired by class (`pair="class"`:
    every sample of the field with the most samples in a split, each given a seeded same-class sample of every other
    field) or by position (`pair="index"`: the fields' i-th samples, which must be as many and of the same class).

    Batches are `FusedBatch`es; `runtime_kwargs` gives each field's tokenizer its own run-time values
    (`{"tokenizer": {"fields": {name: ...}}}`) and the classes to the task family."""

    def __init__(
        self,
        fields: dict[str, L.LightningDataModule],
        batch_size: Count = 64,
        eval_batch_size: MaybeCount = None,
        pair: Annotated[str, one_of("class", "index")] = "class",
        use: list[str] | None = None,
        field_dropout: Rate = 0.0,
        field_subsets: bool = False,
        eval_missing: list[str] | None = None,
        noise: dict[str, NonNegative] | None = None,
        captions: dict[str, str] | None = None,
        device_resident: bool = True,
        seed: int = 0,
        root: str | None = None,
        fixed_tgt_vocab: Vocab | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, device_resident, seed)
        if not fields:
            raise ConfigError("data.fields is empty: name one data config a field, e.g. data.fields.image and "
                              "data.fields.audio")
        self.fields = dict(fields)
        for key, names in (("data.use", use), ("data.eval_missing", eval_missing), ("data.noise", noise)):
            unknown = sorted(set(names or ()) - set(self.fields))
            if unknown:
                raise ConfigError(f"{key} names {unknown}, which data.fields does not have (it has {sorted(self.fields)})")
        self.use = list(use) if use else list(self.fields)
        if eval_missing and not set(self.use) - set(eval_missing):
            raise ConfigError(f"data.eval_missing={list(eval_missing)} leaves the evaluated samples no field of "
                              f"data.use={self.use}; leave at least one out of data.eval_missing")
        if field_dropout and len(self.use) < 2:
            raise ConfigError(f"data.field_dropout={field_dropout} drops one of a sample's fields, but data.use="
                              f"{self.use} gives it one; set data.field_dropout=0")
        if field_subsets and (len(self.use) < 2 or field_dropout):
            why = f"data.use={self.use} gives a sample one field" if len(self.use) < 2 else \
                f"data.field_dropout={field_dropout} drops fields too"
            raise ConfigError(f"data.field_subsets=true shows every sample with each of its fields alone, but {why}; "
                              "set data.field_subsets=false" + ("" if len(self.use) < 2 else " or data.field_dropout=0"))
        self.pair = pair
        self.field_dropout = field_dropout
        self.field_subsets = field_subsets
        self.eval_missing = list(eval_missing or ())
        self.noise = {k: float(v) for k, v in (noise or {}).items() if v}
        self.captions = {str(k): str(v) for k, v in (captions or {}).items() if v is not None}
        self.tgt_vocab = fixed_tgt_vocab  # a checkpoint's, when one is evaluated; else made from the captions
        self.classes: list[str] = []
        self._texts: dict[str, torch.Tensor] = {}  # captions: BOS + text and text + EOS, a row per class

    def prepare_data(self) -> None:
        for data in self.fields.values():
            data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for data in self.fields.values():
            data.setup(stage)
        self.classes = self._common_classes()
        for split in SPLITS:
            if all(data.has_split(split) for data in self.fields.values()):
                self.splits[split] = self._paired(split)
        if self.captions:
            self._caption_rows()
        log.info("paired samples of fields %s (%s): %s", list(self.fields), self.pair,
                 {k: self.num_samples(k) for k in self.splits})

    def _common_classes(self) -> list[str]:
        """The class names every field shares (each field's label ids are mapped onto the first field's order)."""
        names = {name: list(data.classes) for name, data in self.fields.items()}
        first, *others = names
        for name in others:
            if sorted(names[name]) != sorted(names[first]):
                raise DataError(f"data.fields.{name} has the classes {names[name]} and data.fields.{first} "
                                f"{names[first]}: paired samples need the same class names in every field")
        return names[first]

    def _labels(self, name: str, split: str) -> torch.Tensor:
        """Field `name`'s labels of `split`, as ids of this module's class order."""
        data = self.fields[name]
        order = torch.tensor([self.classes.index(c) for c in data.classes])
        return order[data.splits[split]["labels"].long().cpu()]

    def _paired(self, split: str) -> dict[str, torch.Tensor]:
        labels = {name: self._labels(name, split) for name in self.fields}
        if self.pair == "index":
            sizes = {name: len(v) for name, v in labels.items()}
            if len(set(sizes.values())) > 1:
                raise DataError(f"data.pair=index pairs the fields' i-th samples, but their {split} splits differ in "
                                f"size {sizes}; use data.pair=class")
            first = next(iter(labels.values()))
            for name, v in labels.items():
                if not torch.equal(v, first):
                    raise DataError(f"data.pair=index: data.fields.{name}'s {split} samples are not of the same classes "
                                    "as the first field's in the same order")
            pairs = {name: torch.arange(len(first)) for name in labels}
        else:
            anchor = max(labels, key=lambda name: len(labels[name]))  # the most samples: none left out
            pairs = pair_by_class(labels, anchor, self.seed + SPLITS.index(split), split)
            first = labels[anchor][pairs[anchor]]
        return {"labels": first, **{f"{name}_index": idx for name, idx in pairs.items()}}

    def _caption_rows(self) -> None:
        """The captions' vocabulary (characters and <pad> <s> </s>) and, a row per class, the decoder's input
        (BOS + text, padded) and targets (text + EOS, IGNORE_INDEX at padding)."""
        lacking = [c for c in self.classes if c not in self.captions]
        if lacking:
            raise ConfigError(f"data.captions has no text for class(es) {lacking}; give every class one "
                              f"(the classes: {self.classes})")
        texts = [self.captions[c] for c in self.classes]
        if self.tgt_vocab is None:
            self.tgt_vocab = build_vocab(text="\n".join(texts), **with_specials({"kind": "char"}))
        self.special = special_ids(self.tgt_vocab)
        ids = [self.tgt_vocab.encode(t) for t in texts]
        width = 1 + max(len(i) for i in ids)
        tokens = torch.full((len(ids), width), self.special["pad_id"], dtype=torch.long)
        targets = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
        for row, seq in enumerate(ids):
            tokens[row, :1 + len(seq)] = torch.tensor([self.special["bos_id"], *seq])
            targets[row, :1 + len(seq)] = torch.tensor([*seq, self.special["eos_id"]])
        self._texts = {"tokens": tokens, "targets": targets}

    def runtime_kwargs(self) -> dict[str, dict[str, Any]]:
        self.setup()
        tokenizer = {"fields": {name: self.fields[name].runtime_kwargs()["tokenizer"] for name in self.use}}
        if self.captions:  # a prefix LM writes the class's text
            family = {"vocab": self.tgt_vocab, "bos_id": self.special["bos_id"], "eos_id": self.special["eos_id"],
                      "max_len": self._texts["tokens"].shape[1], "prefix_ids": []}
            return {"tokenizer": tokenizer, "family": family}
        return {"tokenizer": tokenizer, "family": {"num_classes": self.num_classes, "class_names": self.classes}}

    def gather(self, split: str, store: dict[str, torch.Tensor], index: torch.Tensor, device: torch.device) -> FusedBatch:
        if split == "train" and self.field_subsets:
            index = index.repeat(1 + len(self.use))  # (B,) -> ((1 + fields) * B,): all fields, then each alone
        batches = {}
        for name in self.use:
            data = self.fields[name]
            picked = store[f"{name}_index"][index]
            picked = picked.to(device) if data.device_resident else picked.cpu()
            batches[name] = self._noised(name, data.gather(split, data._store(split, device), picked, device),
                                         split, index)
        label = store["labels"][index].to(device, non_blocking=True)
        fused = FusedBatch(batches, label, self._present(split, len(index), device))
        if not self.captions:
            return fused
        rows = self._texts
        if rows["tokens"].device != device:  # moved to the training device once, not copied every batch
            rows = self._texts = {k: v.to(device) for k, v in rows.items()}
        target = TokenBatch(rows["tokens"][label], targets=rows["targets"][label])  # (B, T) each
        refs = None if split == "train" else [self.captions[self.classes[i]] for i in store["labels"][index].tolist()]
        return PairBatch(fused, target, refs=refs)

    def _present(self, split: str, n: int, device: torch.device) -> dict[str, torch.Tensor] | None:
        if split == "train" and self.field_subsets:
            copy = torch.arange(n, device=device) // (n // (1 + len(self.use)))  # 0: every field; i: field i alone
            return {name: (copy == 0) | (copy == i + 1) for i, name in enumerate(self.use)}
        if split == "train" and self.field_dropout:
            # Each sample loses one field (uniformly chosen) with probability field_dropout; never all of them.
            drop = torch.rand(n, device=device) < self.field_dropout  # (B,)
            which = torch.randint(len(self.use), (n,), device=device)  # (B,)
            return {name: ~(drop & (which == i)) for i, name in enumerate(self.use)}
        if split != "train" and self.eval_missing:
            return {name: torch.full((n,), name not in self.eval_missing, device=device) for name in self.use}
        return None

    def _noised(self, name: str, batch: Any, split: str, index: torch.Tensor) -> Any:
        std = self.noise.get(name)
        if not std:
            return batch
        attr = SIGNAL.get(type(batch).__name__)
        if attr is None:
            raise ConfigError(f"data.noise.{name}: noise is added to images and audio, not to a "
                              f"{type(batch).__name__}; remove data.noise.{name}")
        signal = getattr(batch, attr)
        generator = None
        if split != "train":  # the same noise at every evaluation of a sample batch
            generator = torch.Generator(signal.device).manual_seed(self.seed * 1_000_003 + int(index[0]))
        noise = torch.randn(signal.shape, generator=generator, device=signal.device, dtype=signal.dtype)
        return replace(batch, **{attr: signal + std * noise})
