"""Hugging Face GPT-2 in and out (mmtx.interop.gpt2), offline: a GPT-2 with random weights saved by `save_pretrained` in
tmp_path stands in for the hub's; it is loaded through the converter hub weights take (`init_from=hf:<folder>`), and
mmtx's logits and greedy tokens are compared with transformers' in fp32 on the CPU. `mmtx.export format=hf` writes
an mmtx language model that `AutoModelForCausalLM` loads with the same logits."""

from pathlib import Path

import pytest
import torch

from conftest import TINY_TEXT, gpt2_reference, gpt2_small_run, small_run
from mmtx import build, compose
from mmtx.batch import TokenBatch
from mmtx.checkpoints.io import load_checkpoint
from mmtx.errors import ConfigError, MissingError
from mmtx.export import main as export
from mmtx.tasks.decoding import generate
from mmtx.interop.registry import check_architecture, load_pretrained
from mmtx.tasks.language_model import CausalLM
from mmtx.train import train
from mmtx.training.transfer import init_from

transformers = pytest.importorskip("transformers")
TOLERANCE = 1e-4  # the bound on max |mmtx - transformers| in fp32


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpt2_data")
    (root / "tinyshakespeare").mkdir()
    (root / "tinyshakespeare" / "input.txt").write_text(TINY_TEXT)
    return root


@pytest.fixture(scope="module")
def reference(data_root) -> Path:
    return gpt2_reference(data_root / "gpt2")


def max_delta(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def mmtx_gpt2(reference: Path, tmp_path: Path, data_root: Path, *extra: str):
    """gpt2_finetune built for the reference model and loaded from it; (model, the LM part, init_from's table)."""
    model, _ = build(compose("gpt2_finetune", [*gpt2_small_run(tmp_path, data_root, reference), *extra]))
    table = init_from(model, f"hf:{reference}")
    return model.eval(), model.tasks["main"], table


def test_gpt2_logits_and_greedy_tokens_match_transformers(reference, data_root, tmp_path):
    model, part, table = mmtx_gpt2(reference, tmp_path, data_root, "data.block_size=48")
    assert not table["new"] and not table["skipped"] and not table["unused"]
    # data.block_size=48 < GPT-2's 64 positions: the first 48 rows of its table, reported
    assert [(n, a, b) for n, a, b in table["resampled"]] == [("tasks.main.tokenizer.pos", (64, 32), (48, 32))]
    theirs = transformers.GPT2LMHeadModel.from_pretrained(reference).eval()

    ids = torch.randint(0, theirs.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits = part(model.backbone, TokenBatch(ids))
        their_logits = theirs(ids).logits
    delta = max_delta(ours_logits, their_logits)
    print(f"GPT-2 parity: logits max |delta| {delta:.2e}")
    assert delta <= TOLERANCE

    prompt = torch.tensor([part.vocab.encode("First Citizen:")])
    with torch.no_grad():
        ours = generate(CausalLM(part, model.backbone), prompt, 20, temperature=0.0)
        their = theirs.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt),
                                pad_token_id=theirs.config.eos_token_id)
    assert ours.tolist() == their.tolist()  # 20 greedy tokens, the same


def test_the_run_takes_gpt2s_tokenizer_and_checks_the_model(reference, data_root, tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(reference)
    args = gpt2_small_run(tmp_path, data_root, reference)
    summary = train(compose("gpt2_finetune", [*args, "trainer.max_steps=2", "test_after_fit=false"]), run_dir=tmp_path / "run")
    run = Path(summary["run_dir"])
    text = "Speak, speak. All resolved"
    vocab = load_checkpoint(summary["last_checkpoint"])["mmtx_members"]["main"]["mmtx_vocab"]
    from mmtx.tokenizers.text import Vocab

    assert Vocab.from_json(vocab).encode(text) == tokenizer.encode(text)  # GPT-2's own tokens
    assert "loaded\ttasks.main.tokenizer.embed.weight" in (run / "init_from.tsv").read_text()
    from mmtx.generate import main as generate_cli

    texts = generate_cli([f"ckpt={summary['last_checkpoint']}", "prompt=First", "max_new_tokens=5", "temperature=0",
                         "device=cpu"])
    assert len(texts) == 1 and texts[0].startswith("First")  # from the checkpoint alone: GPT-2's tokenizer is inside

    source = load_pretrained(f"hf:{reference}")
    wide = compose("gpt2_finetune", [*args, "backbone.dim=64"])
    with pytest.raises(ConfigError, match=r"backbone.dim=64 here, 32 in the weights.*add backbone.dim=32"):
        check_architecture(wide, source)
    with pytest.raises(ConfigError, match=r"data.block_size=128 is longer than the 64 positions"):
        check_architecture(compose("gpt2_finetune", [*args, "data.block_size=128"]), source)
    with pytest.raises(ConfigError, match=r"tokenizer.vocab.name=gpt2 here"):
        check_architecture(compose("gpt2_finetune", [*args, "tokenizer.vocab.name=gpt2"]), source)


def test_unmapped_and_unavailable_models_are_named(tmp_path, monkeypatch):
    roberta = tmp_path / "roberta"
    transformers.RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
                               ).save_pretrained(roberta)
    with pytest.raises(ConfigError, match=r"is a roberta model; this mmtx maps hf:<a BERT.* or a GPT-2.* or a "
                                          r"Whisper.*>; timm:<a timm Vision"):
        load_pretrained(f"hf:{roberta}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(MissingError, match=r"init_from=hf:mmtx-test/no-such-gpt2: .*local Hugging Face cache.*"
                                           r"HF_HOME.*from_pretrained\('mmtx-test/no-such-gpt2'\)"):
        load_pretrained("hf:mmtx-test/no-such-gpt2")


@pytest.fixture(scope="module")
def native_lm(data_root, tmp_path_factory) -> dict:
    """gpt_shakespeare_cpu, GPT-2-shaped (learned positions, biases, no rotary), three steps: an mmtx-native LM
    (exact GELU, LayerNorm eps 1e-6) for format=hf."""
    tmp = tmp_path_factory.mktemp("native_lm")
    args = [*small_run(tmp, data_root, "text"), "tokenizer=bpe", "tokenizer.vocab.vocab_size=300",
            "tokenizer.pos_embed=learned", "backbone.rotary=false", "backbone.bias=true", "backbone.qkv_bias=true",
            "data.block_size=32", "trainer.max_steps=3", "test_after_fit=false"]
    summary = train(compose("gpt_shakespeare_cpu", args), run_dir=tmp / "run")
    return {"ckpt": summary["last_checkpoint"], "args": args, "tmp": tmp}


def test_export_hf_is_read_by_transformers_with_the_same_logits_and_back_by_init_from(native_lm, data_root, tmp_path):
    out = export([f"ckpt={native_lm['ckpt']}", "format=hf", f"out={tmp_path / 'hf'}"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model, _ = build(compose("gpt_shakespeare_cpu", native_lm["args"]))
    model.load_state_dict(load_checkpoint(native_lm["ckpt"])["state_dict"])
    model.eval()
    part = model.tasks["main"]
    text = "First Citizen:\nBefore we proceed any further"
    assert tokenizer.encode(text) == part.vocab.encode(text)
    ids = torch.tensor([part.vocab.encode(text)])
    with torch.no_grad():
        delta = max_delta(part(model.backbone, TokenBatch(ids)), theirs(ids).logits)
    print(f"format=hf: logits max |delta| {delta:.2e}")
    assert delta <= TOLERANCE

    # and back: the exported folder is a GPT-2 that init_from=hf: maps onto the same model
    again, _ = build(compose("gpt_shakespeare_cpu", [*native_lm["args"], "backbone.activation=gelu"]))
    table = init_from(again, f"hf:{out}")
    assert not table["new"] and not table["skipped"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_export_hf_names_what_gpt2_cannot_express(data_root, tmp_path):
    args = [*small_run(tmp_path, data_root, "text"), "trainer.max_steps=1", "test_after_fit=false"]
    summary = train(compose("gpt_shakespeare_cpu", args), run_dir=tmp_path / "rotary")  # rotary, no biases
    with pytest.raises(ConfigError, match=r"backbone.rotary=True.*tokenizer.pos_embed=none.*it needs backbone.rotary=False"):
        export([f"ckpt={summary['last_checkpoint']}", "format=hf", f"out={tmp_path / 'hf'}"])
    assert not (tmp_path / "hf").exists()
    with pytest.raises(ConfigError, match=r"format='nope' is not valid: format must be 'safetensors' or 'hf' or 'onnx'"):
        export([f"ckpt={summary['last_checkpoint']}", "format=nope"])


def test_the_shipped_task_is_the_model_of_gpt2_small():
    from mmtx.interop.gpt2 import gpt2_arch

    small = transformers.GPT2Config()  # the hub's gpt2: 768 wide, 12 layers, 12 heads, gelu_new, eps 1e-5
    source = {"mmtx_pretrained": {"spec": "hf:gpt2", "arch": gpt2_arch(small, "gpt2"), "mean": [], "std": [],
                                  "limits": {"data.block_size": small.n_positions}}}
    check_architecture(compose("gpt2_finetune", ["data.source.files=x.txt"]), source)  # no mismatch to name
