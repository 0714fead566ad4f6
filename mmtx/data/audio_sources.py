"""Where audio comes from: a folder labelled by sub-folder or by file name, or a Hugging Face dataset.

Decoding goes through `soundfile` (WAV, FLAC, OGG; no FFmpeg): mixed down to
mono, resampled to the configured rate with torchaudio, cropped to
`max_seconds` (the start is kept; crops are counted in one warning). Files
that cannot be decoded, and empty ones, are skipped and counted in one
warning that names the first few (on_bad_file=skip, the default) or stop the
run naming the file (on_bad_file=error).
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from mmtx.data.cache import digest
from mmtx.errors import ConfigError, Count, DataError, MaybePositive, MissingError, optional
from mmtx.files import describe_root, resolve_root

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga")


class AudioDecoder:
    """Decode, mix down, resample and crop clips; count what it had to change or skip."""

    def __init__(self, sample_rate: Count, max_seconds: MaybePositive = None, on_bad_file: str = "skip") -> None:
        if on_bad_file not in ("skip", "error"):
            raise ConfigError(f"data.source.on_bad_file must be 'skip' or 'error', got {on_bad_file!r}")
        self.sample_rate = sample_rate
        self.max_samples = int(max_seconds * sample_rate) if max_seconds else None
        self.on_bad_file = on_bad_file
        self.resampled: Counter = Counter()
        self.stereo = 0
        self.cropped = 0
        self.bad: list[str] = []
        self.reasons: dict[str, str] = {}  # why each bad file was skipped

    def decode(self, source: str | Path | bytes, name: str) -> torch.Tensor | None:
        """A mono float32 waveform at `sample_rate`, or None for a skipped file."""
        import soundfile as sf

        try:
            data, rate = sf.read(io.BytesIO(source) if isinstance(source, bytes) else source,
                                 dtype="float32", always_2d=True)  # (frames, channels)
            if data.shape[0] == 0:
                raise DataError("it holds no samples")
            declared = wav_declared_frames(source)
            if declared is not None and data.shape[0] < declared:
                raise DataError(f"it is truncated: its header declares {declared} frames but it holds {data.shape[0]}")
            finite = np.isfinite(data)
            if not finite.all():  # a float file can hold NaN or infinity: one clip would poison every batch of it
                raise DataError(f"it holds {int((~finite).sum())} non-finite samples (NaN or infinity)")
        except Exception as err:  # soundfile's LibsndfileError, a truncated header, an empty file, NaN samples
            if self.on_bad_file == "error":
                raise DataError(f"cannot read audio file {name}: {err} (data.source.on_bad_file=skip skips such files)") from err
            self.bad.append(name)
            self.reasons[name] = str(err)
            return None
        if data.shape[1] > 1:
            self.stereo += 1
        wave = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))  # mix down to mono: (frames,)
        if rate != self.sample_rate:
            import torchaudio.functional as AF

            self.resampled[rate] += 1
            wave = AF.resample(wave, rate, self.sample_rate)
        if self.max_samples and wave.numel() > self.max_samples:
            self.cropped += 1
            wave = wave[: self.max_samples]
        return wave

    def report(self, where: str) -> None:
        for rate, n in self.resampled.items():
            log.info("%s: resampled %d clip(s) from %d Hz to %d Hz", where, n, rate, self.sample_rate)
        if self.stereo:
            log.info("%s: mixed %d multi-channel clip(s) down to mono", where, self.stereo)
        if self.cropped:
            log.warning("%s: cropped %d clip(s) to data.source.max_seconds", where, self.cropped)
        if self.bad:
            log.warning("%s: skipped %d unreadable or empty file(s), e.g. %s", where, len(self.bad),
                        "; ".join(f"{name} ({self.reasons.get(name, 'unreadable')})" for name in self.bad[:3]))


def wav_declared_frames(source: str | Path | bytes) -> int | None:
    """The number of frames a RIFF/WAVE file's header declares (its data chunk's size over the block
    size), or None when `source` is not a WAV file or its header does not say (streamed files write 0
    or 0xFFFFFFFF). A file that holds fewer frames than this was cut short."""
    if isinstance(source, bytes):
        head = source[:65536]
    else:
        with open(source, "rb") as f:
            head = f.read(65536)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, block = 12, 0
    while pos + 8 <= len(head):
        chunk, size = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        if chunk == b"fmt " and pos + 22 <= len(head):
            block = int.from_bytes(head[pos + 20:pos + 22], "little")  # nBlockAlign: bytes per frame
        elif chunk == b"data":
            return size // block if block and size not in (0, 0xFFFFFFFF) else None
        pos += 8 + size + (size & 1)  # chunks are padded to an even size
    return None


def check_fits(files: list[Path], sample_rate: Count, max_seconds: MaybePositive, where: str) -> None:
    """Refuse a split whose decoded clips would not fit in memory (float32 while decoding, then the float16 cache:
    6 bytes a sample at `sample_rate`, each clip cropped to `max_seconds`), naming its size, before decoding it.
    The clips' lengths come from their headers."""
    import soundfile as sf

    from mmtx.data.memory import refuse_if_too_large

    samples = 0
    for f in files:
        try:
            info = sf.info(str(f))
        except Exception:  # noqa: BLE001 - unreadable: skipped by the decoder, counted there
            continue
        seconds = info.frames / max(1, info.samplerate)
        samples += int(min(seconds, max_seconds or seconds) * sample_rate)
    refuse_if_too_large(6 * samples, f"{where} ({len(files):,} clips, {samples / sample_rate / 3600:.1f} hours at "
                        f"{sample_rate} Hz, decoded)", "lower data.source.max_seconds or data.source.sample_rate, or "
                        "use fewer clips")


def pack(waves: list[torch.Tensor], labels: list[int], classes: list[str], where: str,
         names: list[str] | None = None, skipped: list[str] | None = None) -> dict[str, Any]:
    """Clips of different lengths -> one flat float16 tensor plus offsets and lengths (the cache format);
    `names` (the clips' files) are kept for tables and messages, `skipped` (unreadable files) for the
    warning every run on this cache repeats."""
    if not waves:
        raise MissingError(f"{where} holds no readable audio")
    lengths = torch.tensor([w.numel() for w in waves], dtype=torch.long)
    offsets = torch.cumsum(lengths, 0) - lengths
    return {
        "audio": torch.cat(waves).to(torch.float16),
        "offsets": offsets,
        "lengths": lengths,
        "labels": torch.tensor(labels, dtype=torch.long),
        "classes": classes,
        "names": list(names or []),
        "skipped": list(skipped or []),
    }


def decoded_bytes(files: Iterable[Path], sample_rate: Count, max_seconds: MaybePositive) -> int:
    """What `files` take decoded as the cache holds them (float16 at `sample_rate`, each cropped to `max_seconds`),
    from their headers (soundfile's `info`: nothing is decoded); a file whose header cannot be read counts as its
    size in bytes."""
    import soundfile as sf

    total = 0
    for f in files:
        try:
            info = sf.info(str(f))
            seconds = info.frames / info.samplerate
        except Exception:  # unreadable: skipped when decoded; about its size meanwhile
            total += Path(f).stat().st_size
            continue
        total += 2 * int(min(seconds, max_seconds or seconds) * sample_rate)
    return total


class AudioFolder:
    """Audio files under `path`, labelled by sub-folder (`<path>/<split>/<class>/<clip>` or
    `<path>/<class>/<clip>`) or by `label_pattern`, a regex with a `label` group matched
    against the file name. With no split folders, files whose name matches `test_pattern`
    form the test split and the rest the training split.

    FSDD: label_pattern='^(?P<label>\\d+)_', test_pattern='_[0-4]\\.wav$' (takes 0-4 are
    the official test set).
    """

    def __init__(
        self,
        path: str,
        root: str | None = None,
        sample_rate: Count = 16000,
        max_seconds: MaybePositive = 10.0,
        label_pattern: str | None = None,
        test_pattern: str | None = None,
        on_bad_file: str = "skip",
    ) -> None:
        p = Path(path).expanduser()
        if not p.is_absolute() and not p.exists():
            p = resolve_root(root) / p
        if not p.is_dir():
            raise MissingError(f"audio folder {p.resolve()} does not exist (data.source.path={path}; relative paths are "
                               f"looked up under the data root {describe_root(root)})")
        self.path = p
        self.sample_rate, self.max_seconds, self.on_bad_file = sample_rate, max_seconds, on_bad_file
        self.label_re = re.compile(label_pattern) if label_pattern else None
        self.test_re = re.compile(test_pattern) if test_pattern else None
        self.cache_name = f"audio-{p.name}-{digest(p.resolve(), sample_rate, max_seconds, label_pattern, test_pattern)}"
        self._listing: dict[str, list[tuple[Path, str]]] | None = None

    def _list(self) -> dict[str, list[tuple[Path, str]]]:
        """{split: [(file, label name)]}, sorted."""
        if self._listing is not None:
            return self._listing
        split_dirs = [s for s in ("train", "val", "test") if (self.path / s).is_dir()]
        roots = {s: self.path / s for s in split_dirs} or {"all": self.path}
        listing: dict[str, list[tuple[Path, str]]] = {}
        for split, root in roots.items():
            for f in sorted(_audio_files(root)):
                label = self._label(f, root)
                target = split
                if split == "all":
                    target = "test" if self.test_re and self.test_re.search(f.name) else "train"
                listing.setdefault(target, []).append((f, label))
        if not listing.get("train"):
            raise MissingError(f"{self.path} holds no audio files ({', '.join(AUDIO_EXTENSIONS)}) for training")
        self._listing = listing
        return listing

    def _label(self, f: Path, root: Path) -> str:
        if self.label_re is not None:
            m = self.label_re.search(f.name)
            if not m:
                raise DataError(f"file name {f} does not match data.source.label_pattern {self.label_re.pattern!r}")
            return m.group("label")
        if f.parent == root:
            raise DataError(f"{f} is not in a class sub-folder; set data.source.label_pattern to label by name")
        return f.relative_to(root).parts[0]

    def splits(self) -> list[str]:
        return list(self._list())

    def classes(self) -> list[str]:
        names = {label for files in self._list().values() for _, label in files}
        return sorted(names, key=lambda c: (len(c), c) if c.isdigit() else (0, c))

    def fingerprint(self, split: str) -> str:
        files = self._list()[split]
        return digest(self.on_bad_file, *((str(f), f.stat().st_size, f.stat().st_mtime_ns, c) for f, c in files))

    def decode(self, split: str) -> dict[str, Any]:
        check_fits([f for f, _ in self._list()[split]], self.sample_rate, self.max_seconds, f"{self.path} [{split}]")
        decoder = AudioDecoder(self.sample_rate, self.max_seconds, self.on_bad_file)
        index = {c: i for i, c in enumerate(self.classes())}
        waves, labels, names = [], [], []
        for f, label in self._list()[split]:
            wave = decoder.decode(f, str(f))
            if wave is not None:
                waves.append(wave)
                labels.append(index[label])
                names.append(str(f.relative_to(self.path)))
        decoder.report(f"{self.path} [{split}]")
        return pack(waves, labels, self.classes(), f"{self.path} [{split}]", names, decoder.bad)


def _audio_files(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.lower().endswith(AUDIO_EXTENSIONS) and not name.startswith("."):
                yield Path(dirpath) / name


class HFAudio:
    """A Hugging Face `datasets` audio-classification dataset, decoded with soundfile (no FFmpeg):
    the audio column is read as raw bytes (`Audio(decode=False)`)."""

    def __init__(
        self,
        path: str,
        name: str | None = None,
        data_dir: str | None = None,
        audio_key: str = "audio",
        label_key: str = "label",
        split_names: dict[str, str] | None = None,
        sample_rate: Count = 16000,
        max_seconds: MaybePositive = 10.0,
        on_bad_file: str = "skip",
    ) -> None:
        self.path, self.name, self.data_dir = path, name, data_dir
        self.audio_key, self.label_key = audio_key, label_key
        self.split_names = dict(split_names or {"train": "train", "test": "test"})
        self.sample_rate, self.max_seconds, self.on_bad_file = sample_rate, max_seconds, on_bad_file
        self.cache_name = f"hfaudio-{Path(path).name}-{digest(path, name, data_dir, sample_rate, max_seconds)}"

    def _dataset(self, split: str):
        datasets = optional("datasets", "datasets", "data=hf_audio (a Hugging Face dataset)")

        ds = datasets.load_dataset(self.path, self.name, data_dir=self.data_dir, split=self.split_names[split])
        for key in (self.audio_key, self.label_key):
            if key not in ds.features:
                raise DataError(f"dataset {self.path} has no column {key!r}; columns: {list(ds.features)}")
        return ds.cast_column(self.audio_key, datasets.Audio(decode=False))

    def splits(self) -> list[str]:
        return list(self.split_names)

    def fingerprint(self, split: str) -> str:
        return digest(self.on_bad_file, self._dataset(split)._fingerprint)

    def classes(self) -> list[str]:
        feature = self._dataset(self.splits()[0]).features[self.label_key]
        if hasattr(feature, "names"):
            return list(feature.names)
        return sorted({str(v) for s in self.splits() for v in self._dataset(s)[self.label_key]})

    def decode(self, split: str) -> dict[str, Any]:
        ds = self._dataset(split)
        classes = self.classes()
        named = hasattr(ds.features[self.label_key], "names")
        index = {c: i for i, c in enumerate(classes)}
        decoder = AudioDecoder(self.sample_rate, self.max_seconds, self.on_bad_file)
        waves, labels = [], []
        for i, row in enumerate(ds):
            audio = row[self.audio_key]
            wave = decoder.decode(audio["bytes"] if audio.get("bytes") else audio["path"], audio.get("path") or f"{self.path}[{split}][{i}]")
            if wave is not None:
                waves.append(wave)
                labels.append(row[self.label_key] if named else index[str(row[self.label_key])])
        decoder.report(f"{self.path} [{split}]")
        return pack(waves, labels, classes, f"{self.path} [{split}]", skipped=decoder.bad)
