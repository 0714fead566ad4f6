"""Text: strings <-> token ids (byte-level BPE, characters, or a tokenizer.json), and ids -> Tokens.

`Vocab` wraps a Hugging Face `tokenizers.Tokenizer` for all three kinds, so
each is saved and reloaded the same way: as tokenizer.json in the run folder
and as its JSON string inside every checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.init import trunc_normal_  # timm.layers.trunc_normal_ is this function

from mmtx.batch import TokenBatch, Tokens
from mmtx.errors import ConfigError, Count, MissingError, Rate

log = logging.getLogger(__name__)

UNK = "<unk>"


class Vocab:
    """A text tokenizer: `encode(str) -> ids`, `decode(ids) -> str`, `len()` ids."""

    def __init__(self, tokenizer, kind: str) -> None:
        self.tokenizer = tokenizer
        self.kind = kind
        self._chars: tuple[np.ndarray, np.ndarray] | None = None  # a char vocabulary's (code points, ids), sorted
        self._added: list[str] | None = None

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        unk = self.tokenizer.token_to_id(UNK)
        if self.kind == "char" and unk is not None and unk in ids:
            unseen = sorted({ch for ch in text if self.tokenizer.token_to_id(ch) is None})
            raise ConfigError(
                f"text has characters the char tokenizer never saw in training: {unseen[:20]} "
                "(use tokenizer=bpe, which covers every byte)"
            )
        if self.kind == "synthetic" and unk is not None and unk in ids:
            raise ConfigError(f"text {text[:60]!r} has words outside this synthetic vocabulary (data=synthetic_tokens): "
                              f"its words are t0 to t{unk - 1}, separated by spaces")
        if self.kind == "palette":
            unknown = [w for w in text.split() if self.tokenizer.token_to_id(w) is None]
            if unknown:
                classes = [t for t, _ in sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
                           if not t.startswith(("#", "<"))]
                raise ConfigError(f"{unknown[0]!r} is not a class of this image model: its prompts are one of "
                                  f"{classes or ['<image>']} (or <image> for an unconditioned image)")
        return ids

    def encode_array(self, text: str) -> np.ndarray:
        """`encode(text)` as an int64 array, for long texts: a character vocabulary maps code points through a
        sorted table (a few bytes a character, where the tokenizers library takes hundreds); other kinds, and
        text holding a special token, go through the tokenizer."""
        if self.kind != "char" or any(token in text for token in self._added_tokens()):
            return np.asarray(self.encode(text), dtype=np.int64)
        points, ids = self._char_table()
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        where = np.minimum(np.searchsorted(points, codes), len(points) - 1)
        known = points[where] == codes
        if not known.all():
            unseen = sorted({chr(c) for c in codes[~known][:10_000].tolist()})
            raise ConfigError(
                f"text has characters the char tokenizer never saw in training: {unseen[:20]} "
                "(use tokenizer=bpe, which covers every byte)"
            )
        return ids[where]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode_array` of each of `texts`, which a BPE or WordPiece vocabulary encodes together in the tokenizers
        library's threads (every core: set TOKENIZERS_PARALLELISM=false to keep to one)."""
        if self.kind in ("char", "synthetic") or len(texts) < 2:
            return [self.encode_array(text) for text in texts]
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def _added_tokens(self) -> list[str]:
        if self._added is None:
            self._added = [t.content for t in self.tokenizer.get_added_tokens_decoder().values()]
        return self._added

    def _char_table(self) -> tuple[np.ndarray, np.ndarray]:
        if self._chars is None:
            single = sorted((ord(tok), i) for tok, i in self.tokenizer.get_vocab(with_added_tokens=False).items()
                            if len(tok) == 1)
            self._chars = (np.array([c for c, _ in single], dtype=np.uint32), np.array([i for _, i in single], dtype=np.int64))
        return self._chars

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def with_tokens(self, tokens: Sequence[str]) -> "Vocab":
        """This vocabulary with `tokens` added as special tokens after its last id (those it lacks), so that no
        other token's id changes; itself when it has them all."""
        missing = [t for t in tokens if self.token_id(t) is None]
        if not missing:
            return self
        from tokenizers import AddedToken, Tokenizer

        tokenizer = Tokenizer.from_str(self.to_json())
        tokenizer.add_special_tokens([AddedToken(t, special=True) for t in missing])
        return Vocab(tokenizer, self.kind)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_json(cls, text: str) -> "Vocab":
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(text)
        return cls(tokenizer, _kind_of(tokenizer))

    @classmethod
    def from_file(cls, path: str | Path) -> "Vocab":
        path = Path(path).expanduser()
        if not path.is_file():
            raise MissingError(f"tokenizer file {path} does not exist")
        try:
            return cls.from_json(path.read_text())
        except Exception as err:
            raise ConfigError(f"{path} is not a tokenizers JSON file: {err}") from err


def _kind_of(tokenizer) -> str:
    model = type(tokenizer.model).__name__
    if model == "WordLevel" and tokenizer.token_to_id("<image>") is not None:  # image tokens (mmtx.tokenizers.palette)
        return "palette"
    if model == "WordLevel":  # characters, or the words t0, t1, ... of synthetic ids (mmtx.data.synthetic)
        return "synthetic" if type(tokenizer.pre_tokenizer).__name__ == "WhitespaceSplit" else "char"
    return model.lower()


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (), min_frequency: int = 2) -> Vocab:
    """Byte-level BPE (GPT-2's scheme, Radford et al., 2019): every byte is a base token, so no text is unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return Vocab(tokenizer, "bpe")


def train_char(text: str | Iterable[str], special_tokens: Sequence[str] = ()) -> Vocab:
    """One token per character seen in `text` (a string, or pieces of one: sorted, as nanoGPT's shakespeare_char),
    plus <unk> and specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    seen: set[str] = set()
    for piece in [text] if isinstance(text, str) else text:
        seen.update(piece)
    chars = sorted(seen)
    tokens = [*chars, UNK, *[t for t in special_tokens if t not in chars and t != UNK]]
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([t for t in special_tokens])
    return Vocab(tokenizer, "char")


def build_vocab(
    kind: str,
    text: str | Iterable[str],
    vocab_size: int = 4096,
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    min_frequency: int = 2,
    path: str | None = None,
    name: str | None = None,
    pad_to_multiple_of: int | None = None,
) -> Vocab:
    """The vocabulary a `tokenizer.vocab` config asks for, trained on `text` (the training split: a string, or an
    iterable of pieces of it, read once), read from a tokenizer.json (`kind=file`, `path`) or a pretrained model's
    (`kind=hf`, `name`: a Hugging Face model id or a folder saved by `save_pretrained`). `pad_to_multiple_of` is the
    embedding's business (`TokenEmbedding`), not the vocabulary's."""
    if kind == "bpe":
        if isinstance(text, str):
            lines = text.splitlines(keepends=True)
            text = ("".join(lines[i:i + 1000]) for i in range(0, len(lines), 1000))
        return train_bpe(text, vocab_size, special_tokens, min_frequency)
    if kind == "char":
        return train_char(text, special_tokens)
    if kind == "file":
        if not path:
            raise ConfigError("tokenizer.vocab.kind=file needs tokenizer.vocab.path=/path/to/tokenizer.json")
        return Vocab.from_file(path)
    if kind == "hf":
        if not name:
            raise ConfigError("tokenizer.vocab.kind=hf needs tokenizer.vocab.name=<a Hugging Face model id or folder>")
        return hf_vocab(name)
    raise ConfigError(f"tokenizer.vocab.kind must be bpe, char, file or hf, got {kind!r}")


def hf_vocab(name: str):
    """The tokenizer of Hugging Face model `name` (an id or a folder) as an mmtx `Vocab`."""
    from mmtx.tokenizers.hub import offline_error, transformers_module

    transformers = transformers_module()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    except OSError as err:
        raise offline_error(name, err) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"tokenizer.vocab.name={name}: its tokenizer has no `tokenizers` (fast) form")
    return Vocab.from_json(tokenizer.backend_tokenizer.to_str())


class TokenEmbedding(nn.Module):
    """Token ids (B, T) -> Tokens: an embedding table plus, optionally, learned 1D positions.

    pos_embed="learned": a (max_len, dim) table added to the embeddings (GPT-2);
    "none": no absolute positions, for a backbone with rotary attention. `norm`: a LayerNorm of the sum (of
    `norm_eps`), as BERT's embeddings have.
    The embedding matrix is shared with the LM head's output layer (tied).
    pad_to_multiple_of (`tokenizer.vocab.pad_to_multiple_of`): the table gets rows up to the next multiple of it
    (GPT-2's 50,257 tokens -> 50,304 rows at 64, as nanoGPT pads them), so that the output matmul's width suits
    the GPU's tiles; the extra ids never occur in the data and are never sampled (`LanguageModel`).
    """

    modality = "text"  # the inputs it reads (mmtx.data.modalities)

    def __init__(
        self,
        dim: Count,
        vocab: Vocab | int,
        max_len: int = 1024,
        pos_embed: str = "learned",
        dropout: Rate = 0.0,
        pad_to_multiple_of: int | None = None,
        norm: bool = False,
        norm_eps: float = 1e-12,
    ) -> None:
        super().__init__()
        if pos_embed not in ("learned", "none"):
            raise ConfigError(f"tokenizer.pos_embed must be 'learned' or 'none', got {pos_embed!r}")
        self.vocab = vocab if isinstance(vocab, Vocab) else None  # kept for decoding; not a parameter
        vocab_size = self.vocab_size = len(vocab) if isinstance(vocab, Vocab) else vocab  # the ids that occur
        if pad_to_multiple_of is not None:
            if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) \
                    or pad_to_multiple_of <= 0:
                raise ConfigError(f"tokenizer.vocab.pad_to_multiple_of={pad_to_multiple_of!r} must be a positive "
                                  "whole number (64 suits GPUs), or null for no padding")
            vocab_size = -(-vocab_size // pad_to_multiple_of) * pad_to_multiple_of
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim)) if pos_embed == "learned" else None
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if norm else None  # BERT normalises its embeddings
        nn.init.normal_(self.embed.weight, std=0.02)
        if self.pos is not None:
            trunc_normal_(self.pos, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"pos"} if self.pos is not None else set()

    def adapt_loaded(self, name: str, tensor: torch.Tensor, source_keys: Sequence[str] = ()) -> torch.Tensor | None:
        """`init_from`: a position table of a longer context (GPT-2's 1,024) gives its first `max_len` rows, the
        same numbers at the same positions; anything else does not fit (None)."""
        if name == "pos" and self.pos is not None and tensor.ndim == 2 and tensor.shape[1] == self.pos.shape[1] \
                and tensor.shape[0] >= self.max_len:
            return tensor[:self.max_len]
        return None

    def forward(self, batch: TokenBatch, start: int = 0) -> Tokens:
        ids = batch.tokens  # (B, T) int
        T = ids.shape[1]
        if start + T > self.max_len and self.pos is not None:
            raise ConfigError(f"a sequence of {start + T} tokens is longer than the {self.max_len} positions this model "
                              "was built for (data.block_size, or data.max_src_len / data.max_tgt_len)")
        x = self.embed(ids)  # (B, T) -> (B, T, D)
        if self.pos is not None:
            x = x + self.pos[start:start + T]
        if self.norm is not None:
            x = self.norm(x)
        return Tokens(self.drop(x), batch.mask)
