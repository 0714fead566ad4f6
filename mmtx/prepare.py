"""`python -m mmtx.prepare out=DIR [task=NAME] [data=GROUP] [KEY=VALUE ...]`: write a data source once into a folder
that runs stream from (data bigger than memory).

The source is the one `python -m mmtx.train` would read with the same `task=`, `data=` and `data.*` keys (composed
by the same code); `out` and `num_workers` are this program's own keys (`conf/prepare.yaml`). Image and audio
folders and translation or speech-to-text pairs go into litdata shards (`mmtx.data.shards`; read by `data=streaming`,
`data=streaming_audio`, `data=streaming_pairs`), text into token files (`mmtx.data.token_files.prepare_text`; read by
`data=streaming_text`).
"""

from __future__ import annotations

from mmtx.config.help import answer_help

answer_help("prepare")  # `--help` is answered here, before the imports below (torch, Lightning) take seconds

import logging
import sys
from typing import Any, Sequence

from mmtx.config.apps import app_defaults, app_keys
from mmtx.errors import ConfigError, reported


def prepare(overrides: Sequence[str], out: str, num_workers: int | None = None) -> dict[str, Any]:
    """Prepare the data source of the training run `overrides` would compose into shards under `out`; the written
    description (`mmtx.json`: classes, samples per split)."""
    from hydra.utils import get_class, instantiate

    from mmtx.config.compose import compose
    from mmtx.data.seq2seq import Seq2SeqDataModule
    from mmtx.data.shards import prepare_pairs, prepare_shards
    from mmtx.data.streaming import StreamingPairs
    from mmtx.data.text import TextDataModule
    from mmtx.data.token_files import StreamingText, prepare_text

    task = next((o.split("=", 1)[1] for o in overrides if o.startswith("task=")), "vit_cifar")
    cfg = compose(task, [o for o in overrides if not o.startswith("task=")])
    target = get_class(cfg.data._target_) if "_target_" in cfg.data else None
    if isinstance(target, type) and issubclass(target, StreamingText):
        raise ConfigError(f"data={cfg.data._target_} reads text already prepared (data.path={cfg.data.path}); give "
                          "the text to prepare: data=text_files data.source.files=<files>")
    if isinstance(target, type) and issubclass(target, Seq2SeqDataModule) and not issubclass(target, StreamingPairs):
        # Pairs: tokenized with the task's vocabulary settings, as a training run in memory tokenizes them.
        return prepare_pairs(instantiate(cfg.data, _convert_="all"), out, num_workers)
    if isinstance(target, type) and issubclass(target, TextDataModule):
        # Text: tokenized with the task's vocabulary settings (tokenizer.vocab) and validation cut (data.val_fraction).
        return prepare_text(instantiate(cfg.data, _convert_="all"), out)
    source_cfg = cfg.data.get("source")
    if source_cfg is None or "_target_" not in source_cfg:
        raise ConfigError(f"data ({cfg.data._target_}) has no data.source to prepare; give an image, audio or text "
                          "source: data=imagefolder data.source.path=<folder>, data=audio_folder "
                          "data.source.path=<folder>, data=text_files data.source.files=<files>")
    source = instantiate(source_cfg, _convert_="all")
    return prepare_shards(source, out, num_workers)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line: a mistake ends it with one line. `argv`: its arguments, from Python (a mistake raises)."""
    if argv is not None:
        return _run(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with reported("mmtx.prepare"):
        return _run(sys.argv[1:])


def _run(args: list[str]) -> dict[str, Any]:
    own = {**app_defaults("prepare")}
    rest = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in app_keys("prepare"):
            own[key] = value
        else:
            rest.append(arg)
    if "out" not in own or not own["out"]:
        raise ConfigError("give the folder to write: out=DIR (python -m mmtx.prepare --help)")
    workers = own.get("num_workers")
    if workers in (None, "null"):
        workers = None
    elif not str(workers).isdigit() or int(workers) < 1:
        raise ConfigError(f"num_workers={workers}: give a whole number >= 1, or null for the CPU count")
    meta = prepare(rest, str(own["out"]), int(workers) if workers is not None else None)
    if meta["modality"] == "pairs":
        print(f"prepared {meta['source']} into {own['out']}: {meta['samples']} pairs; train on it with "
              f"data=streaming_pairs data.path={own['out']}", flush=True)
    elif meta["modality"] == "text":
        print(f"prepared {meta['source']} into {own['out']}: {meta['tokens']} tokens ({meta['dtype']}, a vocabulary "
              f"of {meta['vocab_size']:,}); train on it with data=streaming_text data.path={own['out']}", flush=True)
    else:
        what, config = ("images", "streaming") if meta["modality"] == "image" else ("clips", "streaming_audio")
        print(f"prepared {meta['source']} into {own['out']}: {meta['samples']} {what} of {len(meta['classes'])} "
              f"classes; train on it with data={config} data.path={own['out']}", flush=True)
    return meta


if __name__ == "__main__":
    main()
