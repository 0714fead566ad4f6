"""Access to Hugging Face models for mmtx.gpt2 and mmtx.whisper: `transformers` imported where used, one offline
message, a model's configuration and its tokenizer as an mmtx `Vocab`."""

from __future__ import annotations

from typing import Any

from mmtx.errors import ConfigError, MissingError, optional

SUPPORTED = ("hf:<a GPT-2 (gpt2, gpt2-medium, distilgpt2, ...) or a Whisper (openai/whisper-tiny, -base, -small), "
             "or a folder saved by save_pretrained>")


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


def load(spec: str) -> dict[str, Any]:
    """`hf:<name>` as an mmtx checkpoint, by its architecture (mmtx.gpt2, mmtx.whisper)."""
    name = spec.split(":", 1)[1]
    model_type = auto_config(name).model_type
    if model_type == "gpt2":
        from mmtx.gpt2 import load as load_gpt2

        return load_gpt2(spec)
    if model_type == "whisper":
        from mmtx.whisper import load as load_whisper

        return load_whisper(spec)
    raise ConfigError(f"init_from={spec} is a {model_type} model; this mmtx maps Hugging Face {SUPPORTED} "
                      "(and timm:<a Vision Transformer>)")


def hf_vocab(name: str):
    """The tokenizer of Hugging Face model `name` (an id or a folder) as an mmtx `Vocab`."""
    from mmtx.tokenizers.text import Vocab

    transformers = transformers_module()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    except OSError as err:
        raise offline_error(name, err) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"tokenizer.vocab.name={name}: its tokenizer has no `tokenizers` (fast) form")
    return Vocab.from_json(tokenizer.backend_tokenizer.to_str())
