"""Encoder-decoder benchmarks on the CPU: asr_fsdd word error rate, translate_multi30k_cpu BLEU, and
cached against uncached beam-search speed.

    python scripts/bench_seq2seq.py asr --root ../shared/data [--seeds 1 2 3]
        `python -m mmtx.train task=asr_fsdd seed=S` as shipped, once per seed (the decoded cache built
        beforehand, untimed); prints each run's wall time (the whole process) and WER / CER on FSDD's
        official test split (takes 0-4, 300 clips), then their mean and range.
    python scripts/bench_seq2seq.py asr --root ../shared/data --prefix-lm [--seeds 1 2 3]
        the same with `task=asr_fsdd_prefix` (one decoder-only stack, a prefix LM) beside each seed's asr_fsdd
        (the encoder-decoder), interleaved seed by seed: WER / CER and wall time of both, and their difference.
    python scripts/bench_seq2seq.py translate --root ../shared/data [--seeds 1]
        `python -m mmtx.train task=translate_multi30k_cpu seed=S` (15 minutes of training at most); prints
        the wall time and sacreBLEU on test_2016_flickr (beam 4, all 1,000 sentences); then runs `decode`
        on the last seed's checkpoint.
    python scripts/bench_seq2seq.py decode --ckpt RUN/checkpoints/last.ckpt --root ../shared/data
        beam search over test batches with and without the KV cache, same model, same process:
        generated tokens/s of each, their ratio, and whether both produced the same hypotheses.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchlib import report, run_train, warm_cache


def decode_speed(ckpt: str, root: str | None, batches: int, beam: int, batch_size: int) -> None:
    from omegaconf import OmegaConf

    from mmtx.checkpoints.io import load_checkpoint, member_view
    from mmtx.generate import load_model
    from mmtx.tokenizers.text import Vocab
    from mmtx.config.wiring import build_data

    torch.set_grad_enabled(False)
    checkpoint = member_view(load_checkpoint(ckpt), None, ckpt)
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
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="asr: 1 2 3; translate: 1")
    parser.add_argument("--prefix-lm", action="store_true", help="asr: asr_fsdd_prefix beside asr_fsdd, seed by seed")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.what in ("asr", "translate"):
        task, metrics = {"asr": ("asr_fsdd", ["wer", "cer"]), "translate": ("translate_multi30k_cpu", ["bleu"])}[args.what]
        seeds = args.seeds or ([1, 2, 3] if args.what == "asr" else [1])
        work = Path(tempfile.mkdtemp(prefix=f"mmtx-bench-{task}-"))
        warm_cache(task, work, args.root)
        if args.what == "asr" and args.prefix_lm:
            both = {t: [] for t in (task, "asr_fsdd_prefix")}
            for seed in seeds:  # interleaved: the machine's drift falls on both tasks alike
                for t in both:
                    both[t].append(run_train(t, seed, work, args.root))
            for t, runs in both.items():
                report(t, runs, metrics)
            gaps = [p["test/wer"] - e["test/wer"] for e, p in zip(*both.values())]
            print(f"test/wer prefix LM - encoder-decoder: mean {100 * sum(gaps) / len(gaps):+.2f} points "
                  f"({', '.join(f'{100 * g:+.2f}' for g in gaps)})")
            return
        runs = [run_train(task, seed, work, args.root) for seed in seeds]
        report(task, runs, metrics)
        if args.what == "translate":
            decode_speed(runs[-1]["last_checkpoint"], args.root, args.batches, args.beam, args.batch_size)
    else:
        if not args.ckpt:
            parser.error("decode needs --ckpt")
        decode_speed(args.ckpt, args.root, args.batches, args.beam, args.batch_size)


if __name__ == "__main__":
    main()
