"""What a user with `pip install mmtx` (core dependencies only, no extras) can do: every entry point's
--help, one short training run of each modality on tiny data made here, eval, generate, predict and
export on those runs, and a logger of a missing extra refused in one line naming the extra.

    python scripts/lean_install_check.py      # in a venv with `pip install .` and nothing else

.ci/run runs it in a fresh venv of its own. Exit status 0 when every step did what a user would expect.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
from PIL import Image

ENTRY_POINTS = ["train", "eval", "generate", "predict", "export", "prepare"]
SMALL = ["backbone.depth=1", "backbone.dim=32", "backbone.num_heads=2", "data.batch_size=8", "trainer=cpu",
         "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
         "trainer.log_every_n_steps=1"]


def run(*args: str, expect: int = 0, contains: str | None = None) -> str:
    """`python -m <args>` from a folder outside the checkout, so the installed mmtx (and its conf) runs."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600,
                          cwd=tempfile.gettempdir())
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    ok = proc.returncode == expect and (contains is None or contains in out)
    print(f"{'ok  ' if ok else 'FAIL'} {seconds:5.1f} s  python -m {' '.join(args)}", flush=True)
    if not ok:
        print(out[-4000:])
        raise SystemExit(f"lean install check failed: python -m {' '.join(args)} exited {proc.returncode}"
                         + (f" (expected {contains!r} in its output)" if contains else ""))
    return out


def make_data(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 4)):
        for c, name in enumerate(("cat", "dog")):
            folder = root / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(60 * c + 60 + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    (root / "text.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 60)
    for c, hz in enumerate((300.0, 900.0)):  # two tones, WAV written with the standard library
        folder = root / "audio" / f"tone{c}"
        folder.mkdir(parents=True)
        for i in range(24):
            t = np.arange(8000) / 16000
            clip = 0.5 * np.sin(2 * math.pi * hz * (1 + 0.01 * i) * t) + 0.01 * rng.normal(size=t.size)
            with wave.open(str(folder / (f"test_{i}.wav" if i >= 20 else f"{i}.wav")), "wb") as w:
                w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
                w.writeframes((clip * 32767).astype("<i2").tobytes())


def main() -> None:
    for name in ENTRY_POINTS:
        run(f"mmtx.{name}", "--help", contains=f"usage: python -m mmtx.{name}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root)
        common = [f"paths.output_root={root / 'outputs'}", f"paths.cache_dir={root / 'cache'}"]
        runs = {
            "image": ["task=vit_cifar_cpu", "data=imagefolder", f"data.source.path={root / 'images'}",
                      "data.val_fraction=0.25", "tokenizer.patch_size=4", "data.augment.randaugment=null",
                      "logger=[csv,tensorboard]"],
            "text": ["task=gpt_shakespeare_cpu", "data=text_files", f"data.source.files={root / 'text.txt'}",
                     "data.block_size=16", "family.sample_tokens=8", "trainer.limit_val_batches=2"],
            "audio": ["task=audio_fsdd", "data=audio_folder", f"data.source.path={root / 'audio'}",
                      "data.source.max_seconds=0.5", "data.val_fraction=0.25", "data.source.test_pattern=test_"],
        }
        for modality, args in runs.items():
            out = run("mmtx.train", *args, *SMALL, *common, f"hydra.run.dir={root / modality}")
            assert "test/" in out, f"{modality}: no test figures in the summary"
        ckpt = root / "image" / "checkpoints" / "last.ckpt"
        run("mmtx.eval", f"ckpt={ckpt}")
        run("mmtx.predict", f"ckpt={ckpt}", f"inputs={root / 'images' / 'test' / 'cat'}",
            f"output={root / 'predictions.tsv'}")
        run("mmtx.generate", f"ckpt={root / 'text' / 'checkpoints' / 'last.ckpt'}", "prompt=First", "max_new_tokens=8")
        run("mmtx.export", f"ckpt={ckpt}", f"out={root / 'export'}")
        if importlib.util.find_spec("wandb") is None:  # a lean install: the extra is named, in one line
            run("mmtx.train", *runs["image"], *SMALL, *common, "logger=wandb", f"hydra.run.dir={root / 'wandb'}",
                expect=1, contains="pip install 'mmtx[wandb]'")
        else:
            print("skip  logger=wandb without wandb: wandb is installed here (not a lean install)", flush=True)
    print("lean install check: every step passed", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("MMTX_DEBUG", "")
    main()
