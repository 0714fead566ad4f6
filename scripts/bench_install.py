"""The size and time of mmtx's installs, each into a fresh venv, as the README's install lines do them:
core (`pip install .`), core with PyTorch's CPU-only wheels (when download.pytorch.org is reachable), and the
extras (`.[dev]`: tests only; `.[all]`: every user extra). Prints a table (docs/benchmarks.md keeps it).

    python scripts/bench_install.py [--variants core dev all cpu] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
VARIANTS = {"core": ".", "dev": ".[dev]", "all": ".[all]", "cpu": "."}


def size(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0])


def biggest(site: Path, n: int = 5) -> str:
    sizes = sorted(((size(p), p.name) for p in site.iterdir() if p.is_dir()), reverse=True)[:n]
    return ", ".join(f"{name} {b / 2**30:.2f} GiB" for b, name in sizes)


def cpu_index_reachable() -> bool:
    try:
        import urllib.request

        urllib.request.urlopen(f"{CPU_INDEX}/torch/", timeout=15)
        return True
    except OSError:
        return False


def install(variant: str, root: Path) -> str:
    venv = root / variant
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-cache-dir"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    start = time.perf_counter()
    if variant == "cpu":
        subprocess.run([*pip, "torch", "torchvision", "torchaudio", "--index-url", CPU_INDEX, "-c",
                        str(REPO / "constraints.txt")], check=True)
    subprocess.run([*pip, VARIANTS[variant], "-c", str(REPO / "constraints.txt")], check=True, cwd=REPO)
    seconds = time.perf_counter() - start
    site = next((venv / "lib").glob("python3*/site-packages"))
    total = size(venv)
    nvidia = sum(size(p) for p in site.glob("nvidia*")) + sum(size(p) for p in site.glob("triton*"))
    return (f"| {variant} (`pip install {VARIANTS[variant]}`{' + CPU torch' if variant == 'cpu' else ''}) | "
            f"{total / 2**30:.2f} GiB | {nvidia / 2**30:.2f} GiB | {seconds:.0f} s | {biggest(site)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["core", "dev", "all", "cpu"], choices=list(VARIANTS))
    parser.add_argument("--keep", action="store_true", help="keep the venvs (under a temporary folder)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mmtx-install-"))
    print("| install | venv size | of it CUDA libraries and triton | time (no pip cache) | largest packages |")
    print("| --- | --- | --- | --- | --- |", flush=True)
    try:
        for variant in args.variants:
            if variant == "cpu" and not cpu_index_reachable():
                print(f"| cpu (PyTorch's CPU-only wheels) | not measured: {CPU_INDEX} is not reachable from this "
                      "machine | | | |", flush=True)
                continue
            print(install(variant, root), flush=True)
            if not args.keep:
                shutil.rmtree(root / variant)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
