"""PNG figures of an evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless machines; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from grailcore.data.schema import OPINION_DIRECTIONS  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_bars(results: dict[str, Any], path: Path) -> Path:
    """Model accuracy beside every choice baseline, with bootstrap intervals when present."""
    names = ["model"] + list(results["baselines"])
    ests = [results["choice"]["accuracy"]] + [row["accuracy"] for row in results["baselines"].values()]
    values = np.array([e.value for e in ests])
    lo = np.array([e.lo for e in ests])
    hi = np.array([e.hi for e in ests])
    errors = np.nan_to_num(np.vstack([values - lo, hi - values]), nan=0.0)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 4))
    colors = ["tab:blue"] + ["tab:gray"] * (len(names) - 1)
    ax.bar(range(len(names)), values, yerr=errors, capsize=4, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("next-video accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Accuracy vs baselines ({results['n_rows']} rows)")
    return _save(fig, path)


def _heatmap(matrix: np.ndarray, row_labels: list[str], col_labels: list[str], title: str,
             xlabel: str, ylabel: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(col_labels), 1 + 0.6 * len(row_labels)))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    dark = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:g}", ha="center", va="center", fontsize=8,
                color="white" if value > dark else "black")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return _save(fig, path)


def position_confusion(matrix: list[list[float]], path: Path) -> Path:
    m = np.asarray(matrix)
    labels = [str(i + 1) for i in range(m.shape[0])]
    return _heatmap(m, labels, labels + ["none"], "Gold vs predicted position (first sample)",
                    "predicted position", "gold position", path)


def opinion_confusion(matrix: list[list[float]], path: Path) -> Path:
    labels = list(OPINION_DIRECTIONS)
    return _heatmap(np.asarray(matrix), labels, labels + ["none"], "Gold vs predicted opinion direction",
                    "predicted", "gold", path)


def reliability(bins: list[dict], ece: float, path: Path) -> Path:
    """Accuracy vs mean confidence per bin; marker area ~ rows in the bin."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    if bins:
        counts = np.array([b["count"] for b in bins])
        ax.scatter([b["confidence"] for b in bins], [b["accuracy"] for b in bins],
                   s=20 + 300 * counts / counts.max(), label="bins")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted top-choice probability", ylabel="accuracy",
           title=f"Reliability (ECE {ece:.3f})")
    ax.legend(loc="upper left")
    return _save(fig, path)


def write_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Every figure the results support; returns the written paths."""
    written = [
        accuracy_bars(results, out_dir / "accuracy_vs_baselines.png"),
        position_confusion(results["confusion"]["position"], out_dir / "position_confusion.png"),
        reliability(results["fidelity"]["reliability"], results["fidelity"]["ece"].value,
                    out_dir / "reliability.png"),
    ]
    if results["confusion"]["opinion"] is not None:
        written.append(opinion_confusion(results["confusion"]["opinion"], out_dir / "opinion_confusion.png"))
    return written
