"""The transformer feed-forward layer: one dense MLP (`Mlp`), or a mixture of experts (`MixtureOfExperts`: Switch
Transformer's top-1 routing, GShard's top-2) whose experts are MLPs of the same shape, run as batched matmuls.

A block takes either (`backbone.mlp`: dense | moe, `MLPS`); `build_mlp` is the one place that picks."""

from __future__ import annotations

from typing import Annotated, Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_

from mmtx.errors import ConfigError, Count, NonNegative, Positive, Rate, integer

# The GELU of each family: the exact erf form (BERT, ViT) or GPT-2's tanh approximation (Hendrycks & Gimpel, 2016).
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}


def _gelu(activation: str) -> nn.GELU:
    if activation not in ACTIVATIONS:
        raise ConfigError(f"backbone.activation={activation!r}: one of {', '.join(ACTIVATIONS)}")
    return nn.GELU(approximate=ACTIVATIONS[activation])


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout (Vaswani et al., 2017; GELU as in ViT).

    `activation`: gelu (exact) | gelu_tanh (GPT-2's approximation, for its weights to give its numbers).
    `mask` (which tokens are real) is the mixture of experts' business; a dense MLP treats every token alike."""

    def __init__(self, dim: int, hidden_dim: int, *, dropout: float = 0.0, bias: bool = True,
                 activation: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = _gelu(activation)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class ExpertLinear(nn.Module):
    """E linear layers side by side, applied as one batched matmul: (E, C, in) -> (E, C, out).

    `weight` is (E, out, in), each expert's laid out as an `nn.Linear`'s, so a dense layer's weight is one
    expert's (sparse upcycling copies it into every expert: `mmtx.training.transfer`)."""

    def __init__(self, num_experts: int, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_dim)) if bias else None
        trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.transpose(1, 2)  # (E, out, in) -> (E, in, out): a view, bmm reads it as it lies
        if self.bias is None:
            return torch.bmm(x, weight)
        return torch.baddbmm(self.bias.unsqueeze(1), x, weight)  # (E, C, in) -> (E, C, out)


class Experts(nn.Module):
    """The experts' MLPs (each `Mlp`'s shape), all at once: (E, C, D) -> (E, C, D)."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, *, dropout: float = 0.0, bias: bool = True,
                 activation: str = "gelu") -> None:
        super().__init__()
        self.fc1 = ExpertLinear(num_experts, dim, hidden_dim, bias)
        self.act = _gelu(activation)
        self.fc2 = ExpertLinear(num_experts, hidden_dim, dim, bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class MoeSpec:
    """`backbone.moe`: the mixture of experts a `backbone.mlp=moe` backbone puts in every `every_n_blocks`-th block
    (the 2nd, 4th, ...: Switch Transformer's every other layer, Fedus et al., 2022).

    num_experts           experts per MoE layer
    top_k                 experts a token goes to: 1 (Switch), 2 (GShard, Lepikhin et al., 2021; gates renormalised)
    capacity_factor       slots per expert, as a multiple of an even share (tokens x top_k / num_experts), in
                          training; a token past its expert's capacity is dropped (the residual carries it on)
    eval_capacity_factor  the same at validation, test and generation (Switch evaluates with 2.0)
    every_n_blocks        1: every block's MLP is a mixture; 2: every other block's
    router_jitter         multiplicative noise on the router's input in training, uniform in [1 - eps, 1 + eps]
    aux_loss_weight       the load-balancing loss's weight (Switch: 0.01)
    z_loss_weight         the router z-loss's weight (ST-MoE, Zoph et al., 2022: 0.001)
    """

    def __init__(self, num_experts: Annotated[int, integer(2)] = 8, top_k: Count = 1, capacity_factor: Positive = 1.25,
                 eval_capacity_factor: Positive = 2.0, every_n_blocks: Count = 2, router_jitter: Rate = 0.0,
                 aux_loss_weight: NonNegative = 0.01, z_loss_weight: NonNegative = 0.001) -> None:
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ConfigError(f"backbone.moe.top_k={top_k} must be a whole number from 1 to "
                              f"backbone.moe.num_experts={num_experts}")
        for key, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if not value > 0:
                raise ConfigError(f"backbone.moe.{key}={value} must be > 0 (1.0: an even share of the tokens for "
                                  "each expert; Switch trains with 1.0-1.25)")
        self.num_experts, self.top_k, self.every_n_blocks = num_experts, top_k, every_n_blocks
        self.capacity_factor, self.eval_capacity_factor = float(capacity_factor), float(eval_capacity_factor)
        self.router_jitter = float(router_jitter)
        self.aux_loss_weight, self.z_loss_weight = float(aux_loss_weight), float(z_loss_weight)

    def is_moe_block(self, index: int) -> bool:
        return (index + 1) % self.every_n_blocks == 0

    def check_depth(self, depth: int, key: str = "backbone.depth") -> None:
        if depth % self.every_n_blocks:
            raise ConfigError(f"backbone.moe.every_n_blocks={self.every_n_blocks} does not divide {key}={depth}: "
                              "the blocks with experts would not repeat evenly; pick a divisor of the depth "
                              "(backbone.moe.every_n_blocks=1 puts experts in every block)")


class MixtureOfExperts(nn.Module):
    """A router and `num_experts` expert MLPs; each token goes to its `top_k` experts (Switch Transformer, Fedus et
    al., 2022; GShard, Lepikhin et al., 2021), scaled by the router's probability.

    Dispatch is by slot, with no loop over tokens or experts: every expert has `capacity` slots (the capacity factor
    times an even share); a token's choices fill them in order, all first choices before any second (GShard), and a
    choice past its expert's capacity is dropped: that token's MLP output is zero there and the residual stream
    carries it on. The experts run as two batched matmuls over (E, capacity, D). Padding (`mask` False) is routed
    nowhere and counted nowhere. The capacity is a whole number computed from the shapes alone: no host sync.

    Each call adds its router losses and load counts to `record` (`mmtx.training.experts.ExpertLog.take` takes them
    after each forward): the load-balancing loss E * sum_e f_e P_e (f_e: the fraction of choices routed to expert e,
    P_e: its mean router probability) and the z-loss mean(logsumexp(logits)^2), already weighted, for the task's
    loss; and (detached) the counts for the logs.
    """

    def __init__(self, dim: int, hidden_dim: int, spec: MoeSpec, *, dropout: float = 0.0, bias: bool = True,
                 activation: str = "gelu") -> None:
        super().__init__()
        self.spec = spec
        self.num_experts, self.top_k = spec.num_experts, spec.top_k
        self.router = nn.Linear(dim, spec.num_experts, bias=False)
        self.experts = Experts(spec.num_experts, dim, hidden_dim, dropout=dropout, bias=bias, activation=activation)
        self.record: dict[str, torch.Tensor] | None = None

    @property
    def fc2(self) -> ExpertLinear:
        """Every expert's output projection, as a dense `Mlp`'s `fc2` (a residual projection, re-drawn by
        `scale_residual_init`)."""
        return self.experts.fc2

    def capacity(self, tokens: int) -> int:
        factor = self.spec.capacity_factor if self.training else self.spec.eval_capacity_factor
        per_mille = round(factor * 1000)  # whole numbers only, so a symbolic token count stays one (torch.compile)
        return max(1, -(-(tokens * self.top_k * per_mille) // (self.num_experts * 1000)))

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits (N, E), in float32 whatever the autocast (Switch's selective precision)."""
        if self.training and self.spec.router_jitter > 0:
            eps = self.spec.router_jitter
            x = x * torch.empty_like(x).uniform_(1 - eps, 1 + eps)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.router.weight.float())

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        E, k = self.num_experts, self.top_k
        flat = x.reshape(B * T, D)  # (B, T, D) -> (N, D)
        N = flat.shape[0]
        real = None if mask is None else mask[:, -T:].reshape(N)  # a decoder's cached keys come first in its mask
        logits = self.route(flat)  # (N, E)
        probs = logits.softmax(dim=-1)
        gate, expert = probs.topk(k, dim=-1)  # (N, k)
        if k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        choice = F.one_hot(expert, E)  # (N, k, E)
        if real is not None:
            choice = choice * real[:, None, None]
        # Slots in order of priority: every token's first choice, then every second choice.
        order = choice.transpose(0, 1).reshape(k * N, E)  # (N, k, E) -> (k N, E)
        position = (order.cumsum(dim=0) - 1).reshape(k, N, E).transpose(0, 1)  # -> (N, k, E)
        position = (position * choice).sum(dim=-1)  # (N, k): the slot each choice takes in its expert
        capacity = self.capacity(N)
        kept = choice.sum(dim=-1).bool() & (position < capacity)  # (N, k)
        # Each kept choice's slot in the (E * capacity) buffer; a dropped one a spare slot of its own, past the end.
        spare = E * capacity + torch.arange(N * k, device=x.device).reshape(N, k)
        slot = torch.where(kept, expert * capacity + position, spare)  # (N, k)
        # Which token fills each slot (N: the zero row, for an empty slot).
        token = torch.arange(N, device=x.device)[:, None].expand(N, k)
        owner = torch.full((E * capacity + N * k,), N, dtype=torch.long, device=x.device)
        owner = owner.scatter(0, slot.reshape(-1), token.reshape(-1))[: E * capacity]
        padded = torch.cat([flat, flat.new_zeros(1, D)])  # (N + 1, D)
        out = self.experts(padded.index_select(0, owner).reshape(E, capacity, D))  # (E, C, D)
        out = torch.cat([out.reshape(E * capacity, D), out.new_zeros(1, D)])  # (E C + 1, D): the last row is zero
        slot = torch.where(kept, slot, E * capacity)
        y = out.index_select(0, slot.reshape(-1)).reshape(N, k, D)  # each choice's expert output
        y = (y * gate.unsqueeze(-1).to(out.dtype)).sum(dim=1)  # (N, k, D) -> (N, D)
        self._add_record(logits, probs, choice, kept, real)
        return y.reshape(B, T, D)

    def _add_record(self, logits, probs, choice, kept, real) -> None:
        """Add this call's weighted router losses and its load counts to `record` (summed over calls until taken)."""
        counts = choice.sum(dim=(0, 1)).float()  # (E,): choices routed to each expert, before capacity
        assigned = counts.sum()
        weight = torch.ones_like(probs[:, 0]) if real is None else real.float()  # (N,)
        tokens = weight.sum().clamp(min=1)
        mean_prob = (probs * weight[:, None]).sum(dim=0) / tokens  # (E,)
        balance = self.num_experts * (counts / assigned.clamp(min=1) * mean_prob).sum()
        z = (logits.logsumexp(dim=-1).square() * weight).sum() / tokens
        loss = self.spec.aux_loss_weight * balance + self.spec.z_loss_weight * z
        stats = torch.cat([torch.stack([torch.ones_like(z), balance, z, assigned, kept.sum().float()]), counts])
        record = self.record
        if record is None:
            self.record = {"loss": loss, "stats": stats.detach()}
        else:
            self.record = {"loss": record["loss"] + loss, "stats": record["stats"] + stats.detach()}


# The columns of a record's stats, then one count per expert.
STATS = ("calls", "balance_loss", "z_loss", "assigned", "kept")

MLPS = ("dense", "moe")  # backbone.mlp


def build_mlp(mlp: str, moe: MoeSpec | None, index: int, dim: int, hidden_dim: int, *, dropout: float, bias: bool,
              activation: str) -> nn.Module:
    """Block `index`'s MLP: dense, or (`mlp=moe`) a mixture of experts where `moe.every_n_blocks` puts one."""
    if mlp == "moe" and moe is not None and moe.is_moe_block(index):
        return MixtureOfExperts(dim, hidden_dim, moe, dropout=dropout, bias=bias, activation=activation)
    return Mlp(dim, hidden_dim, dropout=dropout, bias=bias, activation=activation)


def moe_spec(mlp: str, moe: Mapping[str, Any] | MoeSpec | None) -> MoeSpec | None:
    """`backbone.moe` as a `MoeSpec` when `backbone.mlp=moe` (None for a dense backbone)."""
    if mlp not in MLPS:
        raise ConfigError(f"backbone.mlp={mlp!r} must be one of {', '.join(MLPS)}")
    if mlp == "dense":
        return None
    if isinstance(moe, MoeSpec):
        return moe
    return MoeSpec(**dict(moe or {}))


def moe_layers(module: nn.Module) -> list[tuple[str, MixtureOfExperts]]:
    """(name, layer) of every mixture of experts in `module`, in order."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, MixtureOfExperts)]


def active_parameters(module: nn.Module) -> int:
    """Parameters a token meets: all of them, less the experts a token is not routed to ((E - k) / E of each
    mixture's experts). FLOPs per token and MFU count these (Switch counts FLOPs per token the same way)."""
    total = sum(p.numel() for p in module.parameters())
    for _, layer in moe_layers(module):
        experts = sum(p.numel() for p in layer.experts.parameters())
        total -= experts * (layer.num_experts - layer.top_k) // layer.num_experts
    return total
