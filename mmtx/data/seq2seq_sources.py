"""Where sequence-to-sequence pairs come from.

Text to text (translation): local parallel files (a `src` and a `tgt` file
per split, line i of one translating line i of the other, or one TSV file of
`source<TAB>target` lines; `.gz` read transparently) or a Hugging Face
translation dataset. A pair with an empty side is skipped; skips are counted
in one warning per split. Files whose line counts differ stop the run with
both counts.

Audio to text (speech recognition): a manifest per split
(`audio_path<TAB>transcript`, paths relative to the manifest's folder), or
an audio folder whose labels map to transcripts (FSDD: "7" -> "seven").
Audio is decoded as in `mmtx.data.audio_sources`. A manifest line whose audio
file is missing or unreadable is skipped and counted in one warning that
names the first few (on_bad_file=skip, the default), or stops the run naming
the file and the manifest line (on_bad_file=error).

Every source has `kind` ("text" | "audio"), `cache_name`, `splits()`,
`fingerprint(split)` and `read(split)`: {"src": [str] | packed audio,
"tgt": [str], "names": [str]} (names: what a table shows as the source of
an audio example).
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import Any, Mapping

from mmtx.data.audio_sources import AudioDecoder, AudioFolder, pack
from mmtx.data.cache import digest
from mmtx.data.text_sources import decode_utf8
from mmtx.errors import ConfigError, Count, DataError, MaybePositive, MissingError, optional
from mmtx.files import resolve_root

log = logging.getLogger(__name__)

# FSDD's labels as the words spoken.
DIGIT_WORDS = {str(i): w for i, w in enumerate("zero one two three four five six seven eight nine".split())}


def find_file(path: str, root: Path, key: str) -> Path:
    """`path` as given, or under the data root `root`; a missing file is named with its config `key`."""
    p = Path(path).expanduser()
    for candidate in ([p] if p.is_absolute() else [p, root / p]):
        if candidate.is_file():
            return candidate
    where = p if p.is_absolute() else f"{p} or {root / p}"
    raise MissingError(f"{key}: no file at {where}")


def given_splits(files: Mapping[str, Any]) -> dict[str, Any]:
    """The splits of `data.source.files` that name a file: the config lists train, val and test empty
    (null, or {src: null, tgt: null}) so that `data.source.files.train=...` and
    `data.source.files.train.src=...` can be set one by one. A train split is required."""
    given = {split: spec for split, spec in files.items()
             if spec is not None and not (isinstance(spec, Mapping) and all(v is None for v in spec.values()))}
    if "train" not in given:
        raise ConfigError(f"data.source.files needs a train split (data.source.files.train=FILE), got {sorted(given)}")
    return given


def read_lines(path: Path, on_decode_error: str = "error") -> list[str]:
    """The lines of a UTF-8 text file (gzip-compressed if its name ends in .gz), without line ends."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    text = decode_utf8(data, path, on_decode_error)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start a new one
    return [line.rstrip("\r") for line in lines]


def keep_pairs(src: list[str], tgt: list[str], where: str) -> tuple[list[str], list[str]]:
    """Pairs with text on both sides (stripped); the others are counted in one warning."""
    kept_src, kept_tgt, skipped = [], [], []
    for i, (s, t) in enumerate(zip(src, tgt), start=1):
        s, t = s.strip(), t.strip()
        if s and t:
            kept_src.append(s)
            kept_tgt.append(t)
        else:
            skipped.append(i)
    if skipped:
        log.warning("%s: skipped %d pair(s) with an empty side (lines %s%s)", where, len(skipped),
                    ", ".join(map(str, skipped[:5])), ", ..." if len(skipped) > 5 else "")
    if not kept_src:
        raise DataError(f"{where} holds no sentence pairs")
    return kept_src, kept_tgt


class ParallelText:
    """Sentence pairs from local files, per split: {"src": path, "tgt": path} or a TSV path.

    Relative paths are looked up as given, then under the data root.

    >>> ParallelText({"train": {"src": "multi30k/train.en.gz", "tgt": "multi30k/train.de.gz"},
    ...               "test": "my_corpus/test.tsv"})
    """

    kind = "text"

    def __init__(self, files: Mapping[str, Any], root: str | None = None, on_decode_error: str = "error") -> None:
        if on_decode_error not in ("error", "replace"):
            raise ConfigError(f"data.source.on_decode_error must be 'error' or 'replace', got {on_decode_error!r}")
        files = given_splits(files)
        self.root = resolve_root(root)
        self.on_decode_error = on_decode_error
        self.files: dict[str, dict[str, Path] | Path] = {}
        for split, spec in files.items():
            key = f"data.source.files.{split}"
            if isinstance(spec, str):
                self.files[split] = find_file(spec, self.root, key)
            elif isinstance(spec, Mapping) and set(spec) == {"src", "tgt"}:
                for side in ("src", "tgt"):
                    if spec[side] is None:
                        raise ConfigError(f"{key}.{side} is not set: a split given as two files needs both "
                                          f"({key}.src=FILE {key}.tgt=FILE)")
                self.files[split] = {side: find_file(spec[side], self.root, f"{key}.{side}") for side in ("src", "tgt")}
            else:
                raise DataError(f"{key} must be a TSV file or {{src: FILE, tgt: FILE}}, got {spec!r}")
        first = self.files["train"]
        name = (first["src"] if isinstance(first, dict) else first).name.split(".")[0]
        self.cache_name = f"parallel-{name}-{digest(*self._all_files())}"

    def _all_files(self) -> list[Path]:
        return [f for spec in self.files.values() for f in (spec.values() if isinstance(spec, dict) else [spec])]

    def splits(self) -> list[str]:
        return list(self.files)

    def fingerprint(self, split: str) -> str:
        spec = self.files[split]
        files = spec.values() if isinstance(spec, dict) else [spec]
        return digest(self.on_decode_error, *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))

    def decode(self, split: str) -> dict[str, Any]:
        spec = self.files[split]
        if isinstance(spec, dict):
            src, tgt = (read_lines(spec[side], self.on_decode_error) for side in ("src", "tgt"))
            if len(src) != len(tgt):
                raise DataError(
                    f"{spec['src']} has {len(src)} lines but {spec['tgt']} has {len(tgt)}: line i of the source "
                    "file must translate line i of the target file"
                )
            where = f"{spec['src']} / {spec['tgt']}"
        else:
            src, tgt = [], []
            for i, line in enumerate(read_lines(spec, self.on_decode_error), start=1):
                if not line.strip():
                    line = "\t"  # a blank line: an empty pair, skipped and counted below
                fields = line.split("\t")
                if len(fields) != 2:
                    raise DataError(f"{spec}:{i} has {len(fields)} tab-separated fields, expected source<TAB>target")
                src.append(fields[0])
                tgt.append(fields[1])
            where = str(spec)
        src, tgt = keep_pairs(src, tgt, where)
        return {"src": src, "tgt": tgt, "names": []}


class HFTranslation:
    """A Hugging Face translation dataset: a `translation` column of {lang: text} dicts (WMT, opus),
    or one column per language (e.g. bentrevett/multi30k's `en` and `de`)."""

    kind = "text"

    def __init__(
        self,
        path: str,
        src_lang: str,
        tgt_lang: str,
        name: str | None = None,
        data_dir: str | None = None,
        data_files: str | list[str] | dict | None = None,
        translation_key: str = "translation",
        split_names: Mapping[str, str] | None = None,
    ) -> None:
        self.path, self.name, self.data_dir, self.data_files = path, name, data_dir, data_files
        self.src_lang, self.tgt_lang, self.translation_key = src_lang, tgt_lang, translation_key
        self.split_names = dict(split_names or {"train": "train", "val": "validation", "test": "test"})
        self.cache_name = f"hftrans-{Path(path).name}-{digest(path, name, data_dir, data_files, src_lang, tgt_lang)}"

    def _load(self, split: str):
        datasets = optional("datasets", "datasets", "data=hf_translation (a Hugging Face dataset)")

        return datasets.load_dataset(self.path, self.name, data_dir=self.data_dir, data_files=self.data_files,
                                     split=self.split_names[split])

    def splits(self) -> list[str]:
        return list(self.split_names)

    def fingerprint(self, split: str) -> str:
        return self._load(split)._fingerprint

    def decode(self, split: str) -> dict[str, Any]:
        ds = self._load(split)
        if self.translation_key in ds.features:
            pairs = ds[self.translation_key]
            missing = {self.src_lang, self.tgt_lang} - set(pairs[0] if pairs else {})
            if missing:
                raise DataError(f"dataset {self.path}: {self.translation_key!r} has no language {sorted(missing)}; "
                               f"it has {sorted(pairs[0])}")
            src, tgt = [p[self.src_lang] or "" for p in pairs], [p[self.tgt_lang] or "" for p in pairs]
        else:
            for lang in (self.src_lang, self.tgt_lang):
                if lang not in ds.features:
                    raise DataError(f"dataset {self.path} has neither a {self.translation_key!r} column nor a "
                                   f"{lang!r} column; columns: {list(ds.features)}")
            src, tgt = [t or "" for t in ds[self.src_lang]], [t or "" for t in ds[self.tgt_lang]]
        src, tgt = keep_pairs(src, tgt, f"{self.path} [{split}]")
        return {"src": src, "tgt": tgt, "names": []}


class SpeechManifest:
    """Speech-to-text pairs from manifests: per split, a file of `audio_path<TAB>transcript` lines
    (relative audio paths are relative to the manifest's folder; blank lines are ignored)."""

    kind = "audio"

    def __init__(
        self,
        files: Mapping[str, str],
        root: str | None = None,
        sample_rate: Count = 16000,
        max_seconds: MaybePositive = 30.0,
        on_bad_file: str = "skip",
    ) -> None:
        files = given_splits(files)
        if on_bad_file not in ("skip", "error"):
            raise ConfigError(f"data.source.on_bad_file must be 'skip' or 'error', got {on_bad_file!r}")
        self.root = resolve_root(root)
        self.files = {split: find_file(f, self.root, f"data.source.files.{split}") for split, f in files.items()}
        self.sample_rate, self.max_seconds, self.on_bad_file = sample_rate, max_seconds, on_bad_file
        self.cache_name = f"manifest-{self.files['train'].stem}-{digest(*self.files.values(), sample_rate, max_seconds)}"

    def splits(self) -> list[str]:
        return list(self.files)

    def _entries(self, split: str) -> list[tuple[int, Path, str]]:
        manifest = self.files[split]
        entries = []
        for i, line in enumerate(read_lines(manifest), start=1):
            if not line.strip():
                continue
            path, sep, transcript = line.partition("\t")
            if not sep:
                raise DataError(f"{manifest}:{i} is not audio_path<TAB>transcript: {line[:80]!r}")
            audio = Path(path.strip()).expanduser()
            entries.append((i, audio if audio.is_absolute() else manifest.parent / audio, transcript.strip()))
        return entries

    def fingerprint(self, split: str) -> str:
        def stat(f: Path):
            return (f.stat().st_size, f.stat().st_mtime_ns) if f.exists() else None

        manifest = self.files[split]
        return digest(self.on_bad_file, manifest, stat(manifest), *((str(f), stat(f)) for _, f, _ in self._entries(split)))

    def entries(self, split: str) -> list[tuple[Path, str, str]]:
        """[(audio file, transcript, its name in tables)] of `split`, undecoded (`decode` decodes them; `python -m mmtx.prepare` keeps
        their bytes): lines with an empty transcript are left out, and lines whose file is missing left out or an
        error by `on_bad_file`, each counted in a warning."""
        return [(path, transcript, str(path)) for path, transcript in self._usable(split)[0]]

    def _usable(self, split: str) -> tuple[list[tuple[Path, str]], list[str]]:
        manifest = self.files[split]
        kept, missing, empty = [], [], 0
        for line, path, transcript in self._entries(split):
            if not transcript:
                empty += 1
            elif path.is_file():
                kept.append((path, transcript))
            elif self.on_bad_file == "error":
                raise MissingError(f"{manifest}:{line}: audio file {path} does not exist "
                                   "(data.source.on_bad_file=skip skips such lines)")
            else:
                missing.append(f"{path} ({manifest.name}:{line})")
        where = f"{manifest} [{split}]"
        if missing:
            log.warning("%s: skipped %d line(s) whose audio file is missing, e.g. %s", where, len(missing), missing[:3])
        if empty:
            log.warning("%s: skipped %d line(s) with an empty transcript", where, empty)
        return kept, missing

    def decode(self, split: str) -> dict[str, Any]:
        decoder = AudioDecoder(self.sample_rate, self.max_seconds, self.on_bad_file)
        waves, texts, names = [], [], []
        usable, missing = self._usable(split)
        for path, transcript in usable:
            wave = decoder.decode(path, f"{path} ({self.files[split].name})")
            if wave is not None:
                waves.append(wave)
                texts.append(transcript)
                names.append(str(path))
        where = f"{self.files[split]} [{split}]"
        decoder.report(where)
        packed = pack(waves, [0] * len(waves), [], where, names)
        return {"src": packed, "tgt": texts, "names": names, "skipped": decoder.bad + missing}


class AudioTranscripts:
    """An audio folder (see `AudioFolder`) whose labels are mapped to transcripts by `transcripts`
    (a label missing from it is its own transcript). FSDD: transcripts=DIGIT_WORDS."""

    kind = "audio"

    def __init__(self, transcripts: Mapping[str, str] | None = None, **folder: Any) -> None:
        self.folder = AudioFolder(**folder)
        self.transcripts = {str(k): str(v) for k, v in (transcripts or {}).items()}
        self.sample_rate = self.folder.sample_rate
        self.cache_name = f"asr-{self.folder.cache_name}"

    def splits(self) -> list[str]:
        return self.folder.splits()

    def fingerprint(self, split: str) -> str:
        return self.folder.fingerprint(split)

    @property
    def max_seconds(self) -> float | None:
        return self.folder.max_seconds

    def entries(self, split: str) -> list[tuple[Path, str, str]]:
        """[(audio file, transcript, its name in tables)] of `split`, undecoded (`python -m mmtx.prepare` keeps the
        files' bytes)."""
        return [(f, self.transcripts.get(label, label), str(f.relative_to(self.folder.path)))
                for f, label in self.folder._list().get(split, [])]

    def decode(self, split: str) -> dict[str, Any]:
        packed = self.folder.decode(split)
        texts = [self.transcripts.get(packed["classes"][i], packed["classes"][i]) for i in packed["labels"].tolist()]
        return {"src": packed, "tgt": texts, "names": packed["names"], "skipped": packed["skipped"]}
