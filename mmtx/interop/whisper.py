"""Whisper (Hugging Face `transformers`' WhisperForConditionalGeneration) under mmtx's names, with its numbers.

Whisper is mmtx's encoder-decoder with Whisper's settings: the mel tokenizer with Whisper's front end and
positions (`tokenizer.front_end=whisper`, `tokenizer.pos_embed=whisper`, `tokenizer.stem=conv`: its two
convolutions are `stem.conv1`, `stem.conv2`), the backbone (LayerNorm eps 1e-5, exact GELU), and the text
decoder (learned positions, cross-attention, the output tied to the token embedding). Whisper's key projections
have no bias; mmtx's fused projections (`attn.qkv`, `cross_attn.kv`) have one bias vector, whose key part is
set to zeros, which computes the same thing.

`init_from=hf:openai/whisper-tiny` (mmtx.interop.registry) loads it from the Hugging Face cache with
`WhisperForConditionalGeneration.from_pretrained`; the target is Whisper's own tokenizer
(`data.tgt_vocab.kind=hf`), started by its prompt of special tokens (`data.tgt_specials`: bos
<|startoftranscript|>, prefix <|en|> <|transcribe|> <|notimestamps|>, eos <|endoftext|>). Task `whisper_finetune`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmtx.errors import ConfigError
from mmtx.interop.registry import PREFIX, register_family
from mmtx.tokenizers.hub import offline_error, transformers_module

SPECIALS = {"bos": "<|startoftranscript|>", "eos": "<|endoftext|>"}  # what data.tgt_specials must name


def _fused(parts: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    """Concatenated biases of fused projections; a projection without a bias (Whisper's keys) gives zeros."""
    return torch.cat([p if p is not None else torch.zeros_like(like) for p in parts])


def _attention(source: dict[str, torch.Tensor], theirs: str) -> dict[str, torch.Tensor]:
    """q/k/v/out projections of one Whisper attention, popped from `source`."""
    out = {}
    for name in ("q", "k", "v", "out"):
        out[name] = source.pop(f"{theirs}.{name}_proj.weight")
        out[name + "_b"] = source.pop(f"{theirs}.{name}_proj.bias", None)
    return out


def whisper_state(model: nn.Module, spec: str = "hf:whisper") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A WhisperForConditionalGeneration's weights under mmtx's names (asr's encoder-decoder), and the run
    configuration that holds them. A tensor without a place is an error naming it."""
    config = model.config
    if config.activation_function != "gelu":
        raise ConfigError(f"{spec}: activation {config.activation_function}; mmtx maps Whisper's exact GELU")
    if getattr(config, "scale_embedding", False):
        raise ConfigError(f"{spec}: scale_embedding=True (a scaled token embedding); Whisper's is unscaled")
    source = {k: v.detach() for k, v in model.state_dict().items()}
    if "proj_out.weight" in source:
        if not torch.equal(source["proj_out.weight"], source["model.decoder.embed_tokens.weight"]):
            raise ConfigError(f"{spec}: proj_out is not tied to the token embedding, as mmtx's decoder output is")
        source.pop("proj_out.weight")
    enc, dec = "model.encoder", "model.decoder"
    positions = source.pop(f"{enc}.embed_positions.weight")
    state = {PREFIX + f"tokenizer.stem.{c}.{leaf}": source.pop(f"{enc}.{c}.{leaf}")
             for c in ("conv1", "conv2") for leaf in ("weight", "bias")}
    for i in range(config.encoder_layers):
        _block(source, f"{enc}.layers.{i}", f"backbone.blocks.{i}", state, cross=False)
    state["backbone.norm.weight"] = source.pop(f"{enc}.layer_norm.weight")
    state["backbone.norm.bias"] = source.pop(f"{enc}.layer_norm.bias")
    emb = source.pop(f"{dec}.embed_tokens.weight")
    state.update({PREFIX + "decoder.embed.embed.weight": emb, PREFIX + "decoder.head.proj.weight": emb,
                  PREFIX + "decoder.embed.pos": source.pop(f"{dec}.embed_positions.weight")})
    for i in range(config.decoder_layers):
        _block(source, f"{dec}.layers.{i}", PREFIX + f"decoder.stack.blocks.{i}", state, cross=True)
    state[PREFIX + "decoder.stack.norm.weight"] = source.pop(f"{dec}.layer_norm.weight")
    state[PREFIX + "decoder.stack.norm.bias"] = source.pop(f"{dec}.layer_norm.bias")
    if source:
        raise ConfigError(f"{spec}: tensor(s) {', '.join(sorted(source)[:5])} have no place in mmtx's encoder-decoder")
    from mmtx.tokenizers.audio import whisper_sinusoids

    expected = whisper_sinusoids(positions.shape[0], positions.shape[1])
    if (positions - expected).abs().max() > 1e-4:
        raise ConfigError(f"{spec}: its encoder positions are not Whisper's sinusoids (trained ones have no place "
                          "in mmtx's tokenizer.pos_embed=whisper)")
    ffn = config.encoder_ffn_dim / config.d_model
    arch = {
        "backbone.dim": config.d_model, "backbone.depth": config.encoder_layers,
        "backbone.num_heads": config.encoder_attention_heads, "backbone.mlp_ratio": ffn, "backbone.qkv_bias": True,
        "backbone.bias": True, "backbone.rotary": False, "backbone.norm_eps": 1e-5, "backbone.activation": "gelu",
        "tokenizer._target_": "mmtx.tokenizers.MelTokenizer", "tokenizer.front_end": "whisper",
        "tokenizer.pos_embed": "whisper", "tokenizer.stem": "conv", "tokenizer.n_mels": config.num_mel_bins,
        "family.decoder.depth": config.decoder_layers, "family.decoder.num_heads": config.decoder_attention_heads,
        "family.decoder.mlp_ratio": config.decoder_ffn_dim / config.d_model, "family.pos_embed": "learned",
    }
    return {k: v.contiguous() for k, v in state.items()}, arch


def _block(source: dict[str, torch.Tensor], theirs: str, ours: str, state: dict[str, torch.Tensor],
           cross: bool) -> None:
    """One Whisper layer (pre-norm self-attention [, cross-attention], MLP) onto an mmtx Block."""
    a = _attention(source, f"{theirs}.self_attn")
    state[f"{ours}.attn.qkv.weight"] = torch.cat([a["q"], a["k"], a["v"]])
    state[f"{ours}.attn.qkv.bias"] = _fused([a["q_b"], a["k_b"], a["v_b"]], a["v_b"])
    state[f"{ours}.attn.proj.weight"], state[f"{ours}.attn.proj.bias"] = a["out"], a["out_b"]
    norms = {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"}
    if cross:
        c = _attention(source, f"{theirs}.encoder_attn")
        state[f"{ours}.cross_attn.q.weight"], state[f"{ours}.cross_attn.q.bias"] = c["q"], c["q_b"]
        state[f"{ours}.cross_attn.kv.weight"] = torch.cat([c["k"], c["v"]])
        state[f"{ours}.cross_attn.kv.bias"] = _fused([c["k_b"], c["v_b"]], c["v_b"])
        state[f"{ours}.cross_attn.proj.weight"], state[f"{ours}.cross_attn.proj.bias"] = c["out"], c["out_b"]
        norms["encoder_attn_layer_norm"] = "norm_cross"
    for their_norm, our_norm in norms.items():
        for leaf in ("weight", "bias"):
            state[f"{ours}.{our_norm}.{leaf}"] = source.pop(f"{theirs}.{their_norm}.{leaf}")
    for fc in ("fc1", "fc2"):
        for leaf in ("weight", "bias"):
            state[f"{ours}.mlp.{fc}.{leaf}"] = source.pop(f"{theirs}.{fc}.{leaf}")


@register_family("hf", "whisper", describe="a Whisper (openai/whisper-tiny, -base, -small; or a folder saved by save_pretrained)")
def load(spec: str) -> dict[str, Any]:
    """`hf:<a Whisper>` as an mmtx checkpoint (see mmtx.interop.registry.load_pretrained)."""
    name = spec.split(":", 1)[1]
    transformers = transformers_module()
    try:
        model = transformers.WhisperForConditionalGeneration.from_pretrained(name, dtype=torch.float32).eval()
        rate = transformers.WhisperFeatureExtractor.from_pretrained(name).sampling_rate
    except OSError as err:
        raise offline_error(name, err) from None
    state, arch = whisper_state(model, spec)
    arch.update({"data.source.sample_rate": rate, "data.tgt_vocab.kind": "hf", "data.tgt_vocab.name": name,
                 "data.tgt_specials.bos": SPECIALS["bos"], "data.tgt_specials.eos": SPECIALS["eos"]})
    info = {"spec": spec, "arch": arch, "mean": [], "std": [], "num_classes": None, "task": "whisper_finetune",
            "limits": {"data.max_tgt_len": model.config.max_target_positions}}
    return {"state_dict": state, "mmtx_pretrained": info}
