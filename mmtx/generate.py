"""`python -m mmtx.generate ckpt=PATH prompt="ROMEO:" max_new_tokens=500 temperature=0.8 top_k=200`.

Continues a prompt with a decoder-only model from a checkpoint. The model and
its vocabulary come from the checkpoint alone: no data is read.
Arguments (key=value): ckpt (required), prompt ("\\n"), max_new_tokens (500),
temperature (0.8; 0 is greedy), top_k (200; 0 or null: off), top_p (null),
num_samples (1), seed (1337), device (auto | cpu | cuda), use_cache (true).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf

from mmtx.checkpoint import load_checkpoint
from mmtx.data.text import text_runtime
from mmtx.tokenizers.text import Vocab
from mmtx.wiring import build_model

DEFAULTS: dict[str, Any] = {
    "ckpt": None, "prompt": "\n", "max_new_tokens": 500, "temperature": 0.8, "top_k": 200, "top_p": None,
    "num_samples": 1, "seed": 1337, "device": "auto", "use_cache": True,
}
USAGE = "usage: python -m mmtx.generate ckpt=PATH [prompt=TEXT max_new_tokens=N temperature=T top_k=K top_p=P ...]"


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    args = OmegaConf.create(DEFAULTS)
    OmegaConf.set_struct(args, True)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"{USAGE}\nnot a key=value argument: {arg!r}")
        if key not in DEFAULTS:
            raise SystemExit(f"{USAGE}\nunknown argument {key!r} (known: {', '.join(DEFAULTS)})")
        args[key] = value if key == "prompt" else OmegaConf.from_dotlist([arg])[key]
    if not args.ckpt:
        raise SystemExit(f"{USAGE}\nmissing ckpt=PATH")
    return OmegaConf.to_container(args)


def load_lm(ckpt: str, device: str = "cpu"):
    """The language model stored in `ckpt`, with its vocabulary, in eval mode on `device`."""
    checkpoint = load_checkpoint(ckpt)
    if "mmtx_vocab" not in checkpoint:
        raise ValueError(f"checkpoint {ckpt} has no tokenizer (it was not written by a text task's training run)")
    cfg = OmegaConf.create(checkpoint["mmtx_config"])
    model = build_model(cfg, text_runtime(Vocab.from_json(checkpoint["mmtx_vocab"])))
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval()


def main(argv: Sequence[str] | None = None) -> list[str]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = args["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_lm(args["ckpt"], device)
    generator = torch.Generator(device=device).manual_seed(int(args["seed"]))
    texts = []
    for i in range(int(args["num_samples"])):
        text = model.complete(
            str(args["prompt"]), int(args["max_new_tokens"]), float(args["temperature"]),
            args["top_k"] or None, args["top_p"], generator=generator,
        )
        texts.append(text)
        print(text if i == 0 else f"\n---\n{text}", flush=True)
    return texts


if __name__ == "__main__":
    main()
