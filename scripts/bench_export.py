"""ONNX export of a trained classifier against the model it came from, on real inputs, on this machine.

`python -m mmtx.export ckpt=CKPT format=onnx` (in its own process, as a user runs it), then every input file
labelled twice: by `mmtx.predict` (PyTorch) and by onnxruntime from `model.onnx` with the inputs prepared as
`preprocess.json` says (audio decoded by mmtx's decoder, as predict does; images resized and normalised with
numpy). Printed: the export's own check, the share of inputs given the same label, the largest difference of
the top probability, the size of model.onnx against the checkpoint, and seconds per input of each.

    python scripts/bench_export.py --ckpt outputs/bench-fsdd/audio-seed1/checkpoints/last.ckpt \\
        --inputs '../shared/data/fsdd/recordings/*_[0-4].wav'          (FSDD's test split: takes 0-4)
    python scripts/bench_export.py --ckpt <vit_cifar_cpu run>/checkpoints/last.ckpt \\
        --inputs '../shared/data/cifar10/test/*/00*.jpg'               (100 test images of each class)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def onnx_rows(folder: Path, paths: list[Path], batch: int = 64) -> list[tuple[str, float]]:
    """(label, probability) of each path from model.onnx and preprocess.json alone."""
    import onnxruntime
    from PIL import Image

    pre = json.loads((folder / "preprocess.json").read_text())
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    rows = []
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        if pre["input"] == "image":
            h, w = pre["image_size"]
            mean, std = np.array(pre["mean"])[:, None, None], np.array(pre["std"])[:, None, None]
            x = np.stack([(np.asarray(Image.open(p).convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float32)
                           .transpose(2, 0, 1) / 255 - mean) / std for p in chunk]).astype(np.float32)
            feed = {"image": x}
        else:
            from mmtx.data.audio_sources import AudioDecoder

            decoder = AudioDecoder(pre["sample_rate"], pre["max_seconds"])
            waves = [decoder.decode(p, str(p)).numpy() for p in chunk]
            x = np.zeros((len(waves), max(len(w) for w in waves)), dtype=np.float32)
            for i, w in enumerate(waves):
                x[i, :len(w)] = w
            feed = {"audio": x, "lengths": np.array([len(w) for w in waves], dtype=np.int64)}
        logits = session.run(["logits"], feed)[0]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        rows += [(pre["classes"][i], float(p[i])) for i, p in zip(probs.argmax(-1), probs)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--inputs", required=True, help="files, a folder or a glob, as mmtx.predict's inputs=")
    args = parser.parse_args()
    from mmtx.data.modalities import MODALITIES
    from mmtx.predict import list_inputs
    from mmtx.predict import main as predict

    out = Path(tempfile.mkdtemp(prefix="mmtx-bench-export-")) / "onnx"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmtx.export", f"ckpt={args.ckpt}", "format=onnx", f"out={out}"], check=True)
    export_s = time.perf_counter() - t0
    check = json.loads((out / "preprocess.json").read_text())["onnx_check"]
    modality = json.loads((out / "preprocess.json").read_text())["input"]  # image | audio
    paths = list_inputs(args.inputs, MODALITIES[modality].suffixes)

    t0 = time.perf_counter()
    rows = predict([f"ckpt={args.ckpt}", f"inputs={args.inputs}", "device=cpu", "batch_size=64",
                    f"output={out.parent / 'predict.tsv'}"])
    torch_s = time.perf_counter() - t0
    theirs = {Path(r[0]): (r[1], float(r[2])) for r in rows[1:]}
    t0 = time.perf_counter()
    ours = onnx_rows(out, paths)
    onnx_s = time.perf_counter() - t0
    same = sum(theirs[p][0] == label for p, (label, _) in zip(paths, ours))
    delta = max(abs(theirs[p][1] - prob) for p, (_, prob) in zip(paths, ours))
    size = (out / "model.onnx").stat().st_size
    print(f"export: {export_s:.1f} s; its check: logits max |delta| {check['max_abs_delta']:.1e} (onnxruntime "
          f"{check['onnxruntime']}, torch {check['torch']})")
    print(f"{len(paths)} inputs: same label {same}/{len(paths)}; top probability max |delta| {delta:.1e} (predict "
          f"prints 4 decimals)")
    print(f"model.onnx {size / 1e6:.2f} MB, checkpoint {Path(args.ckpt).stat().st_size / 1e6:.2f} MB")
    print(f"seconds per input, decoding included: mmtx.predict {torch_s / len(paths) * 1000:.2f} ms, onnxruntime "
          f"{onnx_s / len(paths) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
