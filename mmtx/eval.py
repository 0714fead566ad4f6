"""`python -m mmtx.eval ckpt=PATH [KEY=VALUE ...]`: test metrics of a checkpoint (a Hydra application:
`conf/eval.yaml`, `--help`, `-m ckpt=a.ckpt,b.ckpt`).

The run configuration stored in the checkpoint rebuilds the data and model; `KEY=VALUE` pairs override
it (for example `data.root=/elsewhere`, `data.source.image_size=64` to evaluate at another resolution,
or `trainer.accelerator=cpu`). Files the test writes (the examples table of an encoder-decoder: source,
reference, hypothesis) go to `<run dir>/eval/`, beside the checkpoint's `checkpoints/` folder. The
whole test split is scored unless `trainer.limit_test_batches=...` is given here. A mistake (a missing
checkpoint, an unknown key) ends with one line; MMTX_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

from mmtx.config.help import answer_help

answer_help("eval")  # `--help` is answered here, before the imports below (torch, Lightning) take seconds

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from mmtx.checkpoints.io import load_checkpoint, member_view
from mmtx.checkpoints.loader import rebuild
from mmtx.config.apps import passed_through, run_app
from mmtx.config.validate import validate
from mmtx.config.wiring import build_data, resolve_precision
from mmtx.errors import ConfigError, DataError, StorageError
from mmtx.files import check_writable
from mmtx.tokenizers.text import Vocab

log = logging.getLogger("mmtx.eval")

def eval_dir(ckpt: str) -> Path:
    """Where an evaluation of `ckpt` writes its files: <run dir>/eval (run dir: the folder that holds checkpoints/),
    checked before any data is read; when that folder cannot be written (a checkpoint on a read-only disk), the
    same name under $MMTX_OUTPUT_DIR (else ./outputs)/eval/, said in a warning."""
    folder = Path(ckpt).expanduser().resolve().parent
    run = folder.parent if folder.name == "checkpoints" else folder
    try:
        return check_writable(run / "eval", "the evaluation folder")
    except StorageError as err:
        elsewhere = Path(os.environ.get("MMTX_OUTPUT_DIR") or "outputs") / "eval" / run.name
        log.warning("%s; writing the evaluation's files to %s instead", err, elsewhere.resolve())
        return check_writable(elsewhere, "the evaluation folder", hint="$MMTX_OUTPUT_DIR")


def evaluate(ckpt: str, overrides: Sequence[str] | DictConfig = (), member: str | None = None) -> dict[str, Any]:
    """Rebuild the run stored in `ckpt`, load its weights and return its test metrics.

    overrides: `key=value` strings (or a config) merged onto the stored run configuration (of `member`, for
    a co-training run's checkpoint: that member alone is evaluated).
    """
    checkpoint = member_view(load_checkpoint(ckpt), member, ckpt)
    cfg = OmegaConf.create(checkpoint["mmtx_config"])
    OmegaConf.set_struct(cfg, True)
    given = overrides if isinstance(overrides, DictConfig) else OmegaConf.from_dotlist(list(overrides))
    try:
        cfg = OmegaConf.merge(cfg, given)
    except ConfigKeyError as err:
        raise ConfigError(f"{err.full_key} is not a key of the run stored in {ckpt}: leave it out, or check its "
                          "spelling against that run's config.yaml") from None
    validate(cfg)
    folder = eval_dir(ckpt)  # before any data is read
    extra = {}
    if "mmtx_vocab" in checkpoint:  # evaluate with exactly the vocabulary the model was trained with
        extra["fixed_vocab"] = Vocab.from_json(checkpoint["mmtx_vocab"])
    if "mmtx_tgt_vocab" in checkpoint:  # an encoder-decoder's target side
        extra["fixed_tgt_vocab"] = Vocab.from_json(checkpoint["mmtx_tgt_vocab"])
    datamodule = build_data(cfg, **extra)
    model = rebuild(checkpoint, cfg, datamodule.runtime_kwargs(), ckpt)  # for the data as configured here
    from mmtx.training.progress import ProgressBar, quiet_lightning, stdout_is_terminal

    quiet_lightning()
    terminal = stdout_is_terminal()
    trainer = L.Trainer(
        default_root_dir=str(folder),
        callbacks=[ProgressBar()] if terminal else [],
        enable_progress_bar=terminal,
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=resolve_precision(cfg.trainer),
        logger=False,
        enable_checkpointing=False,
        # The whole test split, unless asked otherwise here: not the training run's limit (or fast_dev_run).
        limit_test_batches=OmegaConf.select(given, "trainer.limit_test_batches", default=None),
    )
    if hasattr(datamodule, "has_split") and not datamodule.has_split("test"):
        raise DataError(f"the data of checkpoint {ckpt} has no test split to evaluate on "
                        "(a data source with only train and val)")
    results = trainer.test(model, datamodule=datamodule, verbose=False)
    return results[0] if results else {}


def _report(cfg: DictConfig) -> dict[str, Any]:
    metrics = evaluate(cfg.ckpt, passed_through(cfg, "eval"), cfg.get("member"))
    for key, value in sorted(metrics.items()):
        print(f"{key}: {value:.4f}")
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """The command line. `argv`: its arguments, from Python: returns the metrics, and a mistake raises
    its error instead of ending the process."""
    return run_app("eval", lambda cfg, _: _report(cfg), argv, pass_through=True)


if __name__ == "__main__":
    main()
