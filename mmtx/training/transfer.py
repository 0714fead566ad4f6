"""Transfer between tasks: `init_from=PATH` starts a new run from the matching weights of any mmtx checkpoint
(single-task or co-trained), and `finetune.*` freezes parts and sets the learning rate of new ones.

Unlike `resume`, which continues the same run (weights, optimizer, schedule, data order), `init_from` takes
weights only: matched by name and shape, the backbone always, the tokenizer and task part where the two runs
have the same ones (an `audio_fsdd` classifier's mel tokenizer and backbone start an `asr_fsdd`
encoder-decoder; its classifier head has no place there). One table says what was loaded, what was skipped
(a name found with another shape) and what is newly initialised; it is printed and saved as
`<run>/init_from.tsv`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtx.checkpoints.io import cotrained, load_checkpoint, member_view
from mmtx.errors import ConfigError
from mmtx.files import atomic_write_text, tsv_text
from mmtx.interop.registry import is_pretrained, load_pretrained

log = logging.getLogger(__name__)

FREEZABLE = ("backbone", "tokenizer", "head")


def init_from(model: nn.Module, path: str | Path, member: str | None = None,
              preloaded: dict[str, Any] | None = None, merge_experts: bool = False) -> dict[str, list]:
    """Copy the weights of checkpoint `path` that match `model` by name and shape into it; return
    {"loaded": [parameter names], "skipped": [(name, source shape, target shape)], "new": [parameter names],
    "resampled": [(name, source shape, target shape)] (loaded after its module's `adapt_loaded`),
    "unused": [checkpoint names with no tensor of that name here], "upcycled": [parameter names],
    "merged": [parameter names]}.

    Between a dense MLP and a mixture of experts (`backbone.mlp=moe`): a dense checkpoint starts every expert of
    a mixture as a copy of the MLP it replaces, its router new (sparse upcycling, Komatsuzaki et al., 2023); a
    mixture's checkpoint starts a dense model only with `merge_experts` (`finetune.merge_experts`: each MLP the
    mean of its experts, an approximation), else it is an error naming the expert tensors.

    `path` may also be `timm:<name>` or `hf:<name>` (mmtx.interop.registry; `preloaded`: those weights, loaded already). A co-trained
    checkpoint gives its backbone, and the task part of `member` (to every task part of a
    single-task `model`); without `member`, a co-trained `model` takes each of its members' parts from the
    checkpoint's member of the same name. Nothing matching at all is an error: a wrong checkpoint must not
    start a silently random model.
    """
    checkpoint, same_members = _source(model, path, member, preloaded)
    for part in getattr(model, "tasks", {}).values():  # a part whose tokens mean something only with its own table
        check = getattr(part, "check_transfer", None)
        if check is not None:
            check(checkpoint, path)
    source = checkpoint["state_dict"]
    target = model.state_dict()
    loaded, skipped, new, resampled, used = [], [], [], [], set()
    experts: dict[str, list[str]] = {"upcycled": [], "merged": []}
    with torch.no_grad():
        for name, tensor in target.items():
            key = name if same_members or not name.startswith("tasks.") else "tasks.main." + name.split(".", 2)[2]
            found = source.get(key)
            if found is None:
                found, how, key = _between_experts(key, tensor, source, merge_experts, path)
                if how:
                    experts[how].append(name)
            if found is not None:
                # A module that can take another shape of its tensor (ViT positions of another grid) adapts it,
                # given the checkpoint's names under it; one whose rows stand for named things (a fused tokenizer's
                # segment rows, one per field) lists them in `adapts_by_name` and maps them even at the same shape.
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner) if owner else model
                adapt = getattr(module, "adapt_loaded", None)
                same = tuple(found.shape) == tuple(tensor.shape)
                if adapt is not None and (not same or leaf in getattr(module, "adapts_by_name", ())):
                    prefix = key[:len(key) - len(leaf)]  # the owner's name in the checkpoint, with its dot
                    adapted = adapt(leaf, found, source_keys=[k[len(prefix):] for k in source if k.startswith(prefix)])
                    if adapted is not None and tuple(adapted.shape) == tuple(tensor.shape) and \
                            not (same and torch.equal(adapted, found)):
                        resampled.append((name, tuple(found.shape), tuple(tensor.shape)))
                        found = adapted
            if found is None:
                new.append(name)
            elif tuple(found.shape) != tuple(tensor.shape):
                skipped.append((name, tuple(found.shape), tuple(tensor.shape)))
                used.add(key)  # listed as skipped, not again as unused
            else:
                tensor.copy_(found.to(tensor.dtype))
                loaded.append(name)
                used.add(key)
    # One state dict holds parameters and buffers; buffers (a mel filterbank) are copied with their module, but
    # the table and the "nothing matched" check count parameters only: a buffer matches any model.
    params = {n for n, _ in model.named_parameters()}
    loaded, new = [n for n in loaded if n in params], [n for n in new if n in params]
    if not loaded:
        raise ConfigError(f"init_from checkpoint {path} has no tensor that matches this model by name and shape "
                          f"({len(source)} tensors there, {len(target)} here): is it a checkpoint of a model with "
                          "this backbone (backbone.dim, backbone.depth)?")
    return {"loaded": loaded, "skipped": skipped, "new": new, "resampled": resampled,
            "unused": sorted(k for k in source if k not in used), **experts}


def _between_experts(key: str, tensor: torch.Tensor, source: dict[str, torch.Tensor], merge: bool,
                     path: str | Path) -> tuple[torch.Tensor | None, str | None, str]:
    """(the tensor for `key` made from a dense MLP's or a mixture's experts' in `source`, "upcycled" | "merged" |
    None, the source key it came from): an expert tensor (..mlp.experts.fc1.weight, (E, H, D)) from the dense
    one (..mlp.fc1.weight, (H, D)), copied into every expert; a dense one from the experts', averaged."""
    if ".experts." in key:
        dense = key.replace(".experts.", ".", 1)
        found = source.get(dense)
        if found is not None and tuple(found.shape) == tuple(tensor.shape[1:]):
            return found.unsqueeze(0).expand(tensor.shape), "upcycled", dense
        return None, None, key
    owner, _, leaf = key.rpartition(".")
    mixed = f"{owner.rpartition('.')[0]}.experts.{owner.rpartition('.')[2]}.{leaf}" if owner else ""
    found = source.get(mixed)
    if found is None or tuple(found.shape[1:]) != tuple(tensor.shape):
        return None, None, key
    if not merge:
        raise ConfigError(f"init_from checkpoint {path} has a mixture of experts where this model has a dense MLP: "
                          f"{mixed} {list(found.shape)} (and the layer's other expert tensors) has no dense "
                          f"{key}. Start a model with the same experts (backbone.mlp=moe), or set "
                          "finetune.merge_experts=true to start each MLP as the mean of its experts")
    return found.float().mean(dim=0).to(found.dtype), "merged", mixed


def _source(model: nn.Module, path: str | Path, member: str | None, preloaded: dict[str, Any] | None):
    """(the checkpoint `init_from` copies from (its `state_dict`), whether its task parts are matched to the model's
    by member name)."""
    if preloaded is not None:  # already loaded (pretrained weights of another library: mmtx.interop)
        checkpoint = preloaded
    elif is_pretrained(path):
        checkpoint = load_pretrained(str(path))
    else:
        checkpoint = load_checkpoint(path)
    several = cotrained(checkpoint)
    if several and member is not None:
        checkpoint = member_view(checkpoint, member, path)
    elif member is not None:
        raise ConfigError(f"finetune.member={member}: init_from checkpoint {path} is of a single-task run; leave "
                          "finetune.member out")
    elif several and not set(getattr(model, "tasks", {})) & set(checkpoint["mmtx_members"]):
        raise ConfigError(f"init_from checkpoint {path} is a co-training run of members "
                          f"{', '.join(checkpoint['mmtx_members'])}: pick the one whose task part this run starts "
                          "from with finetune.member=NAME")
    return checkpoint, several and member is None


def report(result: dict[str, Any], path: str | Path, run_dir: Path | None) -> str:
    """The table of `init_from`: one line per tensor (status, name, shapes), after a summary line; saved as
    `<run_dir>/init_from.tsv` and the summary logged."""
    loaded = result["loaded"]
    rows = [["status", "name", "checkpoint shape", "model shape"]]
    adapted = {n: (a, b) for n, a, b in result.get("resampled", [])}
    rows += [["resampled", n, list(adapted[n][0]), list(adapted[n][1])] if n in adapted else ["loaded", n, "", ""]
             for n in loaded]
    rows += [["skipped", n, list(a), list(b)] for n, a, b in result["skipped"]]
    rows += [["new", n, "", ""] for n in result["new"]]
    rows += [["unused", n, "", ""] for n in result["unused"]]
    how = {n: status for status in ("upcycled", "merged") for n in result.get(status, [])}
    rows = [[how.get(r[1], r[0]), *r[1:]] if r[0] == "loaded" else r for r in rows]
    summary = (f"init_from {path}: loaded {len(loaded)} parameter tensors, skipped {len(result['skipped'])} "
               f"(another shape), newly initialised {len(result['new'])}, unused in the checkpoint "
               f"{len(result['unused'])}")
    if result.get("upcycled"):
        summary += f"; of those loaded, {len(result['upcycled'])} upcycled (every expert a copy of the dense MLP)"
    if result.get("merged"):
        summary += f"; of those loaded, {len(result['merged'])} merged (each dense MLP the mean of its experts)"
    if run_dir is not None:
        atomic_write_text(Path(run_dir) / "init_from.tsv", tsv_text(rows))
        summary += f" (the table: {Path(run_dir) / 'init_from.tsv'})"
    log.info(summary)
    for name, a, b in result["skipped"]:
        log.info("  skipped %s: %s in the checkpoint, %s here", name, list(a), list(b))
    return summary


def part_of(name: str) -> str:
    """backbone | tokenizer | head: which part of the model a parameter belongs to (`finetune.freeze`)."""
    if name.startswith("backbone."):
        return "backbone"
    return "tokenizer" if ".tokenizer." in name else "head"


def freeze(model: nn.Module, parts: list[str]) -> int:
    """Stop `parts` (backbone, tokenizer, head) from training; return how many parameters were frozen."""
    unknown = [p for p in parts if p not in FREEZABLE]
    if unknown:
        raise ConfigError(f"finetune.freeze={list(parts)}: {', '.join(map(repr, unknown))} is not a part; the parts "
                          f"are {', '.join(FREEZABLE)}")
    frozen = 0
    for name, p in model.named_parameters():
        if part_of(name) in parts:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen
