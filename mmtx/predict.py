"""`python -m mmtx.predict ckpt=PATH inputs=PATHS`: label images or audio clips with a trained classifier
(a Hydra application: `conf/predict.yaml`, `--help`).

`inputs` is a file, a folder (searched recursively for images or audio), a glob, or a comma-separated list
of them. Out comes a TSV, one row per input: path, predicted label, its probability, and the `top_k` most
likely labels with theirs (written with the csv module: a field holding a tab, a newline or a quote is quoted). Inputs are prepared as the training data was (images: resized to the model's
size, normalised with the run's mean and std; audio: mixed down, resampled, cropped to the run's
`max_seconds`), batched, on the GPU when there is one. A file that cannot be read is named in a warning
and skipped (`on_bad_file=error` stops at it instead).
"""

from __future__ import annotations

from mmtx.help import answer_help

answer_help("predict")  # `--help` is answered here, before the imports below (torch, Lightning) take seconds

import glob
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.utils.rnn import pad_sequence

from mmtx.apps import app_keys, compose_app, hydra_argv, inference_device
from mmtx.batch import AudioBatch, ImageBatch
from mmtx.config import config_dir
from mmtx.errors import CheckpointError, ConfigError, DataError, MissingError, reported, run_cli
from mmtx.files import atomic_write_text, check_writable, tsv_text
from mmtx.validate import device, integer, one_of, validate

log = logging.getLogger("mmtx.predict")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
VERBATIM = ("ckpt", "inputs", "output")
RULES = {"top_k": integer(1), "batch_size": integer(1), "device": device(), "on_bad_file": one_of("skip", "error")}


def load_classifier(ckpt: str, device: str, member: str | None = None):
    """The classifier stored in `ckpt` (`member`'s, from a co-training run: weights, class names, input
    geometry), in eval mode on `device` (mmtx.load's module), and its run configuration."""
    from mmtx.checkpoints import load

    model = load(ckpt, member, device)
    if model.kind != "classification":
        family = model.config.family._target_
        raise CheckpointError(f"checkpoint {ckpt} is not a classifier's ({family}): mmtx.predict labels images and "
                              "audio; continue text or translate with mmtx.generate")
    return model.module, model.config


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
    from mmtx.data.sources import read_image

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


def predict(args: dict[str, Any]) -> list[list[str]]:
    """Label every input; the rows of the TSV (header first)."""
    model, cfg = load_classifier(args["ckpt"], inference_device(str(args["device"])), args.get("member"))
    return label(model, cfg, args)


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


def _check_output(args: dict[str, Any]) -> None:
    """`output=`, before any work: a file in a writable folder, and not one of the files it would label, nor the
    checkpoint (writing the table there would replace them)."""
    if args["output"] in (None, "", "-"):
        return
    out = Path(args["output"]).expanduser()
    if out.is_dir():
        raise ConfigError(f"output={out} is a folder: give the file to write the table to (e.g. {out / 'labels.tsv'})")
    target = out.resolve()
    named = [Path(p.strip()).expanduser().resolve() for p in str(args["inputs"]).split(",") if p.strip()]
    labelled = target.suffix.lower() in IMAGE_SUFFIXES + AUDIO_SUFFIXES and any(f in target.parents for f in named)
    if target == Path(args["ckpt"]).expanduser().resolve() or target in named or labelled:
        raise ConfigError(f"output={out} is the checkpoint or one of the files given to label: writing the table "
                          "there would replace it; give another output= (e.g. labels.tsv)")
    check_writable(out.parent, "the folder of output=", hint="output=")


def _run(args: dict[str, Any]) -> list[list[str]]:
    validate(args, RULES)
    _check_output(args)
    rows = predict(args)
    text = tsv_text(rows)  # a name holding a tab, a newline or a quote is quoted, as the csv module reads it back
    if args["output"] in (None, "", "-"):
        sys.stdout.write(text)
    else:
        atomic_write_text(Path(args["output"]).expanduser(), text)
    return rows


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def _cli(cfg: DictConfig) -> None:
    with reported("mmtx.predict"):
        _run(OmegaConf.to_container(cfg, resolve=True))


def main(argv: Sequence[str] | None = None) -> list[list[str]] | None:
    """The command line. `argv`: its arguments, from Python: returns the rows, and a mistake raises."""
    if argv is None:
        with reported("mmtx.predict"):
            sys.argv = [sys.argv[0], *hydra_argv(sys.argv[1:], app_keys("predict"), verbatim=VERBATIM)]
        return run_cli(_cli)
    return _run(OmegaConf.to_container(compose_app("predict", hydra_argv(argv, app_keys("predict"), verbatim=VERBATIM))))


if __name__ == "__main__":
    main()
