"""BERT (Hugging Face `transformers`) as mmtx's masked text model, with the same numbers.

`init_from=hf:<id or folder>` of a BERT (`model_type: bert`; mmtx.interop.registry) maps `BertForMaskedLM` onto
`TokenEmbedding` (word embeddings; the position table with the first token type's embedding added, since a run
has one segment; the embeddings' LayerNorm: `tokenizer.norm`), a backbone of post-norm blocks
(`backbone.block=post`: the query, key and value projections stacked into one; no final norm) and the masked
family's head (BERT's transform: dense, GELU, LayerNorm; the tied embedding and its bias). The model's WordPiece
tokenizer, with its `[MASK]`, becomes the run's vocabulary. What the run's configuration must be is taken from the
weights (`backbone.*`, `tokenizer.*`).
"""

from __future__ import annotations

from typing import Any

import torch

from mmtx.errors import ConfigError
from mmtx.interop.registry import PREFIX, register_family
from mmtx.tokenizers.hub import pretrained_model

SUPPORTED = "hf:<a BERT, e.g. bert-base-uncased, or a folder saved by save_pretrained>"
# A BERT layer's modules and the mmtx post-norm block's that hold them (the query, key and value apart)
LINEARS = {"attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
NORMS = {"attention.output.LayerNorm": "norm1", "output.LayerNorm": "norm2"}


def bert_state(model: Any, spec: str) -> dict[str, torch.Tensor]:
    """A BertForMaskedLM's (or BertModel's) weights under mmtx's names; a tensor without a place is an error."""
    config = model.config
    unsupported = {f"hidden_act={config.hidden_act}": config.hidden_act != "gelu",
                   f"position_embedding_type={getattr(config, 'position_embedding_type', 'absolute')}":
                       getattr(config, "position_embedding_type", "absolute") != "absolute",
                   "is_decoder": config.is_decoder}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(f"init_from={spec}: this BERT has {', '.join(bad)}, which mmtx does not compute; it maps "
                          f"{SUPPORTED}")
    source = {k.removeprefix("bert."): v.detach() for k, v in model.state_dict().items()}
    source = {k: v for k, v in source.items() if not k.startswith("pooler.") and not k.endswith("position_ids")
              and not k.endswith("token_type_ids")}
    emb = "embeddings."
    state = {PREFIX + "tokenizer.embed.weight": source.pop(emb + "word_embeddings.weight"),
             PREFIX + "tokenizer.pos": source.pop(emb + "position_embeddings.weight")
             + source.pop(emb + "token_type_embeddings.weight")[0]}
    for leaf in ("weight", "bias"):
        state[PREFIX + f"tokenizer.norm.{leaf}"] = source.pop(f"{emb}LayerNorm.{leaf}")
    for i in range(config.num_hidden_layers):
        layer, block = f"encoder.layer.{i}.", f"backbone.blocks.{i}."
        for leaf in ("weight", "bias"):
            state[f"{block}attn.qkv.{leaf}"] = torch.cat(
                [source.pop(f"{layer}attention.self.{p}.{leaf}") for p in ("query", "key", "value")])
            for theirs, ours in {**LINEARS, **NORMS}.items():
                state[f"{block}{ours}.{leaf}"] = source.pop(f"{layer}{theirs}.{leaf}")
    head = "cls.predictions."
    if head + "bias" in source:  # the masked-LM head (absent from a bare BertModel: trained anew)
        state[PREFIX + "head_bias"] = source.pop(head + "bias")
        source.pop(head + "decoder.weight", None)  # tied to the word embeddings
        source.pop(head + "decoder.bias", None)  # the same tensor as cls.predictions.bias
        for theirs, ours in (("transform.dense", "transform.0"), ("transform.LayerNorm", "transform.2")):
            for leaf in ("weight", "bias"):
                state[f"{PREFIX}{ours}.{leaf}"] = source.pop(f"{head}{theirs}.{leaf}")
    if source:
        raise ConfigError(f"init_from={spec}: tensor(s) {', '.join(sorted(source)[:5])} have no place in mmtx's "
                          f"masked text model; it maps {SUPPORTED}")
    return {k: v.contiguous() for k, v in state.items()}


def bert_arch(config: Any, name: str) -> dict[str, Any]:
    """The run configuration (dotted keys) whose model holds the weights of a BERT of `config`."""
    return {
        "backbone.dim": config.hidden_size, "backbone.depth": config.num_hidden_layers,
        "backbone.num_heads": config.num_attention_heads,
        "backbone.mlp_ratio": config.intermediate_size / config.hidden_size, "backbone.qkv_bias": True,
        "backbone.bias": True, "backbone.rotary": False, "backbone.norm_eps": config.layer_norm_eps,
        "backbone.activation": "gelu", "backbone.block": "post",
        "tokenizer._target_": "mmtx.tokenizers.TokenEmbedding", "tokenizer.pos_embed": "learned",
        "tokenizer.norm": True, "tokenizer.norm_eps": config.layer_norm_eps, "tokenizer.vocab.kind": "hf",
        "tokenizer.vocab.name": name, "family._target_": "mmtx.tasks.Masked",
    }


@register_family("hf", "bert", describe="a BERT (bert-base-uncased, ...; or a folder saved by save_pretrained)")
def load(spec: str) -> dict[str, Any]:
    """`hf:<name>` as an mmtx checkpoint (see mmtx.interop.registry.load_pretrained)."""
    name = spec.split(":", 1)[1]
    model = pretrained_model("BertForMaskedLM", name)
    info = {"spec": spec, "arch": bert_arch(model.config, name), "mean": [], "std": [], "num_classes": None,
            "limits": {"data.block_size": model.config.max_position_embeddings}, "task": "bert_shakespeare"}
    return {"state_dict": bert_state(model, spec), "mmtx_pretrained": info}
