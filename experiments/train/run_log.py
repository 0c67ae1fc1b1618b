"""Per-step training log: plain ``log.jsonl`` + ``log.csv`` in the run folder, and wandb (offline by default).

The plain files are the record the experiments read back; wandb is for browsing. wandb runs offline unless
``WANDB_MODE`` says otherwise (no account needed; ``wandb sync`` uploads later) and writes under the run folder.
On resume from a checkpoint at step k, rows after k (logged after the last checkpoint of the killed run) are
dropped from both files, so the resumed log equals the log of an uninterrupted run. That rewrite goes to a temporary
file renamed over the old one, so a run killed meanwhile keeps its whole log; half a last line (a kill while a row
was appended, necessarily after the checkpoint) is dropped with the other rows after k.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from ..results import write_text


class RunLog:
    """Append step rows (dicts with a ``step`` key) to jsonl/csv and, if enabled, to wandb."""

    def __init__(self, out_dir: str | Path, name: str, config: dict | None = None, *, use_wandb: bool = True,
                 project: str = "mst", resume_step: int | None = None, wandb_id: str | None = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.csv = self.dir / "log.jsonl", self.dir / "log.csv"
        self.rows = self._restore(resume_step)
        self.wandb_run = None
        if use_wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(project=project, name=name, id=wandb_id, resume="allow" if wandb_id else None,
                                        dir=str(self.dir), config=config or {}, reinit="finish_previous")

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def _restore(self, resume_step: int | None) -> list[dict]:
        if resume_step is None or not self.jsonl.exists():
            for f in (self.jsonl, self.csv):
                f.unlink(missing_ok=True)
            return []
        lines = [line for line in self.jsonl.read_text().splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:  # only the row being appended at a kill can be cut short
                    raise ValueError(f"{self.jsonl}: line {i + 1} is not JSON (the log is damaged)") from None
        rows = [r for r in rows if r["step"] <= resume_step]
        write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        buf = io.StringIO(newline="")
        if rows:
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        write_text(self.csv, buf.getvalue())
        return rows

    def _append_csv(self, row: dict) -> None:
        new = not self.csv.exists() or self.csv.stat().st_size == 0
        with self.csv.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def log(self, row: dict) -> None:
        """Record one step's metrics."""
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._append_csv(row)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def finish(self, summary: dict | None = None) -> None:
        """Close wandb, storing ``summary`` in the run summary."""
        if self.wandb_run is not None:
            self.wandb_run.summary.update(summary or {})
            self.wandb_run.finish()
            self.wandb_run = None
