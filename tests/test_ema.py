"""EMA of weights and early stopping, the two opt-in callbacks (callbacks.ema, callbacks.early_stopping)."""

import pytest
import torch

from conftest import TINY_TEXT, folder_run, small_run
from mmtx import compose
from mmtx.training.callbacks import _ema_with_warmup
from mmtx.checkpoints.io import load_checkpoint
from mmtx.eval import evaluate
from mmtx.train import train


def _ema_run(cfg, run_dir):
    summary = train(cfg, run_dir=run_dir)
    ckpt = load_checkpoint(summary["last_checkpoint"])
    ema, current = ckpt["state_dict"], ckpt["current_model_state"]  # Lightning's WeightAveraging layout
    assert ema.keys() == current.keys() and int(ckpt["averaging_state"]["n_averaged"]) == summary["global_step"]
    assert any(not torch.equal(ema[k], current[k]) for k in ema if ema[k].is_floating_point())
    return summary, ckpt


def test_ema_on_a_rotary_language_model(tmp_path):
    corpus = tmp_path / "input.txt"
    corpus.write_text(TINY_TEXT * 4)
    cfg = compose("gpt_shakespeare_cpu", [*small_run(tmp_path, modality="text"), "data=text_files",
                                          f"data.source.files={corpus}", "trainer.max_steps=6",
                                          "callbacks.ema.enabled=true", "test_after_fit=false"])
    assert cfg.backbone.rotary
    _ema_run(cfg, tmp_path / "run")  # the rotary table is a cache, not a buffer that grows: nothing to mismatch


@pytest.mark.parametrize("tested", ["best", "last"])
def test_ema_on_a_classifier_is_what_eval_scores(tested, image_folder, tmp_path):
    cfg = compose("vit_cifar_cpu", [*folder_run(tmp_path, image_folder), "trainer.max_steps=8",
                                    "callbacks.ema.enabled=true", "callbacks.ema.decay=0.9", f"test_ckpt={tested}"])
    summary, ckpt = _ema_run(cfg, tmp_path / "run")
    assert any("running_mean" in k for k in ckpt["state_dict"])  # the conv stem's BatchNorm statistics averaged too
    # the final test ran on the averaged weights of the best checkpoint, or those training ended with, as mmtx.eval
    # does from that checkpoint
    assert summary["tested"] == tested
    assert abs(evaluate(summary[f"{tested}_checkpoint"])["test/loss"] - summary["test/loss"]) < 1e-5


def test_ema_decay_warms_up():
    average = _ema_with_warmup(0.999)
    a, b = torch.zeros(3), torch.ones(3)
    assert torch.allclose(average(a, b, torch.tensor(0)), torch.full((3,), 0.9))  # 1 - 1/10 of the new weights
    assert torch.allclose(average(a, b, torch.tensor(10**6)), torch.full((3,), 0.001))  # then the set decay
    steps = torch.tensor([5, 7])
    assert torch.equal(average(torch.tensor([1, 2]), steps, torch.tensor(3)), steps)  # integer buffers: copied


def test_early_stopping_stops_when_the_metric_stops_improving(image_folder, tmp_path):
    cfg = compose("vit_cifar", [*folder_run(tmp_path, image_folder), "trainer.max_epochs=6", "test_after_fit=false",
                                "callbacks.early_stopping.enabled=true", "callbacks.early_stopping.patience=1",
                                "callbacks.early_stopping.min_delta=2.0"])  # no accuracy improves by 2
    summary = train(cfg, run_dir=tmp_path / "run")
    per_epoch = 3  # 29 training images (folder_run's split) in batches of 8, the last one dropped
    assert summary["status"] == "finished" and summary["global_step"] == 2 * per_epoch  # validations 1 and 2
