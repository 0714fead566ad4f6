"""`python -m mmtx.eval ckpt=PATH [key=value ...]`: test metrics of a checkpoint.

The run configuration stored in the checkpoint rebuilds the data and model;
`key=value` arguments override it (for example `data.root=/elsewhere`,
`data.source.image_size=64` to evaluate at another resolution, or
`trainer.accelerator=cpu`). Files the test writes (the examples table of an
encoder-decoder: source, reference, hypothesis) go to `<run dir>/eval/`,
beside the checkpoint's `checkpoints/` folder. The whole test split is scored unless
`trainer.limit_test_batches=...` is given here. A mistake (a missing checkpoint, an unknown key)
ends with one line; MMTX_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from mmtx.validate import validate
from mmtx.wiring import build_data, build_model, resolve_precision
from mmtx.checkpoint import load_checkpoint
from mmtx.errors import DataError, reported
from mmtx.tokenizers.text import Vocab

USAGE = "usage: python -m mmtx.eval ckpt=PATH [key=value ...]"


def parse_args(argv: Sequence[str]) -> tuple[str, list[str]]:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        raise SystemExit(0)
    ckpt, overrides = None, []
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"{USAGE}\nnot a key=value argument: {arg!r}")
        if arg.startswith("ckpt="):
            ckpt = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    if not ckpt:
        raise SystemExit(f"{USAGE}\nmissing ckpt=PATH")
    return ckpt, overrides


def eval_dir(ckpt: str) -> Path:
    """Where an evaluation of `ckpt` writes its files: <run dir>/eval (run dir: the folder that holds checkpoints/)."""
    folder = Path(ckpt).expanduser().resolve().parent
    out = (folder.parent if folder.name == "checkpoints" else folder) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    return out


def evaluate(ckpt: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Rebuild the run stored in `ckpt`, load its weights and return its test metrics."""
    checkpoint = load_checkpoint(ckpt)
    cfg = OmegaConf.create(checkpoint["mmtx_config"])
    OmegaConf.set_struct(cfg, True)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except ConfigKeyError as err:
        raise SystemExit(f"unknown configuration key in overrides {list(overrides)}: {err.msg}") from None
    validate(cfg)
    extra = {}
    if "mmtx_vocab" in checkpoint:  # evaluate with exactly the vocabulary the model was trained with
        extra["fixed_vocab"] = Vocab.from_json(checkpoint["mmtx_vocab"])
    if "mmtx_tgt_vocab" in checkpoint:  # an encoder-decoder's target side
        extra["fixed_tgt_vocab"] = Vocab.from_json(checkpoint["mmtx_tgt_vocab"])
    datamodule = build_data(cfg, **extra)
    model = build_model(cfg, datamodule.runtime_kwargs())
    model.load_state_dict(checkpoint["state_dict"])
    trainer = L.Trainer(
        default_root_dir=str(eval_dir(ckpt)),
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=resolve_precision(cfg.trainer),
        logger=False,
        enable_checkpointing=False,
        # The whole test split, unless asked otherwise here: not the training run's limit (or fast_dev_run).
        limit_test_batches=cfg.trainer.limit_test_batches if _overrides_key(overrides, "trainer.limit_test_batches") else None,
    )
    if hasattr(datamodule, "has_split") and not datamodule.has_split("test"):
        raise DataError(f"the data of checkpoint {ckpt} has no test split to evaluate on "
                        "(a data source with only train and val)")
    results = trainer.test(model, datamodule=datamodule, verbose=False)
    return results[0] if results else {}


def _overrides_key(overrides: Sequence[str], key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+") == key for o in overrides)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ckpt, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    with reported("mmtx.eval"):
        metrics = evaluate(ckpt, overrides)
    for key, value in sorted(metrics.items()):
        print(f"{key}: {value:.4f}")
    return metrics


if __name__ == "__main__":
    main()
