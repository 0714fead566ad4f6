"""Reliability and security: bad files, bad checkpoints, kills, interrupts, divergence and mistakes.

One test (or parametrized group) per promise in docs/reliability.md (items 1-6 and 10; the messages of
items 7-9 and 11-14 are checked in test_messages.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import ENV, REPO, TINY_TEXT, PoisonStep, cli, folder_run, make_image_folder, make_parallel, read_metrics, small_run
from mmtx import compose
from mmtx.checkpoints.io import load_checkpoint
from mmtx.config.compose import claim_dir
from mmtx.errors import CheckpointError, DataError
from mmtx.eval import evaluate
from mmtx.train import train


def start(module: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for(pattern: str, folder: Path, proc: subprocess.Popen, seconds: float = 180) -> Path:
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = list(folder.glob(pattern))
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {pattern} appeared:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{pattern} did not appear under {folder}")


def strict_json(path: Path):
    """Parse JSON refusing NaN and Infinity, which are not JSON."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not valid JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


# -- 1. no code runs from a file a user hands mmtx ---------------------------------------------------

class Payload:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    Payload.marker = str(marker)
    path = tmp_path / "outputs" / "vit_cifar" / "old" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "mmtx_config": {"task_name": "vit_cifar"}, "payload": Payload()}, path)
    return path, marker


def test_a_crafted_checkpoint_is_refused_by_eval_generate_and_resume(image_folder, tmp_path):
    ckpt, marker = crafted_checkpoint(tmp_path)
    from mmtx.generate import load_model

    for attempt in (lambda: evaluate(str(ckpt)), lambda: load_model(str(ckpt))):
        with pytest.raises(CheckpointError, match=rf"refusing to load checkpoint {re.escape(str(ckpt))}.*posix\.system"):
            attempt()
    for resume in (str(ckpt), "auto"):
        cfg = compose("vit_cifar", [*folder_run(tmp_path, image_folder), f"resume={resume}"])
        with pytest.raises(CheckpointError, match="posix.system"):
            train(cfg, run_dir=tmp_path / "run")
    proc = cli("mmtx.eval", f"ckpt={ckpt}")
    assert proc.returncode == 1 and "posix.system" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_a_crafted_data_cache_is_rebuilt_not_loaded(tmp_path, caplog):
    from mmtx.data.cache import load_or_build

    marker = tmp_path / "pwned"
    Payload.marker = str(marker)
    path = tmp_path / "cache.pt"
    torch.save({"fingerprint": "f", "payload": Payload()}, path)
    assert load_or_build(path, "f", lambda: {"x": torch.ones(2)})["x"].sum() == 2
    assert not marker.exists() and "posix.system" in caplog.text


# -- 2. non-finite training stops clearly and never becomes "best" ------------------------------------

def test_a_nonfinite_step_is_skipped_and_counted(image_folder, tmp_path):
    PoisonStep.seen.clear()
    cfg = compose("vit_cifar", [*folder_run(tmp_path, image_folder), "trainer.max_steps=4", "test_after_fit=false",
                                "+callbacks.poison._target_=conftest.PoisonStep", "+callbacks.poison.step=3"])
    summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["status"] == "finished" and summary["global_step"] == 4
    seen = PoisonStep.seen
    assert seen["skipped"] == 1
    for key, before in seen["before"].items():  # the NaN step changed no weight
        assert torch.equal(before, seen["after"][key]), key
    weights = load_checkpoint(summary["last_checkpoint"])["state_dict"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_a_diverging_run_stops_naming_the_step_and_keeps_nothing_nonfinite(image_folder, tmp_path):
    args = [*folder_run(tmp_path, image_folder), "optim.lr=1e6", "optim.warmup_steps=0", "trainer.max_epochs=20",
            "module.max_nonfinite_steps=3", "callbacks.last_checkpoint.every_n_steps=1"]
    proc = cli("mmtx.train", "task=vit_cifar", *args)
    assert proc.returncode == 1, proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert any(re.search(r"training stopped at step \d+: .* 3 optimizer steps in a row .*optim\.lr=1000000", line)
               for line in message), proc.stderr[-2000:]
    run = next((tmp_path / "outputs" / "vit_cifar").iterdir())
    summary = strict_json(run / "summary.json")
    assert summary["status"] == "diverged"
    assert not list((run / "checkpoints").glob("best-*.ckpt"))  # a diverged model is never "best"
    if summary["last_checkpoint"]:  # written only while the model was finite
        weights = load_checkpoint(summary["last_checkpoint"])["state_dict"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_summary_json_writes_null_for_a_nonfinite_figure():
    from mmtx.training.summary import finite

    assert [finite(v) for v in (float("nan"), float("inf"), torch.tensor(0.5), None)] == [None, None, 0.5, None]


# -- 3. every run has its own folder ------------------------------------------------------------------

def test_claim_dir_gives_each_claim_its_own_folder(tmp_path):
    import mmtx.config.compose

    first = claim_dir(str(tmp_path / "run"))
    assert claim_dir(str(tmp_path / "run")) == first  # the same claim in one process: the same folder
    mmtx.config.compose._CLAIMED.clear()  # as another process would
    second = claim_dir(str(tmp_path / "run"))
    assert (first, second) == (str(tmp_path / "run"), str(tmp_path / "run_1"))
    assert Path(second).is_dir()


def test_two_runs_started_together_get_their_own_folders(image_folder, tmp_path):
    same = f"hydra.run.dir=${{mmtx_unique_dir:{tmp_path}/outputs/vit_cifar/same-second}}"
    common = [*folder_run(tmp_path, image_folder), "trainer.max_steps=1", "test_after_fit=false",
              "trainer.limit_val_batches=1", same]
    procs = {dim: start("mmtx.train", "task=vit_cifar", *common, f"backbone.dim={dim}") for dim in (32, 48)}
    for proc in procs.values():
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    runs = sorted((tmp_path / "outputs" / "vit_cifar").iterdir())
    assert [r.name for r in runs] == ["same-second", "same-second_1"]
    dims = set()
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        ckpt = load_checkpoint(summary["last_checkpoint"])
        assert Path(summary["last_checkpoint"]).parent.parent == run
        dims.add(ckpt["mmtx_config"]["backbone"]["dim"])
        assert f"dim: {ckpt['mmtx_config']['backbone']['dim']}" in (run / "config.yaml").read_text()
    assert dims == {32, 48}


# -- 4. resume is exact, also mid-epoch -----------------------------------------------------------------

def lm_args(tmp_path: Path) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT)
    return [*small_run(tmp_path, modality="text"), "data=text_files", f"data.source.files={corpus}",
            "backbone.dropout=0.1", "trainer.max_steps=12", "test_after_fit=false", "trainer.limit_val_batches=1",
            "trainer.val_check_interval=4", "callbacks.last_checkpoint.every_n_steps=5"]


def losses(run: Path) -> dict[int, str]:
    rows = [r for r in read_metrics(run) if r.get("train/loss")]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged twice in {run}: {steps}"
    return {int(r["step"]): r["train/loss"] for r in rows}


def test_a_run_killed_mid_epoch_resumes_on_exactly_the_same_samples(tmp_path):
    args = lm_args(tmp_path)
    straight = train(compose("gpt_shakespeare_cpu", args), run_dir=tmp_path / "straight")
    task_dir = tmp_path / "outputs" / "gpt_shakespeare_cpu"
    proc = start("mmtx.train", "task=gpt_shakespeare_cpu", *args, "+callbacks.pause._target_=conftest.PauseAtStep",
                 "+callbacks.pause.step=7")
    wait_for("*/paused", task_dir, proc)  # 7 steps trained, last.ckpt at step 5: mid-epoch (28 batches an epoch)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = next(task_dir.glob("*/checkpoints/last.ckpt"))
    assert load_checkpoint(killed)["global_step"] == 5

    resumed = train(compose("gpt_shakespeare_cpu", [*args, "resume=auto"]), run_dir=task_dir / "resumed")
    assert resumed["resumed_from"] == str(killed) and resumed["global_step"] == 12
    expected, got = losses(Path(straight["run_dir"])), losses(task_dir / "resumed")
    assert sorted(got) == list(range(5, 12))  # steps 6..12 (logged 0-based), none before the checkpoint
    assert {s: expected[s] for s in got} == got  # bit-identical losses


@pytest.mark.parametrize("modality", ["image", "text"])
def test_a_streamed_run_killed_mid_epoch_resumes_on_exactly_the_same_samples(modality, image_folder, tmp_path):
    """The same on data streamed from a prepared folder: images from litdata's shards read by a loader worker (its
    position in the checkpoint), text from memory-mapped token files."""
    from mmtx.prepare import main

    if modality == "image":
        pytest.importorskip("litdata", reason="the streaming extra (pip install 'mmtx[streaming]') is not installed")
        task, shards = "vit_cifar", tmp_path / "shards"
        main(["data=imagefolder", f"data.source.path={image_folder}", f"out={shards}", "num_workers=1"])
        args = [*small_run(tmp_path), "data=streaming", f"data.path={shards}", "data.num_workers=1",
                "backbone.dropout=0.1", "trainer.max_steps=12", "test_after_fit=false", "trainer.limit_val_batches=1",
                "callbacks.last_checkpoint.every_n_steps=5"]  # 36 images, 4 batches an epoch
    else:
        task, tokens, text_args = "gpt_shakespeare_cpu", tmp_path / "tokens", lm_args(tmp_path)
        main(["task=gpt_shakespeare_cpu", text_args[text_args.index("data=text_files") + 1], f"out={tokens}",
              "data=text_files", f"paths.cache_dir={tmp_path / 'cache'}"])
        args = [a for a in text_args if not a.startswith(("data=", "data.source."))]
        args += ["data=streaming_text", f"data.path={tokens}"]
    straight = train(compose(task, args), run_dir=tmp_path / "straight")
    task_dir = tmp_path / "outputs" / task
    proc = start("mmtx.train", f"task={task}", *args, "+callbacks.pause._target_=conftest.PauseAtStep",
                 "+callbacks.pause.step=7")
    wait_for("*/paused", task_dir, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = next(task_dir.glob("*/checkpoints/last.ckpt"))
    assert load_checkpoint(killed)["global_step"] == 5
    resumed = train(compose(task, [*args, "resume=auto"]), run_dir=task_dir / "resumed")
    assert resumed["resumed_from"] == str(killed) and resumed["global_step"] == 12
    expected, got = losses(Path(straight["run_dir"])), losses(task_dir / "resumed")
    assert sorted(got) == list(range(5, 12))
    assert {s: expected[s] for s in got} == got  # bit-identical losses


def test_resume_at_an_epoch_end_starts_the_next_epoch(image_folder, tmp_path):
    # 29 training images, batch 8: 3 batches an epoch; checkpoints every 3 steps fall on epoch ends.
    base = [*folder_run(tmp_path, image_folder), "test_after_fit=false", "trainer.limit_val_batches=0",
            "callbacks.last_checkpoint.every_n_steps=3", "trainer.max_steps=9"]
    straight = train(compose("vit_cifar", base), run_dir=tmp_path / "straight")
    stop = ["+callbacks.stop._target_=conftest.StopAtStep", "+callbacks.stop.step=6"]
    cut = train(compose("vit_cifar", [*base, *stop]), run_dir=tmp_path / "cut")
    resumed = train(compose("vit_cifar", [*base, f"resume={cut['last_checkpoint']}"]), run_dir=tmp_path / "resumed")
    a, b = (load_checkpoint(s["last_checkpoint"])["state_dict"] for s in (straight, resumed))
    for key in a:  # with augmentation on: same batches, same random crops and flips
        assert torch.equal(a[key], b[key]), key


# -- 5. Ctrl-C and crashes keep the work ------------------------------------------------------------------

def test_ctrl_c_saves_last_ckpt_prints_the_summary_and_exits_non_zero(image_folder, tmp_path):
    args = [*folder_run(tmp_path, image_folder), "trainer.max_steps=50", "trainer.limit_val_batches=1",
            "callbacks.last_checkpoint.every_n_steps=100"]
    task_dir = tmp_path / "outputs" / "vit_cifar"
    proc = start("mmtx.train", "task=vit_cifar", *args, "+callbacks.pause._target_=conftest.PauseAtStep",
                 "+callbacks.pause.step=4")
    wait_for("*/paused", task_dir, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "mmtx run summary" in out and "interrupted at step 4" in out, out[-2000:] + err[-2000:]
    run = next(p for p in task_dir.iterdir() if (p / "summary.json").exists())
    summary = strict_json(run / "summary.json")
    assert summary["status"] == "interrupted" and load_checkpoint(summary["last_checkpoint"])["global_step"] == 4
    resumed = train(compose("vit_cifar", [*args, "trainer.max_steps=6", "resume=auto"]), run_dir=task_dir / "resumed")
    assert resumed["resumed_from"] == summary["last_checkpoint"] and resumed["global_step"] == 6


def test_a_crash_saves_last_ckpt_and_the_summary(image_folder, tmp_path):
    cfg = compose("vit_cifar", [*folder_run(tmp_path, image_folder), "trainer.max_steps=50",
                                "+callbacks.crash._target_=conftest.FailAtStep", "+callbacks.crash.step=2"])
    with pytest.raises(RuntimeError, match="a crash at step 2"):
        train(cfg, run_dir=tmp_path / "run")
    summary = strict_json(tmp_path / "run" / "summary.json")
    assert summary["status"] == "failed" and load_checkpoint(summary["last_checkpoint"])["global_step"] == 2


# -- 6. data without a test split --------------------------------------------------------------------

def test_an_image_folder_without_a_test_split_trains_and_skips_the_test(tmp_path, caplog):
    folder = make_image_folder(tmp_path / "imgs")
    (folder / "test").rename(folder / "val")
    cfg = compose("vit_cifar", [*folder_run(tmp_path, folder), "data.val_fraction=0", "trainer.max_steps=2"])
    summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["status"] == "finished" and not any(k.startswith("test/") for k in summary)
    assert (tmp_path / "run" / "summary.json").is_file() and "no test split" in caplog.text


def test_parallel_text_with_train_and_val_only_trains_to_the_end(tmp_path):
    data = make_parallel(tmp_path / "par", sizes=(("train", 60), ("val", 10)))
    cfg = compose("translate_multi30k", [*small_run(tmp_path, modality="text2text"), "data=parallel_text",
                                         f"data.source.files.train.src={data}/train.en.gz",
                                         f"data.source.files.train.tgt={data}/train.de.gz",
                                         f"data.source.files.val.src={data}/val.en.gz",
                                         f"data.source.files.val.tgt={data}/val.de.gz", "trainer.max_steps=2",
                                         "family.val_decode_batches=1"])
    summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["status"] == "finished" and (tmp_path / "run" / "summary.json").is_file()


# -- 10. a truncated audio file is not a short clip ------------------------------------------------------

def test_a_truncated_wav_is_skipped_and_counted_not_decoded_short(tmp_path):
    from mmtx.data.audio_sources import AudioDecoder, wav_declared_frames

    path = tmp_path / "clip.wav"
    sf.write(path, np.random.default_rng(0).uniform(-0.5, 0.5, 5332).astype(np.float32), 8000, subtype="PCM_16")
    whole = path.read_bytes()
    assert wav_declared_frames(path) == 5332
    assert AudioDecoder(8000, on_bad_file="error").decode(path, str(path)).numel() == 5332
    path.write_bytes(whole[:44 + 2655 * 2])  # the header still claims 5,332 frames
    decoder = AudioDecoder(8000, on_bad_file="skip")
    assert decoder.decode(path, str(path)) is None and decoder.bad == [str(path)]
    with pytest.raises(DataError, match=r"clip\.wav: it is truncated: its header declares 5332 frames but it holds 2655"):
        AudioDecoder(8000, on_bad_file="error").decode(path, str(path))


# -- 11. a run that would train nothing stops before training, naming the cause ---------------------------------

@pytest.mark.parametrize("override, message", [
    ("data.val_fraction=0.999", r"the training split is empty: data.val_fraction=0.999 holds out all 36 of its samples"),
    ("data.batch_size=64", r"the training split has 29 samples, fewer than data.batch_size=64, .* set data.batch_size=29"),
    ("trainer.max_steps=0", r"trainer.max_steps=0: the run would take no optimizer step .* eval_only=true"),
    ("trainer.limit_train_batches=0.1", r"trainer.limit_train_batches=0.1 keeps none of the 3 training batches"),
])
def test_a_run_that_would_take_no_step_stops_before_training(image_folder, tmp_path, override, message):
    proc = cli("mmtx.train", "task=vit_cifar", *folder_run(tmp_path, image_folder), "trainer.max_steps=5", override)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(message, proc.stderr), proc.stderr[-2000:]
    assert "mmtx run summary" not in proc.stdout  # nothing reported as a result
    assert not list((tmp_path / "outputs").rglob("summary.json"))


def test_a_fit_that_ended_without_a_step_is_not_finished(image_folder, tmp_path):
    cfg = compose("vit_cifar", [*folder_run(tmp_path, image_folder), "trainer.max_steps=5",
                                "+callbacks.stop._target_=conftest.StopAtStart"])
    with pytest.raises(DataError, match=r"training ended at step 0 without taking an optimizer step"):
        train(cfg, run_dir=tmp_path / "run")
    summary = strict_json(tmp_path / "run" / "summary.json")
    assert summary["status"] == "failed" and "without taking an optimizer step" in summary["error"]
    assert not any(k.startswith("test/") for k in summary)  # the untrained model's figures are not reported


def test_eval_only_tests_the_initial_weights_and_a_finished_run_is_not_resumed_to_nothing(image_folder, tmp_path):
    args = [*folder_run(tmp_path, image_folder), "trainer.max_steps=2", "trainer.limit_val_batches=1"]
    done = train(compose("vit_cifar", args), run_dir=tmp_path / "done")
    with pytest.raises(Exception, match=r"resume=.* is at step 2, and trainer.max_steps=2: there is nothing left"):
        train(compose("vit_cifar", [*args, f"resume={done['last_checkpoint']}"]), run_dir=tmp_path / "again")
    initial = train(compose("vit_cifar", [*args, f"init_from={done['last_checkpoint']}", "eval_only=true"]),
                    run_dir=tmp_path / "initial")
    assert initial["status"] == "evaluated" and initial["global_step"] == 0 and initial["tested"] == "initial"
    assert initial["test/acc"] == pytest.approx(evaluate(done["last_checkpoint"])["test/acc"])
    assert not (tmp_path / "initial" / "checkpoints").exists() or not any((tmp_path / "initial" / "checkpoints").iterdir())


# -- 12. configuration mistakes are one line ---------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["task=cotrain_fsdd", "members=null"], r"task=cotrain_fsdd is a co-training task, but members=None lists no member"),
    (["task=vit_cifar", "tokenizer=null"], r"tokenizer=null: a config group takes no null .* ~tokenizer"),
    (["task=vit_cifar", "data=imagefolder", "data.source.path=/nowhere", "+data.source.foo=1"],
     r"\+data.source.foo: not a key of the run and mmtx.data.image_sources.image_folder takes no foo"),
    (["task=vit_cifar", "~backbone"], r"leaves task=vit_cifar without a backbone to build"),
    (["task=vit_cifar", "logger=bogus"], r"'bogus' is not a choice of the config group logger; pick one of conf/logger/"),
    (["task=vit_cifar", "data=imagefolder", "data.source.path=/nowhere", "data.augment.crop_padding=-1"],
     r"data.augment.crop_padding=-1 is not valid"),
])
def test_configuration_mistakes_are_one_line(tmp_path, args, message):
    proc = cli("mmtx.train", *args, f"paths.output_root={tmp_path / 'outputs'}", f"paths.cache_dir={tmp_path / 'c'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and re.search(message, errors[0]), proc.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()
