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

import sys
from pathlib import Path
from typing import Any, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

from mmtx.apps import app_keys, compose_app, hydra_argv, inference_device
from mmtx.checkpoints import load
from mmtx.checkpoints.labelling import (AUDIO_SUFFIXES, IMAGE_SUFFIXES, RULES, audio_inputs,  # noqa: F401 (here too)
                                        image_inputs, label, list_inputs)
from mmtx.config import config_dir
from mmtx.errors import CheckpointError, ConfigError, reported, run_cli
from mmtx.files import atomic_write_text, check_writable, tsv_text
from mmtx.validate import validate

VERBATIM = ("ckpt", "inputs", "output")


def load_classifier(ckpt: str, device: str, member: str | None = None):
    """The classifier stored in `ckpt` (`member`'s, from a co-training run: weights, class names, input
    geometry), in eval mode on `device` (mmtx.load's module), and its run configuration."""
    model = load(ckpt, member, device)
    if model.kind != "classification":
        family = model.config.family._target_
        raise CheckpointError(f"checkpoint {ckpt} is not a classifier's ({family}): mmtx.predict labels images and "
                              "audio; continue text or translate with mmtx.generate")
    return model.module, model.config


def predict(args: dict[str, Any]) -> list[list[str]]:
    """Label every input; the rows of the TSV (header first)."""
    model, cfg = load_classifier(args["ckpt"], inference_device(str(args["device"])), args.get("member"))
    return label(model, cfg, args)


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
