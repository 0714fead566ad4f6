"""Encoder-decoder benchmarks on the CPU: asr_fsdd word error rate, translate_multi30k_cpu BLEU, and
cached against uncached beam-search speed.

    python scripts/bench_seq2seq.py asr --root ../shared/data
        trains `task=asr_fsdd` as shipped; prints the whole run's wall time (data set-up, training,
        validation, the final test) and WER / CER on FSDD's official test split (takes 0-4, 300 clips).
    python scripts/bench_seq2seq.py translate --root ../shared/data
        trains `task=translate_multi30k_cpu` (15 minutes at most); prints the training wall time and
        sacreBLEU on test_2016_flickr (beam 4, all 1,000 sentences); then runs `decode` on its checkpoint.
    python scripts/bench_seq2seq.py decode --ckpt RUN/checkpoints/last.ckpt --root ../shared/data
        beam search over test batches with and without the KV cache, same model, same process:
        generated tokens/s of each, their ratio, and whether both produced the same hypotheses.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from mmtx import compose
from mmtx.train import train


def overrides(out: str, root: str | None) -> list[str]:
    extra = ["trainer=cpu", "trainer.enable_progress_bar=false", f"paths.output_root={out}",
             f"paths.cache_dir={out}/cache"]
    return extra + ([f"data.root={root}"] if root else [])


def run_task(task: str, root: str | None, metrics: list[str]) -> dict:
    out = tempfile.mkdtemp(prefix=f"mmtx-bench-{task}-")
    t0 = time.perf_counter()
    summary = train(compose(task, overrides(out, root)), run_dir=f"{out}/run")
    wall = time.perf_counter() - t0
    shown = ", ".join(f"test/{m} {summary[f'test/{m}']:.4f}" for m in metrics)
    print(f"{task}: {wall:.1f} s wall (set-up, training, validation, test), {summary['global_step']} steps; {shown}")
    return summary


def decode_speed(ckpt: str, root: str | None, batches: int, beam: int, batch_size: int) -> None:
    from omegaconf import OmegaConf

    from mmtx.checkpoint import load_checkpoint
    from mmtx.generate import load_model
    from mmtx.tokenizers.text import Vocab
    from mmtx.wiring import build_data

    torch.set_grad_enabled(False)
    checkpoint = load_checkpoint(ckpt)
    cfg = OmegaConf.create(checkpoint["mmtx_config"])
    cfg.data.eval_batch_size = batch_size
    if root:
        cfg.data.root = root
    dm = build_data(cfg, fixed_vocab=Vocab.from_json(checkpoint["mmtx_vocab"]),
                    fixed_tgt_vocab=Vocab.from_json(checkpoint["mmtx_tgt_vocab"]))
    model = load_model(ckpt, "cpu")
    data = [dm.on_after_batch_transfer(b) for _, b in zip(range(batches), dm.test_dataloader())]
    results = {}
    for use_cache in (True, False, True):  # the cached pass twice: the first one warms up
        t0 = time.perf_counter()
        hyps = [ids for b in data for ids in model.task.decode(model.backbone, b.source, beam_size=beam, use_cache=use_cache)]
        results[use_cache] = (time.perf_counter() - t0, hyps)
    tokens = sum(len(h) + 1 for h in results[True][1])  # + EOS
    (tc, hc), (tu, hu) = results[True], results[False]
    print(f"beam {beam}, {len(hc)} test sentences in batches of {batch_size}: cached {tokens / tc:.0f} tokens/s "
          f"({tc:.1f} s), uncached {tokens / tu:.0f} tokens/s ({tu:.1f} s): cached/uncached {tu / tc:.2f}x; "
          f"same hypotheses: {hc == hu}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["asr", "translate", "decode"])
    parser.add_argument("--root", default=None, help="data root (default: $MMTX_DATA_DIR)")
    parser.add_argument("--ckpt", default=None, help="decode: the encoder-decoder checkpoint")
    parser.add_argument("--batches", type=int, default=4, help="decode: test batches")
    parser.add_argument("--batch-size", type=int, default=64, help="decode: sentences per batch")
    parser.add_argument("--beam", type=int, default=4, help="decode: beam size")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.what == "asr":
        run_task("asr_fsdd", args.root, ["wer", "cer"])
    elif args.what == "translate":
        summary = run_task("translate_multi30k_cpu", args.root, ["bleu"])
        decode_speed(summary["last_checkpoint"], args.root, args.batches, args.beam, args.batch_size)
    else:
        if not args.ckpt:
            parser.error("decode needs --ckpt")
        decode_speed(args.ckpt, args.root, args.batches, args.beam, args.batch_size)


if __name__ == "__main__":
    main()
