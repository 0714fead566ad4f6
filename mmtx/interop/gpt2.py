"""GPT-2 (Hugging Face `transformers`) and mmtx's language model, both ways, with the same numbers.

In, `init_from=hf:<id or folder>` (mmtx.interop.registry): `GPT2LMHeadModel.from_pretrained` fetches the weights
through the Hugging Face hub cache (`HF_HOME`), and they map onto `TokenEmbedding` + the causal `Backbone` + the
tied output layer: `wte` is the token embedding (and, tied, the output), `wpe` the learned positions (its first
`data.block_size` rows when the run's context is shorter), each `h.<i>` a pre-norm block (GPT-2's `Conv1D`
weights are (in, out): transposed into `nn.Linear`'s (out, in)), `ln_f` the backbone's final norm; the backbone
takes GPT-2's LayerNorm epsilon (1e-5) and tanh-approximated GELU (`backbone.norm_eps`, `backbone.activation`).
The model's own tokenizer becomes the run's vocabulary (`tokenizer.vocab.kind=hf`), saved with the run and its
checkpoints like any other.

Out, `python -m mmtx.export ckpt=... format=hf`: an mmtx language model of GPT-2's shape (learned positions, biases,
no rotary positions) as a folder `transformers.AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtx.errors import CheckpointError, ConfigError
from mmtx.interop.registry import PREFIX, register_family
from mmtx.tokenizers.hub import pretrained_model, transformers_module

# GPT-2's activation_function values and the backbone.activation that computes the same numbers
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# GPT-2's Conv1D layers and LayerNorms of a block, and mmtx's Block modules that hold them
LINEARS = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
NORMS = {"ln_1": "norm1", "ln_2": "norm2"}
SUPPORTED = "hf:<a GPT-2 model, e.g. gpt2, gpt2-medium, distilgpt2, or a folder saved by save_pretrained>"


def gpt2_state(model: nn.Module, spec: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """A GPT2LMHeadModel's weights under mmtx's names, the run configuration that holds them, and its number of
    positions. A setting mmtx's backbone does not compute, or a tensor without a place, is an error naming it."""
    config = model.config
    name = spec.split(":", 1)[1]
    unsupported = {
        f"activation_function={config.activation_function}": config.activation_function not in ACTIVATIONS,
        "scale_attn_by_inverse_layer_idx": config.scale_attn_by_inverse_layer_idx,
        "scale_attn_weights=False": not config.scale_attn_weights,
        "add_cross_attention": config.add_cross_attention,
        "untied lm_head": not torch.equal(model.lm_head.weight, model.transformer.wte.weight),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(f"init_from={spec}: this GPT-2 has {', '.join(bad)}, which mmtx's backbone does not "
                          f"compute; it maps {SUPPORTED}")
    source = {k: v.detach() for k, v in model.state_dict().items()}
    source.pop("lm_head.weight")  # tied to wte (checked above)
    wte = source.pop("transformer.wte.weight")
    state = {PREFIX + "tokenizer.embed.weight": wte, PREFIX + "head.proj.weight": wte,
             PREFIX + "tokenizer.pos": source.pop("transformer.wpe.weight")}
    for i in range(config.n_layer):
        for theirs, ours in LINEARS.items():
            state[f"backbone.blocks.{i}.{ours}.weight"] = source.pop(f"transformer.h.{i}.{theirs}.weight").t()
            state[f"backbone.blocks.{i}.{ours}.bias"] = source.pop(f"transformer.h.{i}.{theirs}.bias")
        for theirs, ours in NORMS.items():
            for leaf in ("weight", "bias"):
                state[f"backbone.blocks.{i}.{ours}.{leaf}"] = source.pop(f"transformer.h.{i}.{theirs}.{leaf}")
    for leaf in ("weight", "bias"):
        state[f"backbone.norm.{leaf}"] = source.pop(f"transformer.ln_f.{leaf}")
    if source:
        raise ConfigError(f"init_from={spec}: tensor(s) {', '.join(sorted(source)[:5])} have no place in mmtx's "
                          f"language model; it maps {SUPPORTED}")
    return {k: v.contiguous() for k, v in state.items()}, gpt2_arch(config, name), config.n_positions


def gpt2_arch(config: Any, name: str) -> dict[str, Any]:
    """The run configuration (dotted keys) whose model holds the weights of a GPT-2 of `config`."""
    return {
        "backbone.dim": config.n_embd, "backbone.depth": config.n_layer, "backbone.num_heads": config.n_head,
        "backbone.mlp_ratio": (config.n_inner or 4 * config.n_embd) / config.n_embd, "backbone.qkv_bias": True,
        "backbone.bias": True, "backbone.rotary": False, "backbone.norm_eps": config.layer_norm_epsilon,
        "backbone.activation": ACTIVATIONS[config.activation_function],
        "tokenizer._target_": "mmtx.tokenizers.TokenEmbedding", "tokenizer.pos_embed": "learned",
        "tokenizer.vocab.kind": "hf", "tokenizer.vocab.name": name, "family._target_": "mmtx.tasks.LanguageModel",
    }


@register_family("hf", "gpt2", describe="a GPT-2 (gpt2, gpt2-medium, distilgpt2, ...; or a folder saved by save_pretrained)")
def load(spec: str) -> dict[str, Any]:
    """`hf:<name>` as an mmtx checkpoint (see mmtx.interop.registry.load_pretrained)."""
    model = pretrained_model("GPT2LMHeadModel", spec.split(":", 1)[1])
    state, arch, positions = gpt2_state(model, spec)
    info = {"spec": spec, "arch": arch, "mean": [], "std": [], "num_classes": None,
            "limits": {"data.block_size": positions}, "task": "gpt2_finetune"}
    return {"state_dict": state, "mmtx_pretrained": info}


# -- out: format=hf ---------------------------------------------------------------------------------


def hf_config(checkpoint: dict[str, Any], source: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """One member's mmtx language model (`mmtx.checkpoints.io.member_view`) as a GPT2Config and GPT2LMHeadModel's
    state dict; what GPT-2 cannot express (rotary or no positions, no biases) is an error naming the key."""
    transformers = transformers_module()

    cfg = checkpoint.get("mmtx_config") or {}
    if not str((cfg.get("family") or {}).get("_target_", "")).endswith("LanguageModel"):
        raise ConfigError(f"format=hf writes a language model (GPT-2's shape); {source} is a "
                          f"{cfg.get('task_name')} checkpoint: use format=safetensors")
    bb = cfg["backbone"]
    wrong = {"backbone.rotary": (bb.get("rotary"), False), "backbone.bias": (bb.get("bias"), True),
             "backbone.qkv_bias": (bb.get("qkv_bias"), True), "backbone.mlp": (bb.get("mlp", "dense"), "dense"),
             "tokenizer.pos_embed": ((cfg.get("tokenizer") or {}).get("pos_embed"), "learned")}
    wrong = {k: v for k, v in wrong.items() if v[0] != v[1]}
    if wrong:
        found = ", ".join(f"{k}={have}" for k, (have, _) in wrong.items())
        need = " ".join(f"{k}={want}" for k, (_, want) in wrong.items())
        raise ConfigError(f"format=hf: {source} has {found}, which GPT-2 cannot express (it needs {need}); export "
                          "it with format=safetensors, or train with those settings")
    state = checkpoint["state_dict"]
    wte, wpe = state[PREFIX + "tokenizer.embed.weight"], state[PREFIX + "tokenizer.pos"]
    dim, depth = int(bb["dim"]), int(bb["depth"])
    vocab = checkpoint.get("mmtx_vocab")
    eos = None
    if vocab:
        from mmtx.tokenizers.text import Vocab

        eos = Vocab.from_json(vocab).token_id("<|endoftext|>")
    config = transformers.GPT2Config(
        vocab_size=wte.shape[0], n_positions=wpe.shape[0], n_embd=dim, n_layer=depth, n_head=int(bb["num_heads"]),
        n_inner=state["backbone.blocks.0.mlp.fc1.weight"].shape[0],
        activation_function={"gelu_tanh": "gelu_new", "gelu": "gelu"}[bb.get("activation", "gelu")],
        layer_norm_epsilon=float(bb.get("norm_eps", 1e-6)), resid_pdrop=float(bb.get("dropout", 0.0)),
        embd_pdrop=float((cfg.get("tokenizer") or {}).get("dropout", 0.0)), attn_pdrop=float(bb.get("attn_dropout", 0.0)),
        bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True)
    out = {"transformer.wte.weight": wte, "transformer.wpe.weight": wpe, "lm_head.weight": wte,
           "transformer.ln_f.weight": state["backbone.norm.weight"], "transformer.ln_f.bias": state["backbone.norm.bias"]}
    for i in range(depth):
        for theirs, ours in LINEARS.items():
            out[f"transformer.h.{i}.{theirs}.weight"] = state[f"backbone.blocks.{i}.{ours}.weight"].t()
            out[f"transformer.h.{i}.{theirs}.bias"] = state[f"backbone.blocks.{i}.{ours}.bias"]
        for theirs, ours in NORMS.items():
            for leaf in ("weight", "bias"):
                out[f"transformer.h.{i}.{theirs}.{leaf}"] = state[f"backbone.blocks.{i}.{ours}.{leaf}"]
    return config, out


def save_hf(checkpoint: dict[str, Any], folder: Path, source: str) -> None:
    """Write `checkpoint`'s language model into `folder` as GPT2LMHeadModel.save_pretrained and its tokenizer as
    PreTrainedTokenizerFast.save_pretrained do."""
    transformers = transformers_module()

    config, state = hf_config(checkpoint, source)
    model = transformers.GPT2LMHeadModel(config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith(".attn.bias")]  # a causal-mask buffer in older versions
    if missing or unexpected:
        raise CheckpointError(f"format=hf: {source} does not fill GPT-2 ({', '.join([*missing, *unexpected][:5])})")
    model.save_pretrained(folder)
    vocab = checkpoint.get("mmtx_vocab")
    if vocab:
        from tokenizers import Tokenizer

        eos = "<|endoftext|>" if config.eos_token_id is not None else None
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(vocab), eos_token=eos,
                                                         bos_token=eos, model_max_length=config.n_positions)
        tokenizer.save_pretrained(folder)
