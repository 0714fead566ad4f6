"""Data bigger than memory, read: a folder prepared once into shards (`mmtx.data.shards`, `python -m mmtx.prepare`)
streamed by loader workers from a local or shared disk, or from S3.

    python -m mmtx.prepare data=imagefolder data.source.path=/data/imagenet out=/shards/imagenet
    python -m mmtx.train task=vit_cifar data=streaming data.path=/shards/imagenet      # or s3://bucket/imagenet

Loader workers decode images to the pixels the cached path decodes (torchvision's decoder; the cached path's
Pillow reader for an image to resize), and the batch goes through `ImageDataModule`'s device-side augmentation and
normalisation; audio clips (`StreamingAudio`, `data=streaming_audio`) are decoded, resampled and cropped as the
cached path does it; translation pairs (`StreamingPairs`, `data=streaming_pairs`) come as token ids with their
vocabularies. litdata gives each DDP rank its own samples and saves the loader's position in the checkpoint. Text
is tokenized into memory-mapped token files instead (`mmtx.data.text`). Speech-to-text pairs are still held in
memory.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mmtx.batch import AudioBatch, ImageBatch
from mmtx.data.audio import AudioDataModule
from mmtx.data.cache import file_checksum
from mmtx.data.image import ImageDataModule
from mmtx.data.seq2seq import Seq2SeqDataModule
from mmtx.data.shards import FORMAT, META, image_dims, litdata_module, prepare_pairs, prepare_shards, shard_problems
from mmtx.errors import ConfigError, DataError, MissingError, optional

log = logging.getLogger(__name__)

class _Decode:
    """A shard's record -> {"image": uint8 (3, H, W), "label"}, in a loader worker (picklable: workers may be
    spawned). torchvision's decoder (libjpeg-turbo, libpng) gives the pixels Pillow gives, 5x faster on 64 px JPEGs;
    an image to resize, or one it cannot read, goes through the cached path's own reader."""

    def __init__(self, image_size: int | None, on_bad_file: str) -> None:
        self.image_size, self.on_bad_file = image_size, on_bad_file

    def __call__(self, item: dict[str, Any]) -> dict[str, Any] | None:
        from torchvision.io import ImageReadMode, decode_image

        from mmtx.data.sources import read_image

        size = self.image_size
        try:
            try:
                image = decode_image(torch.frombuffer(bytearray(item["data"]), dtype=torch.uint8), ImageReadMode.RGB)
            except RuntimeError:
                image = None
            if image is None or (size is not None and tuple(image.shape[-2:]) != (size, size)):
                image = read_image(io.BytesIO(item["data"]), size)
        except DataError as err:
            if self.on_bad_file == "error":
                raise DataError(f"cannot read image {_name(item)}: {err} (set data.on_bad_file=skip to skip such "
                                "files)") from None
            log.warning("skipped an unreadable image: %s (%s)", _name(item), err)
            return None
        return {"image": image, "label": item["label"]}


def _name(item: dict[str, Any]) -> str:
    name = item.get("name", "?")
    return name.decode() if isinstance(name, bytes) else str(name)


def _shard_is_whole(path: str, size: int, sha256: str, on_bad_file: str) -> bool:
    """Whether a shard's bytes are the ones written (size and checksum); if not, a DataError naming it, or with
    `on_bad_file=skip` a warning (its images are then skipped)."""
    whole = os.path.getsize(path) == size and file_checksum(Path(path))["sha256"] == sha256
    if not whole:
        what = f"shard {path} does not match the checksum written with it"
        if on_bad_file == "error":
            raise DataError(f"{what}: prepare the folder again (python -m mmtx.prepare with the same data keys and "
                            "out=), or set data.on_bad_file=skip to train without it")
        log.warning("%s: its images are skipped (data.on_bad_file=skip)", what)
    return whole


class _Collate:
    """Decoded samples -> {"images": (B, C, H, W) uint8, "labels": (B,), "split": name}; skipped samples dropped."""

    def __init__(self, split: str) -> None:
        self.split = split

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        items = [i for i in items if i is not None]
        if not items:
            return None  # every sample skipped (a damaged shard): the loader moves on to the next batch
        return {"images": torch.stack([i["image"] for i in items]),
                "labels": torch.tensor([i["label"] for i in items], dtype=torch.long), "split": self.split}


_LOADERS: dict[int, type] = {}


def _loader_class(litdata) -> type:
    """litdata's StreamingDataLoader, for a trainer that ends an epoch by counting its batches.

    A loader given a position (`load_state_dict`) replays from it at its next iteration and forgets it only when
    that iteration runs to its end. A resumed trainer stops the epoch after the batches it had left, without running
    the iterator to its end, so the next epoch would replay the same batches; here, once a resumed iteration has
    yielded, the next one is a new epoch."""
    if id(litdata) not in _LOADERS:
        class Loader(litdata.StreamingDataLoader):
            _resumed_yielded = False

            def load_state_dict(self, obj: dict[str, Any]) -> None:
                super().load_state_dict(obj)
                self._resumed_yielded = False

            def __iter__(self):
                if self.restore and self._resumed_yielded:
                    self.restore = False  # the resumed epoch was ended by the trainer: this is the next one
                self._resumed_yielded = False
                resumed = self.restore
                for batch in super().__iter__():
                    if batch is None:  # every sample of it skipped
                        continue
                    self._resumed_yielded = resumed
                    yield batch

        _LOADERS[id(litdata)] = Loader
    return _LOADERS[id(litdata)]


_DATASETS: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """`_DecodingDataset`, made on first use (litdata is optional) and found here by name when a spawned loader
    worker unpickles its dataset."""
    if name != "_DecodingDataset":
        raise AttributeError(name)
    if name not in _DATASETS:
        litdata = litdata_module()

        class _DecodingDataset(litdata.StreamingDataset):
            """litdata's dataset, its records decoded by `decode` (a `_Decode`) in the worker that reads them.

            `shards`: (path, bytes, sha256) of each chunk, in litdata's chunk order: the worker checks a chunk
            against them before its first read of it (once a process), and a chunk that fails is an error naming
            it, or (`on_bad_file=skip`) its samples are skipped (None) with one warning."""

            def __init__(self, *args: Any, decode: _Decode, shards: list[tuple[str, int, str]] | None = None,
                         **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.decode, self.shards, self._whole = decode, shards, {}

            def __getitem__(self, index):
                chunk = getattr(index, "chunk_index", None)
                if self.shards is not None and chunk is not None:
                    if chunk not in self._whole:
                        self._whole[chunk] = _shard_is_whole(*self.shards[chunk], self.decode.on_bad_file)
                    if not self._whole[chunk]:
                        return None
                return self.decode(super().__getitem__(index))

        _DecodingDataset.__module__ = __name__
        _DecodingDataset.__qualname__ = "_DecodingDataset"  # pickled by name: this function makes it again
        _DATASETS[name] = _DecodingDataset
    return _DATASETS[name]


def _remote(path: str) -> bool:
    return path.startswith("s3://")


def read_s3(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The bytes of an object in S3 (or an S3-compatible store: `storage_options.endpoint_url`, as litdata takes
    it), with one message for what stops it: no credentials, credentials refused, no network, no such object."""
    boto3 = optional("boto3", "streaming", f"data.path={url.rsplit('/', 1)[0]} (S3, read with boto3)")
    botocore = optional("botocore", "streaming", f"data.path={url.rsplit('/', 1)[0]} (S3, read with boto3)")
    import importlib

    for sub in ("config", "exceptions"):  # submodules of the package found just above
        importlib.import_module(f"botocore.{sub}")
    Config = botocore.config.Config
    BotoCoreError, ClientError = botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError
    EndpointConnectionError = botocore.exceptions.EndpointConnectionError
    NoCredentialsError = botocore.exceptions.NoCredentialsError
    PartialCredentialsError = botocore.exceptions.PartialCredentialsError

    bucket, _, key = url[len("s3://"):].partition("/")
    options = dict(storage_options or {})
    session = boto3.session.Session()  # its own: the default session keeps the credentials it first found
    client = session.client("s3", endpoint_url=options.pop("endpoint_url", None),
                            config=Config(connect_timeout=10, retries={"max_attempts": 2}), **options)
    where = client.meta.endpoint_url
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except (NoCredentialsError, PartialCredentialsError):
        raise ConfigError(f"reading {url}: no AWS credentials were found; set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, a profile of ~/.aws/credentials), or run on a "
                          "machine with an instance role") from None
    except EndpointConnectionError as err:
        raise DataError(f"reading {url}: cannot reach {where} ({err}); check the network, or "
                        "data.storage_options.endpoint_url for an S3-compatible store") from None
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            raise MissingError(f"{url.rsplit('/', 1)[0]} is not a prepared dataset (no {url.rsplit('/', 1)[1]}): "
                               "prepare it on a disk with python -m mmtx.prepare ... out=DIR, then copy DIR there "
                               "(aws s3 sync DIR s3://...)") from None
        if code == "NoSuchBucket":
            raise MissingError(f"reading {url}: the bucket {bucket} does not exist at {where}") from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
            raise ConfigError(f"reading {url}: {where} refused the AWS credentials ({code}); check "
                              "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and their access to "
                              f"the bucket {bucket}") from None
        raise DataError(f"reading {url}: {code or err}") from None
    except BotoCoreError as err:
        raise DataError(f"reading {url}: {err}") from None


class _Streamed:
    """What the streamed data modules share: a prepared folder (`python -m mmtx.prepare`) on a disk or in S3, read
    by `num_workers` loader processes that decode its samples (`_decoder`) into batches (`_collate`).

    Training reads the shards in a seeded random order (litdata's: chunks, then samples within them) and each DDP
    rank its own part; validation uses the prepared `val` split, else `test`. The training loader's position is
    saved in checkpoints (litdata's `StreamingDataLoader.state_dict`, through the data module's state). Shards are
    checked (`_readable`, `_shard_is_whole`); `on_bad_file`: skip (a warning with a count) | error. An S3 `path`
    (s3://bucket/prefix, the folder copied there as it is): `storage_options` go to boto3's client and litdata's
    (`endpoint_url` for an S3-compatible store), and the shards are downloaded into `cache_dir`/streamed as they are
    read (litdata's cache, bounded by its `max_cache_size`).
    """

    modality = "image"
    config_name = "streaming"  # the data= option that streams this modality

    def _init_streamed(self, path: str, num_workers: int, on_bad_file: str, storage_options: dict[str, Any] | None,
                       cache_dir: str | None) -> None:
        litdata_module()  # missing: one line naming the extra, before anything is read
        if on_bad_file not in ("skip", "error"):
            raise ConfigError(f"data.on_bad_file must be 'skip' or 'error', got {on_bad_file!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers!r} must be a whole number >= 0 (0: load in the training "
                              "process)")
        if str(path).startswith(("gs://", "azure://", "hf://")):
            raise ConfigError(f"data.path={path}: mmtx streams prepared folders from a disk or from S3 (s3://, and "
                              "S3-compatible stores through data.storage_options.endpoint_url) so far; copy the folder "
                              "to one of those")
        self.path = str(path).rstrip("/") if _remote(str(path)) else str(Path(path).expanduser())
        self.storage_options = dict(storage_options or {})
        self.shard_cache = str(Path(cache_dir).expanduser() / "streamed") if cache_dir else None
        self.num_workers = num_workers
        self.on_bad_file = on_bad_file
        self.meta: dict[str, Any] = {}
        self._readable_splits: dict[str, tuple[str, int, list[tuple[str, int, str]] | None]] = {}
        self._train_loader = None
        self._position: dict[str, Any] | None = None  # a resumed run's loader position, until its loader exists

    def prepare_data(self) -> None:
        pass  # prepared by python -m mmtx.prepare

    def setup(self, stage: str | None = None) -> None:
        if self.meta:
            return
        logging.getLogger("litdata").setLevel(logging.WARNING)  # its cache and mmap notes at every loader
        self.meta = self._read_meta()
        self.classes = list(self.meta.get("classes", []))
        log.info("streaming %s: %s", self.path, self.meta["samples"])

    def _read_meta(self) -> dict[str, Any]:
        if _remote(self.path):
            meta = json.loads(read_s3(f"{self.path}/{META}", self.storage_options))
        else:
            meta_path = Path(self.path) / META
            if not meta_path.is_file():
                source = {"image": "data=imagefolder data.source.path=<image folder>",
                          "audio": "data=audio_folder data.source.path=<audio folder>",
                          "pairs": "task=<a translation or speech-to-text task>"}[self.modality]
                raise MissingError(f"data.path={self.path} is not a prepared dataset (no {META}): prepare it once with "
                                   f"python -m mmtx.prepare {source} out={self.path}")
            meta = json.loads(meta_path.read_text())
        modality = meta.get("modality")
        if modality != self.modality:
            other = {"image": "data=streaming", "audio": "data=streaming_audio", "text": "data=streaming_text",
                     "pairs": "data=streaming_pairs"}
            hint = f" ({other[modality]} streams {modality})" if modality in other else ""
            raise ConfigError(f"{self.path} holds {modality} data; data={self.config_name} streams "
                              f"{self.modality}{hint}")
        if meta.get("format") != FORMAT:
            raise DataError(f"{self.path} was prepared by another version of mmtx (format {meta.get('format')}, this "
                            f"one reads {FORMAT}): prepare it again into a new folder (python -m mmtx.prepare ... out=)")
        return meta

    def _readable(self, folder: str) -> tuple[str, int, list[tuple[str, int, str]] | None]:
        """Where litdata reads the split `folder`, its samples and its shards (path, bytes, sha256) in litdata's
        order. Shards missing or truncated are named: an error, or with `on_bad_file=skip` left out (a folder of
        links to the others and their index, in a temporary folder), counted in one warning."""
        if folder in self._readable_splits:
            return self._readable_splits[folder]
        if _remote(self.path):  # litdata downloads each shard whole into its cache, and checks its size
            self._readable_splits[folder] = (f"{self.path}/{folder}", int(self.meta["samples"][folder]), None)
            return self._readable_splits[folder]
        root = Path(self.path) / folder
        index = json.loads((root / "index.json").read_text())
        recorded = self.meta["shards"][folder]
        bad = {name: text for _, name, text in shard_problems(Path(self.path), self.meta, splits=[folder])}
        where, chunks = str(root), index["chunks"]
        if bad:
            first = next(iter(bad.values()))
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            if self.on_bad_file == "error":
                raise DataError(f"{first}{more}: prepare the folder again (python -m mmtx.prepare with the same data "
                                f"keys and out={self.path}), or set data.on_bad_file=skip to train without it")
            chunks = [c for c in chunks if c["filename"] not in bad]
            left = sum(int(c["chunk_size"]) for c in chunks)
            if left == 0:
                raise DataError(f"every shard of {root} is damaged: prepare the folder again (python -m mmtx.prepare "
                                f"with the same data keys and out={self.path})")
            view = Path(tempfile.mkdtemp(prefix="mmtx-shards-"))
            atexit.register(shutil.rmtree, view, True)
            for c in chunks:
                os.symlink(root / c["filename"], view / c["filename"])
            (view / "index.json").write_text(json.dumps({**index, "chunks": chunks}))
            log.warning("%s%s: skipping %d damaged shard%s of %s, %d of its %d samples (data.on_bad_file=skip)", first,
                        more, len(bad), "s" if len(bad) > 1 else "", root, self.meta["samples"][folder] - left,
                        self.meta["samples"][folder])
            where = str(view)
        samples = sum(int(c["chunk_size"]) for c in chunks)
        shards = [(str(root / c["filename"]), recorded[c["filename"]]["bytes"], recorded[c["filename"]]["sha256"])
                  for c in chunks]
        self._readable_splits[folder] = (where, samples, shards)
        return self._readable_splits[folder]

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.classes)

    def num_samples(self, split: str) -> int:
        self.setup()
        return self._readable(self._split(split))[1]

    def has_split(self, split: str) -> bool:
        self.setup()
        return split in self.meta["samples"] or (split == "val" and "test" in self.meta["samples"])

    def _split(self, split: str) -> str:
        samples = self.meta["samples"]
        if split == "val" and "val" not in samples:
            return "test"
        if split not in samples:
            raise DataError(f"{self.path} has no {split!r} split (it has {sorted(samples)})")
        return split

    def _decoder(self) -> Any:
        """What a loader worker turns a shard's record into a sample with (None: skipped)."""
        raise NotImplementedError

    def _collate(self, split: str) -> Any:
        """What a loader worker turns decoded samples into a batch with (None: every sample skipped)."""
        raise NotImplementedError

    def _loader(self, split: str, batch_size: int, train: bool):
        litdata = litdata_module()
        self.setup()
        where, _, shards = self._readable(self._split(split))
        remote = {"storage_options": self.storage_options, "cache_dir": self.shard_cache} if _remote(where) else {}
        dataset = __getattr__("_DecodingDataset")(where, shuffle=train, seed=self.seed, drop_last=train,
                                                  decode=self._decoder(), shards=shards, **remote)
        loader = _loader_class(litdata)(dataset, batch_size=batch_size, num_workers=self.num_workers,
                                        collate_fn=self._collate(split), drop_last=train,
                                        persistent_workers=self.num_workers > 0 and train,
                                        # its own generator: making an iterator draws a base seed, which from the
                                        # global one would shift training's random numbers at a resume
                                        generator=torch.Generator().manual_seed(self.seed))
        if train:
            self._train_loader = loader
            self._resume_position()
        return loader

    # The training loader's position goes into checkpoints through the data module's own state: Lightning restores
    # a stateful loader's state only if the loader is made after the restore, and `configure_optimizers` makes it
    # before (to count the steps of a schedule), so the position would be lost.
    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._position = state_dict.get("train_loader")
        self._resume_position()

    def _resume_position(self) -> None:
        if self._position is not None and self._train_loader is not None:
            self._train_loader.load_state_dict(self._position)
            self._position = None

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int = 0) -> Any:
        if not isinstance(batch, dict):
            return batch
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class StreamingImages(_Streamed, ImageDataModule):
    """Labelled images streamed from a prepared folder (`_Streamed`): decoded in `num_workers` loader processes,
    augmented and normalised on the training device as `ImageDataModule` does it. `image_size`: null keeps the
    prepared size (the source's `image_size`); `on_bad_file=skip` leaves an unreadable image out of its batch."""

    def __init__(
        self,
        path: str,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        image_size: int | None = None,
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
        augment: dict | None = None,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        on_bad_file: str = "skip",
        seed: int = 0,
        root: str | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        source: dict[str, Any] | None = None,
        val_fraction: float | None = None,
    ) -> None:
        ImageDataModule.__init__(self, source=None, cache_dir="", root=root, batch_size=batch_size,
                                 eval_batch_size=eval_batch_size, mean=mean, std=std, augment=augment, mixup=mixup,
                                 cutmix=cutmix, seed=seed)
        self._init_streamed(path, num_workers, on_bad_file, storage_options, cache_dir)
        # A task written for a folder (vit_finetune) sets data.source.image_size and data.val_fraction: the first is
        # the size its model takes (images prepared at another are resized to it), the second has no folder to cut.
        other = sorted(set(source or {}) - {"image_size"})
        if other:
            raise ConfigError(f"data.source.{other[0]} does not apply to data=streaming (a prepared folder); set it "
                              f"when preparing (python -m mmtx.prepare data=imagefolder data.source.{other[0]}=...)")
        self.wanted_size = image_size or (source or {}).get("image_size")
        if val_fraction:
            log.info("data.val_fraction=%s does not apply to data=streaming: it validates on the prepared folder's "
                     "val split, else its test split", val_fraction)

    def setup(self, stage: str | None = None) -> None:
        if self.meta:
            return
        _Streamed.setup(self, stage)
        if self.mixup_args["mixup_alpha"] > 0 or self.mixup_args["cutmix_alpha"] > 0:
            from timm.data import Mixup

            self.mixup = Mixup(**self.mixup_args, label_smoothing=0.0, num_classes=self.num_classes)

    @property
    def image_size(self) -> tuple[int, int]:
        self.setup()
        size = self.wanted_size or self.meta.get("image_size")
        if size is None:
            raise ConfigError(f"{self.path} was prepared without data.source.image_size, so its images may differ in "
                              "size: set data.image_size")
        return (int(size), int(size))

    @property
    def in_channels(self) -> int:
        return 3  # decoded as RGB

    def _decoder(self) -> _Decode:
        return _Decode(self.image_size[0], self.on_bad_file)

    def _collate(self, split: str) -> _Collate:
        return _Collate(split)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> ImageBatch:
        """The decoded batch -> an ImageBatch, augmented (training) and normalised on the device."""
        if not isinstance(batch, dict):
            return batch
        images = batch["images"]
        index = torch.arange(images.shape[0], device=images.device)
        return self.gather(batch["split"], {"images": images, "labels": batch["labels"]}, index, images.device)


class _DecodeAudio:
    """A shard's record -> {"audio": float16 (L,), "label"}, in a loader worker: decoded, mixed down, resampled and
    cropped as the cached path decodes a clip (`AudioDecoder`), and rounded to float16 as the cache holds it."""

    def __init__(self, sample_rate: int, max_seconds: float | None, on_bad_file: str) -> None:
        self.sample_rate, self.max_seconds, self.on_bad_file = sample_rate, max_seconds, on_bad_file

    def __call__(self, item: dict[str, Any]) -> dict[str, Any] | None:
        from mmtx.data.audio_sources import AudioDecoder

        name = _name(item)
        decoder = AudioDecoder(self.sample_rate, self.max_seconds, self.on_bad_file)
        try:
            wave = decoder.decode(item["data"], name)
        except DataError as err:  # on_bad_file=error; its key is data.on_bad_file here
            raise DataError(str(err).replace("data.source.on_bad_file", "data.on_bad_file")) from None
        if wave is None:
            log.warning("skipped an unreadable clip: %s (%s)", name, decoder.reasons.get(name, "unreadable"))
            return None
        return {"audio": wave.to(torch.float16), "label": item["label"]}


class _CollateAudio:
    """Decoded clips -> {"audio": (B, L) float16 zero-padded to the longest, "lengths", "labels", "split"}."""

    def __init__(self, split: str) -> None:
        self.split = split

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        items = [i for i in items if i is not None]
        if not items:
            return None
        lengths = torch.tensor([len(i["audio"]) for i in items], dtype=torch.long)
        audio = torch.nn.utils.rnn.pad_sequence([i["audio"] for i in items], batch_first=True)  # zeros after each
        return {"audio": audio, "lengths": lengths, "labels": torch.tensor([i["label"] for i in items]),
                "split": self.split}


class StreamingAudio(_Streamed, AudioDataModule):
    """Labelled clips streamed from a prepared folder (`_Streamed`; `python -m mmtx.prepare data=audio_folder ...`):
    each file's bytes as they were (WAV, FLAC), decoded, resampled to the prepared `sample_rate` and cropped to its
    `max_seconds` in the loader workers, padded into `AudioBatch`es as the cached path pads them
    (`data=streaming_audio data.path=DIR`). `on_bad_file=skip` leaves an unreadable clip out of its batch."""

    modality = "audio"
    config_name = "streaming_audio"

    def __init__(
        self,
        path: str,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        on_bad_file: str = "skip",
        seed: int = 0,
        root: str | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        AudioDataModule.__init__(self, source=None, cache_dir="", root=root, batch_size=batch_size,
                                 eval_batch_size=eval_batch_size, seed=seed)
        self._init_streamed(path, num_workers, on_bad_file, storage_options, cache_dir)

    @property
    def sample_rate(self) -> int:
        self.setup()
        return int(self.meta["sample_rate"])

    def _decoder(self) -> _DecodeAudio:
        return _DecodeAudio(self.sample_rate, self.meta.get("max_seconds"), self.on_bad_file)

    def _collate(self, split: str) -> _CollateAudio:
        return _CollateAudio(split)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> AudioBatch:
        if not isinstance(batch, dict):
            return batch
        return AudioBatch(audio=batch["audio"].float(), lengths=batch["lengths"], label=batch["labels"])


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
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        on_bad_file: str = "skip",
        seed: int = 0,
        root: str | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        fixed_vocab: Any = None,
        fixed_tgt_vocab: Any = None,
        max_src_len: int | None = None,
        max_tgt_len: int | None = None,
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


def streamed_if_too_large(datamodule: Any, data_cfg: dict[str, Any]) -> _Streamed | None:
    """A streamed data module over shards prepared in the cache folder, when `datamodule`'s training split would
    decode to more than `data.resident_max_gb` (null: 80% of the memory available, where the cached path would
    refuse it): an image or audio folder (`StreamingImages`, `StreamingAudio`), speech-to-text pairs
    (`StreamingPairs`). None when it fits, or when the source is not files on a disk (the resident path, and its
    speed, stay). Said in one line."""
    from mmtx.cpu import resident_budget
    from mmtx.data.audio_sources import decoded_bytes
    from mmtx.files import size_text

    source = datamodule.source
    splits = source.splits() if hasattr(source, "splits") else []
    if "train" not in splits:
        return None
    if isinstance(datamodule, Seq2SeqDataModule):
        if datamodule.text_source or not hasattr(source, "entries"):
            return None
        need = decoded_bytes((path for path, _, _ in source.entries("train")), source.sample_rate, source.max_seconds)
    elif isinstance(datamodule, AudioDataModule):
        if not hasattr(source, "_list"):
            return None
        need = decoded_bytes((f for f, _ in source._list()["train"]), source.sample_rate, source.max_seconds)
    elif hasattr(source, "_files"):
        files = source._files("train")
        width, height = (source.image_size,) * 2 if source.image_size else image_dims(files[0][0])
        need = len(files) * 3 * width * height  # uint8, decoded
    else:
        return None
    budget = resident_budget(datamodule.resident_max_gb, getattr(datamodule, "resident_gpu", False),
                             getattr(datamodule, "resident_processes", 1))
    if budget is None or need <= budget[0]:
        return None
    out = Path(datamodule.cache_dir) / f"{source.cache_name}-shards"
    log.info("data: %s decodes to %s, more than %s: streaming it from shards prepared in %s (once; python -m "
             "mmtx.prepare does the same ahead of time)", getattr(source, "path", source.cache_name), size_text(need),
             budget[1], out)
    # The cache follows its files, as the resident cache does; its shards' sizes are checked at every start, their
    # checksums by the workers that read them.
    keep = {k: data_cfg[k] for k in ("batch_size", "eval_batch_size", "seed", "root") if k in data_cfg}
    keep["on_bad_file"] = getattr(source, "on_bad_file", "skip")
    if isinstance(datamodule, Seq2SeqDataModule):
        prepare_pairs(datamodule, out, replace=True, verify=False)
        return StreamingPairs(str(out), **keep)
    meta = prepare_shards(source, out, replace=True, verify=False)
    if isinstance(datamodule, AudioDataModule):
        return StreamingAudio(str(out), **keep)
    images = ("mean", "std", "augment", "mixup", "cutmix")
    return StreamingImages(str(out), image_size=meta["image_size"], **keep, **{k: data_cfg[k] for k in images
                                                                                if k in data_cfg})
