"""Labelling files with a loaded classifier (`mmtx.load`): images or audio clips, prepared as the training data
was, batched, scored; the rows of `mmtx.predict`'s TSV (its command line; `Model.predict` is its Python face)."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.utils.rnn import pad_sequence

from mmtx.batch import AudioBatch, ImageBatch
from mmtx.config.validate import device, integer, one_of
from mmtx.errors import DataError, MissingError

log = logging.getLogger("mmtx.predict")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
RULES = {"top_k": integer(1), "batch_size": integer(1), "device": device(), "on_bad_file": one_of("skip", "error")}


def list_inputs(spec: str, suffixes: tuple[str, ...]) -> list[Path]:
    """Files named by `spec`: files, folders (recursively, files with `suffixes`), globs, comma-separated."""
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        path = Path(part).expanduser()
        if glob.has_magic(part):
            found = [Path(f) for f in sorted(glob.glob(os.path.expanduser(part), recursive=True)) if Path(f).is_file()]
        elif path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
        else:
            found = [path] if path.is_file() else []
        if not found:
            raise MissingError(f"inputs: nothing to label at {part} (a file, a folder of {'/'.join(suffixes)} files, "
                               "or a glob)")
        files += found
    return files


def image_inputs(paths: list[Path], size: int, cfg: DictConfig, on_bad_file: str) -> tuple[list[Path], ImageBatch]:
    """The readable images, prepared as the training data was: resized, normalised with the run's mean/std."""
    from mmtx.data.image_sources import read_image

    kept, tensors = [], []
    for path in paths:
        try:
            tensors.append(read_image(path, size))
            kept.append(path)
        except DataError as err:  # not an image, truncated, over Pillow's pixel limit
            if on_bad_file == "error":
                raise DataError(f"cannot read image {path}: {err} (on_bad_file=skip skips such files)") from None
            log.warning("skipping %s: not a readable image (%s)", path, err)
    if not tensors:
        return kept, ImageBatch(torch.empty(0))
    mean = torch.tensor(list(cfg.data.mean)).view(1, -1, 1, 1) * 255
    std = torch.tensor(list(cfg.data.std)).view(1, -1, 1, 1) * 255
    return kept, ImageBatch((torch.stack(tensors).float() - mean) / std)  # (B, 3, H, W)


def audio_inputs(paths: list[Path], sample_rate: int, cfg: DictConfig, on_bad_file: str) -> tuple[list[Path], AudioBatch]:
    """The readable clips, decoded as the training data was: mono, at the run's rate, cropped to max_seconds."""
    from mmtx.data.audio_sources import AudioDecoder

    decoder = AudioDecoder(sample_rate, OmegaConf.select(cfg, "data.source.max_seconds"), on_bad_file=on_bad_file)
    kept, waves = [], []
    for path in paths:
        wave = decoder.decode(path, str(path))
        if wave is None:
            log.warning("skipping %s: not a readable audio file (%s)", path, decoder.reasons.get(str(path), "unreadable"))
            continue
        kept.append(path)
        waves.append(wave)
    if not waves:
        return kept, AudioBatch(torch.empty(0), torch.empty(0, dtype=torch.long))
    return kept, AudioBatch(pad_sequence(waves, batch_first=True), torch.tensor([len(w) for w in waves]))


def label(model, cfg: DictConfig, args: dict[str, Any]) -> list[list[str]]:
    """Label the files of `args["inputs"]` with a loaded classifier (`mmtx.load(...).module`) and its run
    configuration `cfg`: the rows of the TSV (header first)."""
    part, device = model.task, model.device
    sample_rate = getattr(part.tokenizer, "sample_rate", None)
    paths = list_inputs(str(args["inputs"]), AUDIO_SUFFIXES if sample_rate else IMAGE_SUFFIXES)
    k = max(1, min(int(args["top_k"]), len(part.class_names)))
    rows = [["path", "label", "probability", f"top_{k}"]]
    size = max(1, int(args["batch_size"]))
    for start in range(0, len(paths), size):
        chunk = paths[start:start + size]
        if sample_rate:
            kept, batch = audio_inputs(chunk, sample_rate, cfg, args["on_bad_file"])
        else:
            kept, batch = image_inputs(chunk, part.tokenizer.image_size[0], cfg, args["on_bad_file"])
        if not kept:
            continue
        batch = ImageBatch(batch.image.to(device)) if not sample_rate else AudioBatch(batch.audio.to(device), batch.lengths.to(device))
        probs = part.predict(model.backbone, batch).cpu()  # (B, num_classes)
        top = probs.topk(k, dim=-1)
        for path, p, ids in zip(kept, top.values.tolist(), top.indices.tolist()):
            names = [part.class_names[i] for i in ids]
            rows.append([str(path), names[0], f"{p[0]:.4f}", ",".join(f"{n}:{q:.4f}" for n, q in zip(names, p))])
    return rows
