"""The one way a trained model comes back from disk: `mmtx.load(path)` for a checkpoint (`last.ckpt`,
`best-*.ckpt`) or a folder written by `mmtx.export`, and `rebuild` under it (also used by `mmtx.eval`, which
rebuilds a model for data it has reconfigured).

    import mmtx
    model = mmtx.load("outputs/vit_cifar/2026-12-06_10-00-00/checkpoints/last.ckpt")
    model.classes                                  # ['airplane', 'automobile', ...]
    model.predict(["cat.jpg", "photos/"])          # the rows `python -m mmtx.predict` prints
    lm = mmtx.load("outputs/gpt_shakespeare/.../last.ckpt")
    lm.generate(prompt="ROMEO:", max_new_tokens=200, temperature=0.8)   # as `python -m mmtx.generate`
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mmtx.checkpoints.generating import generate_with
from mmtx.checkpoints.labelling import RULES as LABEL_RULES
from mmtx.checkpoints.labelling import label
from mmtx.config.validate import validate
from mmtx.errors import CheckpointError, ConfigError


def rebuild(checkpoint: dict[str, Any], cfg: DictConfig, runtime: dict[str, Any] | None = None,
            path: str | Path = "") -> torch.nn.Module:
    """The `MmtxModule` of `cfg` with the checkpoint's weights, on the CPU, in eval mode. `runtime`: the values
    known at run time (vocabulary, classes, input geometry); None: those the checkpoint stored, by its task
    family's `runtime_from_checkpoint`."""
    from hydra.utils import get_class

    from mmtx.config.wiring import build_model

    if runtime is None:
        family = str(OmegaConf.select(cfg, "family._target_", default=""))
        if not family:
            raise CheckpointError(f"checkpoint {path} was written by an mmtx from before task families (no family "
                                  "in its configuration); train it again with this version")
        runtime = get_class(family).runtime_from_checkpoint(checkpoint, cfg, str(path))
    model = build_model(cfg, runtime)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


class Model:
    """A trained mmtx model, ready to use: `module` (the `MmtxModule`, in eval mode on `device`), the run's
    `config`, and what it was trained with (`classes` of a classifier, `vocab` of a text model); `predict`
    labels files as `python -m mmtx.predict` does, `generate` continues, translates or transcribes as
    `python -m mmtx.generate` does, with the same keys and the same results."""

    def __init__(self, module: torch.nn.Module, path: str, member: str | None = None) -> None:
        self.module = module
        self.path = path
        self.member = member
        self.config: DictConfig = OmegaConf.create(module.run_config)

    def __repr__(self) -> str:
        return f"mmtx.Model({self.kind}, task={self.config.get('task_name')}, path={self.path}, device={self.device})"

    @property
    def part(self):
        """The task part (tokenizer + head) on the shared backbone: `module.task`."""
        return self.module.task

    @property
    def kind(self) -> str:
        """Its task family, as the family names itself: classification | language_model | seq2seq | ..."""
        return self.part.kind

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def classes(self) -> list[str] | None:
        """A classifier's class names, in the order of its outputs; None for other models."""
        names = getattr(self.part, "class_names", None)
        return list(names) if names is not None else None

    @property
    def vocab(self):
        """The text model's vocabulary (`mmtx.tokenizers.text.Vocab`: encode, decode); None for a classifier."""
        return self.part.vocab

    def to(self, device: str | torch.device) -> Model:
        self.module.to(device)
        return self

    def predict(self, inputs: str | Path | list[str | Path], top_k: int = 5, batch_size: int = 64,
                on_bad_file: str = "skip") -> list[list[str]]:
        """Label image or audio files (a file, a folder, a glob, or a list of them), prepared as the training data
        was: the rows of mmtx.predict's TSV, header first (path, label, probability, top_k)."""
        if "predict" not in self.part.can:
            raise ConfigError(f"{self.path} is a {self.kind.replace('_', ' ')}: predict labels images and audio; "
                              "use generate()")
        spec = ",".join(str(p) for p in inputs) if isinstance(inputs, (list, tuple)) else str(inputs)
        args = {"inputs": spec, "top_k": top_k, "batch_size": batch_size, "on_bad_file": on_bad_file}
        validate(args, {k: v for k, v in LABEL_RULES.items() if k in args})
        return label(self.module, self.config, args)

    def generate(self, prompt: str | None = None, **options: Any) -> list[str]:
        """A language model: `num_samples` continuations of `prompt` (None: the model's default prompt). An
        encoder-decoder: the translation or transcript of each of `text=` (a string or a list), `text_file=` or
        `audio=` (a file, a glob, or a list). `options`: the keys of `python -m mmtx.generate --help`
        (max_new_tokens, temperature, top_k, top_p, num_samples, seed, use_cache; beam_size, length_penalty,
        max_len, batch_size), with its defaults."""
        if "generate" not in self.part.can:
            raise ConfigError(f"{self.path} is a {self.kind.replace('_', ' ')} model: generate continues text, "
                              "translates and transcribes; use predict()")
        if prompt is not None:
            options["prompt"] = prompt
        return generate_with(self.module, options, self.path, echo=False)


def load(path: str | Path, member: str | None = None, device: str = "auto") -> Model:
    """A trained model from a checkpoint written by `mmtx.train` or a folder written by `mmtx.export`
    (format=safetensors), in eval mode on `device` (auto: the GPU when there is one). `member`: the member
    of a co-training run's checkpoint to load (its shared backbone and that member's part).

    A file that is not an mmtx checkpoint or export, or a co-training checkpoint without `member`, raises
    the same one-line error (`CheckpointError`, `ConfigError`, `MissingError`) as `python -m mmtx.eval`.
    """
    from mmtx.checkpoints.io import load_checkpoint, member_view
    from mmtx.config.apps import inference_device

    path = str(path)
    checkpoint = member_view(load_checkpoint(path), member, path)
    cfg = OmegaConf.create(checkpoint["mmtx_config"])
    module = rebuild(checkpoint, cfg, path=path)
    return Model(module.to(inference_device(device)), path, member)


def load_classifier(ckpt: str, device: str, member: str | None = None):
    """The classifier stored in `ckpt` (`member`'s, from a co-training run: weights, class names, input
    geometry), in eval mode on `device` (mmtx.load's module), and its run configuration."""
    model = load(ckpt, member, device)
    if "predict" not in model.part.can:
        family = model.config.family._target_
        raise CheckpointError(f"checkpoint {ckpt} is not a classifier's ({family}): mmtx.predict labels images and "
                              "audio; continue text or translate with mmtx.generate")
    return model.module, model.config
