"""The memory that tokenizing a text into its cache takes: the growth of a process's peak resident memory while
`TextDataModule.prepare_data` tokenizes a file (data.device_resident=false: tokenization alone), and the time.

    python scripts/bench_text_memory.py FILE [FILE ...] [--kinds char bpe] [--before REF]

`--before REF` runs the same measurement on the code of git ref REF (a temporary worktree), as the peer: the
figures before a change and after it, in one run on one machine. Each measurement is a fresh process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MEASURE = """
import resource, sys, time
sys.path.insert(0, sys.argv[1])
from mmtx.data.text import TextDataModule
from mmtx.data.text_sources import TextFiles
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
dm = TextDataModule(TextFiles(sys.argv[2]), cache_dir=sys.argv[3], vocab={"kind": sys.argv[4], "vocab_size": 4096},
                    block_size=8, device_resident=False)
dm.prepare_data()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024, time.perf_counter() - t0)
"""


def measure(code: Path, text: Path, kind: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as cache:
        out = subprocess.run([sys.executable, "-c", MEASURE, str(code), str(text), cache, kind], capture_output=True,
                             text=True)
    if out.returncode:
        return float("nan"), float("nan")  # e.g. killed for memory
    grown, seconds = out.stdout.split()[-2:]
    return float(grown), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--kinds", nargs="+", default=["char", "bpe"])
    parser.add_argument("--before", help="a git ref whose code is measured too (the peer)")
    args = parser.parse_args()
    codes = {"now": REPO}
    worktree = None
    if args.before:
        worktree = Path(tempfile.mkdtemp(prefix="mmtx-before-"))
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(worktree), args.before], check=True)
        codes = {f"before ({args.before})": worktree, "now": REPO}
    try:
        for text in args.files:
            for kind in args.kinds:
                for name, code in codes.items():
                    grown, seconds = measure(code, text, kind)
                    print(f"{text.name} ({text.stat().st_size / 1e6:.1f} MB) {kind:>4} {name:>22}: peak memory grew "
                          f"{grown / 1e6:7.0f} MB, {seconds:5.1f} s")
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=False)


if __name__ == "__main__":
    main()
