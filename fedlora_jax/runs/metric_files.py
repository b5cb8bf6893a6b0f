"""The metric files of a run, written every round: metrics.jsonl (one strict-JSON line per round,
appended) and metrics.csv (appended; rewritten atomically when a row brings a new column), and the
`Writer` interface every metric writer (writers.py) implements."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config.run_config import RunConfig


class Writer:
    """open(out, cfg, rows, start) once; write(row, step) per row; close() once."""

    name = "writer"
    every_round = False  # True: gets every round (not thinned by logging.log_every)

    def open(self, out: Path, cfg: RunConfig, rows: list[dict], start: int) -> None:
        pass

    def write(self, row: dict, step: int) -> None:
        raise NotImplementedError

    def amend(self, fields: dict, step: int) -> None:
        """More values of a step already written (the final evaluation of a stopped run's last round)."""
        self.write({"round": step, **fields}, step)

    def close(self) -> None:
        pass


def rewrite_rows(path: Path, rows: list[dict]) -> None:
    """Replace metrics.jsonl with `rows`, atomically (a kill leaves the old file or the new one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(x, allow_nan=False) + "\n" for x in rows))
    os.replace(tmp, path)


class JsonlWriter(Writer):
    """metrics.jsonl: one strict-JSON line per round, appended (a kill loses at most the line being written)."""

    name, every_round = "jsonl", True

    def open(self, out: Path, cfg: RunConfig, rows: list[dict], start: int) -> None:
        self.path = out / "metrics.jsonl"
        rewrite_rows(self.path, rows)  # drops rows logged after the checkpoint: they rerun

    def write(self, row: dict, step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")


class CsvWriter(Writer):
    """metrics.csv: appended per round; rewritten (atomically) when a row brings a new column."""

    name, every_round = "csv", True

    def open(self, out: Path, cfg: RunConfig, rows: list[dict], start: int) -> None:
        self.path, self.rows = out / "metrics.csv", list(rows)
        self.fields = _fields(self.rows)
        write_csv(self.path, self.rows)

    def write(self, row: dict, step: int) -> None:
        self.rows.append(row)
        if set(row) - set(self.fields):
            self.fields = _fields(self.rows)
            write_csv(self.path, self.rows)
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)


def _fields(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for x in rows for k in x)) or ["round"]


def write_csv(path: Path, rows: list[dict]) -> None:
    """metrics.csv from rows (columns: every key, in order of first appearance), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_fields(rows))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
