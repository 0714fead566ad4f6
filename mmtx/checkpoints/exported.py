"""Folders written by `python -m mmtx.export` (mmtx.export writes them): the files they hold, the marker that says
which format each is, and the reader that takes a `format=safetensors` folder back as a checkpoint
(`load_checkpoint` calls it, so `init_from=`, `mmtx.eval`, `mmtx.generate` and `mmtx.predict` take a folder as
they take a `.ckpt`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mmtx.errors import CheckpointError, MissingError

WEIGHTS, CONFIG, META = "model.safetensors", "config.yaml", "mmtx.json"
FORMAT_VERSION = 1


def mark(folder: Path, format: str, ckpt: str | Path) -> None:
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
