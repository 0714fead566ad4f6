"""Every generation option is honoured or refused, and the default sample prompt comes from the training text
(docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import TINY_TEXT, cli, small_run
from mmtx import compose
from mmtx.errors import ConfigError
from mmtx.files import read_tsv
from mmtx.checkpoints.generating import IMAGE_KEYS
from mmtx.generate import LM_KEYS, RULES, SEQ2SEQ_KEYS, check_args, load_model
from mmtx.generate import main as generate
from mmtx.train import train


def lm_run(tmp_path: Path, text: str, *extra: str) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    args = [*small_run(tmp_path, modality="text"), "data=text_files", f"data.source.files={corpus}",
            "trainer.max_steps=2", "test_after_fit=false", *extra]
    return train(compose("gpt_shakespeare_cpu", args), run_dir=tmp_path / "run")


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> str:
    return lm_run(tmp_path_factory.mktemp("lm"), TINY_TEXT)["last_checkpoint"]


@pytest.mark.parametrize("arg, message", [
    ("max_new_tokens=-5", r"max_new_tokens=-5 is not valid: max_new_tokens must be a whole number >= 1"),
    ("temperature=-1", r"temperature=-1 is not valid: temperature must be a number >= 0"),
    ("top_p=2.0", r"top_p=2.0 is not valid: top_p must be a number > 0 and <= 1 or null"),
    ("use_cache=maybe", r"use_cache='maybe' is not valid: use_cache must be true or false"),
    ("device=gpu", r"device='gpu' is not valid"),
    ("prompt=", r"prompt='' is empty: give the text to continue"),
    ("beam_size=2", r"beam_size=2 does not apply: checkpoint .* is a language model, which takes prompt, "),
    ("text=hello", r"text=hello does not apply: checkpoint .* is a language model"),
])
def test_bad_generation_options_are_refused_naming_the_key(lm, arg, message):
    with pytest.raises(ConfigError, match=message):
        generate([f"ckpt={lm}", arg, "max_new_tokens=4"] if not arg.startswith("max_new") else [f"ckpt={lm}", arg])


def test_the_command_line_refuses_in_one_line(lm):
    proc = cli("mmtx.generate", f"ckpt={lm}", "max_new_tokens=-5")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "mmtx.generate: error: max_new_tokens=-5 is not valid" in proc.stderr
    proc = cli("mmtx.generate", f"ckpt={lm}", "prompt=")
    assert proc.returncode == 1 and "prompt='' is empty" in proc.stderr and "Traceback" not in proc.stderr


def test_use_cache_reaches_the_decoder(lm, monkeypatch):
    import mmtx.tasks.language_model as lm_module

    seen = []
    original = lm_module.generate
    monkeypatch.setattr(lm_module, "generate", lambda *a, **k: seen.append(k["use_cache"]) or original(*a, **k))
    greedy = [f"ckpt={lm}", "prompt=First", "max_new_tokens=40", "temperature=0", "device=cpu"]  # past block_size 16
    cached, uncached = generate([*greedy, "use_cache=true"]), generate([*greedy, "use_cache=false"])
    assert seen == [True, False]
    model = load_model(lm)
    expected = model.task.complete(model.backbone, "First", 40, 0.0, use_cache=False)
    assert uncached == [expected] and cached == [model.task.complete(model.backbone, "First", 40, 0.0)]


def test_every_key_of_generate_yaml_reaches_the_code():
    from mmtx.config.apps import app_keys

    handled = {"ckpt", "member", "device", "use_cache", *LM_KEYS, *SEQ2SEQ_KEYS, *IMAGE_KEYS}
    assert set(app_keys("generate")) == handled
    assert set(RULES) <= handled
    check_args({"beam_size": 2}, set(), kind="seq2seq", ckpt="x")  # nothing given: nothing refused
    with pytest.raises(ConfigError, match=r"temperature=0.5 does not apply: checkpoint x is an encoder-decoder"):
        check_args({"temperature": 0.5}, {"temperature"}, kind="seq2seq", ckpt="x")


# -- 11. the default sample prompt is not a trap ------------------------------------------------------------------

def test_a_corpus_without_a_newline_trains_and_samples_from_its_own_first_character(tmp_path):
    text = " ".join(TINY_TEXT.split())  # one line: no newline in the vocabulary
    summary = lm_run(tmp_path, text, "trainer.val_check_interval=1", "trainer.check_val_every_n_epoch=null")
    assert summary["status"] == "finished" and summary["global_step"] == 2
    header, *rows = read_tsv(tmp_path / "run" / "samples.tsv")
    assert header == ["step", "prompt", "text"] and rows and all(r[1] == text[0] for r in rows)
    assert generate([f"ckpt={summary['last_checkpoint']}", "max_new_tokens=5", "device=cpu"])[0].startswith(text[0])
    with pytest.raises(ConfigError, match=r"family.sample_prompts: the prompt '€' cannot be encoded: .*never saw"):
        lm_run(tmp_path / "again", text, "family.sample_prompts=['€']")
    assert not (tmp_path / "again" / "run").exists()  # named before training, not at the first validation


def test_sample_texts_with_newlines_stay_one_field(lm):
    run = Path(lm).parent.parent
    header, *rows = read_tsv(run / "samples.tsv")
    assert rows and all(len(r) == 3 for r in rows) and any("\n" in r[2] for r in rows)
    assert OmegaConf.load(run / "config.yaml").family.sample_prompts is None
