"""`module.compile=true`: each task part's forward and loss in one graph, with no graph break and one graph per
mode (training, evaluation), the sequence lengths symbolic; a compiler that cannot run is one warning, and the run
goes on eagerly."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import TINY_TEXT, make_parallel, small_run, task_modality
from mmtx import compose
from mmtx.training.compiling import CompiledOrEager, compiler_unavailable
from mmtx.train import train


@pytest.fixture
def traced(monkeypatch):
    """torch.compile traced by Dynamo with the eager backend (no kernels built: fast), counting graphs and breaks."""
    import torch._dynamo

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", **kw))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from conftest import make_image_folder
    from test_audio import make_tones

    root = tmp_path_factory.mktemp("compile_data")
    make_image_folder(root / "cifar10", classes=[f"c{i}" for i in range(10)], per_class=(2, 1), size=32)
    make_tones(root / "fsdd" / "recordings", per_class=(10, 5))
    (root / "tinyshakespeare").mkdir()
    (root / "tinyshakespeare" / "input.txt").write_text(TINY_TEXT)
    make_parallel(root / "multi30k")
    return root


@pytest.mark.parametrize("task", ["gpt_shakespeare_cpu", "vit_cifar_cpu", "translate_multi30k_cpu", "audio_fsdd",
                                  "gpt_shakespeare_cpu+moe"])
def test_one_graph_for_training_and_one_for_evaluation_without_a_break(task, traced, data_root, tmp_path):
    """Four training steps and two validations (the sanity check first): Dynamo traces the part's forward_loss
    twice (training, with gradients; evaluation, without) and never breaks a graph. Before: the rotary table, a
    Python cache, made a run whose first forward was a training step trace the training graph twice. `+moe`: with
    a mixture of experts (routing, capacity and the router losses inside the graph)."""
    task, _, moe = task.partition("+")
    args = ["backbone.mlp=moe", "backbone.moe.num_experts=4"] if moe else []
    args += [*small_run(tmp_path, data_root, task_modality(task)), "module.compile=true", "trainer.max_steps=4",
            "trainer.val_check_interval=null", "trainer.check_val_every_n_epoch=1", "trainer.limit_val_batches=1",
            "trainer.limit_train_batches=4", "test_after_fit=false"]
    if task == "translate_multi30k_cpu":
        # decoding runs its own (eager) passes; the sentences vary in length: Dynamo makes the lengths symbols
        args += ["family.val_decode_batches=0", "callbacks.checkpoint.monitor=val/loss", "callbacks.checkpoint.mode=min"]
    train(compose(task, args), run_dir=tmp_path / "run")
    assert sum(traced["graph_break"].values()) == 0, dict(traced["graph_break"])
    # Audio: the stem stacks frames in pairs, and Dynamo guards on the parity of a clip's frame count: at most two
    # graphs a mode, whatever the lengths.
    assert traced["stats"]["unique_graphs"] <= (4 if task == "audio_fsdd" else 2), dict(traced["stats"])


def test_rotary_positions_give_one_training_graph(traced, data_root, tmp_path):
    """The first forward a training step (no sanity check): one graph, not two."""
    args = [*small_run(tmp_path, data_root, "text"), "module.compile=true", "trainer.max_steps=3",
            "trainer.limit_val_batches=0", "test_after_fit=false", "trainer.num_sanity_val_steps=0", "backbone.rotary=true",
            "tokenizer.pos_embed=none"]
    train(compose("gpt_shakespeare_cpu", args), run_dir=tmp_path / "run")
    assert traced["stats"]["unique_graphs"] == 1 and sum(traced["graph_break"].values()) == 0


def test_a_missing_compiler_is_one_warning_and_the_run_goes_on(monkeypatch, caplog, data_root, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert "no-such-compiler-xyz not on PATH" in compiler_unavailable(torch.device("cpu"))
    args = [*small_run(tmp_path, data_root, "text"), "module.compile=true", "trainer.max_steps=2",
            "trainer.limit_val_batches=0", "test_after_fit=false"]
    with caplog.at_level(logging.WARNING, logger="mmtx.training.compiling"):
        summary = train(compose("gpt_shakespeare_cpu", args), run_dir=tmp_path / "run")
    assert summary["global_step"] == 2
    warnings = [r.getMessage() for r in caplog.records if "module.compile=true" in r.getMessage()]
    assert len(warnings) == 1 and "install g++" in warnings[0] and "continues without compiling" in warnings[0]


def test_a_compiler_that_fails_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    from torch._dynamo.exc import BackendCompilerFailed

    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise BackendCompilerFailed(lambda *a: None, RuntimeError("cc1plus: fatal error: no space left"), None)
        return call

    monkeypatch.setattr(torch, "compile", broken)
    double = CompiledOrEager(lambda x: 2 * x)
    with caplog.at_level(logging.WARNING, logger="mmtx.training.compiling"):
        assert double(3) == 6 and double(4) == 8
    assert len(caplog.records) == 1 and "continues without compiling" in caplog.records[0].getMessage()
    model_error = CompiledOrEager(lambda x: 1 / 0)
    monkeypatch.setattr(model_error, "compiled", lambda x: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # the model's own errors are not the compiler's
        model_error(1)
