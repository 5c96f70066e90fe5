"""Per-step metrics to JSONL, CSV and TensorBoard, optionally Weights & Biases and CodeCarbon (main rank only).

The one metrics log of every trainer (pretraining, fine-tuning, alignment): rows are any JSON values with a "step";
the CSV table and TensorBoard are for pretraining's fixed columns and can be switched off.

Optional back-ends are imported only when enabled, and a missing package is a clear error, not a silent no-op.
On resume, rows after the resumed step (written by the killed run, about to be recomputed) are dropped from the JSONL
and CSV files and TensorBoard purges its events after that step, so the logs read like one uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from astrolom import layout

COLUMNS = (
    "step",
    "loss",
    "val_loss",
    "lr",
    "grad_norm",
    "tokens_seen",
    "flops",
    "tokens_per_s",
    "step_time_s",
    "mfu",
)


def _optional(module: str, flag: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ValueError(
            f"{flag}=true needs the `{module}` package: pip install {module} (or astrolom[tracking])"
        ) from err


def _truncate_jsonl(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):  # a line cut short by a kill
            continue
    _replace(path, "".join(f"{line}\n" for line in keep))


def _truncate_csv(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    keep = [rows[0]] + [r for r in rows[1:] if len(r) == len(rows[0]) and r[0].isdigit() and int(r[0]) <= last_step]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(keep)
    os.replace(tmp, path)


def _replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsLogger:
    """Writes one row per step (or per evaluation). A no-op on ranks other than the main one.

    Args:
        resume_step: resuming from the checkpoint of this step: rows after it are dropped; None: a fresh log.
        columns: the CSV table's columns (None: no CSV).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        resume_step: int | None = None,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "astrolom",
        codecarbon: bool = False,
        config: dict | None = None,
        columns: tuple[str, ...] | None = COLUMNS,
    ):
        self.enabled = enabled
        self.columns = columns
        self._tb = self._wandb = self._carbon = self._csv_file = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        self.jsonl_path = run_dir / layout.METRICS_NAME
        self.csv_path = run_dir / layout.METRICS_CSV_NAME
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            _truncate_jsonl(self.jsonl_path, resume_step)
            _truncate_csv(self.csv_path, resume_step)
        else:
            for p in (self.jsonl_path, self.csv_path):
                p.unlink(missing_ok=True)
        self._jsonl = open(self.jsonl_path, "a")
        if columns is not None:
            new_csv = not self.csv_path.exists()
            self._csv_file = open(self.csv_path, "a", newline="")
            self._csv = csv.writer(self._csv_file)
            if new_csv:
                self._csv.writerow(columns)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(run_dir / layout.TENSORBOARD_DIR), purge_step=purge)
        if wandb:
            wb = _optional("wandb", "train.wandb")
            self._wandb = wb.init(project=wandb_project, dir=str(run_dir), config=config, resume="allow")
        if codecarbon:
            cc = _optional("codecarbon", "train.codecarbon")
            self._carbon = cc.EmissionsTracker(output_dir=str(run_dir), log_level="error")
            self._carbon.start()

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
        self._jsonl.flush()
        if self._csv_file is not None:
            self._csv.writerow(["" if row.get(c) is None else row[c] for c in self.columns])
            self._csv_file.flush()
        step = row["step"]
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{'val' if k == 'val_loss' else 'train'}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> dict:
        """Flush and close; returns end-of-run extras (e.g. CodeCarbon's emissions in kg CO2eq)."""
        extras = {}
        if not self.enabled:
            return extras
        if self._carbon is not None:
            extras["emissions_kg"] = self._carbon.stop()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl.close()
        if self._csv_file is not None:
            self._csv_file.close()
        return extras
