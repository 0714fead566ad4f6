"""Shared fixtures: tiny synthetic image folders and the overrides that make a run small and fast."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def make_image_folder(root: Path, classes=("cat", "dog", "ship"), per_class=(12, 4), size=16, seed=0) -> Path:
    """A learnable ImageFolder: each class has its own mean colour, plus noise."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((size, size, 3)) + 60 * c + 40
                pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def make_imagenet_folder(root: Path, classes: int = 3, per_class: tuple[int, int] = (8, 2), seed: int = 0) -> Path:
    """ImageNet's layout in miniature: train/<wnid>/<wnid>_<i>.JPEG and val/<wnid>/..., JPEGs of differing sizes
    (not square), each class its own colour."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c in range(classes):
            wnid = f"n{1440764 + c:08d}"
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(x) for x in rng.integers(36, 60, 2))
                pixels = np.clip(60 * c + 40 + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", format="JPEG")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def fsdd_slice(root: Path, takes, speaker: str = "george") -> Path:
    """Copy `speaker`'s clips of every digit and the given takes from the shared FSDD to
    `<root>/fsdd/recordings` (takes 0-4 are the test split); skip when the shared data is absent."""
    import shutil

    src = SHARED_DATA / "fsdd" / "recordings"
    if not src.is_dir():
        pytest.skip(f"shared FSDD not found at {src}")
    dst = root / "fsdd" / "recordings"
    dst.mkdir(parents=True)
    for digit in range(10):
        for take in takes:
            name = f"{digit}_{speaker}_{take}.wav"
            shutil.copy(src / name, dst / name)
    return dst


def small_run(tmp_path: Path, data_root: Path | None = None, modality: str = "image") -> list[str]:
    """Overrides that make any task tiny: small model, small batches, CPU, outputs in tmp_path."""
    overrides = [
        "backbone.depth=2",
        "backbone.dim=32",
        "backbone.num_heads=2",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        *MODALITY_OVERRIDES[modality],
        "trainer=cpu",
        "module.compile=false",  # a GPU recipe's (gpt2_small): compiling takes longer than a tiny run
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        f"paths.output_root={tmp_path / 'outputs'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    if data_root is not None:
        overrides.append(f"data.root={data_root}")
    return overrides


def task_modality(task: str) -> str:
    """image | audio | text | text2text | audio2text: which of MODALITY_OVERRIDES a single task takes."""
    from mmtx.config.compose import compose

    from hydra.utils import get_class

    cfg = compose(task)
    kind = get_class(cfg.tokenizer._target_).modality  # as the tokenizer declares it (mmtx.data.modalities)
    return f"{kind}2text" if get_class(cfg.family._target_).kind == "seq2seq" else kind


def cotrain_small_run(task: str, tmp_path: Path, data_root: Path | None = None) -> list[str]:
    """small_run for a co-training task: the run's backbone and trainer made tiny, and each member's data
    and tokenizer through `members.<name>.overrides` (its task file's own overrides kept)."""
    from mmtx.config.compose import compose

    args = [a for a in small_run(tmp_path, data_root) if a.startswith(("backbone.", "trainer", "paths.", "data.root"))]
    for name, spec in compose(task).members.items():
        own = [str(o) for o in spec.get("overrides") or []]
        member = [*own, "data.batch_size=8", "data.eval_batch_size=16", *MODALITY_OVERRIDES[task_modality(spec.task)]]
        args.append(f"members.{name}.overrides=[" + ",".join(f"'{o}'" for o in member) + "]")
    return args


MODALITY_OVERRIDES = {
    "image": ["tokenizer.patch_size=4", "data.augment.randaugment=null"],
    "audio": ["data.source.max_seconds=1.0"],
    "text": ["data.block_size=16", "family.sample_tokens=8", "trainer.val_check_interval=null",
             "trainer.check_val_every_n_epoch=1", "trainer.limit_val_batches=2"],
    "text2text": ["family.decoder.depth=1", "tokenizer.vocab.vocab_size=300", "family.beam_size=2", "data.max_tgt_len=24"],
    "audio2text": ["family.decoder.depth=1", "data.source.max_seconds=1.0"],
    "image_tokens": ["data.image_size=8", "data.palette_size=16", "data.fit_pixels=4000", "family.sample_classes=2",
                     "trainer.val_check_interval=null", "trainer.check_val_every_n_epoch=1", "trainer.limit_val_batches=1"],
    "fused": ["data.fields.audio.source.max_seconds=1.0", "tokenizer.fields.image.patch_size=2"],
}

TINY_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
) * 20


def folder_run(tmp_path: Path, folder: Path) -> list[str]:
    """small_run on a local ImageFolder."""
    return [*small_run(tmp_path), "data=imagefolder", f"data.source.path={folder}", "data.val_fraction=0.2"]


class StopAtStep(L.Callback):
    """A callback (used through Hydra as `conftest.StopAtStep`) that stops training at a given step,
    as an interruption would, without changing the configured schedule."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


EN = "zero one two three four five six seven eight nine".split()
DE = "null eins zwei drei vier fünf sechs sieben acht neun".split()


def make_parallel(folder: Path, sizes=(("train", 80), ("val", 12), ("test_2016_flickr", 12)), seed=0) -> Path:
    """A miniature Multi30k: `<split>.en.gz` / `<split>.de.gz`, counting words translated word by word."""
    import gzip

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes:
        rows = [rng.integers(0, 10, rng.integers(2, 6)) for _ in range(n)]
        for lang, words in (("en", EN), ("de", DE)):
            text = "".join(" ".join(words[i] for i in row).capitalize() + ".\n" for row in rows)
            (folder / f"{split}.{lang}.gz").write_bytes(gzip.compress(text.encode()))
    return folder


class RecordSamplerIndices(L.Callback):
    """Writes the training sample indices this rank will see in epoch 0 to `<run>/indices_rank<r>.json`
    (used through Hydra as `conftest.RecordSamplerIndices` in the distributed tests)."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        import json

        if trainer.current_epoch == 0:
            sampler = trainer.train_dataloader.sampler
            path = Path(trainer.default_root_dir) / f"indices_rank{trainer.global_rank}.json"
            path.write_text(json.dumps([int(i) for i in sampler]))


class RecordImages(L.Callback):
    """Writes a fingerprint of every training image this rank sees in epoch 0 (the bytes of its normalised pixels)
    to `<run>/images_rank<r>.json` (used through Hydra as `conftest.RecordImages` in the streaming DDP test)."""

    def __init__(self) -> None:
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import hashlib

        if trainer.current_epoch == 0:
            self.seen += [hashlib.sha1(image.cpu().numpy().tobytes()).hexdigest() for image in batch.image]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        import json

        if trainer.current_epoch == 0:
            (Path(trainer.default_root_dir) / f"images_rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


class RecordMembers(L.Callback):
    """Writes, per training step, the member a co-training run trained and a fingerprint of its batch (the sum
    of its first tensor) to `<run>/members_rank<r>.json` (used through Hydra as `conftest.RecordMembers`)."""

    def __init__(self) -> None:
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for name, member_batch in batch.items():
            first = next(v for v in vars(member_batch).values() if isinstance(v, torch.Tensor))
            self.steps.append([name, float(first.float().sum())])

    def on_train_end(self, trainer, pl_module) -> None:
        import json

        path = Path(trainer.default_root_dir) / f"members_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.steps))


class StopAtStart(L.Callback):
    """Stops training before its first step (used through Hydra as `conftest.StopAtStart`), as a time limit
    reached during start-up would."""

    def on_train_start(self, trainer, *args) -> None:
        trainer.should_stop = True


class PauseAtStep(L.Callback):
    """Writes `<run>/paused` and sleeps once training reaches `step` (until `seconds` pass, or a stopping signal
    arrives), so a test can kill, interrupt or signal the process at a known point (used through Hydra as
    `conftest.PauseAtStep`)."""

    def __init__(self, step: int, seconds: float = 120.0) -> None:
        self.step, self.seconds = step, seconds

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            import time

            (Path(trainer.default_root_dir) / f"paused{trainer.global_rank or ''}").write_text(str(self.step))
            deadline = time.time() + self.seconds
            while time.time() < deadline and not trainer.received_sigterm:
                time.sleep(0.05)


class FailAtStep(L.Callback):
    """Raises RuntimeError once training reaches `step`: a crash in the middle of a run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"a crash at step {self.step}")


class PoisonStep(L.Callback):
    """Fills the batch of training step `step` (1-based) with NaN, and records the weights around it in
    `PoisonStep.seen` (used through Hydra as `conftest.PoisonStep`)."""

    seen: dict = {}

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step:
            PoisonStep.seen["before"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            for value in vars(batch).values():  # a typed batch (mmtx.batch): poison its float tensors
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    value.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            PoisonStep.seen["after"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            PoisonStep.seen["skipped"] = pl_module.guard.check(trainer)  # the counters live on the device


def read_metrics(run: Path) -> list[dict]:
    """The rows of a run's metrics.csv (CSV logger)."""
    import csv

    return list(csv.DictReader(open(run / "metrics" / "version_0" / "metrics.csv")))


# Subprocesses find the test callbacks (PauseAtStep, ...) on their path.
ENV = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))


def cli(module: str, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in a fresh process, from the repository root."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **(env or {})})



def cpu_fsdp(**kwargs):
    """mmtx's FSDP strategy (`trainer=fsdp`, mmtx.training.distributed.fsdp) on CPU processes (gloo), for tests.

    Lightning refuses an `FSDPStrategy` without a GPU (but not a subclass of it), and torch's FSDP takes the CPU
    only when named as its `device_id`, which Lightning leaves out on a CPU: the subclass names it. The
    wrapping, sharding and checkpoint gathering are torch's and Lightning's own."""
    import torch
    import torch.distributed.fsdp as torch_fsdp

    from mmtx.training.distributed import fsdp

    strategy = fsdp(**kwargs)

    class OnCPU(torch_fsdp.FullyShardedDataParallel):
        def __init__(self, *args, device_id=None, **kw):
            super().__init__(*args, device_id=torch.device("cpu"), **kw)

    class CPUFSDPStrategy(type(strategy)):
        def _setup_model(self, model):
            original, torch_fsdp.FullyShardedDataParallel = torch_fsdp.FullyShardedDataParallel, OnCPU
            try:
                return super()._setup_model(model)
            finally:
                torch_fsdp.FullyShardedDataParallel = original

        def lightning_module_state_dict(self):
            if self._state_dict_type != "full":
                return super().lightning_module_state_dict()
            # Lightning gathers a full state dict with `offload_to_cpu=True`, which on CPU tensors frees what it
            # copies (a segfault); the tensors are on the CPU already.
            config = torch_fsdp.FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
            with torch_fsdp.FullyShardedDataParallel.state_dict_type(self.model, torch_fsdp.StateDictType.FULL_STATE_DICT,
                                                                     config):
                return self.model.state_dict()

    strategy.__class__ = CPUFSDPStrategy
    return strategy


def timm_reference(path: Path, name: str = "vit_tiny_patch16_224", **kwargs) -> Path:
    """A timm model with random weights (no network), saved as safetensors at `path` (once): the stand-in for
    hub weights that `init_from=timm:<name> finetune.pretrained_file=<path>` loads through mmtx's converter."""
    if not path.is_file():
        import timm
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kwargs)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def pretrained_small_run(tmp_path: Path, data_root: Path, reference: Path) -> list[str]:
    """small_run for a task that starts from timm weights (vit_finetune): the task's own backbone (the weights'),
    the reference weights from `reference`, the miniature CIFAR-10 folder at 32x32 (positions resampled)."""
    keep = [a for a in small_run(tmp_path, data_root) if not a.startswith(("backbone.", "tokenizer."))]
    return [*keep, f"finetune.pretrained_file={reference}", "data.source.path=cifar10", "data.source.image_size=32",
            "data.augment.crop_padding=4"]


GPT2_SHAPE = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}


def gpt2_reference(path: Path) -> Path:
    """A GPT-2 with random weights (no network) and a byte-level BPE tokenizer trained on TINY_TEXT, saved at
    `path` by `save_pretrained` (once): the stand-in for the hub's gpt2 that `init_from=hf:<path>` loads through
    mmtx's converter. Its shape: GPT2_SHAPE (dim 32, depth 2, 4 heads, 64 positions)."""
    if not (path / "config.json").is_file():
        import torch
        import transformers

        from mmtx.tokenizers.text import train_bpe

        vocab = train_bpe([TINY_TEXT], vocab_size=300, special_tokens=["<|endoftext|>"])
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=vocab.tokenizer, eos_token="<|endoftext|>",
                                                         bos_token="<|endoftext|>")
        eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=len(vocab), bos_token_id=eos, eos_token_id=eos, **GPT2_SHAPE)
        model = transformers.GPT2LMHeadModel(config)
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def gpt2_small_run(tmp_path: Path, data_root: Path, reference: Path) -> list[str]:
    """small_run for gpt2_finetune: the reference GPT-2 at `reference` (its weights, tokenizer and shape) on the
    miniature Tiny Shakespeare."""
    keep = [a for a in small_run(tmp_path, data_root, "text") if not a.startswith("backbone.")]
    return [*keep, f"init_from=hf:{reference}", f"tokenizer.vocab.name={reference}", "data.source.files=tinyshakespeare/input.txt",
            f"backbone.dim={GPT2_SHAPE['n_embd']}", f"backbone.depth={GPT2_SHAPE['n_layer']}",
            f"backbone.num_heads={GPT2_SHAPE['n_head']}"]


WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
WHISPER_SHAPE = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 4,
                 "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_target_positions": 48}


def whisper_reference(path: Path) -> Path:
    """A Whisper with random weights (no network), its feature extractor and a byte-level BPE tokenizer with
    Whisper's special tokens, saved at `path` by `save_pretrained` (once): the stand-in for openai/whisper-tiny
    that `init_from=hf:<path>` loads through mmtx's converter. Its shape: WHISPER_SHAPE."""
    if not (path / "config.json").is_file():
        import torch
        import transformers

        from mmtx.tokenizers.text import train_bpe

        vocab = train_bpe([TINY_TEXT, "zero one two three four five six seven eight nine"], vocab_size=300,
                          special_tokens=WHISPER_SPECIALS)
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=vocab.tokenizer, eos_token="<|endoftext|>",
                                                         pad_token="<|endoftext|>")
        ids = [tokenizer.convert_tokens_to_ids(t) for t in WHISPER_SPECIALS]
        torch.manual_seed(0)
        config = transformers.WhisperConfig(vocab_size=len(vocab), num_mel_bins=80, pad_token_id=ids[0],
                                            eos_token_id=ids[0], bos_token_id=ids[0], decoder_start_token_id=ids[1],
                                            **WHISPER_SHAPE)
        path.mkdir(parents=True, exist_ok=True)
        transformers.WhisperForConditionalGeneration(config).save_pretrained(path)
        transformers.WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def whisper_small_run(tmp_path: Path, data_root: Path, reference: Path) -> list[str]:
    """small_run for whisper_finetune: the reference Whisper at `reference` (weights, tokenizer and shape, taken from
    them) on speech manifests of the miniature FSDD clips at <data_root>/fsdd/recordings (written beside them once)."""
    recordings = data_root / "fsdd" / "recordings"
    words = {"0": "zero", "1": "one"}
    for split, takes in (("train", range(3, 20)), ("test", range(3))):
        lines = [f"recordings/{p.name}\t{words[p.name[0]]}" for p in sorted(recordings.glob("*.wav"))
                 if int(p.stem.rsplit("_", 1)[1]) in takes and p.name[0] in words]
        (data_root / "fsdd" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    keep = [a for a in small_run(tmp_path, data_root, "audio") if not a.startswith(("backbone.", "data.source"))]
    # No shape, front end or vocabulary: the run takes them from the weights (mmtx.interop.registry.take_architecture)
    return [*keep, f"init_from=hf:{reference}", "data.source.files.train=fsdd/train.tsv",
            "data.source.files.test=fsdd/test.tsv", "data.source.max_seconds=1.0", "data.max_tgt_len=16",
            "family.val_decode_batches=1"]
