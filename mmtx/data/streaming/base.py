"""What the streamed data modules share: a prepared folder on a disk or in S3 (`_Streamed`), its shards checked
before and as they are read, and litdata's loader, whose position goes into checkpoints."""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mmtx.data.cache import file_checksum
from mmtx.data.shards import FORMAT, META, litdata_module, shard_problems
from mmtx.errors import ConfigError, DataError, MissingError, optional

log = logging.getLogger(__name__)


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
            """litdata's dataset, its records decoded by `decode` (`images._Decode`, ...) in the worker that reads them.

            `shards`: (path, bytes, sha256) of each chunk, in litdata's chunk order: the worker checks a chunk
            against them before its first read of it (once a process), and a chunk that fails is an error naming
            it, or (`on_bad_file=skip`) its samples are skipped (None) with one warning."""

            def __init__(self, *args: Any, decode: Any, shards: list[tuple[str, int, str]] | None = None,
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
