"""Mistakes a user makes get one message that names the culprit (the key, the file, the value) and how to
fix it: bad values, hints that name keys, the README's commands, entry points without tracebacks.

One test (or parametrized group) per promise in docs/reliability.md (items 7-9, 11-14); items 1-6 and 10
are in test_faults.py.
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from conftest import ENV, REPO, TINY_TEXT, cli, folder_run, make_image_folder, small_run
from mmtx import compose
from mmtx.errors import CheckpointError, ConfigError, DataError, MissingError
from mmtx.eval import evaluate
from mmtx.config.apps import check_keys
from mmtx.train import _compose_groups, train

# -- 7. bad values fail at composition, naming the key ------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("optim.lr=abc", "optim.lr='abc' is not valid: optim.lr must be a number > 0"),
    ("data.batch_size=0", "data.batch_size=0 is not valid: data.batch_size must be a whole number >= 1"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5 is not valid"),
    ("backbone.num_heads=5", "backbone.dim=384 is not divisible by backbone.num_heads=5"),
    ("optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5] is not valid"),
])
def test_bad_values_fail_before_any_data_is_read(override, message, tmp_path):
    cfg = compose("vit_cifar", [f"data.root={tmp_path / 'no-data-here'}", f"paths.output_root={tmp_path}", override])
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(cfg, run_dir=tmp_path / "run")


@pytest.mark.parametrize("task, override, message", [
    ("vit_cifar_cpu", "tokenizer.patch_size=abc", "tokenizer.patch_size='abc' is not valid: tokenizer.patch_size must "
                                                  "be a whole number >= 1"),
    ("vit_cifar_cpu", "data.augment.crop_padding=-1", "data.augment.crop_padding must be a whole number >= 0"),
    ("vit_cifar_cpu", "data.source.image_size=0", "data.source.image_size must be a whole number >= 1 or null"),
    ("vit_cifar_cpu", "module.max_nonfinite_steps=0", "module.max_nonfinite_steps must be a whole number >= 1"),
    ("vit_cifar_cpu", "data.seed=two", "data.seed must be a whole number"),  # a plain int parameter: its type
    ("translate_multi30k_cpu", "family.decoder.depth=0", "family.decoder.depth must be a whole number >= 1 or null"),
    ("gpt_shakespeare_cpu", "data.val_fraction=0", "data.val_fraction must be a number > 0 and < 1"),  # text's own
    ("audio_fsdd", "data.val_fraction=1", "data.val_fraction must be a number >= 0 and < 1"),
])
def test_a_value_is_checked_by_the_rule_its_constructor_declares(task, override, message):
    """Types and ranges are declared once, on the parameter of the class a node's `_target_` names
    (`batch_size: Count`); the run's table holds only keys no mmtx constructor takes."""
    from mmtx.config.validate import validate

    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose(task, [override]))


def test_no_key_has_two_rules():
    """A key of the run's own table (`RULES`) is taken by no mmtx constructor that declares a rule for it."""
    from mmtx.config.validate import RULES, TAKEN_BY, declared

    for task in ("vit_cifar_cpu", "gpt_shakespeare_cpu", "audio_fsdd", "translate_multi30k_cpu", "asr_fsdd"):
        cfg = compose(task, [])
        for key in RULES:
            group, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, group) if group else None
            if isinstance(node, DictConfig) and "_target_" in node and str(node._target_).startswith("mmtx."):
                assert leaf not in declared(node._target_), key
            assert group not in TAKEN_BY, key


# -- 8. hints name keys that exist ---------------------------------------------------------------------------

GROUPS = ("data", "optim", "trainer", "backbone", "tokenizer", "family", "module", "callbacks", "paths", "logger")
KEY = re.compile(rf"\b((?:{'|'.join(GROUPS)})\.[A-Za-z_][\w.]*\w)")
# The configurations that can raise a message: every task, and each with the data sources it takes.
CONFIGS = [
    ("vit_cifar", []), ("vit_cifar", ["data=imagefolder"]), ("vit_cifar", ["data=hf_images"]),
    ("gpt_shakespeare_cpu", []), ("gpt_shakespeare_cpu", ["data=text_files"]), ("gpt_shakespeare_cpu", ["data=hf_text"]),
    ("gpt_shakespeare_cpu", ["tokenizer=pretrained"]), ("gpt_shakespeare_cpu", ["tokenizer=bpe"]),
    ("gpt2_finetune", ["data.source.files=x.txt"]), ("whisper_finetune", []),
    ("audio_fsdd", []), ("audio_fsdd", ["data=audio_folder"]), ("audio_fsdd", ["data=hf_audio"]),
    ("asr_fsdd", []), ("asr_fsdd", ["data=speech_manifest"]), ("translate_multi30k_cpu", []),
    ("translate_multi30k_cpu", ["data=parallel_text"]), ("translate_multi30k_cpu", ["data=hf_translation"]),
    ("gpt2_small", []), ("vit_cifar", ["data=synthetic_images"]), ("audio_fsdd", ["data=synthetic_audio"]),
    ("vit_cifar", ["data=streaming", "data.path=shards"]), ("deit_s_imagenet", ["data.path=shards"]),
    ("vit_cifar", ["data=streaming", "data.path=s3://bucket/x", "+data.storage_options.endpoint_url=https://s3.example"]),
    ("audio_fsdd", ["data=streaming_audio", "data.path=shards"]), ("gpt2_owt", ["data.path=tokens"]),
    ("translate_multi30k_cpu", ["data=streaming_pairs", "data.path=shards"]),
    ("mae_cifar_cpu", []), ("mask_fsdd", []), ("bert_shakespeare", []),
    ("av_digits", []), ("av_digits_clip", []), ("igpt_cifar_cpu", []),
]


def _is_message(call: ast.Call) -> bool:
    """A call that raises or logs: SomethingError(...), SystemExit(...), log.warning(...) and the like."""
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
    return name.endswith(("Error", "Exception", "Exit")) or name in ("warning", "warn", "error", "info", "exception")


def message_keys() -> dict[str, str]:
    """Every config key written in an error or log message of mmtx's code (hints included): {key: file}."""
    keys = {}
    for path in (REPO / "mmtx").rglob("*.py"):
        for call in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(call, ast.Call) and _is_message(call)):
                continue
            for node in ast.walk(call):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    for key in KEY.findall(node.value):
                        if not key.endswith((".json", ".yaml", ".tsv", ".ckpt")):  # file names, not keys
                            keys.setdefault(key, str(path.relative_to(REPO)))
    return keys


def has_key(cfg, key: str) -> bool:
    from omegaconf import DictConfig, OmegaConf

    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None, throw_on_missing=False)
    return isinstance(node, DictConfig) and leaf in node.keys()  # (`in node` is False for a ??? value)


def test_every_config_key_named_in_a_message_exists():
    configs = [compose(task, overrides) for task, overrides in CONFIGS]
    keys = message_keys()
    assert {"data.source.image_size", "data.source.on_bad_file", "data.source.on_decode_error"} <= set(keys)
    missing = {key: where for key, where in keys.items() if not any(has_key(cfg, key) for cfg in configs)}
    assert not missing, f"messages name keys that no configuration has: {missing}"


# -- 9. the README's commands compose ---------------------------------------------------------------------

DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").rglob("*.md"))]


def readme_commands() -> list[tuple[str, list[str]]]:
    """(module, arguments) of every `python -m mmtx...` command in the code blocks of README.md and the docs
    site's pages (those with a config folder of the user's own, `--config-dir`, are run by
    test_a_task_of_your_own_composes_as_the_docs_say)."""
    commands = []
    for page in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].split("&&")[-1]
                match = re.search(r"-m (mmtx\.\w+)(.*)", line)
                if match and "--config-dir" not in line and "hydra.searchpath" not in line:
                    args = shlex.split(match.group(2))
                    commands.append((match.group(1), args[:args.index(">")] if ">" in args else args))
    return commands


def test_a_task_of_your_own_composes_as_the_docs_say(tmp_path, image_folder):
    """docs/custom.md: its task file, in a folder of the user's own, composes with both of its commands."""
    page = (REPO / "docs" / "custom.md").read_text()
    task = re.search(r"```yaml\n(.*?)```", page, flags=re.S).group(1).replace("/data/flowers", str(image_folder))
    (tmp_path / "my_configs" / "task").mkdir(parents=True)
    (tmp_path / "my_configs" / "task" / "flowers.yaml").write_text(task)
    lines = [ln for ln in re.findall(r"```bash\n(.*?)```", page, flags=re.S)[0].splitlines() if "mmtx.train" in ln]
    assert len(lines) == 2
    for line in lines:
        args = shlex.split(line.replace("$PWD", str(tmp_path)))[3:]
        proc = subprocess.run([sys.executable, "-m", "mmtx.train", *args, "--cfg", "job"], cwd=tmp_path,
                              capture_output=True, text=True, env=ENV, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "task_name: flowers" in proc.stdout and str(image_folder) in proc.stdout


def test_every_readme_command_composes():
    """Each `python -m mmtx.train ...` of the README composes as `--cfg job` would; `mmtx.eval`,
    `mmtx.generate`, `mmtx.predict` and `mmtx.export` commands parse, and the keys they override exist."""
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from mmtx.config.apps import app_keys, compose_app, hydra_argv
    from mmtx.generate import VERBATIM

    commands = readme_commands()
    assert len([c for c in commands if c[0] == "mmtx.train"]) >= 20
    for module, args in commands:
        if module == "mmtx.train":
            args = [a for a in args if a not in ("-m", "--cfg", "job", "--help")]
            # a sweep (-m) composes once per job: check its first
            args = [a if "=" not in a or a.split("=", 1)[1].startswith(("{", "[", "'", "tag(")) else
                    a.split("=", 1)[0] + "=" + a.split("=", 1)[1].split(",")[0] for a in args]
            task = next((a.split("=", 1)[1] for a in args if a.startswith("task=")), "vit_cifar")  # the default
            rest = [a for a in args if not a.startswith("task=") and not a.startswith("hydra.sweeper.params")]
            try:
                compose(task, rest)
                check_keys([f"task={task}", *rest], _compose_groups)  # and no key that names nothing
            except Exception as err:
                raise AssertionError(f"README command `python -m mmtx.train {' '.join(args)}` does not compose: {err}")
            finally:
                GlobalHydra.instance().clear()
        elif module == "mmtx.eval":
            compose_app("eval", hydra_argv([a for a in args if a != "-m"], app_keys("eval"), pass_through=True))
            # a checkpoint of some task: each key must be one that some task's run configuration has
            cfgs = [compose(task) for task in ("vit_cifar", "av_digits", "translate_multi30k_cpu")]
            for override in args:
                key = override.split("=", 1)[0]
                if key not in ("ckpt", "-m"):
                    assert any(OmegaConf.select(cfg, key, default="<absent>") != "<absent>" for cfg in cfgs), \
                        f"mmtx.eval {args}: {key}"
        elif module == "mmtx.predict":
            from mmtx.predict import VERBATIM as PREDICT_VERBATIM

            compose_app("predict", hydra_argv(args, app_keys("predict"), verbatim=PREDICT_VERBATIM))
        elif module == "mmtx.export":
            cfg = compose_app("export", hydra_argv(args, app_keys("export"), verbatim=("ckpt", "out")))
            from mmtx.export import FORMATS

            assert cfg.format in FORMATS, args
        elif module == "mmtx.prepare":  # its own keys, and a training run's composition of the rest
            own = [a for a in args if a.split("=", 1)[0] in app_keys("prepare")]
            assert any(a.startswith("out=") for a in own), args
            rest = [a for a in args if a not in own]
            task = next((a.split("=", 1)[1] for a in rest if a.startswith("task=")), "vit_cifar")
            compose(task, [a for a in rest if not a.startswith("task=")])
            GlobalHydra.instance().clear()
        else:
            assert module == "mmtx.generate", module
            compose_app("generate", hydra_argv(args, app_keys("generate"), verbatim=VERBATIM))


# -- 11. errors name the culprit ------------------------------------------------------------------------------

def test_images_of_another_size_are_named(tmp_path):
    from PIL import Image

    from mmtx.data.image_sources import ImageFolder

    folder = make_image_folder(tmp_path / "imgs")
    Image.new("RGB", (20, 18)).save(folder / "train" / "cat" / "odd.png")
    with pytest.raises(DataError, match=r"most are 16x16 pixels, but .*odd\.png \(20x18\); set data\.source\.image_size"):
        ImageFolder(folder).decode("train")


def test_resuming_another_tasks_checkpoint_names_its_task(image_folder, tmp_path):
    first = train(compose("vit_cifar", [*folder_run(tmp_path, image_folder), "trainer.max_steps=1",
                                        "test_after_fit=false"]), run_dir=tmp_path / "vit")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT)
    cfg = compose("gpt_shakespeare_cpu", [*small_run(tmp_path, modality="text"), "data=text_files",
                                          f"data.source.files={corpus}", f"resume={first['last_checkpoint']}"])
    with pytest.raises(CheckpointError, match="is a checkpoint of task 'vit_cifar', not of 'gpt_shakespeare_cpu'"):
        train(cfg, run_dir=tmp_path / "gpt")
    cfg = compose("vit_cifar", [*folder_run(tmp_path, image_folder), "backbone.dim=48",
                                f"resume={first['last_checkpoint']}"])
    with pytest.raises(CheckpointError, match=r"another shape \(.*\(32,\) in the checkpoint, \(48,\) now"):
        train(cfg, run_dir=tmp_path / "wider")


# -- 12. one message, not a traceback -----------------------------------------------------------------------

def test_user_errors_are_one_message_on_every_entry_point(tmp_path):
    missing = tmp_path / "none.ckpt"
    runs = {
        "mmtx.train": ["task=vit_cifar", "optim.lr=abc", f"paths.output_root={tmp_path}"],
        "mmtx.eval": [f"ckpt={missing}"],
        "mmtx.generate": [f"ckpt={missing}"],
    }
    for module, args in runs.items():
        proc = cli(module, *args)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        error = [line for line in proc.stderr.splitlines() if line.startswith(f"{module}: error: ")]
        assert len(error) == 1 and ("optim.lr" in error[0] or str(missing) in error[0]), proc.stderr
    proc = cli("mmtx.eval", f"ckpt={missing}", env={"MMTX_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr


# -- 13. missing data offline ---------------------------------------------------------------------------------

def test_missing_cifar_offline_names_the_paths_and_leaves_no_folder(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision.datasets.cifar

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    monkeypatch.setenv("MMTX_DATA_DIR", str(tmp_path / "mistyped"))
    run_dir = tmp_path / "outputs" / "vit_cifar" / "run"
    with pytest.raises(MissingError) as err:
        train(compose("vit_cifar", [f"paths.output_root={tmp_path / 'outputs'}"]), run_dir=run_dir)
    message = str(err.value)
    assert f"{tmp_path / 'mistyped' / 'cifar-10-batches-py'}" in message and "$MMTX_DATA_DIR" in message
    assert "no network" in message and "data.root" in message
    assert not (tmp_path / "mistyped").exists() and not run_dir.exists()


# -- 14. small things -------------------------------------------------------------------------------------------

def test_orphans_of_killed_writes_are_removed_by_the_next_build(tmp_path):
    from mmtx.data.cache import load_or_build
    from mmtx.files import building_dir

    (tmp_path / ".cache.pt.4242.tmp").write_bytes(b"half a cache")
    (tmp_path / ".tokens.4242.tmp").mkdir()
    load_or_build(tmp_path / "cache.pt", "f", lambda: {"x": torch.ones(1)})
    with building_dir(tmp_path / "tokens") as tmp:
        (tmp / "meta.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.pt", "cache.pt.lock", "tokens", "tokens.lock"]


def test_skipped_files_are_reported_by_every_run_on_the_cache(tmp_path, caplog):
    from mmtx.config.wiring import build_data

    folder = make_image_folder(tmp_path / "imgs")
    (folder / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    cfg = compose("vit_cifar", folder_run(tmp_path, folder))
    for _ in range(2):  # built, then read from the cache
        caplog.clear()
        build_data(cfg)
        assert "broken.png" in caplog.text


def test_eval_scores_the_whole_test_split(image_folder, tmp_path):
    cfg = compose("vit_cifar", [*folder_run(tmp_path, image_folder), "trainer.max_steps=1", "test_after_fit=false",
                                "data.eval_batch_size=4", "trainer.limit_test_batches=1"])
    summary = train(cfg, run_dir=tmp_path / "run")
    evaluate(summary["last_checkpoint"])
    rows = (tmp_path / "run" / "eval" / "test_confusion.tsv").read_text().splitlines()[1:]
    assert sum(int(n) for row in rows for n in row.split("\t")[1:]) == 12  # all 12 test images, not 4


def test_a_plain_trainer_with_a_new_folder_gets_the_tokenizer_written(tmp_path):
    import lightning as L

    from mmtx.config.wiring import build

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT)
    model, data = build("gpt_shakespeare_cpu", [*small_run(tmp_path, modality="text"), "data=text_files",
                                                f"data.source.files={corpus}"])
    folder = tmp_path / "new" / "deeper"
    L.Trainer(default_root_dir=str(folder), max_steps=1, logger=False, enable_checkpointing=False,
              limit_val_batches=0, enable_progress_bar=False).fit(model, datamodule=data)
    assert (folder / "tokenizer.json").is_file()


@pytest.mark.parametrize("module, words", [("mmtx.eval", "ckpt=PATH"), ("mmtx.generate", "max_new_tokens")])
def test_eval_and_generate_answer_help(module, words):
    proc = cli(module, "--help")
    assert proc.returncode == 0 and words in proc.stdout and "Traceback" not in proc.stderr
