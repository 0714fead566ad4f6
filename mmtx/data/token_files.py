"""Text bigger than memory: tokenized once into token files (`prepare_text`, `python -m mmtx.prepare
data=text_files ... out=DIR`) and read from their memory map (`StreamingText`, `data=streaming_text`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from mmtx.data.cache import digest
from mmtx.data.text import TextDataModule
from mmtx.errors import ConfigError, Count, DataError, MaybeCount, MaybeRate, MissingError
from mmtx.tokenizers.text import Vocab

log = logging.getLogger(__name__)

META = "mmtx.json"  # what a folder written by python -m mmtx.prepare holds, beside its token files


def prepare_text(datamodule: TextDataModule, out: str | os.PathLike, replace: bool = False) -> dict[str, Any]:
    """Tokenize the text of `datamodule` (a `TextDataModule`: its source, vocabulary and validation cut) into `out`
    for `data=streaming_text`: `train.bin`, `val.bin` (uint16 or uint32 ids), `tokenizer.json`, `meta.json`, the
    checksums of each and `mmtx.json`; the written `mmtx.json` (returned). Idempotent: a whole folder prepared from
    the same text and settings is left as it is, a damaged one prepared again; one prepared from other text is an
    error unless `replace`. Written into a temporary folder renamed into place, so a killed `prepare` leaves no
    folder that looks prepared (the next call removes its remains and starts again)."""
    from mmtx.data.cache import seal, verified
    from mmtx.files import building_dir

    out = Path(out).expanduser().resolve()
    key = digest(TEXT_FORMAT, datamodule.cache_key())
    meta_path = out / META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") != key and not replace:
            raise DataError(f"{out} holds text prepared from other files or settings ({meta.get('source')}); give "
                            "another out= or delete that folder")
        if meta.get("fingerprint") == key and verified(out):
            log.info("%s is already prepared from %s (%s tokens)", out, meta["source"], meta["tokens"])
            return meta
        shutil.rmtree(out)  # damaged (named by verified), or prepared from other text
    elif out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not a prepared dataset (no {META}); give an empty or new folder as out=")
    elif out.exists():
        out.rmdir()  # empty: building_dir renames the finished folder into its place
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_text_space(datamodule, out)
    with building_dir(out, hint="free space there or give another out=") as tmp:
        if tmp is None:  # another process prepared it meanwhile
            return json.loads(meta_path.read_text())
        info = datamodule._tokenize(tmp)
        meta = {"format": TEXT_FORMAT, "modality": "text", "source": datamodule.source.cache_name,
                "tokens": {split: v["tokens"] for split, v in info["splits"].items()}, "dtype": info["dtype"],
                "vocab_size": info["vocab_size"], "val_fraction": datamodule.val_fraction if
                datamodule.source.splits() == ["all"] else None, "fingerprint": key}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        seal(tmp)
    return meta


TEXT_FORMAT = 1  # of what `prepare_text` writes: part of a prepared folder's fingerprint


def _check_text_space(datamodule: TextDataModule, out: Path) -> None:
    """Refuse to start when the token files of local text files would not fit under `out` (about 2 bytes a
    character for a character vocabulary, half a byte for a subword one: GPT-2's 4 characters a token, 2 bytes
    an id), naming the folder and the space."""
    files = getattr(datamodule.source, "files", None)
    if not files:
        return
    chars = sum(Path(f).stat().st_size for f in files)
    need = chars * (2 if datamodule.vocab_spec.get("kind") == "char" else 0.5)
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise DataError(f"preparing needs about {need / 1e9:.1f} GB in {out.parent} and {free / 1e9:.1f} GB is "
                        "free; free space there or give another out=")


class StreamingText(TextDataModule):
    """Language-model windows read from token files prepared once (`python -m mmtx.prepare data=text_files ...
    out=DIR`, `prepare_text`), memory-mapped: a corpus of any size, each DDP rank reading only its own windows
    (`data=streaming_text data.path=DIR`). Windows, their order and the exact mid-epoch resume are
    `TextDataModule`'s; the vocabulary is the one the folder was prepared with (its `tokenizer.json`).
    `device_resident=true` holds the ids in memory instead (when they fit `resident_max_gb`). A folder whose
    files do not match the checksums written with them is an error naming the file: prepare it again."""

    def __init__(
        self,
        path: str,
        block_size: Count = 256,
        batch_size: Count = 64,
        eval_batch_size: MaybeCount = None,
        device_resident: bool = False,
        resident_max_gb: float | None = None,
        seed: int = 0,
        root: str | None = None,
        fixed_vocab: Vocab | None = None,
        val_fraction: MaybeRate = None,
    ) -> None:
        super().__init__(source=None, cache_dir="", vocab={}, root=root, block_size=block_size, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, device_resident=device_resident, fixed_vocab=fixed_vocab,
                         seed=seed, resident_max_gb=resident_max_gb, val_fraction=val_fraction or 0.1)
        self.wanted_val_fraction = val_fraction  # None: as prepared
        if str(path).startswith(("s3://", "gs://")):
            raise ConfigError(f"data.path={path}: prepared text is memory-mapped from a disk; copy the folder to a "
                              "local or shared disk and give its path")
        self.path = Path(path).expanduser()

    def _cache_path(self) -> Path:
        return self.path

    def prepare_data(self) -> None:
        from mmtx.data.cache import damage, verified

        meta_path = self.path / META
        if not meta_path.is_file():
            raise MissingError(f"data.path={self.path} is not prepared text (no {META}): prepare it once with "
                               f"python -m mmtx.prepare data=text_files data.source.files=<files> out={self.path}")
        meta = json.loads(meta_path.read_text())
        if meta.get("modality") != "text":
            raise ConfigError(f"{self.path} holds {meta.get('modality')} data; data=streaming_text streams text "
                              "(data=streaming streams images, data=streaming_audio audio)")
        prepared = meta.get("val_fraction")
        if self.wanted_val_fraction is not None and prepared is not None and self.wanted_val_fraction != prepared:
            raise ConfigError(f"data.val_fraction={self.wanted_val_fraction}, but {self.path} was prepared with "
                              f"val_fraction={prepared}: prepare it again with data.val_fraction="
                              f"{self.wanted_val_fraction} (and another out=), or set data.val_fraction=null")
        if not verified(self.path, quiet=True):
            raise DataError(f"{self.path} is damaged: {damage(self.path)}; prepare it again (python -m mmtx.prepare "
                            f"with the same data keys and out={self.path} rebuilds it)")
