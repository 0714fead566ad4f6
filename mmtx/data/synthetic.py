"""Synthetic data of every modality: random samples of a given shape, made from a seed, with no files.

For timing a training step without data (`scripts/bench_gpu.py`) and for trying a recipe's shape before its
data is at hand. The samples go through the same data modules, caches and device-side batch path as real
ones, so a step on them costs what a step on real data of that shape costs; the loss learns nothing useful.

    python -m mmtx.train task=gpt2_small                                 # data=synthetic_tokens
    python -m mmtx.train task=vit_cifar data=synthetic_images
    python -m mmtx.train task=audio_fsdd data=synthetic_audio
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from mmtx.data.audio_sources import pack
from mmtx.data.cache import digest
from mmtx.data.text import TextDataModule, text_runtime
from mmtx.errors import ConfigError, Count, MaybeCount, Positive
from mmtx.tokenizers.text import UNK, Vocab

log = logging.getLogger(__name__)


def _positive(value: Any, key: str, what: str) -> int:
    """`value` as a positive whole number, else one error naming `key`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{key}={value!r}: {what} must be a positive whole number")
    return int(value)


def synthetic_vocab(vocab_size: int, special_tokens: Sequence[str] = ()) -> Vocab:
    """A vocabulary of `vocab_size` ids: the words `t0`, `t1`, ..., then `<unk>` and `special_tokens` (the last
    ids), words separated by spaces, so that samples and prompts of a model trained on synthetic ids can be read and
    typed."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = [UNK, *[t for t in special_tokens if t != UNK]]
    words = {f"t{i}": i for i in range(vocab_size - len(specials))}
    words.update({t: len(words) + i for i, t in enumerate(specials)})
    tokenizer = Tokenizer(models.WordLevel(words, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(specials[1:])
    return Vocab(tokenizer, "synthetic")


class SyntheticTokens(TextDataModule):
    """Random token ids, uniform over a vocabulary of `vocab_size` (special tokens excepted): a language model's
    data with no text and no tokenizer to download (`data=synthetic_tokens`).

    `train_tokens` and `val_tokens` ids are drawn once from `seed`, held as a text split is (on the training
    device) and cut into windows of `block_size` exactly as `TextDataModule` cuts text, so a step costs what a
    step on real text of this vocabulary and shape costs. The loss stays near ln(vocab_size).
    """

    def __init__(
        self,
        vocab_size: int = 50257,
        special_tokens: Sequence[str] = ("<|endoftext|>",),
        block_size: Count = 1024,
        batch_size: Count = 16,
        eval_batch_size: MaybeCount = None,
        train_tokens: int = 1 << 22,
        val_tokens: int = 1 << 18,
        device_resident: bool = True,
        seed: int = 0,
        root: str | None = None,
    ) -> None:
        """`root` is read by nothing: it is taken so that a command line naming `data.root`, as every other data
        source's does, runs here too."""
        super(TextDataModule, self).__init__(batch_size, eval_batch_size, device_resident, seed)  # no text source
        specials = [UNK, *[t for t in special_tokens or [] if t != UNK]]
        vocab_size = _positive(vocab_size, "data.vocab_size", "the vocabulary size")
        if vocab_size <= len(specials):
            raise ConfigError(f"data.vocab_size={vocab_size} leaves no ordinary token beside the {len(specials)} "
                              f"special tokens ({', '.join(specials)}; data.special_tokens): give a larger vocabulary")
        self.block_size = _positive(block_size, "data.block_size", "the context length")
        self.sizes = {"train": _positive(train_tokens, "data.train_tokens", "the training split's length in tokens"),
                      "val": _positive(val_tokens, "data.val_tokens", "the validation split's length in tokens")}
        for split, size in self.sizes.items():
            if size < self.block_size + 2:
                raise ConfigError(f"data.{split}_tokens={size} is shorter than one window of data.block_size="
                                  f"{self.block_size} (+1 target): give at least {self.block_size + 2}")
        self.vocab_size, self.special_tokens = vocab_size, specials[1:]
        self.ordinary = vocab_size - len(specials)  # the ids drawn: t0 .. t{ordinary - 1}
        self.vocab: Vocab | None = None

    def prepare_data(self) -> None:
        pass  # nothing on disk

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.vocab = synthetic_vocab(self.vocab_size, self.special_tokens)
        generator = torch.Generator().manual_seed(self.seed)
        for split in ("train", "val"):
            self.splits[split] = {"ids": torch.randint(0, self.ordinary, (self.sizes[split],), generator=generator)}
        self.splits["test"] = self.splits["val"]
        log.info("synthetic tokens: %s ids of a %d-token vocabulary, windows of %d",
                 self.sizes, self.vocab_size, self.block_size)

    @property
    def chars_per_token(self) -> None:
        return None  # no text: no bits per character

    def runtime_kwargs(self) -> dict[str, dict[str, Any]]:
        self.setup()
        return text_runtime(self.vocab, self.block_size, None, self.default_prompt())

    def default_prompt(self) -> str:
        self.setup()
        return self.vocab.decode([int(self.splits["train"]["ids"][0])])


class SyntheticImages:
    """A `Source` of random images (uint8, `channels` x `image_size` x `image_size`) with random labels of
    `num_classes` classes: `train_size` training and `test_size` test images (`data=synthetic_images`, through
    `ImageDataModule`, augmentation included)."""

    def __init__(self, num_classes: int = 10, image_size: Count = 32, channels: int = 3, train_size: int = 10_000,
                 test_size: int = 1_000, seed: int = 0) -> None:
        self.num_classes = _positive(num_classes, "data.source.num_classes", "the number of classes")
        self.image_size = _positive(image_size, "data.source.image_size", "the image side in pixels")
        self.channels = _positive(channels, "data.source.channels", "the number of channels")
        self.sizes = {"train": _positive(train_size, "data.source.train_size", "the training split's size"),
                      "test": _positive(test_size, "data.source.test_size", "the test split's size")}
        self.seed = int(seed)
        self.cache_name = f"synthetic-images-{self._key()}"

    def _key(self) -> str:
        return digest(self.num_classes, self.image_size, self.channels, self.sizes, self.seed)

    def splits(self) -> list[str]:
        return ["train", "test"]

    def fingerprint(self, split: str) -> str:
        return digest(split, self._key())

    def decode(self, split: str) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(self.seed + (split == "test"))
        n, side = self.sizes[split], self.image_size
        return {
            "images": torch.randint(0, 256, (n, self.channels, side, side), dtype=torch.uint8, generator=generator),
            "labels": torch.randint(0, self.num_classes, (n,), generator=generator),
            "classes": [f"class{i}" for i in range(self.num_classes)],
        }


class SyntheticAudio:
    """A `Source` of random clips (white noise at `sample_rate`, `min_seconds` to `max_seconds` long) with random
    labels of `num_classes` classes (`data=synthetic_audio`, through `AudioDataModule` and the mel tokenizer)."""

    def __init__(self, num_classes: int = 10, sample_rate: Count = 16_000, min_seconds: float = 0.5,
                 max_seconds: Positive = 1.0, train_size: int = 2_000, test_size: int = 300, seed: int = 0) -> None:
        self.num_classes = _positive(num_classes, "data.source.num_classes", "the number of classes")
        self.sample_rate = _positive(sample_rate, "data.source.sample_rate", "the sample rate in Hz")
        if not isinstance(max_seconds, (int, float)) or not isinstance(min_seconds, (int, float)) \
                or not 0 < min_seconds <= max_seconds or int(min_seconds * sample_rate) < 1:
            raise ConfigError(f"data.source.min_seconds={min_seconds!r} and data.source.max_seconds={max_seconds!r}: "
                              "the clips' lengths must be positive, min_seconds <= max_seconds")
        self.min_seconds, self.max_seconds = float(min_seconds), float(max_seconds)
        self.sizes = {"train": _positive(train_size, "data.source.train_size", "the training split's size"),
                      "test": _positive(test_size, "data.source.test_size", "the test split's size")}
        self.seed = int(seed)
        self.cache_name = f"synthetic-audio-{self._key()}"

    def _key(self) -> str:
        return digest(self.num_classes, self.sample_rate, self.min_seconds, self.max_seconds, self.sizes, self.seed)

    def splits(self) -> list[str]:
        return ["train", "test"]

    def fingerprint(self, split: str) -> str:
        return digest(split, self._key())

    def classes(self) -> list[str]:
        return [f"class{i}" for i in range(self.num_classes)]

    def decode(self, split: str) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(self.seed + (split == "test"))
        n = self.sizes[split]
        shortest, longest = int(self.min_seconds * self.sample_rate), int(self.max_seconds * self.sample_rate)
        lengths = torch.randint(shortest, longest + 1, (n,), generator=generator).tolist()
        waves = [0.1 * torch.randn(length, generator=generator) for length in lengths]
        labels = torch.randint(0, self.num_classes, (n,), generator=generator).tolist()
        return pack(waves, labels, self.classes(), f"synthetic audio [{split}]")
