"""Image sources, the decoded cache, device-side augmentation and bad inputs."""

import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA, make_image_folder
from mmtx.data import ImageDataModule
from mmtx.data import image_sources as sources
from mmtx.data.augment import BatchAugment, random_crop_flip, random_resized_crop_flip
from mmtx.data.image_sources import HFImages, ImageFolder, cifar10, resolve_root
from mmtx.errors import ConfigError


def datamodule(source, tmp_path, **kw):
    dm = ImageDataModule(source, cache_dir=str(tmp_path / "cache"), batch_size=4, **kw)
    dm.prepare_data()
    dm.setup()
    return dm


def test_image_folder_decodes_all_splits(image_folder, tmp_path):
    dm = datamodule(ImageFolder(image_folder), tmp_path)
    assert dm.classes == ["cat", "dog", "ship"] and dm.num_classes == 3
    train, test = dm.splits["train"], dm.splits["test"]
    assert train["images"].shape == (36, 3, 16, 16) and train["images"].dtype == torch.uint8
    assert test["images"].shape == (12, 3, 16, 16)
    assert train["labels"].bincount().tolist() == [12, 12, 12]
    assert dm.splits["val"] is test  # no val split and val_fraction=0: validate on test


def test_val_fraction_holds_out_part_of_train(image_folder, tmp_path):
    dm = datamodule(ImageFolder(image_folder), tmp_path, val_fraction=0.25)
    assert len(dm.splits["train"]["labels"]) == 27 and len(dm.splits["val"]["labels"]) == 9


def test_resize_to_image_size(image_folder, tmp_path):
    dm = datamodule(ImageFolder(image_folder, image_size=8), tmp_path)
    assert dm.image_size == (8, 8)


def test_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "imgs", per_class=(3, 2))
    source = ImageFolder(folder)
    calls = []
    decode = source.decode
    monkeypatch.setattr(source, "decode", lambda split: calls.append(split) or decode(split))
    datamodule(source, tmp_path)
    assert sorted(calls) == ["test", "train"]
    calls.clear()
    datamodule(source, tmp_path)
    assert calls == []  # reused
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "train" / "cat" / "new.png")
    dm = datamodule(source, tmp_path)
    assert calls == ["train"]  # only the changed split is rebuilt
    assert len(dm.splits["train"]["labels"]) == 10


def test_corrupt_cache_is_rebuilt(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=(2, 2))
    source = ImageFolder(folder)
    datamodule(source, tmp_path)
    cache = tmp_path / "cache" / f"{source.cache_name}-train.pt"
    cache.write_bytes(cache.read_bytes()[:100])  # truncated, as by a crash
    assert len(datamodule(source, tmp_path).splits["train"]["labels"]) == 6


def test_unreadable_files_are_skipped_and_counted(tmp_path, caplog):
    folder = make_image_folder(tmp_path / "imgs", per_class=(3, 2))
    (folder / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "train" / "dog" / "notes.txt").write_text("hello")
    with caplog.at_level(logging.WARNING):
        dm = datamodule(ImageFolder(folder), tmp_path)
    assert len(dm.splits["train"]["labels"]) == 9
    assert "skipped 2 unreadable file(s)" in caplog.text and "broken.jpg" in caplog.text


def test_unreadable_file_with_on_bad_file_error_names_it(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=(3, 2))
    bad = folder / "train" / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="broken.png"):
        datamodule(ImageFolder(folder, on_bad_file="error"), tmp_path)


def test_missing_root_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no split folder"):
        ImageFolder(tmp_path / "empty")
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no images"):
        ImageFolder(tmp_path / "empty").fingerprint("train")
    (tmp_path / "noclass" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        ImageFolder(tmp_path / "noclass").fingerprint("train")


def test_different_sizes_without_image_size(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=(2, 1))
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "train" / "cat" / "big.png")
    with pytest.raises(ValueError, match="data.source.image_size"):
        ImageFolder(folder).decode("train")


def test_data_root_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MMTX_DATA_DIR", raising=False)
    assert resolve_root(None) == resolve_root("data")
    monkeypatch.setenv("MMTX_DATA_DIR", str(tmp_path))
    assert resolve_root(None) == tmp_path
    assert str(resolve_root("/x")) == "/x"


def test_cifar10_source_finds_an_image_folder_under_the_root(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "cifar10", per_class=(1, 1))
    monkeypatch.setenv("MMTX_DATA_DIR", str(tmp_path))
    source = cifar10(download=False)
    assert isinstance(source, ImageFolder) and source.path == tmp_path / "cifar10"


def test_cifar10_source_missing_without_download_names_the_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        cifar10(root=str(tmp_path), download=False)


def test_cifar10_source_downloads_only_when_nothing_is_local(tmp_path, monkeypatch):
    downloads = []

    def fake_download(base):
        downloads.append(base)
        (base / "cifar-10-batches-py").mkdir(parents=True)

    monkeypatch.setattr(sources, "_download_cifar10", fake_download)
    root = tmp_path / "root"
    assert isinstance(cifar10(root=str(root), download=True), sources.TorchvisionCIFAR10)
    assert downloads == [root]
    cifar10(root=str(root), download=True)
    assert downloads == [root]  # torchvision's files found: no second download


def test_hf_imagefolder_source_offline(image_folder, tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    source = HFImages("imagefolder", data_dir=str(image_folder))
    dm = datamodule(source, tmp_path)
    assert dm.classes == ["cat", "dog", "ship"]
    assert dm.splits["train"]["images"].shape == (36, 3, 16, 16)


def test_hf_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir"):
        HFImages("imagefolder", data_dir=str(tmp_path / "nope")).fingerprint("train")


def test_random_crop_flip_is_a_window_of_the_padded_image_or_its_mirror():
    torch.manual_seed(0)
    images = torch.randint(0, 255, (64, 3, 8, 6), dtype=torch.uint8)
    out = random_crop_flip(images, padding=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for i in range(64):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 6] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(w, out[i]) for w in windows)
        mirrored = any(torch.equal(w.flip(-1), out[i]) for w in windows)
        assert plain or mirrored, f"sample {i} is not a (mirrored) crop of its padded image"
        flips += mirrored and not plain
    assert 10 < flips < 54
    assert not all(torch.equal(out[i], images[i]) for i in range(64))  # not all unshifted
    no_flip = random_crop_flip(images, padding=0, flip_p=0.0)
    assert torch.equal(no_flip, images)
    torch.testing.assert_close(random_crop_flip(images, padding=0, flip_p=1.0), images.flip(-1))


def test_random_resized_crop_is_a_box_of_the_image_resized_back_or_its_mirror():
    """Boxes of a quarter of the area (10x10 of 20x20), each resized to 20x20 as F.interpolate (bilinear) resizes
    it; the whole image unchanged when the box is the image."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    images = torch.randint(0, 255, (16, 3, 20, 20), dtype=torch.uint8)
    out = random_resized_crop_flip(images, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    flips = offsets = 0
    for i in range(16):
        boxes = {(y, x): F.interpolate(images[i:i + 1, :, y:y + 10, x:x + 10].float(), size=(20, 20), mode="bilinear",
                                       align_corners=False)[0] for y in range(11) for x in range(11)}
        near = [(k, flip) for k, box in boxes.items() for flip in (False, True)
                if ((box.flip(-1) if flip else box) - out[i].float()).abs().max() <= 1]
        assert near, f"sample {i} is not a resized 10x10 box of its image"
        flips += near[0][1]
        offsets += near[0][0] != (5, 5)
    assert 2 < flips < 14 and offsets > 8
    assert torch.equal(random_resized_crop_flip(images, scale=(1, 1), ratio=(1, 1), flip_p=0.0), images)
    assert torch.equal(random_resized_crop_flip(images, scale=(1, 1), ratio=(1, 1), flip_p=1.0), images.flip(-1))
    wide = random_resized_crop_flip(images[:, :, :5], scale=(0.9, 1), ratio=(1.0, 1.0), flip_p=0.0)  # no try fits
    torch.testing.assert_close(wide.float(), F.interpolate(images[:, :, :5, 7:12].float(), size=(5, 20),
                                                           mode="bilinear", align_corners=False).round(), atol=1, rtol=0)


def test_imagenet_augmentation_settings_are_checked_and_erase_on_the_normalised_batch(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="data.augment.resized_crop has no key 'size'"):
        BatchAugment(resized_crop={"size": 224})
    with pytest.raises(ConfigError, match=r"resized_crop.scale=\[0.0, 1.0\]"):
        BatchAugment(resized_crop={"scale": [0, 1]})
    with pytest.raises(ConfigError, match="random_erasing=2 is a probability"):
        BatchAugment(random_erasing=2)
    dm = datamodule(ImageFolder(image_folder), tmp_path, augment={
        "crop_padding": 0, "resized_crop": {"scale": [0.08, 1.0], "ratio": [0.75, 1.333]}, "random_erasing": 1.0})
    torch.manual_seed(0)
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch.image.shape == (4, 3, 16, 16)
    # Every image has a rectangle of unit normal noise: values no uint8 pixel normalised by mean/std 0.5 gives.
    grid = (torch.arange(256.0) - 127.5) / 127.5
    off_grid = (batch.image[..., None] - grid).abs().amin(-1) > 1e-4
    assert off_grid.flatten(1).any(1).all()
    val = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert not ((val.image[..., None] - grid).abs().amin(-1) > 1e-4).any()  # evaluation is neither cropped nor erased


def test_batches_are_gathered_and_augmented_on_transfer(image_folder, tmp_path):
    dm = datamodule(ImageFolder(image_folder), tmp_path, augment={"randaugment": {"num_ops": 2, "magnitude": 9}})
    index_batch = next(iter(dm.train_dataloader()))
    assert set(index_batch) == {"index", "split"}  # the loader moves indices only
    batch = dm.on_after_batch_transfer(index_batch, 0)
    assert batch.image.shape == (4, 3, 16, 16) and batch.image.dtype == torch.float32
    torch.testing.assert_close(batch.label, dm.splits["train"]["labels"][index_batch["index"]])
    val = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    raw = dm.splits["val"]["images"][:4].float() / 255
    mean, std = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    torch.testing.assert_close(val.image, (raw - mean) / std)  # no augmentation at eval


def test_mixup_gives_soft_targets(image_folder, tmp_path):
    dm = datamodule(ImageFolder(image_folder), tmp_path, mixup=0.8, cutmix=1.0)
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch.soft_label.shape == (4, 3)
    torch.testing.assert_close(batch.soft_label.sum(1), torch.ones(4))


def test_shared_cifar10_slice(tmp_path):
    src = SHARED_DATA / "cifar10"
    if not src.is_dir():
        pytest.skip(f"shared CIFAR-10 not found at {src}")
    for split, n in (("train", 6), ("test", 2)):
        for cls in sorted(os.listdir(src / split)):
            dst = tmp_path / "cifar10" / split / cls
            dst.mkdir(parents=True)
            for name in sorted(os.listdir(src / split / cls))[:n]:
                shutil.copy(src / split / cls / name, dst / name)
    dm = datamodule(cifar10(root=str(tmp_path), download=False), tmp_path)
    assert dm.classes[:3] == ["airplane", "automobile", "bird"] and dm.num_classes == 10
    assert dm.splits["train"]["images"].shape == (60, 3, 32, 32)


def _build_slowly(counter):
    with open(counter, "a") as f:
        f.write("built\n")
    import time

    time.sleep(0.5)
    return {"x": torch.ones(2)}


def _load_in_another_process(path, counter):
    import functools

    from mmtx.data.cache import load_or_build

    load_or_build(path, "fp", functools.partial(_build_slowly, counter))


def test_processes_that_need_one_cache_at_once_build_it_once(tmp_path):
    """As the ranks of a torchrun job do: the first builds, the others wait and load."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    path, counter = tmp_path / "cache.pt", tmp_path / "builds.txt"
    procs = [ctx.Process(target=_load_in_another_process, args=(path, counter)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text().count("built") == 1
    assert torch.load(path, weights_only=True)["fingerprint"] == "fp"
