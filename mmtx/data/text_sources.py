"""Where text comes from: local files (a path or a glob) or a Hugging Face `datasets` text dataset.

Text sources have the one source shape (`mmtx.data.base.Source`): `decode(split)` gives `{"text": str}`; and,
for text of any size, `chunks(split)` gives the same text as a stream of pieces (about a mebibyte each, files read
and decoded as they go), so that memory does not grow with the corpus. A source without its own validation text
has the one split `all`, which the data module cuts.
"""

from __future__ import annotations

import codecs
import glob
import logging
from pathlib import Path
from typing import Any, Iterator

from mmtx.data.cache import digest
from mmtx.errors import ConfigError, DataError, MissingError, optional
from mmtx.files import describe_root, resolve_root

log = logging.getLogger(__name__)


class TextFiles:
    """One or many UTF-8 text files, concatenated in sorted order.

    `files` is a path, a glob, or a list of them; relative ones are looked up
    under the data root when they do not exist as given. Bytes that are not
    UTF-8 stop the run naming the file and byte offset (on_decode_error=error,
    the default), or become U+FFFD and are counted in one warning
    (on_decode_error=replace).
    """

    def __init__(self, files: str | list[str], root: str | None = None, on_decode_error: str = "error") -> None:
        if on_decode_error not in ("error", "replace"):
            raise ConfigError(f"data.source.on_decode_error must be 'error' or 'replace', got {on_decode_error!r}")
        self.patterns = [files] if isinstance(files, str) else list(files)
        self.root = resolve_root(root)
        self.root_arg = root
        self.on_decode_error = on_decode_error
        self.files = self._expand()
        self.cache_name = f"text-{self.files[0].stem}-{digest(*self.files)}"

    def _expand(self) -> list[Path]:
        files: list[Path] = []
        for pattern in self.patterns:
            p = Path(pattern).expanduser()
            candidates = [p] if p.is_absolute() or p.exists() or glob.has_magic(pattern) else [p, self.root / p]
            found = []
            for c in candidates:
                found = sorted(Path(f) for f in glob.glob(str(c), recursive=True) if Path(f).is_file())
                if found:
                    break
            if not found:
                where = " or ".join(str(c.resolve()) for c in candidates)
                raise MissingError(f"no text file matches {where} (data.source.files={pattern}; data root "
                                   f"{describe_root(self.root_arg)})")
            files += found
        return files

    def splits(self) -> list[str]:
        return ["all"]

    def fingerprint(self, split: str = "all") -> str:
        stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in self.files]
        return digest(self.on_decode_error, *stats)

    def decode(self, split: str = "all") -> dict[str, Any]:
        text = "".join(self.chunks(split))
        if not text.strip():
            raise DataError(f"the text files {[str(f) for f in self.files]} are empty")
        return {"text": text}

    def chunks(self, split: str = "all", size: int = 1 << 20) -> Iterator[str]:
        """The files' text, one after the other with a newline between them, in pieces decoded `size` bytes at a
        time."""
        for i, path in enumerate(self.files):
            if i:
                yield "\n"
            with open(path, "rb") as f:
                yield from decode_utf8_stream(iter(lambda: f.read(size), b""), path, self.on_decode_error)


def decode_utf8_stream(blocks: Iterator[bytes], path: Path | str, on_decode_error: str = "error") -> Iterator[str]:
    """The text of the byte `blocks` of `path`, decoded as they come (a character split between two blocks is
    whole): invalid UTF-8 stops the run naming the file and byte offset (on_decode_error=error), or becomes U+FFFD,
    counted in one warning (replace), exactly as `bytes.decode(errors="replace")` would."""
    pending, offset, replaced, first = b"", 0, 0, None
    block = next(blocks, None)
    while block is not None:
        following = next(blocks, None)
        data, pos, out = pending + block, 0, []
        while True:
            try:
                text, used = codecs.utf_8_decode(data[pos:], "strict", following is None)
            except UnicodeDecodeError as err:
                where = offset + pos + err.start
                if on_decode_error == "error":
                    raise DataError(
                        f"{path} is not UTF-8: invalid byte {data[pos + err.start]:#04x} at byte offset {where} "
                        "(set data.source.on_decode_error=replace to replace such bytes with U+FFFD)"
                    ) from None
                out.append(data[pos:pos + err.start].decode("utf-8"))
                out.append("\ufffd")
                replaced += 1
                first = where if first is None else first
                pos += err.end
                continue
            out.append(text)
            pos += used
            break
        pending, offset = data[pos:], offset + pos
        yield "".join(out)
        block = following
    if replaced:
        log.warning("%s: replaced %d invalid UTF-8 byte sequence(s) with U+FFFD, the first at byte offset %d",
                    path, replaced, first)


def decode_utf8(data: bytes, path: Path | str, on_decode_error: str = "error") -> str:
    """`data` (the bytes of `path`) as text: invalid UTF-8 stops the run naming the file and byte
    offset (on_decode_error=error), or becomes U+FFFD, counted in one warning (replace)."""
    return "".join(decode_utf8_stream(iter([data]), path, on_decode_error))


class HFText:
    """A Hugging Face `datasets` text dataset; documents are joined by `separator`.

    `split_names` maps train/val to the dataset's splits; with no val split the
    data module splits train by `val_fraction`.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        data_dir: str | None = None,
        data_files: str | list[str] | dict | None = None,
        text_key: str = "text",
        split_names: dict[str, str] | None = None,
        separator: str = "\n\n",
    ) -> None:
        self.path, self.name, self.data_dir, self.data_files = path, name, data_dir, data_files
        self.text_key, self.separator = text_key, separator
        self.split_names = dict(split_names or {"train": "train"})
        self.cache_name = f"hftext-{Path(path).name}-{digest(path, name, data_dir, data_files, text_key, separator)}"

    def _load(self, split: str):
        datasets = optional("datasets", "datasets", "data=hf_text (a Hugging Face dataset)")

        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise MissingError(f"data.source.data_dir {self.data_dir} does not exist")
        ds = datasets.load_dataset(self.path, self.name, data_dir=self.data_dir, data_files=self.data_files,
                                   split=self.split_names[split])
        if self.text_key not in ds.features:
            raise DataError(f"dataset {self.path} has no column {self.text_key!r}; columns: {list(ds.features)}")
        return ds

    def splits(self) -> list[str]:
        return ["train", "val"] if "val" in self.split_names else ["all"]

    def _name(self, split: str) -> str:
        return "train" if split == "all" else split

    def fingerprint(self, split: str) -> str:
        return self._load(self._name(split))._fingerprint

    def decode(self, split: str) -> dict[str, Any]:
        text = "".join(self.chunks(split))
        if self._name(split) == "train" and not text.strip():
            raise DataError(f"dataset {self.path} has no text in its train split")
        return {"text": text}

    def chunks(self, split: str) -> Iterator[str]:
        """The split's non-empty documents joined by `separator`, a document at a time (the dataset is read from
        its memory-mapped files as it goes)."""
        first = True
        for batch in self._load(self._name(split)).iter(batch_size=1000):
            for text in batch[self.text_key]:
                if not text:
                    continue
                if not first:
                    yield self.separator
                first = False
                yield text
