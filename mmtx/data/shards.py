"""Writing data sets into shards once (`python -m mmtx.prepare`), for loader workers to stream them
(`mmtx.data.streaming`): litdata's `optimize` writes each split of an image or audio folder, or the pairs of a
translation or speech-to-text source, into chunks of about 64 MB, and `mmtx.json` beside them records what was written: the modality,
the class names or vocabularies, the sample counts, each shard's size and checksum, and the source's fingerprint
(a second `prepare` of the same source does nothing). Files keep their encoded bytes (a JPEG stays a JPEG:
ImageNet's 140 GB, not its 190 GB decoded). A folder is built in `<out>.partial` and renamed into place, so a killed
`prepare` leaves nothing that looks prepared.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Iterator

import torch

from mmtx.data.cache import digest, file_checksum
from mmtx.errors import ConfigError, DataError, optional
from mmtx.files import atomic_write_text

log = logging.getLogger(__name__)

META = "mmtx.json"
FORMAT = 2  # of what `prepare_shards` writes: part of a prepared folder's fingerprint


def litdata_module(purpose: str = "data=streaming (shards read by litdata)"):
    return optional("litdata", "streaming", purpose)


def _file_record(item: tuple[str, int]) -> dict[str, Any]:
    """One sample as a shard keeps it: its file's bytes as they are (a JPEG stays a JPEG, a FLAC a FLAC), its label
    and its name (for messages), as UTF-8 bytes: litdata stores a str that names an image file as that image,
    decoded again on every read."""
    path, label = item
    return {"data": Path(path).read_bytes(), "label": int(label), "name": str(path).encode()}


def _kind(source: Any) -> str:
    """The modality of a source that lists its files: an image folder (`data=imagefolder`) or an audio folder
    (`data=audio_folder`, `data=fsdd`); any other is an error naming what can be prepared."""
    from mmtx.data.audio_sources import AudioFolder

    if hasattr(source, "_files"):
        return "image"
    if isinstance(source, AudioFolder):
        return "audio"
    raise ConfigError(f"data.source ({type(source).__name__}) cannot be prepared for streaming: images and audio are "
                      "prepared from a folder (data=imagefolder data.source.path=<folder with train/<class>/...>, or "
                      "data=audio_folder data.source.path=<folder>)")


def _listing(source: Any) -> dict[str, list[tuple[str, int, int]]]:
    """{split: [(file, label id, bytes)]} of an image or audio folder; one walk of the folder a split."""
    if _kind(source) == "image":
        return {split: [(str(path), label, size) for path, label, size, _ in source._files(split)]
                for split in source.splits()}
    ids = {name: i for i, name in enumerate(source.classes())}
    return {split: [(str(f), ids[label], f.stat().st_size) for f, label in files]
            for split, files in source._list().items()}


def _prepared_or_cleared(out: Path, fingerprint: str, verify: bool, replace: bool, what: str) -> dict[str, Any] | None:
    """The `mmtx.json` of `out` when it is already prepared from `fingerprint` and its shards are whole (`verify`:
    their checksums, else their sizes); else None, with a damaged folder, or with `replace` one prepared from other
    files, deleted to be prepared again. A folder prepared from other files without `replace`, or one that is not a
    prepared dataset, is an error."""
    meta_path = out / META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        damaged = shard_problems(out, meta, contents=verify) if meta.get("fingerprint") == fingerprint else []
        if meta.get("fingerprint") == fingerprint and not damaged:
            log.info("%s is already prepared from %s (%s); %s", out, what, meta["samples"],
                     "every shard matches its checksum" if verify else "every shard has its size")
            return meta
        if damaged:
            log.warning("%s; preparing it again", "; ".join(text for _, _, text in damaged[:3]))
        elif not replace and meta.get("format") != FORMAT:
            raise DataError(f"{out} was prepared by another version of mmtx (format {meta.get('format')}, this one "
                            f"writes {FORMAT}); delete that folder and prepare it again, or give another out=")
        elif not replace:
            raise DataError(f"{out} holds a dataset prepared from other files or settings ({meta.get('source')}); "
                            "give another out= or delete that folder")
        else:
            log.info("%s was prepared from files that have changed since: preparing it again", out)
        shutil.rmtree(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not a prepared dataset (no {META}); give an empty or new folder as out=")
    return None


def _partial_folder(out: Path) -> Path:
    """`<out>.partial`, new and empty (what a killed prepare left there is deleted): shards are written into it and
    it is renamed into place only when complete, so nothing half-written looks prepared."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def prepare_shards(source: Any, out: str | os.PathLike, num_workers: int | None = None,
                   replace: bool = False, chunk_bytes: int | str = "64MB", verify: bool = True) -> dict[str, Any]:
    """Write every split of a `source` that lists its files (an image or audio folder) into shards under `out`; the
    written `mmtx.json` (returned). Idempotent: a folder already prepared from the same files is left as it is; one
    prepared from other files is an error, or, with `replace` (mmtx's own cache folder), prepared again. The
    shards are written into `<out>.partial` and moved into place only when every split is done, so a killed
    `prepare` leaves no folder that looks prepared; the next call starts it again. `chunk_bytes`: the size of a
    shard (litdata's; 64 MB reads well from local disks and object storage alike). `verify`: on a folder already
    prepared, check every shard's checksum (reads them all; without it, their sizes: the loader workers check each
    shard's checksum as they first read it)."""
    litdata = litdata_module("python -m mmtx.prepare (shards written by litdata)")
    modality = _kind(source)  # before anything is read or written
    out = Path(out).expanduser().resolve()
    splits = source.splits()
    # The files, and how they are decoded (the cache name holds an image size, a sample rate, a crop).
    fingerprint = digest(FORMAT, source.cache_name, *(source.fingerprint(s) for s in splits))
    prepared = _prepared_or_cleared(out, fingerprint, verify, replace, str(source.path))
    if prepared is not None:
        return prepared
    partial = _partial_folder(out)
    listing = _listing(source)
    _check_space(partial, sum(size for files in listing.values() for _, _, size in files))
    workers = num_workers or max(1, min(8, os.cpu_count() or 1))
    samples: dict[str, int] = {}
    shards: dict[str, dict[str, dict[str, Any]]] = {}  # split -> shard file -> its size and checksum
    for split, found in listing.items():
        files = [(path, label) for path, label, _ in found]
        log.info("preparing %s [%s]: %d files into %s", source.path, split, len(files), out / split)
        with _progress(partial / split, sum(size for _, _, size in found), f"prepare [{split}]"):
            litdata.optimize(fn=_file_record, inputs=files, output_dir=str(partial / split), chunk_bytes=chunk_bytes,
                             num_workers=min(workers, len(files)), mode="overwrite", verbose=False)
        samples[split] = _check_written(partial / split, len(files))
        shards[split] = {name: file_checksum(partial / split / name) for name in _chunk_names(partial / split)}
    meta = {"format": FORMAT, "modality": modality, "classes": list(source.classes()), "samples": samples,
            "source": str(source.path), "fingerprint": fingerprint, "shards": shards}
    if modality == "image":
        meta["image_size"] = source.image_size or _square_side(listing["train" if "train" in listing else splits[0]][0][0])
    else:  # decoded by the workers as the cached path decodes: resampled, mixed down, cropped
        meta.update(sample_rate=source.sample_rate, max_seconds=source.max_seconds)
    atomic_write_text(partial / META, json.dumps(meta, indent=1))
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(partial, out)
    return meta


@contextlib.contextmanager
def _progress(folder: Path, total: int, what: str) -> Iterator[None]:
    """A progress bar (on a terminal) of the shard bytes written under `folder` against `total`, the files' bytes,
    polled once a second while litdata's workers write them (its own bars interleave with its workers' notes)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=what, unit="B", unit_scale=True, disable=None, leave=False)
    done = threading.Event()

    def poll() -> None:
        while not done.wait(1.0):
            written = sum(f.stat().st_size for f in folder.glob("*.bin") if f.is_file()) if folder.is_dir() else 0
            bar.update(max(0, min(written, total) - bar.n))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.close()


def _chunk_names(folder: Path) -> list[str]:
    """The shard files of a litdata split folder, in its index's order (litdata's chunk indexes)."""
    return [c["filename"] for c in json.loads((folder / "index.json").read_text())["chunks"]]


def shard_problems(out: Path, meta: dict[str, Any], contents: bool = False,
                    splits: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(split, shard file, what is wrong) for each shard of a prepared folder that is missing or of another size
    than was written; with `contents`, also each whose bytes no longer match their checksum (reads every shard)."""
    problems = []
    for split, files in meta.get("shards", {}).items():
        if splits is not None and split not in splits:
            continue
        for name, recorded in files.items():
            path = out / split / name
            if not path.is_file():
                problems.append((split, name, f"shard {path} is missing"))
            elif path.stat().st_size != recorded["bytes"]:
                problems.append((split, name, f"shard {path} holds {path.stat().st_size} bytes where "
                                              f"{recorded['bytes']} were written (truncated or changed)"))
            elif contents and file_checksum(path)["sha256"] != recorded["sha256"]:
                problems.append((split, name, f"shard {path} does not match the checksum written with it"))
    return problems


def _check_written(folder: Path, expected: int) -> int:
    """The samples litdata's index under `folder` holds, which must be all `expected` (its workers can fail
    without failing `optimize`: a split would be short, or empty, with nothing said)."""
    try:
        chunks = json.loads((folder / "index.json").read_text())["chunks"]
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"preparing {folder} wrote no readable index.json ({err}); run python -m mmtx.prepare "
                        "again") from None
    written = sum(int(c["chunk_size"]) for c in chunks)
    missing = [c["filename"] for c in chunks if not (folder / c["filename"]).is_file()]
    if written != expected or missing:
        raise DataError(f"preparing {folder} wrote {written} of its {expected} samples"
                        + (f" and its index names missing shards {missing[:3]}" if missing else "")
                        + "; the log above names what failed; run python -m mmtx.prepare again")
    return written


def image_dims(path: Path) -> tuple[int, int]:
    """An image file's (width, height), from its header."""
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def _square_side(path: Path) -> int:
    """The side of a source's images when `data.source.image_size` is null: its first training image's (`path`),
    which must be square (the images are decoded at that size; the cached path asks the same of every image)."""
    width, height = image_dims(path)
    if width != height:
        raise ConfigError(f"{path} is {width}x{height}: set data.source.image_size=N to prepare every image at NxN "
                          "(resized and centre-cropped, as the cached path does)")
    return width


def _check_space(folder: Path, needed: int) -> None:
    """Refuse to start writing shards that would not fit (about the files' size), naming the folder and the space."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DataError(f"preparing needs about {needed / 1e9:.1f} GB in {folder.parent} and {free / 1e9:.1f} GB is "
                        "free; free space there or give another out=")


class _PairRecords:
    """Pairs `start .. start + PAIRS_A_TASK` of a split as shard records (litdata's `fn`, a generator): the source's
    and target's token ids (int32 bytes, as `Seq2SeqDataModule` made them: cut to the lengths set, the target
    without BOS, prefix and EOS) and both strings (the references metrics are computed against)."""

    def __init__(self, tensors: dict[str, torch.Tensor], texts: dict[str, list[str]]) -> None:
        self.arrays = {k: tensors[k].numpy() for k in ("src_ids", "src_offsets", "src_lengths", "tgt_ids",
                                                      "tgt_offsets", "tgt_lengths", "rows")}
        self.texts = texts

    def __call__(self, start: int):
        a = self.arrays
        for i in range(start, min(start + PAIRS_A_TASK, len(a["rows"]))):
            row = int(a["rows"][i])
            src = a["src_ids"][a["src_offsets"][i]:a["src_offsets"][i] + a["src_lengths"][i]]
            tgt = a["tgt_ids"][a["tgt_offsets"][i]:a["tgt_offsets"][i] + a["tgt_lengths"][i]]
            yield {"src": src.astype("<i4").tobytes(), "tgt": tgt.astype("<i4").tobytes(),
                   "src_text": self.texts["src"][row].encode(), "tgt_text": self.texts["tgt"][row].encode()}


PAIRS_A_TASK = 4096


def _speech_record(item: tuple[str, str, bytes, str]) -> dict[str, Any]:
    """One speech-to-text pair as a shard keeps it: its audio file's bytes as they are (decoded, resampled and
    cropped by the loader workers), its path (for messages) and its name in tables, and its transcript as int32
    token ids and as a string."""
    path, name, ids, text = item
    return {"data": Path(path).read_bytes(), "name": path.encode(), "src_text": name.encode(), "tgt": ids,
            "tgt_text": text.encode()}


def _write_translation(datamodule: Any, partial: Path, litdata: Any, num_workers: int | None) -> dict[str, int]:
    """Each split's translation pairs into `partial`/<split>, tokenized as a training run in memory tokenizes them
    (`Seq2SeqDataModule.setup`: the strings are read into memory once); {split: pairs}."""
    datamodule.prepare_data()
    datamodule.setup()
    splits = [s for s in ("train", "val", "test") if s in datamodule.splits
              and not (s == "val" and datamodule.val_from == "test")]  # validation on test: the test split's shards
    samples = {}
    for split in splits:
        tensors = datamodule.splits[split]
        n = len(tensors["rows"])
        texts = datamodule.texts["train" if split == "val" and datamodule.val_from == "train" else split]
        log.info("preparing %s [%s]: %d pairs into %s", datamodule.source.cache_name, split, n, partial / split)
        litdata.optimize(fn=_PairRecords(tensors, texts), inputs=list(range(0, n, PAIRS_A_TASK)),
                         output_dir=str(partial / split), chunk_bytes="64MB",
                         num_workers=max(1, min(num_workers or 1, -(-n // PAIRS_A_TASK))), mode="overwrite",
                         verbose=False)
        samples[split] = _check_written(partial / split, n)
    return samples


def _write_speech(datamodule: Any, partial: Path, litdata: Any, num_workers: int | None) -> dict[str, int]:
    """Each split's speech-to-text pairs into `partial`/<split> without decoding a clip (LibriSpeech's 960 hours
    are 110 GB decoded): the audio files' bytes, and the transcripts tokenized with the vocabulary a training run in
    memory trains on the same transcripts (and caches under the same key); validation held out of the training
    pairs by the same seeded choice. {split: pairs}."""
    from mmtx.data.base import hold_out
    from mmtx.data.seq2seq import _encode_flat

    source = datamodule.source
    entries = {split: [(str(path), text, name) for path, text, name in source.entries(split)]
               for split in source.splits()}
    train = entries["train"]
    _, datamodule.tgt_vocab = datamodule._vocabs({"fingerprint": source.fingerprint("train"),
                                                  "tgt": [text for _, text, _ in train]})
    room = datamodule.target_room()
    if datamodule.val_fraction > 0:
        kept, held = hold_out(len(train), datamodule.val_fraction, datamodule.seed)
        entries["train"], entries["val"] = [train[i] for i in kept.tolist()], [train[i] for i in held.tolist()]
    elif "val" not in entries and "test" not in entries:
        raise DataError("the data source has no val or test split; set data.val_fraction to hold out part of the "
                        "training split")
    _check_space(partial, sum(Path(path).stat().st_size for pairs in entries.values() for path, _, _ in pairs))
    workers = num_workers or max(1, min(8, os.cpu_count() or 1))
    samples = {}
    for split, pairs in entries.items():
        if not pairs:
            raise DataError(f"{source.cache_name} [{split}] holds no speech-to-text pairs to prepare")
        tgt, cut = _encode_flat(datamodule.tgt_vocab, [text for _, text, _ in pairs], room)
        if cut:
            log.warning("%s [%s]: cut %d transcript(s) to %d tokens (data.max_tgt_len less BOS and the prefix)",
                        source.cache_name, split, cut, room)
        ids = [tgt["ids"][o:o + n].numpy().astype("<i4").tobytes()
               for o, n in zip(tgt["offsets"].tolist(), tgt["lengths"].tolist())]
        items = [(path, name, i, text) for (path, text, name), i in zip(pairs, ids)]
        log.info("preparing %s [%s]: %d clips into %s", source.cache_name, split, len(items), partial / split)
        with _progress(partial / split, sum(Path(path).stat().st_size for path, _, _ in pairs), f"prepare [{split}]"):
            litdata.optimize(fn=_speech_record, inputs=items, output_dir=str(partial / split), chunk_bytes="64MB",
                             num_workers=min(workers, len(items)), mode="overwrite", verbose=False)
        samples[split] = _check_written(partial / split, len(items))
    return samples


def prepare_pairs(datamodule: Any, out: str | os.PathLike, num_workers: int | None = None,
                  replace: bool = False, verify: bool = True) -> dict[str, Any]:
    """Write the pairs of a `Seq2SeqDataModule` into shards under `out`, once, and its vocabularies beside them
    (`data=streaming_pairs` reads them): translation pairs as token ids and strings, tokenized as for training in
    memory; speech-to-text pairs as each clip's file bytes (decoded in the loader workers) with its transcript's
    ids and string. Idempotent and atomic as `prepare_shards` (`replace`, `verify`: as there)."""
    litdata = litdata_module("python -m mmtx.prepare (shards written by litdata)")
    source = datamodule.source
    speech = not datamodule.text_source
    out = Path(out).expanduser().resolve()
    specs = {"tgt": datamodule.tgt_spec, "src": datamodule.src_spec, "shared": datamodule.shared_vocab,
             "max": [datamodule.max_src_len, datamodule.max_tgt_len], "specials": datamodule.specials,
             "val_fraction": datamodule.val_fraction, "seed": datamodule.seed if datamodule.val_fraction else None}
    decoded = [source.cache_name] if speech else []  # the sample rate and crop the workers decode clips at
    fingerprint = digest(FORMAT, *decoded, *(source.fingerprint(s) for s in source.splits()),
                         json.dumps(specs, sort_keys=True))
    prepared = _prepared_or_cleared(out, fingerprint, verify, replace, source.cache_name)
    if prepared is not None:
        return prepared
    partial = _partial_folder(out)
    samples = (_write_speech if speech else _write_translation)(datamodule, partial, litdata, num_workers)
    shards = {split: {name: file_checksum(partial / split / name) for name in _chunk_names(partial / split)}
              for split in samples}
    datamodule.tgt_vocab.save(partial / "tgt_tokenizer.json")
    if not datamodule.shared_vocab and not speech:
        datamodule.src_vocab.save(partial / "src_tokenizer.json")
    meta = {"format": FORMAT, "modality": "pairs", "src_kind": "audio" if speech else "text",
            "source": source.cache_name, "samples": samples, "shared_vocab": datamodule.shared_vocab,
            "max_src_len": datamodule.max_src_len, "max_tgt_len": datamodule.max_tgt_len,
            "tgt_specials": datamodule.specials, "fingerprint": fingerprint, "shards": shards}
    if speech:
        meta.update(sample_rate=source.sample_rate, max_seconds=source.max_seconds)
    atomic_write_text(partial / META, json.dumps(meta, indent=1))
    if out.exists():
        out.rmdir()
    os.replace(partial, out)
    return meta
