"""Every task composes and runs; the Python API; config errors name the culprit."""

import csv
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from conftest import (TINY_TEXT, cotrain_small_run, gpt2_reference, gpt2_small_run, make_image_folder, make_imagenet_folder, make_parallel,
                      pretrained_small_run, small_run, task_modality, timm_reference, whisper_reference,
                      whisper_small_run)
from test_audio import make_tones
from mmtx import build, compose
from mmtx.files import config_dir
from mmtx.interop.registry import is_pretrained
from mmtx.train import train

TASKS = sorted(p.stem for p in (Path(config_dir()) / "task").glob("*.yaml") if not p.stem.startswith("_"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A data root holding every data set a task looks for, in miniature."""
    root = tmp_path_factory.mktemp("data_root")
    make_image_folder(root / "cifar10", classes=[f"c{i}" for i in range(10)], per_class=(2, 1), size=32)
    make_tones(root / "fsdd" / "recordings", per_class=(10, 5))  # takes 0-4 are the test split
    make_image_folder(root / "digits", classes=("0", "1"), per_class=(10, 4), size=8)  # written digits of the tones' classes
    (root / "tinyshakespeare").mkdir()
    (root / "tinyshakespeare" / "input.txt").write_text(TINY_TEXT)
    make_parallel(root / "multi30k")
    return root


def tiny(task: str, tmp_path: Path, data_root: Path) -> list[str]:
    """The overrides that make `task` tiny on the miniature data root (a co-training task: its members; a task
    that starts from timm or Hugging Face weights: random weights of that model saved beside the data, and its
    backbone)."""
    cfg = compose(task)
    if "members" in cfg:
        return cotrain_small_run(task, tmp_path, data_root)
    if is_pretrained(cfg.init_from) and cfg.init_from.startswith("hf:"):
        if cfg.family._target_.endswith("Seq2Seq"):
            return whisper_small_run(tmp_path, data_root, whisper_reference(data_root / "whisper"))
        return gpt2_small_run(tmp_path, data_root, gpt2_reference(data_root / "gpt2"))
    if is_pretrained(cfg.init_from):
        name = cfg.init_from.split(":", 1)[1].split(".", 1)[0]
        return pretrained_small_run(tmp_path, data_root, timm_reference(data_root / f"{name}.safetensors", name))
    if cfg.data._target_ == "mmtx.data.streaming.StreamingImages":  # an ImageNet-style folder, prepared (deit_s)
        from mmtx.prepare import main

        pytest.importorskip("litdata", reason="the streaming extra (pip install 'mmtx[streaming]') is not installed")
        shards = data_root / f"shards-{task}"
        main(["data=imagefolder", f"data.source.path={make_imagenet_folder(data_root / 'imagenet')}",
              "data.source.image_size=32", f"out={shards}", "num_workers=1"])
        keep = [o for o in small_run(tmp_path, None, "image") if not o.startswith("data.augment.randaugment")]
        return [*keep, f"data.path={shards}", "tokenizer.patch_size=16", "data.num_workers=0"]  # the whole recipe's augmentation
    if cfg.data._target_ == "mmtx.data.token_files.StreamingText":  # text files tokenized into token files (gpt2_owt)
        from mmtx.prepare import main

        shards = data_root / f"tokens-{task}"
        main([f"task={task}", "data=text_files", f"data.source.files={data_root / 'tinyshakespeare' / 'input.txt'}",
              "tokenizer=bpe", "tokenizer.vocab.vocab_size=300", "data.val_fraction=0.1",
              f"paths.cache_dir={tmp_path / 'cache'}", f"out={shards}"])
        return [*small_run(tmp_path, None, task_modality(task)), f"data.path={shards}", "data.val_fraction=null"]
    if cfg.data._target_.startswith("mmtx.data.synthetic."):  # no files: no data root; a small vocabulary
        return [*small_run(tmp_path, None, task_modality(task)), "data.vocab_size=300", "data.train_tokens=4096",
                "data.val_tokens=1024"]
    if cfg.family._target_.endswith("ImageGPT"):  # images as palette tokens: a small grid and palette
        return small_run(tmp_path, data_root, "image_tokens")
    if cfg.family._target_.endswith("Masked"):  # no sampling keys; MAE's decoder within the tiny backbone's width
        kept = [o for o in small_run(tmp_path, data_root, task_modality(task)) if not o.startswith("family.")]
        return [*kept, "family.decoder.dim=16", "family.decoder.num_heads=2"]
    return small_run(tmp_path, data_root, task_modality(task))


def test_tasks_are_found():
    assert {"vit_cifar", "gpt_shakespeare", "gpt_shakespeare_cpu", "audio_fsdd", "translate_multi30k",
            "translate_multi30k_cpu", "asr_fsdd"} <= set(TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_every_task_composes_and_runs_fast_dev_run(task, data_root, tmp_path):
    cfg = compose(task, [*tiny(task, tmp_path, data_root), "trainer.fast_dev_run=true"])
    assert cfg.task_name == task
    summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["global_step"] == 1
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_compose_and_build_from_python(data_root, tmp_path):
    cfg = compose("vit_cifar", [*small_run(tmp_path, data_root), "optim.lr=3e-4"])
    assert cfg.optim.lr == 3e-4 and cfg.backbone.dim == 32
    model, dm = build(cfg)
    assert dm.num_classes == 10
    assert model.task.head.proj.out_features == 10 and model.task.tokenizer.proj.out_channels == 32
    model2, _ = build("vit_cifar", small_run(tmp_path, data_root))
    assert type(model2) is type(model)


def test_default_vit_cifar_config():
    cfg = compose("vit_cifar")
    assert cfg.data.source._target_.endswith("cifar10") and cfg.tokenizer.patch_size == 4
    assert cfg.data.batch_size == 512 and cfg.backbone.dim == 384
    assert cfg.callbacks.checkpoint.monitor == "val/acc"


def test_unknown_task():
    with pytest.raises(ConfigCompositionException, match="task/nonexistent"):
        compose("nonexistent")


def test_misspelled_key():
    with pytest.raises(ConfigCompositionException, match="optim.lrr"):
        compose("vit_cifar", ["optim.lrr=0.1"])


def test_unknown_group_option():
    with pytest.raises(ConfigCompositionException, match="backbone"):
        compose("vit_cifar", ["backbone=gigantic"])


def test_image_size_not_divisible_by_patch_size(data_root, tmp_path):
    cfg = compose("vit_cifar", [*small_run(tmp_path, data_root), "data.source.image_size=30"])
    with pytest.raises(Exception, match="30x30 is not divisible by tokenizer.patch_size=4"):
        build(cfg)


def test_missing_data_root(tmp_path):
    cfg = compose("vit_cifar", [*small_run(tmp_path, tmp_path / "absent"), "data.source.download=false"])
    with pytest.raises(Exception, match=r"CIFAR-10 not found: looked for .*absent/cifar-10-batches-py"):
        build(cfg)


def test_the_wheel_ships_every_package_and_config(tmp_path):
    """setup.py finds the packages (conf/ ships as mmtx.conf): the wheel `pip install .` installs holds every
    folder of mmtx/ with Python files and every YAML file of conf/ (built from a copy: the build writes beside it)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    from conftest import REPO

    src = tmp_path / "src"
    for name in ("mmtx", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                           str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("mmtx-*.whl"))).namelist())
    packages = {str(p.relative_to(REPO)) for p in (REPO / "mmtx").rglob("__init__.py")}
    assert packages <= names, sorted(packages - names)
    configs = {"mmtx/conf/" + str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    assert configs <= names, sorted(configs - names)


@pytest.mark.parametrize("task", ["vit_cifar", "audio_fsdd", "gpt_shakespeare_cpu", "asr_fsdd", "translate_multi30k_cpu"])
def test_every_family_logs_one_training_loss_key(task, data_root, tmp_path):
    """`train/loss` (a mean over the steps since the last log line) in every task family; no `_step`/`_epoch` twins."""
    cfg = compose(task, [*small_run(tmp_path, data_root, task_modality(task)), "trainer.max_steps=3", "test_after_fit=false"])
    train(cfg, run_dir=tmp_path / "run")
    with open(tmp_path / "run" / "metrics" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = set(rows[0])
    assert "train/loss" in keys and not {"train/loss_step", "train/loss_epoch"} & keys
    assert sorted(int(r["step"]) for r in rows if r["train/loss"]) == [0, 1, 2]  # every step: log_every_n_steps=1
