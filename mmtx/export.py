"""`python -m mmtx.export ckpt=PATH [format=safetensors] [out=DIR]`: a trained model's weights and
configuration, without the training state, as a folder other tools and `init_from=` read (a Hydra
application: `conf/export.yaml`, `--help`).

`format=safetensors` writes, like Hugging Face's `save_pretrained`:

    DIR/model.safetensors   every tensor of the model (no optimizer state, no pickle: nothing in it runs)
    DIR/config.yaml         the run's resolved configuration (a co-training run's, its members' inside)
    DIR/mmtx.json           what rebuilds the model besides the configuration (vocabularies, class names,
                            input geometry, co-training members), the run's provenance, and the name and
                            shape of every tensor, checked when the folder is read

`load_checkpoint(DIR)` reads such a folder back as a checkpoint holding the weights and the configuration,
so `init_from=DIR`, `mmtx.eval ckpt=DIR`, `mmtx.generate ckpt=DIR` and `mmtx.predict ckpt=DIR` take it as
they take a `.ckpt`; `resume=` does not (no optimizer state: start a new run with `init_from=` instead).

`format=onnx` writes an image or audio classifier as `model.onnx` (input tensor to logits, the batch dynamic) and
`preprocess.json` (input size, normalisation, sample rate, class names), after checking onnxruntime's logits
against the model's (mmtx.interop.onnx).

`format=hf` writes a single-task language model of GPT-2's shape (learned positions, biases, no rotary
positions) as `transformers` does (config.json, model.safetensors, tokenizer.json and tokenizer_config.json):
`AutoModelForCausalLM.from_pretrained(DIR)` gives the same logits, `AutoTokenizer.from_pretrained(DIR)` the same
tokens, and `init_from=hf:DIR` reads it back into mmtx (mmtx.interop.gpt2).
"""

from __future__ import annotations

from mmtx.config.help import answer_help

answer_help("export")  # `--help` is answered here, before the imports below (torch, Lightning) take seconds

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from mmtx.checkpoints.exported import CONFIG, FORMAT_VERSION, META, WEIGHTS, export_format, mark
from mmtx.config.apps import run_app
from mmtx.config.validate import boolean, one_of, validate
from mmtx.errors import CheckpointError, ConfigError
from mmtx.files import check_writable, write_failure

FORMATS = ("safetensors", "hf", "onnx")
# Checkpoint entries of training only: they do not travel with the weights.
TRAINING_ONLY = ("mmtx_train_loss_window", "mmtx_wandb_id")


def _model_state(value: Any) -> Any:
    """A checkpoint's `mmtx_*` entry without its training-only parts (a member's entries included)."""
    if isinstance(value, dict):
        return {k: _model_state(v) for k, v in value.items() if k not in TRAINING_ONLY}
    return value


def default_out(ckpt: str | Path, format: str = "safetensors") -> Path:
    """`<run dir>/export/<checkpoint name>` (`...-hf`, `...-onnx` for those formats; run dir: the folder that holds
    checkpoints/)."""
    path = Path(ckpt).expanduser().resolve()
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return run / "export" / (path.stem + ("" if format == "safetensors" else f"-{format}"))


def _checked_out(ckpt: str | Path, out: str | Path | None, format: str, overwrite: bool, member: str | None) -> Path:
    """The folder to write, after the arguments' mistakes are named (before the checkpoint is read)."""
    if format not in FORMATS:
        raise ConfigError(f"format={format}: mmtx.export writes {', '.join(FORMATS)}")
    out = Path(out).expanduser() if out else default_out(ckpt, format)
    if out.exists():
        if not overwrite:
            raise ConfigError(f"out={out} exists: pass overwrite=true to replace it (an earlier export), or another out=")
        _check_replaceable(out, Path(ckpt))
    if member and format == "safetensors":
        raise ConfigError(f"member={member}: format=safetensors writes every member of a co-training checkpoint; "
                          "member= is for format=hf and format=onnx")
    check_writable(out.parent, "the folder of out=", hint="out=")
    return out


def export(ckpt: str | Path, out: str | Path | None = None, format: str = "safetensors",
           overwrite: bool = False, member: str | None = None) -> Path:
    """Write checkpoint `ckpt`'s model as a folder (see the module's doc) and return the folder. The folder is
    built beside `out` and renamed into place, so an interrupted export leaves no half-written one. `format=hf`:
    a language model as GPT-2 for `transformers` (mmtx.interop.gpt2); `format=onnx`: a classifier (mmtx.interop.onnx).
    `member`: for hf and onnx, the member of a co-training checkpoint to write (safetensors writes them all).
    `overwrite` replaces only a folder that mmtx.export wrote (its mmtx.json says so), never one that holds `ckpt`."""
    from safetensors.torch import save_file

    from mmtx.checkpoints.io import load_checkpoint

    out = _checked_out(ckpt, out, format, overwrite, member)
    if format == "onnx":
        from mmtx.checkpoints.loader import load_classifier
        from mmtx.interop.onnx import save_onnx

        try:
            model, cfg = load_classifier(str(ckpt), "cpu", member)
        except CheckpointError as err:
            raise ConfigError(f"format=onnx exports image and audio classifiers: {err}") from None
        return _write_folder(out, lambda tmp: (save_onnx(model, cfg, tmp, str(ckpt)), mark(tmp, "onnx", ckpt)))
    checkpoint = load_checkpoint(ckpt)
    if format == "hf":
        from mmtx.checkpoints.io import member_view

        checkpoint = member_view(checkpoint, member, ckpt)
        from mmtx.interop.gpt2 import hf_config, save_hf

        hf_config(checkpoint, str(ckpt))  # what GPT-2 cannot express is named before anything is written
        return _write_folder(out, lambda tmp: (save_hf(checkpoint, tmp, str(ckpt)), mark(tmp, "hf", ckpt)))
    # safetensors stores each tensor once and refuses tensors that share memory (tied embeddings): each is
    # written as its own contiguous copy, and loaded back as separate tensors of the same values.
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in checkpoint["state_dict"].items()}
    meta = {
        "format": "mmtx-safetensors", "format_version": FORMAT_VERSION, "source": str(Path(ckpt).expanduser().resolve()),
        "global_step": checkpoint.get("global_step"),
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
        "entries": {k: _model_state(v) for k, v in checkpoint.items()
                    if k.startswith("mmtx_") and k not in TRAINING_ONLY and k != "mmtx_config"},
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "mmtx_format_version": str(FORMAT_VERSION)})
        (tmp / CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(checkpoint["mmtx_config"])), encoding="utf-8")
        (tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        shutil.copymode(tmp / META, tmp / WEIGHTS)  # safetensors writes 0600; the folder's files as any other

    return _write_folder(out, write)


def _check_replaceable(out: Path, ckpt: Path) -> None:
    """`overwrite=true` replaces `out` only if mmtx.export wrote it, and never when it holds the checkpoint."""
    target, source = out.resolve(), ckpt.expanduser().resolve()
    if source == target or target in source.parents:
        raise ConfigError(f"out={out} holds the checkpoint being exported ({ckpt}): replacing it would delete the "
                          "checkpoint; give another out=")
    if not out.is_dir() or export_format(out) is None:
        what = "a file" if not out.is_dir() else f"a folder without mmtx.export's marker ({META})"
        raise ConfigError(f"out={out} is {what}, not an earlier export: overwrite=true replaces only a folder that "
                          "mmtx.export wrote; give another out= (or move that one away yourself)")


def _write_folder(out: Path, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` fills a new folder beside `out`, which is then renamed into place: an interrupted export
    leaves no half-written folder, and an existing `out` (an earlier export: `_check_replaceable`) goes only once
    the new one is complete. The temporary names are new ones, so nothing that was there is touched."""
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp = out.with_name(f".{out.name}.{tag}.tmp")
    try:
        tmp.mkdir()
        write(tmp)
        if out.exists():  # overwrite: the old folder goes only once the new one is complete
            old = out.with_name(f".{out.name}.{tag}.old.tmp")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as err:
        failure = write_failure(err, getattr(err, "filename", None) or out, hint="out=")
        if failure is err:
            raise
        raise failure from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # this call's own folder, if the rename did not happen
    return out


def _run(cfg: DictConfig) -> Path:
    validate(cfg, {"overwrite": boolean(), "format": one_of(*FORMATS)})
    out = export(cfg.ckpt, cfg.get("out"), cfg.format, bool(cfg.overwrite), cfg.get("member"))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"exported {cfg.ckpt} -> {out} ({size / 2**20:.1f} MiB: {', '.join(sorted(f.name for f in out.iterdir()))})")
    if cfg.format == "onnx":
        check = json.loads((out / "preprocess.json").read_text())["onnx_check"]
        print(f"onnxruntime {check['onnxruntime']} gives the model's logits to max |delta| {check['max_abs_delta']:.1e}")
    return out


def main(argv: Sequence[str] | None = None) -> Path | None:
    """The command line. `argv`: its arguments, from Python: returns the folder written, and a mistake raises
    its error instead of ending the process."""
    return run_app("export", lambda cfg, _: _run(cfg), argv, verbatim=("ckpt", "out"))


if __name__ == "__main__":
    main()
