"""Modalities: what the parts of mmtx that meet a trained model's inputs outside training need to know of each kind
of input, declared once a modality. A tokenizer names its modality (`PatchTokenizer.modality = "image"`);
`modality_of(tokenizer)` gives its `Modality`, which `mmtx.predict` (files to a batch), `mmtx.export format=onnx`
(the graph's inputs) and the classification family's logged media ask, instead of branching on image or audio.

A new modality: its tokenizer (with `modality = "<name>"`), its batch type (`mmtx.batch`), its data module and
sources, and one `Modality` in `MODALITIES` below.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from mmtx.batch import AudioBatch, ImageBatch
from mmtx.errors import ConfigError, DataError

log = logging.getLogger("mmtx.predict")


@dataclass(frozen=True)
class Modality:
    """name; suffixes: the files mmtx.predict reads; read_files(paths, tokenizer, cfg, on_bad_file) -> (the paths
    read, their batch), prepared as the run's training data was; graph_inputs(tokenizer, cfg) -> (example inputs by
    name, their dynamic dimensions, what preprocess.json says) and graph(model): the classifier from those inputs,
    by name, to its logits (ONNX export); media(batch, i): sample i as logged; media_log(samples, datamodule, tokenizer):
    `log_media`'s keyword arguments for them; geometry(tokenizer): the tokenizer's run-time arguments a checkpoint
    keeps to rebuild it without the data (image size and channels, sample rate)."""

    name: str
    suffixes: tuple[str, ...]
    read_files: Callable[[list[Path], Any, DictConfig, str], tuple[list[Path], Any]]
    graph_inputs: Callable[[Any, DictConfig], tuple[dict[str, torch.Tensor], dict, dict[str, Any]]]
    graph: Callable[[nn.Module], nn.Module]
    media: Callable[[Any, int], torch.Tensor]
    media_log: Callable[[list[torch.Tensor], Any, Any], dict[str, Any]]
    geometry: Callable[[Any], dict[str, Any]]


# -- images ---------------------------------------------------------------------------------------------------

def _read_images(paths: list[Path], tokenizer: Any, cfg: DictConfig, on_bad_file: str) -> tuple[list[Path], ImageBatch]:
    """The readable images, prepared as the training data was: resized, normalised with the run's mean/std."""
    from mmtx.data.image_sources import read_image

    size = tokenizer.image_size[0]
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


def _image_graph_inputs(tokenizer: Any, cfg: DictConfig) -> tuple[dict[str, torch.Tensor], dict, dict[str, Any]]:
    h, w = tokenizer.image_size
    batch = torch.export.Dim("batch", min=1, max=4096)
    inputs = {"image": torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))}
    preprocess = {"input": "image", "shape": ["batch", 3, h, w], "image_size": [h, w],
                  "mean": list(cfg.data.mean), "std": list(cfg.data.std),
                  "normalise": "RGB pixels / 255, minus mean, divided by std (per channel)"}
    return inputs, {"image": {0: batch}}, preprocess


class ImageGraph(nn.Module):
    """image (B, 3, H, W), normalised -> logits (B, C) of a classifier (an `MmtxModule`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.task(self.model.backbone, ImageBatch(image))


def _image_media_log(samples: list[torch.Tensor], datamodule: Any, tokenizer: Any) -> dict[str, Any]:
    images = torch.stack(samples)
    if getattr(datamodule, "mean", None) is not None:  # undo the normalisation: back to [0, 1]
        images = (images * datamodule.std[0].cpu() + datamodule.mean[0].cpu()) / 255.0
    return {"images": images.clamp(0, 1)}


# -- audio ----------------------------------------------------------------------------------------------------

def _read_audio(paths: list[Path], tokenizer: Any, cfg: DictConfig, on_bad_file: str) -> tuple[list[Path], AudioBatch]:
    """The readable clips, decoded as the training data was: mono, at the run's rate, cropped to max_seconds."""
    from mmtx.data.audio_sources import AudioDecoder

    decoder = AudioDecoder(tokenizer.sample_rate, OmegaConf.select(cfg, "data.source.max_seconds"),
                           on_bad_file=on_bad_file)
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


def _audio_graph_inputs(tokenizer: Any, cfg: DictConfig) -> tuple[dict[str, torch.Tensor], dict, dict[str, Any]]:
    sample_rate, n_fft = tokenizer.sample_rate, tokenizer.n_fft
    seconds = OmegaConf.select(cfg, "data.source.max_seconds") or 30.0
    longest = int(sample_rate * seconds)
    length = max(n_fft + 1, min(longest, sample_rate))  # one second, at most the longest
    inputs = {"audio": torch.randn(2, length, generator=torch.Generator().manual_seed(0)) * 0.1,
              "lengths": torch.tensor([length, max(n_fft, length // 2)])}
    batch = torch.export.Dim("batch", min=1, max=4096)
    samples = torch.export.Dim("samples", min=n_fft, max=max(longest, n_fft + 2))
    preprocess = {"input": "audio", "shape": ["batch", "samples"], "sample_rate": sample_rate, "max_seconds": seconds,
                  "lengths": "the number of real samples of each row (rows are zero-padded to the longest)"}
    return inputs, {"audio": {0: batch, 1: samples}, "lengths": {0: batch}}, preprocess


class AudioGraph(nn.Module):
    """audio (B, L) and lengths (B,) -> logits (B, C) of a classifier (an `MmtxModule`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model.task(self.model.backbone, AudioBatch(audio, lengths))


MODALITIES: dict[str, Modality] = {
    "image": Modality(
        name="image", suffixes=(".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"),
        read_files=_read_images, graph_inputs=_image_graph_inputs, graph=ImageGraph,
        media=lambda batch, i: batch.image[i].detach().float().cpu(), media_log=_image_media_log,
        geometry=lambda tok: {"image_size": list(tok.image_size), "in_channels": tok.in_channels}),
    "audio": Modality(
        name="audio", suffixes=(".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"),
        read_files=_read_audio, graph_inputs=_audio_graph_inputs, graph=AudioGraph,
        media=lambda batch, i: batch.audio[i, : int(batch.lengths[i])].detach().float().cpu(),
        media_log=lambda samples, datamodule, tokenizer: {
            "audio": samples, "sample_rate": getattr(tokenizer, "sample_rate", 16000)},
        geometry=lambda tok: {"sample_rate": tok.sample_rate}),
}


def _fused_unsupported(what: str) -> Callable[..., Any]:
    def refuse(*args: Any) -> Any:
        raise ConfigError(f"{what} takes one input a sample, and this model reads several fields in one sequence "
                          "(tokenizer.fields); load it with mmtx.load and call it on a mmtx.batch.FusedBatch")
    return refuse


def fused_modality(tokenizer: Any) -> Modality:
    """The `Modality` of a fused tokenizer (`mmtx.tokenizers.fused`), from its fields': the logged media are its
    first field's, the geometry every field's; reading files and ONNX export take one input a sample, so they refuse."""
    first = tokenizer.names[0]
    own = modality_of(tokenizer.fields[first])

    def media_log(samples: list[torch.Tensor], datamodule: Any, tok: Any) -> dict[str, Any]:
        fields = getattr(datamodule, "fields", {})
        return own.media_log(samples, fields.get(first, datamodule), tok.fields[first])

    return Modality(
        name="fused", suffixes=(), read_files=_fused_unsupported("mmtx.predict"),
        graph_inputs=_fused_unsupported("mmtx.export format=onnx"), graph=_fused_unsupported("mmtx.export format=onnx"),
        media=lambda batch, i: own.media(batch.fields[first], i), media_log=media_log,
        geometry=lambda tok: {"fields": {n: modality_of(t).geometry(t) for n, t in tok.fields.items()}})


def modality_of(tokenizer: Any) -> Modality:
    """The `Modality` of the inputs `tokenizer` reads (its `modality` attribute; a fused tokenizer's is made of its
    fields')."""
    name = getattr(tokenizer, "modality", None)
    if name == "fused":
        return fused_modality(tokenizer)
    if name not in MODALITIES:
        raise ConfigError(f"{type(tokenizer).__name__} reads {name or 'an unnamed'} input, which this mmtx cannot read "
                          f"from files or export; it knows {', '.join(MODALITIES)} (declared in mmtx/data/modalities.py)")
    return MODALITIES[name]
