"""Sweeps: a Hydra callback that tabulates a multirun's jobs and their final metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mmtx.errors import StorageError, failed_jobs, record_failed_job
from mmtx.files import atomic_write_text, tsv_text
from mmtx.training.summary import is_test_metric

log = logging.getLogger(__name__)


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder of `sweep_dir`: job, status (and the error of one that failed), overrides, metrics.
    A job folder without a summary.json (a job killed outright) is a row whose status says so."""
    rows = []
    jobs = [p.parent for p in sweep_dir.glob("*/.hydra")] + [p.parent for p in sweep_dir.glob("*/summary.json")]
    for job in sorted(set(jobs), key=lambda p: (len(p.name), p.name)):
        summary_file = job / "summary.json"
        try:
            summary = json.loads(summary_file.read_text())
        except (OSError, ValueError):
            summary = {"status": "unknown", "error": f"no readable {summary_file} (the job was killed?)"}
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.load(overrides_file) if overrides_file.is_file() else []
        row = {"job": job.name, "status": summary.get("status"), "error": summary.get("error") or summary.get("signal"),
               "overrides": " ".join(str(o) for o in overrides)}
        if summary.get("monitor"):
            row[f"best {summary['monitor']}"] = summary.get("best_score")
        row.update({k: v for k, v in summary.items() if is_test_metric(k)})
        row.update({"steps": summary.get("global_step"), "run_dir": summary.get("run_dir") or str(job)})
        rows.append(row)
    return rows


def write_sweep_summary(sweep_dir: Path) -> Path | None:
    rows = sweep_rows(sweep_dir)
    if not rows:
        return None
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = [columns] + [[_cell(row.get(c)) for c in columns] for row in rows]
    path = sweep_dir / "summary.tsv"
    atomic_write_text(path, tsv_text(table))
    return path


def _cell(value: Any) -> str:
    return "" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))


class SweepSummary(Callback):
    """At the end of a multirun, write `<sweep dir>/summary.tsv` (every job a row; a failed one with its status
    and error) and, when any job did not finish, make the command exit with status 1 (jobs that ran in other
    processes, SLURM's, are known from their summaries)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            path = write_sweep_summary(sweep_dir)
        except StorageError as err:  # the jobs' own summary.json files still hold their results
            log.warning("the sweep summary was not written: %s", err)
            path = None
        if path is None:
            return
        log.info("sweep summary: %s", path)
        print(path.read_text(), flush=True)
        known = {f.split(":", 1)[0] for f in failed_jobs()}
        for row in sweep_rows(sweep_dir):
            if row["status"] not in ("finished", "evaluated") and f"job {row['job']}" not in known:
                record_failed_job(f"job {row['job']}: {row['status']}" + (f" ({row['error']})" if row["error"] else ""))
