"""A BERT from Hugging Face in the masked family (mmtx.interop.bert): post-norm blocks, BERT's embeddings and
masked-LM head with the same numbers as `transformers`, offline, on a small random BERT saved beside the test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, small_run

from mmtx import compose
from mmtx.backbone import Backbone
from mmtx.batch import TokenBatch
from mmtx.interop.bert import bert_state
from mmtx.interop.registry import PREFIX, load_pretrained
from mmtx.tasks.masked import Masked
from mmtx.tokenizers import TokenEmbedding
from mmtx.tokenizers.text import Vocab
from mmtx.train import train

transformers = pytest.importorskip("transformers")
SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
         "max_position_embeddings": 64, "type_vocab_size": 2}


def bert_reference(path: Path) -> Path:
    """A BertForMaskedLM with random weights and a WordPiece tokenizer of TINY_TEXT's words, saved by
    `save_pretrained` at `path`: the stand-in for the hub's bert-base-uncased."""
    if (path / "config.json").is_file():
        return path
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator([TINY_TEXT], trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    tokenizer = transformers.BertTokenizerFast(tokenizer_object=tok, mask_token="[MASK]", pad_token="[PAD]",
                                               unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=tok.get_vocab_size(), **SHAPE))
    with torch.no_grad():  # LayerNorms and biases away from their initial 1 and 0, so the test sees them
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return bert_reference(tmp_path_factory.mktemp("bert"))


def test_the_converted_bert_computes_transformers_numbers(reference):
    theirs = transformers.BertForMaskedLM.from_pretrained(reference).eval()
    vocab = Vocab.from_json(transformers.AutoTokenizer.from_pretrained(reference).backend_tokenizer.to_str())
    eps = theirs.config.layer_norm_eps
    tokenizer = TokenEmbedding(32, vocab, max_len=64, norm=True, norm_eps=eps)
    backbone = Backbone(32, 2, 4, mlp_ratio=2.0, norm_eps=eps, block="post")
    part = Masked(tokenizer, 32)
    state = bert_state(theirs, f"hf:{reference}")
    own = {**{k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}}
    missing, unexpected = backbone.load_state_dict(own, strict=False)
    assert not missing and not unexpected
    missing, unexpected = part.load_state_dict({k.removeprefix(PREFIX): v for k, v in state.items()
                                                if k.startswith(PREFIX)}, strict=False)
    assert not unexpected and not [m for m in missing if not m.startswith("head.proj")]  # tied to the embedding
    part.eval()
    ids = torch.randint(0, len(vocab), (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = backbone(tokenizer(TokenBatch(ids)), causal=False)
        logits = part.head(part.transform(hidden)) + part.head_bias
        expected = theirs(input_ids=ids, output_hidden_states=True)
    assert (hidden - expected.hidden_states[-1]).abs().max() < 1e-5
    assert (logits - expected.logits).abs().max() < 1e-4


def test_init_from_a_bert_takes_its_shape_tokenizer_and_weights(reference, tmp_path):
    data = tmp_path / "data"
    (data / "tinyshakespeare").mkdir(parents=True)
    (data / "tinyshakespeare" / "input.txt").write_text(TINY_TEXT)
    keep = [o for o in small_run(tmp_path, data, "text") if not o.startswith(("backbone.", "family."))]
    summary = train(compose("bert_shakespeare", [*keep, f"init_from=hf:{reference}", "trainer.max_steps=2",
                                                 "trainer.max_epochs=null"]), run_dir=tmp_path / "run")
    assert summary["global_step"] == 2
    table = (tmp_path / "run" / "init_from.tsv").read_text()
    assert "loaded\tbackbone.blocks.1.attn.qkv.weight" in table and "loaded\ttasks.main.head_bias" in table
    assert "new\t" not in table  # every parameter from the BERT
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "block: post" in config and "norm: true" in config
    assert load_pretrained(f"hf:{reference}")["mmtx_pretrained"]["arch"]["backbone.block"] == "post"
