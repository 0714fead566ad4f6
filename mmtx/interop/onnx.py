"""`python -m mmtx.export ckpt=... format=onnx`: an image or audio classifier as an ONNX graph, checked in
onnxruntime against the model it came from (the `onnx` extra: onnx, onnxscript, onnxruntime).

The graph is PyTorch's exporter (`torch.onnx.export(..., dynamo=True)`) applied to the classifier from its input
tensor to its logits: an image classifier takes `image` (B, 3, H, W), already resized to the run's size and
normalised with its mean and std; an audio classifier takes `audio` (B, L), mono at the run's sample rate, and
`lengths` (B,), its log-mel front end inside the graph. The batch (and, for audio, the length) is dynamic.
`preprocess.json` beside it says how to prepare inputs and names the classes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtx.data.modalities import modality_of
from mmtx.errors import CheckpointError, ConfigError, optional

TOLERANCE = 1e-4  # max |onnxruntime - torch| on the check inputs, in fp32


def _modules():
    optional("onnx", "onnx", "mmtx.export format=onnx")  # torch's exporter needs onnx and onnxscript
    optional("onnxscript", "onnx", "mmtx.export format=onnx")
    return optional("onnxruntime", "onnx", "mmtx.export format=onnx")


def graph_and_inputs(model: nn.Module, cfg) -> tuple[nn.Module, dict[str, torch.Tensor], dict, dict[str, Any]]:
    """The classifier as a graph module, example inputs, their dynamic dimensions, and preprocess.json (what its
    modality declares: `mmtx.data.modalities`)."""
    part = model.task
    modality = modality_of(part.tokenizer)
    inputs, dynamic, preprocess = modality.graph_inputs(part.tokenizer, cfg)
    return modality.graph(model), inputs, dynamic, {**preprocess, "classes": list(part.class_names)}


def save_onnx(model: Any, cfg: Any, folder: Path, source: str = "the model") -> float:
    """Write the classifier `model` (an `MmtxModule` in eval mode, with its run configuration `cfg`: as
    `mmtx.checkpoints.labelling.load_classifier` gives them) into `folder` (model.onnx, preprocess.json;
    model.onnx.data too for a model over 1.5 GiB); return the check's max |delta|. `source`: the checkpoint, for
    messages."""
    import warnings

    ort = _modules()
    model.float()
    graph, inputs, dynamic, preprocess = graph_and_inputs(model, cfg)
    path = folder / "model.onnx"
    # One file unless protobuf's 2 GiB limit forces the weights beside it (model.onnx.data)
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, tuple(inputs.values()), str(path), input_names=list(inputs), output_names=["logits"],
                              dynamic_shapes=dynamic, dynamo=True, verbose=False, external_data=external)
    except Exception as err:  # the exporter's own errors: this model on this torch is not supported
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"format=onnx: torch {torch.__version__}'s ONNX exporter cannot export {source} ({first}); "
                          "export it with format=safetensors") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = {k: v[:1].clone() for k, v in inputs.items()}  # another batch size than the exported example's
    delta = 0.0
    for feed in (inputs, check):
        with torch.no_grad():
            want = graph(*feed.values())
        got = session.run(["logits"], {k: v.numpy() for k, v in feed.items()})[0]
        delta = max(delta, (torch.from_numpy(got) - want).abs().max().item())
    if not delta <= TOLERANCE:
        raise CheckpointError(f"format=onnx: onnxruntime's logits differ from the model's by {delta:.2e} (> {TOLERANCE}) "
                              f"on {source}; the graph was not kept")
    preprocess["onnx_check"] = {"max_abs_delta": delta, "onnxruntime": ort.__version__, "torch": torch.__version__}
    (folder / "preprocess.json").write_text(json.dumps(preprocess, indent=1), encoding="utf-8")
    return delta
