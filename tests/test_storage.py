"""Reliability on disk (docs/reliability.md): nothing deleted that mmtx did not write, caches verified against
their checksums and rebuilt, and a full or read-only disk named in one line, before any work where it can be.

Full and read-only disks are small tmpfs mounts (root only; otherwise those tests skip, and the simulated ones
still run)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import TINY_TEXT, cli, folder_run, make_image_folder
from mmtx import compose
from mmtx.errors import ConfigError, MissingError, StorageError
from mmtx.export import main as export
from mmtx.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run folder of two steps of a tiny image classifier."""
    tmp = tmp_path_factory.mktemp("storage")
    folder = make_image_folder(tmp / "images")
    summary = train(compose("vit_cifar", [*folder_run(tmp, folder), "trainer.max_steps=2", "test_after_fit=false",
                                          "trainer.limit_val_batches=1"]), run_dir=tmp / "run")
    return Path(summary["run_dir"])


def mount_tmpfs(folder: Path, size: str, read_only: bool = False, holding: Path | None = None) -> Path:
    """A tmpfs of `size` at `folder` (root only: the test skips otherwise), holding a copy of `holding`."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root; the simulated-error tests cover the rest")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    if holding is not None:
        shutil.copytree(holding, folder / holding.name)
    if read_only:
        (folder / "out").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    return folder


@pytest.fixture
def disks(tmp_path):
    mounted = []

    def make(name: str, size: str = "1m", read_only: bool = False, holding: Path | None = None) -> Path:
        mounted.append(mount_tmpfs(tmp_path / name, size, read_only, holding))
        return mounted[-1]

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(disk: Path, leave: int) -> None:
    """Fill `disk` but for about `leave` bytes."""
    stat = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))


# -- 1. never delete what mmtx did not write ---------------------------------------------------------------

def test_export_overwrite_replaces_only_an_earlier_export_never_a_folder_holding_the_checkpoint(trained, tmp_path):
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    (run / "sub").mkdir()
    (run / "sub" / "thesis.txt").write_text("four years")
    ckpt = run / "checkpoints" / "last.ckpt"
    for out in (run, run / "checkpoints"):
        with pytest.raises(ConfigError, match=rf"out={re.escape(str(out))} holds the checkpoint being exported"):
            export([f"ckpt={ckpt}", f"out={out}", "overwrite=true"])
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "a.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("also mine")
    for out in (mine, tmp_path / "file.txt"):
        with pytest.raises(ConfigError, match=rf"out={re.escape(str(out))} is .*not an earlier export"):
            export([f"ckpt={ckpt}", f"out={out}", "overwrite=true"])
    proc = cli("mmtx.export", f"ckpt={ckpt}", f"out={run}", "overwrite=true")
    assert proc.returncode == 1 and "holds the checkpoint being exported" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert ckpt.is_file() and (run / "sub" / "thesis.txt").read_text() == "four years"
    assert (mine / "a.txt").read_text() == "mine" and (tmp_path / "file.txt").read_text() == "also mine"
    first = export([f"ckpt={ckpt}", f"out={tmp_path / 'exported'}"])
    assert export([f"ckpt={ckpt}", f"out={first}", "overwrite=true"]) == first  # an earlier export: replaced
    assert json.loads((first / "mmtx.json").read_text())["format"] == "mmtx-safetensors"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_predict_never_writes_its_table_over_an_input_or_the_checkpoint(trained, tmp_path):
    from PIL import Image

    from mmtx.predict import main as predict

    image, ckpt = tmp_path / "a.png", trained / "checkpoints" / "last.ckpt"
    Image.new("RGB", (16, 16), (90, 90, 90)).save(image)
    before, weights = image.read_bytes(), ckpt.read_bytes()
    for inputs, out in ((image, image), (image, ckpt), (tmp_path, tmp_path / "b.png")):
        with pytest.raises(ConfigError, match=rf"output={re.escape(str(out))} is the checkpoint or one of the files"):
            predict([f"ckpt={ckpt}", f"inputs={inputs}", f"output={out}", "device=cpu"])
    with pytest.raises(ConfigError, match=rf"output={re.escape(str(tmp_path))} is a folder"):
        predict([f"ckpt={ckpt}", f"inputs={image}", f"output={tmp_path}", "device=cpu"])
    assert image.read_bytes() == before and ckpt.read_bytes() == weights


def test_a_run_that_fails_before_training_removes_only_what_it_wrote(image_folder, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    (mine / "config.yaml").write_text("my own")
    bad = [*folder_run(tmp_path, image_folder), "optim.lr=abc"]
    with pytest.raises(ConfigError, match="optim.lr"):
        train(compose("vit_cifar", bad), run_dir=mine)  # a folder the run did not make
    assert (mine / "notes.txt").read_text() == "keep" and (mine / "config.yaml").read_text() == "my own"
    with pytest.raises(ConfigError, match="optim.lr"):
        train(compose("vit_cifar", bad), run_dir=tmp_path / "new" / "run")  # one it made, with its parent
    assert not (tmp_path / "new").exists()
    proc = cli("mmtx.train", "task=vit_cifar", *bad)  # from the command line: Hydra's folder and files too
    assert proc.returncode == 1 and "optim.lr='abc' is not valid" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists(), list((tmp_path / "outputs").rglob("*"))


# -- 5. caches are verified, and rebuilt when wrong -----------------------------------------------------------

def text_module(tmp_path: Path, corpus: Path):
    from mmtx.data.text import TextDataModule
    from mmtx.data.text_sources import TextFiles

    dm = TextDataModule(TextFiles(str(corpus)), cache_dir=str(tmp_path / "cache"), vocab={"kind": "char"},
                        block_size=8, batch_size=4)
    dm.setup()
    return dm


@pytest.mark.parametrize("keep_bytes", [1000, 1001])  # even: whole tokens; odd: half a token
def test_a_truncated_text_cache_is_rebuilt_with_a_warning(tmp_path, caplog, keep_bytes):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT * 2)
    tokens = len(text_module(tmp_path, corpus).splits["train"]["ids"])
    folder = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    with open(folder / "train.bin", "r+b") as f:
        f.truncate(keep_bytes)
    caplog.clear()
    dm = text_module(tmp_path, corpus)
    assert len(dm.splits["train"]["ids"]) == tokens  # rebuilt whole, not trained on the first 500 tokens
    assert re.search(rf"cache {re.escape(str(folder))} is damaged: train.bin holds {keep_bytes} bytes where "
                     rf"{2 * tokens} were written; rebuilding it", caplog.text), caplog.text
    assert json.loads((folder / "checksums.json").read_text())["train.bin"]["bytes"] == 2 * tokens


def test_a_text_cache_with_a_changed_byte_is_rebuilt(tmp_path, caplog):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT)
    ids = text_module(tmp_path, corpus).splits["val"]["ids"].clone()
    folder = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    data = bytearray((folder / "val.bin").read_bytes())
    data[10] ^= 0x01
    (folder / "val.bin").write_bytes(bytes(data))
    assert torch.equal(text_module(tmp_path, corpus).splits["val"]["ids"], ids)
    assert "val.bin does not match the checksum recorded when it was written; rebuilding it" in caplog.text


def flip_a_bit_in_tensor_data(path: Path) -> None:
    """Flip one bit inside the first tensor's bytes of a torch.save file (a zip of uncompressed members)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if re.search(r"/data/\d+$", i.filename) and i.file_size > 64)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))


def test_an_image_cache_with_a_flipped_bit_is_rebuilt(tmp_path, caplog):
    from mmtx.data.cache import load_or_build
    from mmtx.data.image_sources import ImageFolder

    source = ImageFolder(make_image_folder(tmp_path / "images"))
    path = tmp_path / "cache.pt"
    built = load_or_build(path, source.fingerprint("train"), lambda: source.decode("train"))
    flip_a_bit_in_tensor_data(path)
    caplog.clear()
    again = load_or_build(path, source.fingerprint("train"), lambda: source.decode("train"))
    assert torch.equal(again["images"], built["images"])
    assert f"cache {path} does not match the size and checksum recorded when it was built" in caplog.text
    assert "rebuilding it" in caplog.text


def test_a_damaged_cache_whose_source_is_gone_is_an_error_naming_the_source(tmp_path):
    from mmtx.data.image import ImageDataModule
    from mmtx.data.image_sources import ImageFolder

    images = make_image_folder(tmp_path / "images")
    ImageDataModule(ImageFolder(images), cache_dir=str(tmp_path / "cache"), val_fraction=0.2).setup()
    for cache in (tmp_path / "cache").glob("*.pt"):
        flip_a_bit_in_tensor_data(cache)
    shutil.rmtree(images)
    with pytest.raises(MissingError, match=f"image folder {re.escape(str(images))} does not exist"):
        ImageDataModule(ImageFolder(images), cache_dir=str(tmp_path / "cache"), val_fraction=0.2).setup()


# -- 7. every path checked before the work; a full or read-only disk is one line ------------------------------

def test_a_refused_write_is_one_message_and_the_previous_file_stays(tmp_path, monkeypatch):
    """Simulated (no mount needed): torch.save failing with ENOSPC, and with torch's own "unexpected pos"."""
    from mmtx.files import atomic_save, atomic_write_text

    path = tmp_path / "last.ckpt"
    atomic_save({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(StorageError, match=rf"cannot write {re.escape(str(path))}: no space left on the device holding "
                                           rf"{re.escape(str(tmp_path))} \(it needs about 12 bytes, and .* is free\); "
                                           r"the previous last.ckpt, if any, is intact"):
        atomic_save({"w": torch.ones(3)}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system", str(path))))
    with pytest.raises(StorageError, match=f"cannot write {re.escape(str(path))}: .* read-only"):
        atomic_write_text(path, "x")


def test_a_checkpoint_on_a_full_disk_is_one_line_with_the_summary_printed(image_folder, tmp_path, disks):
    disk = disks("full", "1m")
    args = [*folder_run(tmp_path, image_folder), f"paths.output_root={disk}", "trainer.max_steps=4",
            "callbacks.last_checkpoint.every_n_steps=2", "trainer.limit_val_batches=1", "trainer.val_check_interval=2",
            "hydra.run.dir=" + str(disk / "run")]
    fill(disk, 200_000)  # room for the run's files, not for a checkpoint (about 340 kB)
    proc = cli("mmtx.train", "task=vit_cifar", *args)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "inline_container" not in proc.stderr, proc.stderr[-6000:]
    line = next(l for l in proc.stderr.splitlines() if l.startswith("mmtx.train: error:"))
    assert re.search(rf"cannot write {re.escape(str(disk / 'run' / 'checkpoints'))}/\S+\.ckpt: no space left on the "
                     r"device holding .* \(it needs about .*, and .* is free\)", line), line
    assert "mmtx run summary" in proc.stdout and "status:          failed" in proc.stdout


def test_a_data_cache_on_a_full_disk_is_one_line(image_folder, tmp_path, disks):
    disk = disks("cache", "512k")
    fill(disk, 8_000)
    proc = cli("mmtx.train", "task=vit_cifar", *folder_run(tmp_path, image_folder), f"paths.cache_dir={disk}",
               "trainer.max_steps=1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(rf"mmtx.train: error: cannot write {re.escape(str(disk))}/\S+\.pt: no space left .*"
                     r"\(paths.cache_dir\)", proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "outputs" / "vit_cifar").exists() or not any((tmp_path / "outputs" / "vit_cifar").iterdir())


def test_read_only_folders_are_one_line_before_any_work(trained, image_folder, tmp_path, disks):
    disk = disks("ro", "1m", read_only=True)
    proc = cli("mmtx.train", "task=vit_cifar", *folder_run(tmp_path, image_folder), f"paths.output_root={disk / 'out'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(rf"cannot make the run folder {re.escape(str(disk / 'out'))}/vit_cifar/\S+: .*read-only file "
                     r"system", proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "cache").exists()  # no data was read
    proc = cli("mmtx.export", f"ckpt={trained / 'checkpoints' / 'last.ckpt'}", f"out={disk / 'out' / 'exported'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(rf"the folder of out= {re.escape(str(disk / 'out'))} is not writable: .*read-only", proc.stderr)


def test_eval_of_a_checkpoint_on_a_read_only_disk_writes_its_files_elsewhere(trained, tmp_path, disks):
    disk = disks("zoo", "4m", read_only=True, holding=trained)
    proc = cli("mmtx.eval", f"ckpt={disk / trained.name / 'checkpoints' / 'last.ckpt'}",
               env={"MMTX_OUTPUT_DIR": str(tmp_path / "outputs")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test/acc:" in proc.stdout and f"writing the evaluation's files to {tmp_path / 'outputs' / 'eval' / trained.name}" \
        in proc.stderr


def test_train_log_on_a_full_disk_loses_its_lines_quietly(capsys):
    """<run>/train.log's copy of the terminal (progress.console_log) on a disk that refuses it: the lines are lost,
    nothing is raised or printed, so the run's own one-line error stays the only message."""
    import logging

    from mmtx.training.progress import CONSOLE, _RunLog, echo

    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (Linux)")
    handler = _RunLog("/dev/full", encoding="utf-8", delay=True)
    CONSOLE.addHandler(handler)
    CONSOLE.setLevel(logging.INFO)
    try:
        echo("step 1/2  train/loss 1.0", to_stdout=False)
        echo("step 2/2  train/loss 0.9", to_stdout=False)
    finally:
        CONSOLE.removeHandler(handler)
        handler.close()
    assert handler.failed and capsys.readouterr().err == ""
