"""The prefix LM: the prefix mask, a decoder-only model over [source; target] on the shared backbone, its cached
decoding, and asr_fsdd_prefix end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import small_run
from test_audio import make_tones

from mmtx import build, compose, load
from mmtx.backbone import Backbone
from mmtx.batch import IGNORE_INDEX, PairBatch, TokenBatch, Tokens
from mmtx.errors import ConfigError
from mmtx.generate import main as generate
from mmtx.nn.attention import attention_mask
from mmtx.tasks import PrefixLM
from mmtx.tokenizers.text import TokenEmbedding
from mmtx.train import train

BOS, EOS, V, D = 1, 2, 23, 16


def test_the_prefix_mask_is_bidirectional_over_the_prefix_and_causal_after_it():
    mask, is_causal = attention_mask(None, 5, 5, causal=True, prefix=2)
    assert not is_causal
    expected = torch.tensor([[1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)
    # the last query of a cached decode sees every key; padding keys of the prefix stay out
    keys = torch.tensor([[True, False, True, True, True]])
    one, _ = attention_mask(keys, 1, 5, causal=True, prefix=2)
    assert torch.equal(one[0, 0, 0], keys[0])


def test_a_prefix_backbone_leaks_no_later_target_token_and_reads_the_whole_prefix():
    torch.manual_seed(0)
    backbone = Backbone(D, 2, 2).eval()
    x = torch.randn(2, 7, D)
    out = backbone(Tokens(x), causal=True, prefix=3)
    later = x.clone()
    later[:, 5] = torch.randn(2, D)  # a target token
    torch.testing.assert_close(backbone(Tokens(later), causal=True, prefix=3)[:, :5], out[:, :5])
    last_of_prefix = x.clone()
    last_of_prefix[:, 2] = torch.randn(2, D)  # (not a shift by a constant: LayerNorm removes that)
    assert not torch.allclose(backbone(Tokens(last_of_prefix), causal=True, prefix=3)[:, 0], out[:, 0])


def prefix_lm(seed: int = 0) -> tuple[PrefixLM, Backbone]:
    torch.manual_seed(seed)
    source = TokenEmbedding(D, V, max_len=16)
    part = PrefixLM(source, D, V, BOS, EOS, max_len=16, beam_size=1, metrics=("cer",))
    backbone = Backbone(D, 2, 2)
    part.attach(backbone)
    return part.eval(), backbone.eval()


def padded_source() -> TokenBatch:
    ids = torch.randint(3, V, (3, 5))
    return TokenBatch(ids, mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] * 2 + [False] * 3]))


def test_teacher_forced_logits_cover_the_target_and_ignore_the_source_s_padding():
    part, backbone = prefix_lm()
    source, tgt = padded_source(), torch.randint(0, V, (3, 4))
    batch = PairBatch(source, TokenBatch(tgt, targets=torch.full((3, 4), IGNORE_INDEX)))
    logits = part(backbone, batch)
    assert logits.shape == (3, 4, V)
    changed = TokenBatch(source.tokens.clone(), mask=source.mask)
    changed.tokens[1, 3:] = 3  # under the padding of source 1
    torch.testing.assert_close(part(backbone, PairBatch(changed, batch.target)), logits)
    changed.tokens[1, 0] = 4 if source.tokens[1, 0] != 4 else 5  # a real token
    assert not torch.allclose(part(backbone, PairBatch(changed, batch.target))[1], logits[1])


def test_cached_and_uncached_decoding_agree():
    part, backbone = prefix_lm(1)
    source = padded_source()
    cached = part.decode(backbone, source, beam_size=1, max_len=8)
    assert cached == part.decode(backbone, source, beam_size=1, max_len=8, use_cache=False)
    assert part.decode(backbone, source, beam_size=3, max_len=8) == \
        part.decode(backbone, source, beam_size=3, max_len=8, use_cache=False)


def asr_run(tmp_path, *extra: str) -> list[str]:
    return [*small_run(tmp_path, tmp_path, "audio"), "data.source.test_pattern='_[0-2]\\.wav$'", *extra]


def test_asr_fsdd_prefix_trains_evaluates_loads_and_transcribes_files(tmp_path):
    folder = make_tones(tmp_path / "fsdd" / "recordings", per_class=(6, 3))
    summary = train(compose("asr_fsdd_prefix", asr_run(tmp_path, "trainer.max_epochs=1")), run_dir=tmp_path / "run")
    assert summary["monitor"] == "val/wer" and 0.0 <= summary["test/wer"] and 0.0 <= summary["test/cer"]
    model = load(summary["last_checkpoint"], device="cpu")
    assert model.kind == "prefix_lm" and "tasks.main.decoder.stack" not in str(model.module.state_dict().keys())
    outs = generate([f"ckpt={summary['last_checkpoint']}", f"audio={folder}/*_spk_[0-2].wav"])
    assert len(outs) == 6 and all(isinstance(o, str) for o in outs)


def test_a_prefix_lm_has_no_cross_attention_to_use(tmp_path):
    make_tones(tmp_path / "fsdd" / "recordings", per_class=(4, 3))
    with pytest.raises(ConfigError, match="backbone.cross_attention=false"):
        build(compose("asr_fsdd_prefix", asr_run(tmp_path, "backbone.cross_attention=true")))
