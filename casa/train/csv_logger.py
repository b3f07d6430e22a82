"""Lightning's CSVLogger, except that a resumed run keeps the rows logged before it resumed.

Lightning's CSV writer deletes `metrics.csv` when its directory is not empty
(`_ExperimentWriter._check_log_dir_exists`: "Previous log files in this directory will be
deleted"). The run configs log to a fixed directory (`version: ""`), so `--ckpt_path last`
lost every row before the resume. `experiments.fit` swaps this class in for
`lightning.pytorch.loggers.CSVLogger` (same arguments, plus `resume`, which it sets when the run
resumes), so every config gets it.

On resume the earlier rows are kept up to the first step the resumed run logs: rows an
interrupted run logged after its last checkpoint are logged again by the resumed run (it
retrains those steps), and appear once. A fresh run (`resume=False`) replaces the file, as
Lightning does. The file is rewritten only at the first save, so a resumed run that fails
before logging anything leaves the earlier rows in place.
"""

from __future__ import annotations

import csv
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


def _step(row: dict[str, str]) -> float | None:
    try:
        return float(row.get("step") or "")
    except ValueError:
        return None


class _ResumingWriter(ExperimentWriter):
    """ExperimentWriter that, when resuming, reads the existing metrics.csv instead of deleting it
    and writes its rows (before the resumed run's first step) back at the first save."""

    def __init__(self, log_dir: str, resume: bool) -> None:
        self.resume = resume
        self.earlier: list[dict[str, str]] | None = None
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if not (self.resume and self._fs.isfile(self.metrics_file_path)):
            return super()._check_log_dir_exists()
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            self.earlier = list(csv.DictReader(f))

    def save(self) -> None:
        if self.earlier is not None and self.metrics:
            first = min(m["step"] for m in self.metrics)
            kept = [r for r in self.earlier if (s := _step(r)) is not None and s < first]
            self.earlier = None
            keys = sorted({k for r in kept for k in r} | set(self.metrics_keys))
            tmp = self.metrics_file_path + ".tmp"
            with self._fs.open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(kept)
            self._fs.mv(tmp, self.metrics_file_path)  # the earlier rows are never half-written
            self.metrics_keys[:] = keys  # the new rows' own keys are added (and the header rewritten) below
        super().save()


class ResumableCSVLogger(CSVLogger):
    """CSVLogger(save_dir, name, version, prefix, flush_logs_every_n_steps) + `resume`: keep the
    rows of the run being resumed (see the module docstring)."""

    def __init__(self, save_dir: str, name: str | None = "lightning_logs", version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100, resume: bool = False) -> None:
        super().__init__(save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
        self.resume = resume

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _ResumingWriter(log_dir=self.log_dir, resume=self.resume)
        return self._experiment


