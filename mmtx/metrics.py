"""Text-generation metrics on detokenized strings: sacreBLEU, character and word error rates."""

from __future__ import annotations

from typing import Sequence
from mmtx.errors import ConfigError


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU (Post, 2018) with its defaults: detokenized input, 13a tokenization, case-sensitive,
    one reference per sentence; 0-100."""
    from sacrebleu.metrics import BLEU

    return float(BLEU().corpus_score(list(hypotheses), [list(references)]).score)


def error_rates(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Character and word error rates (edit distance / reference length, over the corpus; 0-1),
    computed by torchmetrics."""
    from torchmetrics.functional.text import char_error_rate, word_error_rate

    hyps, refs = list(hypotheses), list(references)
    return {"cer": float(char_error_rate(hyps, refs)), "wer": float(word_error_rate(hyps, refs))}


def text_metrics(names: Sequence[str], hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The metrics called `names` (bleu, cer, wer) of a corpus of hypotheses against references."""
    unknown = set(names) - {"bleu", "cer", "wer"}
    if unknown:
        raise ConfigError(f"module.metrics: unknown metric(s) {sorted(unknown)}; known: bleu, cer, wer")
    if not hypotheses:
        return {}
    out: dict[str, float] = {}
    if "bleu" in names:
        out["bleu"] = corpus_bleu(hypotheses, references)
    if {"cer", "wer"} & set(names):
        rates = error_rates(hypotheses, references)
        out.update({k: v for k, v in rates.items() if k in names})
    return out
