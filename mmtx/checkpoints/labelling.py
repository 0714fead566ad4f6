"""Labelling files with a loaded classifier (`mmtx.load`): images or audio clips, prepared as the training data
was, batched, scored; the rows of `mmtx.predict`'s TSV (its command line; `Model.predict` is its Python face)."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mmtx.batch import batch_to
from mmtx.config.validate import device, integer, one_of
from mmtx.data.modalities import modality_of
from mmtx.errors import MissingError

log = logging.getLogger("mmtx.predict")

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


def label(model, cfg: DictConfig, args: dict[str, Any]) -> list[list[str]]:
    """Label the files of `args["inputs"]` with a loaded classifier (`mmtx.load(...).module`) and its run
    configuration `cfg`: the rows of the TSV (header first)."""
    part, device = model.task, model.device
    modality = modality_of(part.tokenizer)
    paths = list_inputs(str(args["inputs"]), modality.suffixes)
    k = max(1, min(int(args["top_k"]), len(part.class_names)))
    rows = [["path", "label", "probability", f"top_{k}"]]
    size = max(1, int(args["batch_size"]))
    for start in range(0, len(paths), size):
        kept, batch = modality.read_files(paths[start:start + size], part.tokenizer, cfg, args["on_bad_file"])
        if not kept:
            continue
        batch = batch_to(batch, device)
        probs = part.predict(model.backbone, batch).cpu()  # (B, num_classes)
        top = probs.topk(k, dim=-1)
        for path, p, ids in zip(kept, top.values.tolist(), top.indices.tolist()):
            names = [part.class_names[i] for i in ids]
            rows.append([str(path), names[0], f"{p[0]:.4f}", ",".join(f"{n}:{q:.4f}" for n, q in zip(names, p))])
    return rows
