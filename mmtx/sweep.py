"""Sweeps: a Hydra callback that tabulates a multirun's jobs and their final metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mmtx.files import atomic_write_text

log = logging.getLogger(__name__)


def is_test_metric(key: str) -> bool:
    """`test/acc` of a single-task run, `{member}/test/acc` of a co-training run's member."""
    return key.startswith("test/") or "/test/" in key


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder of `sweep_dir` that holds a summary.json: job, overrides, metrics."""
    rows = []
    for summary_file in sorted(sweep_dir.glob("*/summary.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        job = summary_file.parent
        summary = json.loads(summary_file.read_text())
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.load(overrides_file) if overrides_file.is_file() else []
        row = {"job": job.name, "overrides": " ".join(str(o) for o in overrides)}
        if summary.get("monitor"):
            row[f"best {summary['monitor']}"] = summary.get("best_score")
        row.update({k: v for k, v in summary.items() if is_test_metric(k)})
        row.update({"steps": summary.get("global_step"), "run_dir": summary.get("run_dir")})
        rows.append(row)
    return rows


def write_sweep_summary(sweep_dir: Path) -> Path | None:
    rows = sweep_rows(sweep_dir)
    if not rows:
        return None
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["\t".join(columns)]
    for row in rows:
        lines.append("\t".join("" if row.get(c) is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c]))
                               for c in columns))
    path = sweep_dir / "summary.tsv"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


class SweepSummary(Callback):
    """At the end of a multirun, write `<sweep dir>/summary.tsv` (jobs that failed have no row)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = write_sweep_summary(Path(config.hydra.sweep.dir))
        if path is not None:
            log.info("sweep summary: %s", path)
            print(path.read_text(), flush=True)
