"""Data bigger than memory: `python -m mmtx.prepare` writes an image folder into litdata shards once, and
`data=streaming` trains from them with the same images, the same device-side batch path and a resumable position."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, make_image_folder, small_run
from mmtx import compose
from mmtx.checkpoints.io import load_checkpoint
from mmtx.errors import ConfigError, DataError, MissingError
from mmtx.train import train

pytest.importorskip("litdata", reason="the streaming extra (pip install 'mmtx[streaming]') is not installed")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small PNG ImageFolder (train 36, test 12, three classes, 16x16) and its shards."""
    from mmtx.prepare import main

    root = tmp_path_factory.mktemp("streaming")
    folder = make_image_folder(root / "images", classes=("cat", "dog", "ship"), per_class=(12, 4), size=16)
    meta = main(["data=imagefolder", f"data.source.path={folder}", f"out={root / 'shards'}", "num_workers=2"])
    return folder, root / "shards", meta


def stream_run(tmp_path, shards, *extra):
    return [*small_run(tmp_path), "data=streaming", f"data.path={shards}", "data.num_workers=0", *extra]


def test_prepare_writes_every_split_once(prepared, caplog):
    from mmtx.prepare import main

    folder, shards, meta = prepared
    assert meta["samples"] == {"train": 36, "test": 12} and meta["classes"] == ["cat", "dog", "ship"]
    assert meta["image_size"] == 16 and json.loads((shards / "mmtx.json").read_text()) == meta
    assert (shards / "train" / "index.json").is_file() and not (shards.parent / "shards.partial").exists()
    before = {p: p.stat().st_mtime_ns for p in shards.rglob("*") if p.is_file()}
    with caplog.at_level("INFO"):
        again = main(["data=imagefolder", f"data.source.path={folder}", f"out={shards}"])
    assert again == meta and "already prepared" in caplog.text
    assert before == {p: p.stat().st_mtime_ns for p in shards.rglob("*") if p.is_file()}  # nothing rewritten


def test_an_epoch_streamed_holds_the_images_the_cached_path_holds(prepared, tmp_path):
    from mmtx.data.streaming import StreamingImages
    from mmtx.config.wiring import build_data

    folder, shards, _ = prepared
    cached = build_data(compose("vit_cifar", [*small_run(tmp_path), "data=imagefolder", f"data.source.path={folder}",
                                              "data.val_fraction=0"]))
    streamed = StreamingImages(str(shards), batch_size=6, num_workers=0)
    seen = []
    for batch in streamed.train_dataloader():
        seen += [(label, image.numpy().tobytes()) for image, label in zip(batch["images"], batch["labels"].tolist())]
    train = cached.splits["train"]
    expected = [(label, image.numpy().tobytes()) for image, label in zip(train["images"], train["labels"].tolist())]
    assert sorted(seen) == sorted(expected)  # the same pixels and labels, in a shuffled order
    assert [label for label, _ in seen] != [label for label, _ in expected]
    batch = streamed.on_after_batch_transfer(streamed.transfer_batch_to_device(
        next(iter(streamed.val_dataloader())), torch.device("cpu")))
    assert batch.image.dtype == torch.float32 and batch.image.shape == (6, 3, 16, 16)  # normalised, as cached batches


def test_a_streamed_run_trains_and_resumes_where_it_stopped(prepared, tmp_path):
    """6 + 3 steps resumed equals 9 steps straight through, mid-epoch (6 batches an epoch): the loader's position
    is in the checkpoint."""
    _, shards, _ = prepared
    base = [*stream_run(tmp_path, shards), "task_name=streamed", "test_after_fit=false", "trainer.limit_val_batches=0",
            "data.augment.crop_padding=0", "data.augment.hflip=false", "callbacks.last_checkpoint.every_n_steps=3",
            "trainer.max_steps=9", "trainer.deterministic=true", "data.batch_size=6"]
    straight = train(compose("vit_cifar", base), run_dir=tmp_path / "straight")
    stop = ["+callbacks.stop._target_=conftest.StopAtStep", "+callbacks.stop.step=4"]
    cut = train(compose("vit_cifar", [*base, *stop, "callbacks.last_checkpoint.every_n_steps=4"]), run_dir=tmp_path / "cut")
    assert cut["global_step"] == 4
    resumed = train(compose("vit_cifar", [*base, f"resume={cut['last_checkpoint']}"]), run_dir=tmp_path / "resumed")
    a, b = load_checkpoint(straight["last_checkpoint"]), load_checkpoint(resumed["last_checkpoint"])
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_a_folder_that_is_not_prepared_says_how_to_prepare_it(tmp_path):
    from mmtx.data.streaming import StreamingImages

    with pytest.raises(MissingError, match=r"is not a prepared dataset \(no mmtx.json\): prepare it once with "
                                           r"python -m mmtx.prepare data=imagefolder"):
        StreamingImages(str(tmp_path)).setup()


def test_prepare_refuses_what_it_cannot_write_and_restarts_what_was_killed(prepared, tmp_path):
    from mmtx.prepare import main

    folder, _, _ = prepared
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not a prepared dataset"):
        main(["data=imagefolder", f"data.source.path={folder}", f"out={busy}"])
    killed = tmp_path / "shards.partial"  # what a prepare killed half-way leaves
    (killed / "train").mkdir(parents=True)
    (killed / "train" / "chunk-0-0.bin").write_bytes(b"half")
    meta = main(["data=imagefolder", f"data.source.path={folder}", f"out={tmp_path / 'shards'}", "num_workers=1"])
    assert meta["samples"]["train"] == 36 and not killed.exists()
    with pytest.raises(ConfigError, match="cannot be prepared for streaming"):
        main(["data=synthetic_images", f"out={tmp_path / 'other'}"])
    with pytest.raises(ConfigError, match="out=DIR"):
        main(["data=imagefolder", f"data.source.path={folder}"])


def test_prepare_is_a_command(prepared, tmp_path):
    import subprocess
    import sys

    from conftest import ENV

    proc = subprocess.run([sys.executable, "-m", "mmtx.prepare", "data=imagefolder", "data.source.path=/nowhere",
                           f"out={tmp_path / 'x'}"], cwd=REPO, capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "mmtx.prepare: error: image folder /nowhere does not exist (data.source.path)" in proc.stderr


def test_two_ddp_ranks_stream_disjoint_halves_of_the_training_split(prepared, tmp_path):
    """Two processes (gloo): each rank reads its own samples, and together they see every training image once."""
    import os
    import subprocess
    import sys

    _, shards, _ = prepared
    run = tmp_path / "ddp"
    args = ["task=vit_cifar", "data=streaming", f"data.path={shards}", "data.num_workers=0", "data.batch_size=6",
            "data.augment.crop_padding=0", "data.augment.hflip=false", "data.augment.randaugment=null",
            "backbone.depth=1", "backbone.dim=32", "backbone.num_heads=2", "tokenizer.patch_size=4", "trainer=ddp",
            "trainer.devices=2", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.max_epochs=1",
            "trainer.limit_val_batches=0", "test_after_fit=false", "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}", "+callbacks.record._target_=conftest.RecordImages"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "mmtx.train", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((run / f"images_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 18  # 36 images, 3 batches of 6 a rank
    assert not set(ranks[0]) & set(ranks[1]) and len(set(ranks[0]) | set(ranks[1])) == 36


def test_a_folder_too_large_to_hold_is_prepared_in_the_cache_and_streamed(prepared, tmp_path, caplog):
    from mmtx.data.streaming import StreamingImages
    from mmtx.config.wiring import build_data

    folder, _, _ = prepared
    args = [*small_run(tmp_path), "data=imagefolder", f"data.source.path={folder}"]
    assert not isinstance(build_data(compose("vit_cifar", args)), StreamingImages)  # 36 small images: held
    with caplog.at_level("INFO", logger="mmtx.data.streaming"):
        summary = train(compose("vit_cifar", [*args, "data.resident_max_gb=0.00001", "trainer.max_steps=2",
                                              "test_after_fit=false"]), run_dir=tmp_path / "run")
    assert summary["global_step"] == 2
    assert "decodes to 27.6 kB, more than data.resident_max_gb=1e-05: streaming it from shards prepared in" in caplog.text
    assert list((tmp_path / "cache").glob("imagefolder-*-shards/mmtx.json"))
    with pytest.raises(ConfigError, match="data.resident_max_gb=0 must be a positive number"):
        build_data(compose("vit_cifar", [*args, "data.resident_max_gb=0"]))



def test_the_shards_in_the_cache_follow_their_folder(prepared, tmp_path):
    """Streamed on its own (data.resident_max_gb), a folder that changes is prepared again, as the resident cache
    is rebuilt; a folder prepared by hand (out=) is never replaced."""
    import shutil

    from mmtx.config.wiring import build_data

    folder = shutil.copytree(prepared[0], tmp_path / "images")
    args = [*small_run(tmp_path), "data=imagefolder", f"data.source.path={folder}", "data.resident_max_gb=0.00001"]
    assert build_data(compose("vit_cifar", args)).num_samples("train") == 36
    shutil.copy(folder / "train" / "cat" / "000.png", folder / "train" / "cat" / "extra.png")
    assert build_data(compose("vit_cifar", args)).num_samples("train") == 37
    from mmtx.prepare import main

    with pytest.raises(DataError, match="holds a dataset prepared from other files"):
        main(["data=imagefolder", f"data.source.path={folder}", f"out={prepared[1]}"])


@pytest.fixture(scope="module")
def small_shards(prepared, tmp_path_factory):
    """The fixture's images prepared into shards of about 6 images each (several shards a split)."""
    from mmtx.data.image_sources import ImageFolder
    from mmtx.data.shards import prepare_shards

    folder, _, _ = prepared
    out = tmp_path_factory.mktemp("small") / "shards"
    meta = prepare_shards(ImageFolder(folder), out, num_workers=1, chunk_bytes=6 * 900)
    assert len(meta["shards"]["train"]) >= 3
    return out, meta


def damaged_copy(shards, tmp_path, how):
    """A copy of `shards` whose first training shard is truncated or has bytes overwritten (its size kept)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    shard = sorted((copy / "train").glob("chunk-*.bin"))[0]
    data = bytearray(shard.read_bytes())
    if how == "truncated":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2: len(data) // 2 + 200] = bytes(200)
        shard.write_bytes(bytes(data))
    return copy, shard


def epoch_images(dm):
    return sum(len(batch["labels"]) for batch in dm.train_dataloader())


@pytest.mark.parametrize("how", ["truncated", "overwritten"])
def test_a_damaged_shard_is_named_and_skipped_with_a_count_or_an_error(small_shards, tmp_path, how, caplog):
    from mmtx.data.streaming import StreamingImages

    shards, meta = small_shards
    copy, shard = damaged_copy(shards, tmp_path, how)
    lost = meta["shards"]["train"][shard.name]
    strict = StreamingImages(str(copy), batch_size=2, num_workers=0, on_bad_file="error")
    what = "holds .* bytes where .* were written" if how == "truncated" else "does not match the checksum written"
    with pytest.raises(DataError, match=f"shard {shard}.*{what}.*prepare the folder again.*data.on_bad_file=skip"):
        epoch_images(strict)
    lenient = StreamingImages(str(copy), batch_size=2, num_workers=0, on_bad_file="skip")
    with caplog.at_level("WARNING"):
        seen = epoch_images(lenient)
    assert 0 < seen < 36 and f"shard {shard}" in caplog.text
    if how == "truncated":  # found before reading: counted, and the epoch's length says so
        assert lenient.num_samples("train") == seen and "skipping 1 damaged shard" in caplog.text
    assert lost["bytes"] > 0


def test_a_damaged_shard_read_by_a_worker_ends_a_run_with_one_line(small_shards, tmp_path):
    import subprocess
    import sys

    from conftest import ENV

    shards, _ = small_shards
    copy, shard = damaged_copy(shards, tmp_path, "overwritten")
    proc = subprocess.run([sys.executable, "-m", "mmtx.train", *stream_run(tmp_path, copy), "data.num_workers=1",
                           "data.on_bad_file=error", "trainer.max_epochs=1", "data.batch_size=2",
                           "trainer.limit_val_batches=0", "test_after_fit=false"],
                          cwd=REPO, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"mmtx.train: error: shard {shard} does not match the checksum written with it" in proc.stderr


def test_prepare_again_checks_every_shard_and_rebuilds_a_damaged_folder(prepared, tmp_path, caplog):
    import shutil

    from mmtx.prepare import main

    folder, shards, meta = prepared
    copy, shard = damaged_copy(shards, tmp_path, "overwritten")
    with caplog.at_level("WARNING"):
        again = main(["data=imagefolder", f"data.source.path={folder}", f"out={copy}"])
    assert f"shard {shard} does not match the checksum written with it; preparing it again" in caplog.text
    assert again["samples"] == meta["samples"] and not [p for p in copy.parent.iterdir() if p.name.endswith(".partial")]
    shutil.rmtree(copy)


def test_prepare_notices_shards_litdata_did_not_write(prepared, tmp_path, monkeypatch):
    import litdata

    from mmtx.prepare import main

    folder, _, _ = prepared
    monkeypatch.setattr(litdata, "optimize", lambda **kwargs: None)  # its workers failed: nothing written
    with pytest.raises(DataError, match=r"preparing .*train wrote no readable index.json .*run python -m mmtx.prepare "
                                        "again"):
        main(["data=imagefolder", f"data.source.path={folder}", f"out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


@pytest.fixture
def s3(monkeypatch):
    """A local S3 (moto's server on a free port) and fake credentials; its endpoint URL."""
    import socket

    moto_server = pytest.importorskip("moto.server", reason="moto (a dev dependency) is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    import litdata.streaming.downloader as downloader

    # The local server speaks http, which litdata's obstore client refuses unless told (S3 itself is https).
    monkeypatch.setattr(downloader, "_OBSTORE_CLIENT_OPTIONS", {**downloader._OBSTORE_CLIENT_OPTIONS, "allow_http": "true"})
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_a_prepared_folder_copied_to_s3_streams_the_same_images(prepared, s3, tmp_path):
    import boto3

    from mmtx.data.streaming import StreamingImages

    _, shards, meta = prepared
    client = boto3.client("s3", endpoint_url=s3)
    client.create_bucket(Bucket="data")
    for path in shards.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "data", f"imagenet/{path.relative_to(shards)}")
    options = {"endpoint_url": s3}
    remote = StreamingImages("s3://data/imagenet/", batch_size=6, num_workers=0, storage_options=options,
                             cache_dir=str(tmp_path))
    local = StreamingImages(str(shards), batch_size=6, num_workers=0)
    remote.setup()
    assert remote.meta == meta and remote.num_samples("train") == 36

    def images(dm):
        return sorted(image.numpy().tobytes() for batch in dm.train_dataloader() for image in batch["images"])

    assert images(remote) == images(local)
    assert list((tmp_path / "streamed").rglob("chunk-*.bin"))  # downloaded into the cache folder


def test_s3_without_credentials_network_or_dataset_is_one_message(s3, monkeypatch, tmp_path):
    import socket

    import boto3

    from mmtx.data.streaming import StreamingImages

    boto3.client("s3", endpoint_url=s3).create_bucket(Bucket="data")
    options = {"endpoint_url": s3}
    with pytest.raises(MissingError, match=r"s3://data/none is not a prepared dataset \(no mmtx.json\): prepare it on "
                                           r"a disk .*aws s3 sync"):
        StreamingImages("s3://data/none", storage_options=options).setup()
    with pytest.raises(MissingError, match="the bucket nobucket does not exist"):
        StreamingImages("s3://nobucket/x", storage_options=options).setup()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(DataError, match=f"reading s3://data/x/mmtx.json: cannot reach {closed} .*check the network"):
        StreamingImages("s3://data/x", storage_options={"endpoint_url": closed}).setup()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError, match="reading s3://data/x/mmtx.json: no AWS credentials were found; set "
                                          "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        StreamingImages("s3://data/x", storage_options=options).setup()
    with pytest.raises(ConfigError, match="from a disk or from S3"):
        StreamingImages("gs://bucket/x")


def test_a_task_written_for_a_folder_streams_at_its_image_size(prepared, tmp_path, caplog):
    """vit_finetune sets data.source.image_size=224 and data.val_fraction: streamed, its images are resized to 224
    (prepared at 16) and it validates on the prepared test split, said in one line."""
    from mmtx.config.wiring import build_data

    _, shards, _ = prepared
    with caplog.at_level("INFO"):
        dm = build_data(compose("vit_finetune", [f"paths.cache_dir={tmp_path}", "data=streaming", f"data.path={shards}",
                                                 "data.num_workers=0", "data.batch_size=4"]))
    assert dm.image_size == (224, 224) and "data.val_fraction=0.1 does not apply to data=streaming" in caplog.text
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())))
    assert batch.image.shape == (4, 3, 224, 224)
    with pytest.raises(ConfigError, match=r"data.source.on_bad_file does not apply to data=streaming .*python -m "
                                          r"mmtx.prepare data=imagefolder data.source.on_bad_file=\.\.\."):
        build_data(compose("vit_finetune", [f"paths.cache_dir={tmp_path}", "data=streaming", f"data.path={shards}",
                                            "+data.source.on_bad_file=skip"]))
