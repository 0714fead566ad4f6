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
against the model's (mmtx.export_onnx).

`format=hf` writes a single-task language model of GPT-2's shape (learned positions, biases, no rotary
positions) as `transformers` does (config.json, model.safetensors, tokenizer.json and tokenizer_config.json):
`AutoModelForCausalLM.from_pretrained(DIR)` gives the same logits, `AutoTokenizer.from_pretrained(DIR)` the same
tokens, and `init_from=hf:DIR` reads it back into mmtx (mmtx.gpt2).
"""

from __future__ import annotations

from mmtx.help import answer_help

answer_help("export")  # `--help` is answered here, before the imports below (torch, Lightning) take seconds

import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

from mmtx.apps import app_keys, compose_app, hydra_argv
from mmtx.config import config_dir
from mmtx.errors import CheckpointError, ConfigError, MissingError, reported, run_cli
from mmtx.files import check_writable, write_failure
from mmtx.validate import boolean, one_of, validate

FORMATS = ("safetensors", "hf", "onnx")
WEIGHTS, CONFIG, META = "model.safetensors", "config.yaml", "mmtx.json"
FORMAT_VERSION = 1
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


def export(ckpt: str | Path, out: str | Path | None = None, format: str = "safetensors",
           overwrite: bool = False, member: str | None = None) -> Path:
    """Write checkpoint `ckpt`'s model as a folder (see the module's doc) and return the folder. The folder is
    built beside `out` and renamed into place, so an interrupted export leaves no half-written one. `format=hf`:
    a language model as GPT-2 for `transformers` (mmtx.gpt2); `format=onnx`: a classifier (mmtx.export_onnx).
    `member`: for hf and onnx, the member of a co-training checkpoint to write (safetensors writes them all).
    `overwrite` replaces only a folder that mmtx.export wrote (its mmtx.json says so), never one that holds `ckpt`."""
    from safetensors.torch import save_file

    from mmtx.checkpoint import load_checkpoint

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
    check_writable(out.parent, "the folder of out=", hint="out=")  # before the checkpoint is read
    if format == "onnx":
        from mmtx.export_onnx import save_onnx

        return _write_folder(out, lambda tmp: (save_onnx(str(ckpt), tmp, member), _mark(tmp, "onnx", ckpt)))
    checkpoint = load_checkpoint(ckpt)
    if format == "hf":
        from mmtx.checkpoint import member_view

        checkpoint = member_view(checkpoint, member, ckpt)
        from mmtx.gpt2 import hf_config, save_hf

        hf_config(checkpoint, str(ckpt))  # what GPT-2 cannot express is named before anything is written
        return _write_folder(out, lambda tmp: (save_hf(checkpoint, tmp, str(ckpt)), _mark(tmp, "hf", ckpt)))
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


def _mark(folder: Path, format: str, ckpt: str | Path) -> None:
    """The marker of a folder mmtx.export wrote (hf, onnx; a safetensors export's mmtx.json is its own): what
    `overwrite=true` may replace."""
    meta = {"format": f"mmtx-{format}", "format_version": FORMAT_VERSION, "source": str(Path(ckpt).expanduser().resolve())}
    (folder / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def export_format(path: str | Path) -> str | None:
    """The format of a folder mmtx.export wrote (`mmtx-safetensors`, `mmtx-hf`, `mmtx-onnx`), read from its
    mmtx.json; None for anything else (a folder mmtx.export did not write, a file, nothing)."""
    meta = Path(path).expanduser() / META
    if not meta.is_file():
        return None
    try:
        found = json.loads(meta.read_text(encoding="utf-8")).get("format")
    except (ValueError, OSError, AttributeError):
        return None
    return found if isinstance(found, str) and found.startswith("mmtx-") else None


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


def is_export(path: str | Path) -> bool:
    """Whether `path` is a folder mmtx.export wrote (any format: `load_export` names those it cannot read)."""
    return export_format(path) is not None


def load_export(path: str | Path) -> dict[str, Any]:
    """An exported folder as a checkpoint: {"state_dict", "mmtx_config", the other `mmtx_*` entries,
    "mmtx_export": True}. A tensor missing, added or reshaped since the export is named."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    found = export_format(path)
    if found != "mmtx-safetensors":
        reader = {"mmtx-hf": f"it is a transformers folder: start a run from it with init_from=hf:{path}",
                  "mmtx-onnx": "it is an ONNX model for onnxruntime"}.get(found or "", "")
        raise CheckpointError(f"{path} is an mmtx export in format {found}, which mmtx reads back only as "
                              f"format=safetensors{'; ' + reader if reader else ''}")
    for name in (WEIGHTS, CONFIG, META):
        if not (path / name).is_file():
            raise MissingError(f"{path} is not a complete mmtx export: {name} is missing (write the folder again "
                               "with python -m mmtx.export ckpt=...)")
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
        config = OmegaConf.to_container(OmegaConf.load(path / CONFIG))
        state = load_file(str(path / WEIGHTS))
    except (ValueError, OSError, SafetensorError) as err:  # JSON, YAML and safetensors errors
        raise CheckpointError(f"{path} is not a readable mmtx export ({err})") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path / META}: format {meta.get('format')!r} version {meta.get('format_version')} "
                              f"is not one this mmtx reads (mmtx-safetensors <= {FORMAT_VERSION})")
    expected = meta.get("tensors", {})
    missing = [n for n in expected if n not in state]
    added = [n for n in state if n not in expected]
    reshaped = [f"{n} {list(state[n].shape)} (exported {expected[n]})" for n in expected
                if n in state and list(state[n].shape) != expected[n]]
    if missing or added or reshaped:
        detail = "; ".join([f"missing {', '.join(missing[:5])}"] * bool(missing)
                           + [f"not exported {', '.join(added[:5])}"] * bool(added)
                           + [f"reshaped {', '.join(reshaped[:5])}"] * bool(reshaped))
        raise CheckpointError(f"{path / WEIGHTS} does not hold the tensors {META} lists ({detail}): the folder was "
                              "changed after the export; export the checkpoint again")
    return {**meta.get("entries", {}), "state_dict": state, "mmtx_config": config,
            "global_step": meta.get("global_step"), "mmtx_export": True}


def _run(cfg: DictConfig) -> Path:
    validate(cfg, {"overwrite": boolean(), "format": one_of(*FORMATS)})
    out = export(cfg.ckpt, cfg.get("out"), cfg.format, bool(cfg.overwrite), cfg.get("member"))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"exported {cfg.ckpt} -> {out} ({size / 2**20:.1f} MiB: {', '.join(sorted(f.name for f in out.iterdir()))})")
    if cfg.format == "onnx":
        check = json.loads((out / "preprocess.json").read_text())["onnx_check"]
        print(f"onnxruntime {check['onnxruntime']} gives the model's logits to max |delta| {check['max_abs_delta']:.1e}")
    return out


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def _cli(cfg: DictConfig) -> None:
    with reported("mmtx.export"):
        _run(cfg)


def main(argv: Sequence[str] | None = None) -> Path | None:
    """The command line. `argv`: its arguments, from Python: returns the folder written, and a mistake raises
    its error instead of ending the process."""
    if argv is None:
        with reported("mmtx.export"):
            sys.argv = [sys.argv[0], *hydra_argv(sys.argv[1:], app_keys("export"), verbatim=("ckpt", "out"))]
        return run_cli(_cli)
    return _run(compose_app("export", hydra_argv(argv, app_keys("export"), verbatim=("ckpt", "out"))))


if __name__ == "__main__":
    main()
