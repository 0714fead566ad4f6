"""Generate from a checkpoint: continue a prompt (decoder-only), draw images of a class (an image-token model,
iGPT), translate text or transcribe audio (encoder-decoder). The model and its vocabularies come from the checkpoint alone: no data is read.
A Hydra application: its keys and defaults are `conf/generate.yaml` (`--help` lists them).

    python -m mmtx.generate ckpt=PATH prompt="ROMEO:" max_new_tokens=500 temperature=0.8 top_k=200
    python -m mmtx.generate ckpt=PATH prompt=cat num_samples=8 out=cats [image=half.png]  (writes PNG files)
    python -m mmtx.generate ckpt=PATH text="A dog runs on the beach."
    python -m mmtx.generate ckpt=PATH text_file=sentences.en > sentences.de    (one line in, one line out)
    python -m mmtx.generate ckpt=PATH audio='clips/*.wav'                      (prints path<TAB>transcript)
"""

from __future__ import annotations

from mmtx.config.help import answer_help

answer_help("generate")  # `--help` is answered here, before the imports below (torch, Lightning) take seconds

from typing import Any, Sequence

from omegaconf import OmegaConf

from mmtx.checkpoints import load
from mmtx.checkpoints.generating import LM_KEYS, RULES, SEQ2SEQ_KEYS, check_args, generate_with, given_keys  # noqa: F401 (the keys, here too)
from mmtx.config.apps import inference_device, run_app
from mmtx.config.validate import validate
from mmtx.errors import CheckpointError

VERBATIM = ("prompt", "text", "text_file", "audio", "out", "image")  # free text and paths: never parsed by Hydra's grammar


def load_model(ckpt: str, device: str = "cpu", member: str | None = None):
    """The language model or encoder-decoder stored in `ckpt` (`member`'s, from a co-training run), with its
    vocabularies, in eval mode on `device` (mmtx.load's module)."""
    model = load(ckpt, member, device)
    if "generate" not in model.part.can:
        raise CheckpointError(f"checkpoint {ckpt} holds a {model.kind.replace('_', ' ')} model, which does not "
                              f"generate: label images or audio with "
                              f"python -m mmtx.predict ckpt={ckpt} inputs=PATHS (mmtx.generate continues text, "
                              "translates and transcribes)")
    return model.module


def main(argv: Sequence[str] | None = None) -> list[str] | None:
    """The command line. `argv`: its arguments, from Python: returns the texts, and a mistake raises its
    error (a ValueError or FileNotFoundError) instead of ending the process."""
    return run_app("generate", lambda cfg, overrides: _generate(OmegaConf.to_container(cfg, resolve=True),
                                                                given_keys(overrides)), argv, verbatim=VERBATIM)


def _generate(args: dict[str, Any], given: set[str] = frozenset()) -> list[str]:
    validate(args, RULES)
    model = load_model(args["ckpt"], inference_device(str(args["device"])), args.get("member"))
    return generate_with(model, args, args["ckpt"], given)


if __name__ == "__main__":
    main()
