"""Human- and machine-readable training logs: CSV files of losses and validation metrics, and a PNG
of the curves at the end."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


class CsvLog:
    """Append-only CSV, resume-safe. A row with a new column (a method whose loss terms change between
    stages) rewrites the file once with the wider header; missing values are left empty."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.columns: list[str] | None = None
        if path.is_file():
            with path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                self.columns = list(reader.fieldnames or []) or None

    def truncate_after(self, iteration: int) -> None:
        """Drop rows logged after ``iteration`` (they belong to a run being resumed from earlier)."""
        if not self.path.is_file() or self.columns is None:
            return
        with self.path.open(newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if int(row["iteration"]) <= iteration]
        self._write(rows, mode="w")

    def append(self, row: dict) -> None:
        if self.columns is None:
            self.columns = list(row)
            self._write([], mode="w")
        new_columns = [key for key in row if key not in self.columns]
        if new_columns:
            existing = self.rows()
            self.columns = self.columns + new_columns
            self._write(existing, mode="w")
        self._write([row], mode="a")

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as handle:
            return list(csv.DictReader(handle))

    def _write(self, rows: list[dict], mode: str) -> None:
        with self.path.open(mode, newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore")
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` logged values; NaN (a term not logged at that step) stays NaN."""
    if len(values) < window or window <= 1:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_curves(train_rows: list[dict], val_rows: list[dict], path: Path, title: str) -> Path | None:
    """Loss terms (smoothed) and validation Dice against iterations, as one PNG."""
    if not train_rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(11, 4))
    iterations = np.array([int(row["iteration"]) for row in train_rows])
    window = max(1, len(train_rows) // 50)
    for column in (c for c in train_rows[0] if c.startswith("loss")):
        values = np.array([float(row[column]) if row[column] else np.nan for row in train_rows])
        smoothed = _moving_average(values, window)
        loss_axis.plot(iterations[len(iterations) - len(smoothed) :], smoothed, label=column)
    loss_axis.set(xlabel="iteration", ylabel="loss", yscale="log", title="training losses")
    loss_axis.legend(fontsize=8)
    if val_rows:
        val_iterations = [int(row["iteration"]) for row in val_rows]
        dice_axis.plot(
            val_iterations, [float(row["mean_dice"]) for row in val_rows], marker="o", label="mean"
        )
        for column in (c for c in val_rows[0] if c.startswith("dice_")):
            dice_axis.plot(
                val_iterations, [float(row[column]) for row in val_rows], label=column[5:], alpha=0.6
            )
        dice_axis.legend(fontsize=8)
    dice_axis.set(xlabel="iteration", ylabel="Dice", title="validation Dice")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
