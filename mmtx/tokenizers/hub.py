"""Hugging Face models reached through `transformers`, imported where used: the one offline message, and a model's
configuration (the tokenizer as an mmtx `Vocab` is `mmtx.tokenizers.text.hf_vocab`; weights: `mmtx.interop`)."""

from __future__ import annotations

from typing import Any

from mmtx.errors import MissingError, optional


def transformers_module():
    """`transformers`, or an error that says how to install it (the `pretrained` extra)."""
    return optional("transformers", "pretrained",
                    "Hugging Face models (init_from=hf:..., tokenizer.vocab.kind=hf, mmtx.export format=hf)")


def offline_error(name: str, err: Exception) -> MissingError:
    from huggingface_hub import constants

    return MissingError(
        f"init_from=hf:{name}: not found as a folder, not in the local Hugging Face cache ({constants.HF_HUB_CACHE}; "
        f"HF_HOME sets it), and it could not be downloaded ({type(err).__name__}). Download it once where there is "
        f"a network: python -c \"import transformers as t; t.AutoModel.from_pretrained('{name}'); "
        f"t.AutoTokenizer.from_pretrained('{name}')\" (then HF_HUB_OFFLINE=1 works), or save it with "
        "save_pretrained and give the folder: init_from=hf:/path/to/folder")


def auto_config(name: str) -> Any:
    """The model's configuration (AutoConfig), with the offline message when it cannot be had."""
    transformers = transformers_module()
    try:
        return transformers.AutoConfig.from_pretrained(name)
    except OSError as err:  # no such folder, not cached and no network, or not a model id
        raise offline_error(name, err) from None


def pretrained_model(class_name: str, name: str) -> Any:
    """`transformers.<class_name>.from_pretrained(name)` in float32 and in eval mode, with the offline message when
    it cannot be had (the weight families of `mmtx.interop` read their models through this)."""
    import torch

    transformers = transformers_module()
    try:
        return getattr(transformers, class_name).from_pretrained(name, dtype=torch.float32).eval()
    except OSError as err:
        raise offline_error(name, err) from None
