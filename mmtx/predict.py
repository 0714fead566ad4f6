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

from mmtx.config.help import answer_help

answer_help("predict")  # `--help` is answered here, before the imports below (torch, Lightning) take seconds

import sys
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from mmtx.checkpoints.labelling import RULES, label, list_inputs  # noqa: F401 (list_inputs: here too)
from mmtx.checkpoints.loader import load_classifier
from mmtx.config.apps import inference_device, run_app
from mmtx.config.validate import validate
from mmtx.data.modalities import MODALITIES
from mmtx.errors import ConfigError
from mmtx.files import atomic_write_text, check_writable, tsv_text

VERBATIM = ("ckpt", "inputs", "output")


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
    known = {s for modality in MODALITIES.values() for s in modality.suffixes}  # files mmtx.predict reads
    labelled = target.suffix.lower() in known and any(f in target.parents for f in named)
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


def main(argv: Sequence[str] | None = None) -> list[list[str]] | None:
    """The command line. `argv`: its arguments, from Python: returns the rows, and a mistake raises."""
    return run_app("predict", lambda cfg, _: _run(OmegaConf.to_container(cfg, resolve=True)), argv, verbatim=VERBATIM)


if __name__ == "__main__":
    main()
