"""Autoregressive decoding: sampling for decoder-only models (`generate`) and batched
beam search for encoder-decoders (`beam_search`), with KV caches.

For `generate`, the model is any object with `decode(ids, caches=None, start=0) -> logits`
(B, T, V) and `new_caches(batch, max_len)`, and a `max_len` (the longest
context it was trained for), such as `mmtx.tasks.language_model.CausalLM`; for `beam_search`,
a step function and a cache factory (`mmtx.tasks.seq2seq.Seq2Seq.decode` makes them).
"""

from __future__ import annotations

from typing import Sequence

import torch


def compute_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype activations have (and KV caches need): autocast's when it is on, else the parameters'."""
    if torch.is_autocast_enabled(p.device.type):
        return torch.get_autocast_dtype(p.device.type)
    return p.dtype


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Keep the `top_k` most likely tokens and the smallest set whose probability reaches `top_p`
    (nucleus sampling, Holtzman et al., 2020); the rest get -inf. logits: (B, V)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # tokens past the nucleus (the first always stays)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits of the last position -> (B, 1) next ids; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(
    model,
    ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue each prompt in `ids` (B, T0) by up to `max_new_tokens` tokens; returns (B, T0 + new).

    With the cache, each new token costs one position. The context is the last
    `model.max_len` tokens, as without the cache: when the cache is full it is
    refilled from the last `max_len // 2` tokens (positions must stay within the
    trained range), so cached and uncached outputs agree while the whole text
    fits in `max_len`.
    """
    max_len = model.max_len
    caches, start = None, 0
    for _ in range(max_new_tokens):
        if not use_cache:
            context = ids[:, -max_len:]
            logits = model.decode(context)[:, -1]
        else:
            if caches is None or start + 1 > max_len:
                context = ids[:, -(max_len // 2 if caches is not None else max_len):]
                caches = model.new_caches(ids.shape[0], max_len)
                logits = model.decode(context, caches, 0)[:, -1]  # prefill
                start = context.shape[1]
            else:
                logits = model.decode(ids[:, -1:], caches, start)[:, -1]
                start += 1
        token = next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
        ids = torch.cat([ids, token], dim=1)
        if eos_id is not None and bool((token == eos_id).all()):
            break
    return ids


@torch.no_grad()
def beam_search(
    step,
    new_caches,
    batch: int,
    bos_id: int,
    eos_id: int,
    beam_size: int = 4,
    max_len: int = 64,
    length_penalty: float = 1.0,
    device=None,
    prefix: Sequence[int] = (),
) -> list[list[int]]:
    """Batched beam search over a cached decoder; returns the best token ids of each input (no BOS, prefix
    or EOS).

    Every hypothesis starts as BOS followed by `prefix` (forced tokens: Whisper's task prompt).
    step(ids (N, n), caches, t) -> logits (N, T, V) whose last position scores token n, for
    N = batch * beam_size rows, row b * beam_size + k being hypothesis k of input b; `ids` is the
    whole sequence so far, of which the caches hold the first t positions (a cached step feeds
    `ids[:, t:]`: the whole start at t = 0, then one new column a step). `new_caches(N)` makes the caches (each
    with `reorder`; an empty list decodes without caches). Finished hypotheses (which produced `eos_id`) stay in the beam, extended by EOS at no
    cost. Hypotheses are ranked at the end by log-probability / ((5 + length) / 6) ** length_penalty
    (GNMT, Wu et al., 2016). With beam_size=1 this is greedy decoding.
    """
    K = beam_size
    caches = new_caches(batch * K)
    start = torch.tensor([bos_id, *prefix], dtype=torch.long, device=device)
    ids = start.repeat(batch * K, 1)  # (B*K, 1 + len(prefix))
    scores = torch.full((batch, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start as one hypothesis
    finished = torch.zeros(batch * K, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * K, dtype=torch.long, device=device)
    cached = 0  # positions the caches hold
    for _ in range(max_len - len(start) + 1):  # the positions fed stay within max_len
        logp = step(ids, caches, cached)[:, -1].float().log_softmax(-1)  # (B*K, V)
        cached = ids.shape[1]
        V = logp.shape[-1]
        eos_only = torch.full_like(logp, float("-inf"))
        eos_only[:, eos_id] = 0.0
        logp = torch.where(finished[:, None], eos_only, logp)
        candidates = (scores[:, :, None] + logp.view(batch, K, V)).view(batch, K * V)
        scores, flat = candidates.topk(K, dim=-1)  # (B, K)
        origin = (flat // V + torch.arange(batch, device=device)[:, None] * K).view(-1)  # rows of B*K
        token = (flat % V).view(-1, 1)
        for cache in caches:
            cache.reorder(origin)
        ids = torch.cat([ids[origin], token], dim=1)
        lengths = lengths[origin] + (~finished[origin]).long()
        finished = finished[origin] | (token[:, 0] == eos_id)
        if bool(finished.all()):
            break
    penalty = ((5.0 + lengths.float()) / 6.0) ** length_penalty
    best = (scores.view(-1) / penalty).view(batch, K).argmax(-1)  # (B,)
    out = []
    for b in range(batch):
        row = ids[b * K + best[b], len(start):].tolist()
        out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out
