"""Generation with a loaded model (`mmtx.load`): a language model continues a prompt, an encoder-decoder
translates text or transcribes audio, with the keys of `conf/generate.yaml` (`mmtx.generate` is its command line;
`Model.generate` its Python face). One way each is done, so both give the same results."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf
from torch.nn.utils.rnn import pad_sequence

from mmtx.batch import AudioBatch, TokenBatch
from mmtx.config.apps import app_defaults
from mmtx.config.validate import boolean, device, integer, number, validate
from mmtx.data.audio_sources import AudioDecoder
from mmtx.errors import ConfigError, MissingError
from mmtx.files import tsv_text

# The keys of each kind of model (conf/generate.yaml); one of the other kind given on the command line is refused.
LM_KEYS = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "num_samples", "seed")
SEQ2SEQ_KEYS = ("text", "text_file", "audio", "beam_size", "length_penalty", "max_len", "batch_size")
IMAGE_KEYS = ("prompt", "temperature", "top_k", "top_p", "num_samples", "seed", "out", "image")  # an image-token model
RULES = {
    "max_new_tokens": integer(1), "temperature": number(0), "top_k": integer(0, optional=True),
    "top_p": number(0, 1, low_open=True, optional=True), "num_samples": integer(1), "seed": integer(0),
    "use_cache": boolean(), "beam_size": integer(1, optional=True), "length_penalty": number(optional=True),
    "max_len": integer(2, optional=True), "batch_size": integer(1), "device": device(),
}


def sample_rate(model) -> int | None:
    return getattr(model.task, "sample_rate", None)


def seq2seq_inputs(model, args: dict[str, Any]) -> list[str]:
    """The texts (a text model) or audio file paths (a speech model) to decode, from the arguments."""
    fields = getattr(model.task.tokenizer, "fields", None)
    if fields is not None:  # a prefix LM after several fields (FusedTokenizer)
        raise ConfigError(f"this checkpoint writes text after several inputs in one sequence (tokenizer.fields: "
                          f"{', '.join(fields)}), and mmtx.generate takes one input a sample; load it with mmtx.load "
                          "and call model.task.translate(model.backbone, <a mmtx.batch.FusedBatch>)")
    audio_model = sample_rate(model) is not None
    given = [k for k in ("text", "text_file", "audio") if args[k] is not None]
    if len(given) != 1:
        want = "audio=FILE|GLOB" if audio_model else "text=TEXT or text_file=FILE"
        raise ConfigError(f"this checkpoint is an encoder-decoder: give exactly one input, {want}")
    if audio_model != (given[0] == "audio"):
        kind = "audio" if audio_model else "text"
        raise ConfigError(f"this checkpoint's model reads {kind}, but {given[0]}= was given")
    if given[0] == "text":  # one text (the command line), or a list of them (Model.generate)
        texts = args["text"]
        return [str(t) for t in texts] if isinstance(texts, (list, tuple)) else [str(texts)]
    if given[0] == "text_file":
        path = Path(str(args["text_file"])).expanduser()
        if not path.is_file():
            raise MissingError(f"text_file {path} does not exist")
        return path.read_text(encoding="utf-8").splitlines()
    files: list[str] = []
    audio = args["audio"]
    for pattern in ([str(a) for a in audio] if isinstance(audio, (list, tuple)) else str(audio).split(",")):
        found = sorted(glob.glob(os.path.expanduser(pattern.strip()))) if glob.has_magic(pattern) else [pattern.strip()]
        if not found or not all(Path(f).is_file() for f in found):
            raise MissingError(f"no audio file at {pattern.strip()}")
        files += found
    return files


def seq2seq_batch(model, items: list[str], cfg) -> TokenBatch | AudioBatch:
    """A batch of sources as the data module makes them: token ids and their mask, or padded audio and lengths."""
    rate = sample_rate(model)
    if rate is None:
        limit = int(cfg.data.max_src_len)
        seqs = [torch.tensor(model.task.vocab.encode(text.strip())[:limit] or [0]) for text in items]
    else:
        decoder = AudioDecoder(rate, cfg.data.source.get("max_seconds"), on_bad_file="error")
        seqs = [decoder.decode(f, f) for f in items]
    padded = pad_sequence(seqs, batch_first=True).to(model.device)  # zero-padded (B, S) ids or (B, L) audio
    lengths = torch.tensor([len(seq) for seq in seqs], device=model.device)
    if rate is None:
        return TokenBatch(padded, mask=torch.arange(padded.shape[1], device=model.device) < lengths[:, None])
    return AudioBatch(padded, lengths)


def run_seq2seq(model, args: dict[str, Any], cfg, echo: bool = True) -> list[str]:
    items = seq2seq_inputs(model, args)
    search = {k: args[k] for k in ("beam_size", "length_penalty", "max_len") if args[k] is not None}
    search["use_cache"] = bool(args["use_cache"])
    out: list[str] = []
    size = max(1, int(args["batch_size"]))
    for start in range(0, len(items), size):
        chunk = items[start:start + size]
        blank = [not item.strip() for item in chunk]  # an empty line in, an empty line out
        source = seq2seq_batch(model, [c if c.strip() else "." for c in chunk], cfg)
        hyps = model.task.translate(model.backbone, source, **search)
        for item, hyp, skip in zip(chunk, hyps, blank):
            hyp = "" if skip else " ".join(hyp.splitlines())  # one line in, one line out, whatever was decoded
            out.append(hyp)
            if echo:
                print(tsv_text([[item, hyp]]).rstrip("\n") if args["audio"] is not None else hyp, flush=True)
    return out


def given_keys(overrides: Sequence[str]) -> set[str]:
    """The keys set on the command line (`key=value`, `+key=value`)."""
    return {str(o).split("=", 1)[0].lstrip("+~") for o in overrides if "=" in str(o)}


def check_args(args: dict[str, Any], given: set[str], kind: str, ckpt: str) -> None:
    """Every key given is one this model takes (`kind`: language_model | seq2seq | image): a language model's keys
    for an encoder-decoder (or the reverse) are refused, naming the key and the keys the model takes, instead of
    being ignored."""
    mine = {"seq2seq": SEQ2SEQ_KEYS, "image": IMAGE_KEYS}.get(kind, LM_KEYS)
    others = set(LM_KEYS + SEQ2SEQ_KEYS + IMAGE_KEYS) - set(mine)
    wrong = sorted(k for k in given if k in others)
    if wrong:
        what = {"seq2seq": "an encoder-decoder", "image": "an image-token model"}.get(kind, "a language model")
        raise ConfigError(f"{wrong[0]}={args[wrong[0]]} does not apply: checkpoint {ckpt} is {what}, which takes "
                          f"{', '.join(mine)} (and use_cache, device)")
    prompt = args.get("prompt")
    if kind != "seq2seq" and prompt is not None and (not isinstance(prompt, str) or prompt == ""):
        raise ConfigError(f"prompt={prompt!r} is empty: give the text to continue (prompt=...), or leave prompt out "
                          "to start from the model's default prompt")


def run_images(model, args: dict[str, Any], echo: bool = True) -> list[str]:
    """An image-token model (iGPT) draws `num_samples` images of class `prompt` (or completes the lower half of
    `image`) and writes them as PNG files under `out` (default ./generated): the paths, one a line."""
    from PIL import Image

    from mmtx.data.image_sources import read_image
    from mmtx.files import check_writable

    task = model.task
    prompt = args["prompt"] or task.sample_prompts[0]
    given = None
    if args.get("image"):
        path = Path(str(args["image"])).expanduser()
        if not path.is_file():
            raise MissingError(f"image {path} does not exist")
        if task.height != task.width:
            raise ConfigError(f"image=: this model draws {task.height}x{task.width} images; give a square model")
        given = read_image(path, task.height)  # (3, H, W) uint8, resized and centre-cropped to the model's size
    generator = torch.Generator(device=model.device).manual_seed(int(args["seed"]))
    images = task.draw(model.backbone, str(prompt), int(args["num_samples"]), float(args["temperature"]),
                       args["top_k"] or None, args["top_p"], generator=generator, image=given,
                       use_cache=bool(args["use_cache"]))
    folder = check_writable(Path(str(args.get("out") or "generated")).expanduser(), "out", "give another out=DIR")
    paths = []
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(prompt)) or "image"
    for i, image in enumerate(images):
        path = folder / f"{stem}-{'completed-' if given is not None else ''}{i:03d}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(tmp, format="PNG")
        os.replace(tmp, path)  # whole files only: a reader never sees half a PNG
        paths.append(str(path))
        if echo:
            print(path, flush=True)
    return paths


def generate_with(model, options: dict[str, Any], ckpt: str, given: set[str] | None = None,
                  echo: bool = True) -> list[str]:
    """Generate with a loaded model (`load_model`, `mmtx.load(...).module`): `options` are generate's keys
    (conf/generate.yaml's values for those left out); `given`: the keys the user set (default: those of
    `options`), refused when they do not apply to this kind of model. `echo`: print each result as it comes."""
    args = {**app_defaults("generate"), **options}
    validate(args, RULES)
    kind = "seq2seq" if hasattr(model.task, "translate") else "image" if hasattr(model.task, "draw") else "language_model"
    check_args(args, set(options) if given is None else set(given), kind, ckpt)
    if kind == "seq2seq":
        return run_seq2seq(model, args, OmegaConf.create(model.run_config), echo)
    if kind == "image":
        return run_images(model, args, echo)
    prompt = args["prompt"]
    if prompt is None:
        if not model.task.sample_prompts:
            raise ConfigError(f"checkpoint {ckpt} has no default prompt: give one with prompt=...")
        prompt = model.task.sample_prompts[0]
    generator = torch.Generator(device=model.device).manual_seed(int(args["seed"]))
    texts = []
    for i in range(int(args["num_samples"])):
        text = model.task.complete(
            model.backbone, str(prompt), int(args["max_new_tokens"]), float(args["temperature"]),
            args["top_k"] or None, args["top_p"], generator=generator, use_cache=bool(args["use_cache"]),
        )
        texts.append(text)
        if echo:
            print(text if i == 0 else f"\n---\n{text}", flush=True)
    return texts
