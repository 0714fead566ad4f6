"""Generate from a checkpoint: continue a prompt (decoder-only), translate text or transcribe audio
(encoder-decoder). The model and its vocabularies come from the checkpoint alone: no data is read.
A Hydra application: its keys and defaults are `conf/generate.yaml` (`--help` lists them).

    python -m mmtx.generate ckpt=PATH prompt="ROMEO:" max_new_tokens=500 temperature=0.8 top_k=200
    python -m mmtx.generate ckpt=PATH text="A dog runs on the beach."
    python -m mmtx.generate ckpt=PATH text_file=sentences.en > sentences.de    (one line in, one line out)
    python -m mmtx.generate ckpt=PATH audio='clips/*.wav'                      (prints path<TAB>transcript)
"""

from __future__ import annotations

from mmtx.help import answer_help

answer_help("generate")  # `--help` is answered here, before the imports below (torch, Lightning) take seconds

import sys
from typing import Any, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

from mmtx.apps import app_keys, compose_app, hydra_argv, inference_device
from mmtx.checkpoints import load
from mmtx.checkpoints.generating import (LM_KEYS, RULES, SEQ2SEQ_KEYS, check_args,  # noqa: F401 (the keys, here too)
                                         generate_with, given_keys)
from mmtx.config import config_dir
from mmtx.errors import CheckpointError, reported, run_cli
from mmtx.validate import validate

VERBATIM = ("prompt", "text", "text_file", "audio")  # free text and paths: never parsed by Hydra's grammar


def load_model(ckpt: str, device: str = "cpu", member: str | None = None):
    """The language model or encoder-decoder stored in `ckpt` (`member`'s, from a co-training run), with its
    vocabularies, in eval mode on `device` (mmtx.load's module)."""
    model = load(ckpt, member, device)
    if model.kind == "classification":
        raise CheckpointError(f"checkpoint {ckpt} is a classifier's: label images or audio with "
                              f"python -m mmtx.predict ckpt={ckpt} inputs=PATHS (mmtx.generate continues text, "
                              "translates and transcribes)")
    return model.module


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="generate")
def _cli(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    with reported("mmtx.generate"):
        _generate(OmegaConf.to_container(cfg, resolve=True), given_keys(HydraConfig.get().overrides.task))


def main(argv: Sequence[str] | None = None) -> list[str] | None:
    """The command line. `argv`: its arguments, from Python: returns the texts, and a mistake raises its
    error (a ValueError or FileNotFoundError) instead of ending the process."""
    if argv is None:
        with reported("mmtx.generate"):
            sys.argv = [sys.argv[0], *hydra_argv(sys.argv[1:], app_keys("generate"), verbatim=VERBATIM)]
        return run_cli(_cli)
    overrides = hydra_argv(argv, app_keys("generate"), verbatim=VERBATIM)
    cfg = compose_app("generate", overrides)
    return _generate(OmegaConf.to_container(cfg, resolve=True), given_keys(overrides))


def _generate(args: dict[str, Any], given: set[str] = frozenset()) -> list[str]:
    validate(args, RULES)
    model = load_model(args["ckpt"], inference_device(str(args["device"])), args.get("member"))
    return generate_with(model, args, args["ckpt"], given)


if __name__ == "__main__":
    main()
