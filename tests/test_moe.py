"""Mixture of experts in the shared backbone (`backbone.mlp=moe`): routing against a per-token reference, capacity
and dropping, padding, the router losses, the blocks that get experts, the bad keys, a run's logs, checkpoints,
export, sparse upcycling and merging, active-parameter FLOPs."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_TEXT, read_metrics, small_run
from mmtx import compose
from mmtx.backbone import Backbone
from mmtx.batch import Tokens
from mmtx.config.validate import validate
from mmtx.errors import ConfigError
from mmtx.nn.mlp import STATS, MixtureOfExperts, Mlp, MoeSpec, active_parameters
from mmtx.train import train


def reference(moe: MixtureOfExperts, x: torch.Tensor) -> torch.Tensor:
    """Token by token: each token through its top-k experts, scaled by the (renormalised, for k > 1) gates."""
    flat = x.reshape(-1, x.shape[-1])
    probs = moe.route(flat).softmax(-1)
    gate, expert = probs.topk(moe.top_k, dim=-1)
    if moe.top_k > 1:
        gate = gate / gate.sum(-1, keepdim=True)
    rows = []
    for n in range(flat.shape[0]):
        every = moe.experts(flat[n].expand(moe.num_experts, 1, -1))[:, 0]  # (E, D): the token through every expert
        rows.append(sum(gate[n, j] * every[expert[n, j]] for j in range(moe.top_k)))
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("top_k", [1, 2])
def test_each_token_goes_to_its_top_k_experts_when_none_is_full(top_k):
    torch.manual_seed(0)
    moe = MixtureOfExperts(8, 16, MoeSpec(num_experts=4, top_k=top_k, eval_capacity_factor=4.0)).eval()
    x = torch.randn(3, 5, 8)
    y = moe(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, reference(moe, x))
    stats = moe.record["stats"]
    assert stats[STATS.index("assigned")] == stats[STATS.index("kept")] == 15 * top_k  # nothing dropped
    assert stats[len(STATS):].sum() == 15 * top_k  # every choice counted at its expert


def test_choices_past_capacity_are_dropped_first_choices_first():
    torch.manual_seed(0)
    moe = MixtureOfExperts(4, 8, MoeSpec(num_experts=2, top_k=2, capacity_factor=0.5))  # 0.5 * 6 * 2 / 2 = 3 slots
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0.0, 0, 0, 0]]))  # x[0] > 0: expert 0 first
    x = torch.randn(1, 6, 4).abs()  # every token's first choice is expert 0, its second expert 1
    y = moe(x)
    # Expert 0 takes the first three tokens' first choices; expert 1 the first three second choices: tokens 0-2
    # get both experts, 3-5 none (their output is zero: the residual carries them on).
    assert torch.all(y[0, 3:] == 0) and torch.all(y[0, :3].abs().sum(-1) > 0)
    stats = moe.record["stats"]
    assert stats[STATS.index("assigned")] == 12 and stats[STATS.index("kept")] == 6


def test_padding_is_routed_nowhere_and_counted_nowhere():
    torch.manual_seed(0)
    moe = MixtureOfExperts(8, 16, MoeSpec(num_experts=4)).eval()
    x = torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    y = moe(x, mask)
    assert torch.all(y[1, 2:] == 0)
    torch.testing.assert_close(y[0], reference(moe, x[:1])[0])
    assert moe.record["stats"][STATS.index("assigned")] == 6


def test_router_losses_are_switch_s_and_st_moe_s_and_train_the_router():
    moe = MixtureOfExperts(8, 16, MoeSpec(num_experts=4, aux_loss_weight=1.0, z_loss_weight=0.0))
    torch.nn.init.zeros_(moe.router.weight)  # uniform probabilities: E * sum(f * 1/E) = 1 whatever the loads
    moe(torch.randn(2, 6, 8))
    assert moe.record["loss"].item() == pytest.approx(1.0)
    moe = MixtureOfExperts(8, 16, MoeSpec(num_experts=4, aux_loss_weight=0.0, z_loss_weight=1.0))
    torch.nn.init.zeros_(moe.router.weight)  # logsumexp of 4 zeros = log 4
    y = moe(torch.randn(2, 6, 8))
    assert moe.record["loss"].item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)
    (y.square().sum() + moe.record["loss"]).backward()
    assert moe.router.weight.grad.abs().sum() > 0 and moe.experts.fc1.weight.grad.abs().sum() > 0


def test_the_same_seed_gives_the_same_routing_and_outputs():
    def once():
        torch.manual_seed(3)
        moe = MixtureOfExperts(8, 16, MoeSpec(num_experts=4, router_jitter=0.1))
        y = moe(torch.randn(4, 8, 8))
        return y, moe.record["stats"]

    (a, sa), (b, sb) = once(), once()
    assert torch.equal(a, b) and torch.equal(sa, sb)


def test_every_n_blocks_picks_the_blocks_with_experts():
    backbone = Backbone(dim=16, depth=4, num_heads=2, mlp="moe", moe={"num_experts": 4, "every_n_blocks": 2})
    kinds = [type(block.mlp) for block in backbone.blocks]
    assert kinds == [Mlp, MixtureOfExperts, Mlp, MixtureOfExperts]
    dense = Backbone(dim=16, depth=4, num_heads=2)
    # Active parameters: top-1 of 4 experts meets one expert's MLP, plus the router.
    assert active_parameters(backbone) == active_parameters(dense) + 2 * 16 * 4


def test_a_decoder_with_experts_is_still_causal():
    """Top-1 slots fill in token order: whether a token is dropped never depends on the tokens after it."""
    torch.manual_seed(0)
    backbone = Backbone(dim=16, depth=2, num_heads=2, mlp="moe",
                        moe={"num_experts": 4, "every_n_blocks": 1, "capacity_factor": 0.5}).train()
    x = torch.randn(1, 10, 16)
    changed = x.clone()
    changed[:, 6:] = torch.randn(1, 4, 16)
    a, b = backbone(Tokens(x), causal=True), backbone(Tokens(changed), causal=True)
    torch.testing.assert_close(a[:, :6], b[:, :6])


@pytest.mark.parametrize("override,key", [
    ("backbone.moe.top_k=5", "backbone.moe.top_k"),
    ("backbone.moe.capacity_factor=0", "backbone.moe.capacity_factor"),
    ("backbone.moe.every_n_blocks=3", "backbone.moe.every_n_blocks"),
    ("backbone.moe.num_experts=1", "backbone.moe.num_experts"),
])
def test_bad_expert_keys_are_named_before_anything_is_built(override, key):
    cfg = compose("gpt_shakespeare_cpu", ["backbone.mlp=moe", "backbone.moe.num_experts=4", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_an_unknown_mlp_is_named():
    with pytest.raises(ConfigError, match=r"backbone\.mlp"):
        validate(compose("gpt_shakespeare_cpu", ["backbone.mlp=sparse"]))


@pytest.fixture(scope="module")
def text_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_text")
    (root / "tinyshakespeare").mkdir()
    (root / "tinyshakespeare" / "input.txt").write_text(TINY_TEXT)
    return root


def lm_run(tmp_path, root, *extra):
    return [*small_run(tmp_path, root, "text"), "trainer.max_steps=6", "trainer.max_epochs=-1", "test_after_fit=false",
            *extra]


@pytest.fixture(scope="module")
def runs(text_root, tmp_path_factory):
    """A dense language model and one with experts (4, top-1, in block 1 of 2), 6 steps each."""
    tmp = tmp_path_factory.mktemp("moe_runs")
    dense = train(compose("gpt_shakespeare_cpu", lm_run(tmp / "d", text_root)), run_dir=tmp / "dense")
    moe = train(compose("gpt_shakespeare_cpu", lm_run(tmp / "m", text_root, "backbone.mlp=moe",
                                                      "backbone.moe.num_experts=4")), run_dir=tmp / "moe")
    return {"dense": dense, "moe": moe, "dirs": {"dense": tmp / "dense", "moe": tmp / "moe"}}


def test_a_run_logs_each_layer_s_expert_load_and_drops(runs):
    rows = read_metrics(runs["dirs"]["moe"])
    train_rows = [r for r in rows if r.get("train/moe/block1/load0")]
    assert len(train_rows) == 6  # every log step (trainer.log_every_n_steps=1)
    for r in train_rows:
        assert sum(float(r[f"train/moe/block1/load{e}"]) for e in range(4)) == pytest.approx(1.0, abs=1e-5)
        assert 0 <= float(r["train/moe/block1/dropped"]) < 1 and float(r["train/moe/balance_loss"]) >= 1 - 1e-5
        assert float(r["train/moe/z_loss"]) > 0
    assert any(r.get("val/moe/block1/load0") for r in rows)
    assert not any(k.startswith(("train/moe/block0", "val/moe/block0")) for k in rows[0])  # block 0 is dense


def test_flops_count_the_active_parameters(runs):
    from mmtx.checkpoints import load

    dense = load(runs["dense"]["best_checkpoint"]).module
    moe = load(runs["moe"]["best_checkpoint"]).module
    assert sum(p.numel() for p in moe.parameters()) > sum(p.numel() for p in dense.parameters()) + 3 * 2 * 32 * 128
    router = 32 * 4
    assert moe.flops_per_token(16) == dense.flops_per_token(16) + 6 * router


def test_export_and_reload_keep_the_experts(runs, tmp_path):
    from mmtx.batch import TokenBatch
    from mmtx.checkpoints import load
    from mmtx.export import export

    ckpt = runs["moe"]["best_checkpoint"]
    folder = export(ckpt, tmp_path / "exported")
    a, b = load(ckpt).module, load(folder).module
    ids = torch.randint(0, 20, (2, 12))
    batch = TokenBatch(tokens=ids, targets=ids)
    torch.testing.assert_close(a(batch), b(batch))


def test_a_dense_checkpoint_upcycles_into_every_expert(runs, text_root, tmp_path):
    """Sparse upcycling: each expert a copy of the dense MLP, the router new. With top-2 (gates renormalised)
    and room for every token, the upcycled model computes exactly what the dense one did."""
    from mmtx.batch import TokenBatch
    from mmtx.checkpoints import load
    from mmtx.checkpoints.io import load_checkpoint, member_view
    from mmtx.config.wiring import build_model
    from mmtx.tasks import LanguageModel
    from mmtx.training.transfer import init_from

    ckpt = runs["dense"]["best_checkpoint"]
    cfg = compose("gpt_shakespeare_cpu", lm_run(tmp_path, text_root, "backbone.mlp=moe", "backbone.moe.num_experts=4",
                                                "backbone.moe.top_k=2", "backbone.moe.eval_capacity_factor=4"))
    dense = load(ckpt).module
    moe = build_model(cfg, LanguageModel.runtime_from_checkpoint(member_view(load_checkpoint(ckpt), None, ckpt), cfg, ""))
    result = init_from(moe, ckpt)
    assert sorted(result["upcycled"]) == [f"backbone.blocks.1.mlp.experts.{fc}.weight" for fc in ("fc1", "fc2")]
    assert result["new"] == ["backbone.blocks.1.mlp.router.weight"] and not result["unused"]
    expert = moe.backbone.blocks[1].mlp.experts.fc1.weight
    assert all(torch.equal(expert[e], dense.backbone.blocks[1].mlp.fc1.weight) for e in range(4))
    ids = torch.randint(0, 20, (2, 12))
    batch = TokenBatch(tokens=ids, targets=ids)
    torch.testing.assert_close(moe.eval()(batch), dense.eval()(batch))


def test_an_expert_checkpoint_into_a_dense_model_names_the_experts_or_merges_them(runs, text_root, tmp_path):
    ckpt = runs["moe"]["best_checkpoint"]
    args = lm_run(tmp_path, text_root, f"init_from={ckpt}", "trainer.max_steps=1")
    with pytest.raises(ConfigError, match=r"backbone\.blocks\.1\.mlp\.experts\.fc1\.weight.*finetune\.merge_experts"):
        train(compose("gpt_shakespeare_cpu", args), run_dir=tmp_path / "refused")
    result = train(compose("gpt_shakespeare_cpu", [*args, "finetune.merge_experts=true"]), run_dir=tmp_path / "merged")
    table = (tmp_path / "merged" / "init_from.tsv").read_text()
    assert "merged\tbackbone.blocks.1.mlp.fc1.weight" in table and "unused\tbackbone.blocks.1.mlp.router.weight" in table
    assert result["status"] == "finished"


def test_a_run_with_experts_resumes_where_it_stopped(runs, text_root, tmp_path):
    """Resuming the 6-step run from its step-3 checkpoint ends on the same weights as the unbroken run."""
    args = lm_run(tmp_path, text_root, "backbone.mlp=moe", "backbone.moe.num_experts=4")
    whole = train(compose("gpt_shakespeare_cpu", args), run_dir=tmp_path / "whole")
    first = train(compose("gpt_shakespeare_cpu", [*args, "+callbacks.stop._target_=conftest.StopAtStep",
                                                   "+callbacks.stop.step=3"]), run_dir=tmp_path / "first")
    assert first["global_step"] == 3
    resumed = train(compose("gpt_shakespeare_cpu", [*args, f"resume={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}"]),
                    run_dir=tmp_path / "resumed")
    from mmtx.checkpoints.io import load_checkpoint

    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt")["state_dict"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["state_dict"]
    assert whole["global_step"] == resumed["global_step"] == 6
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_a_member_cannot_ask_for_its_own_experts():
    """The backbone is shared: a co-training member entry that asks for another backbone.mlp is named."""
    from mmtx.config.members import resolve_cotrain

    cfg = compose("cotrain_multimodal", ["members.text.overrides=['backbone.mlp=moe']"])
    with pytest.raises(ConfigError, match=r"backbone\.mlp=moe.*backbone\.mlp=dense"):
        resolve_cotrain(cfg)


def test_gpt2_export_refuses_experts(runs, tmp_path):
    from mmtx.export import export

    with pytest.raises(ConfigError, match=r"backbone\.mlp=moe"):
        export(runs["moe"]["best_checkpoint"], tmp_path / "hf", format="hf")
