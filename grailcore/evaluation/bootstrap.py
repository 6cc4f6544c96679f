"""Percentile bootstrap clustered by viewer: rows of one participant are not independent,
so a replicate resamples viewers (with all their rows), not rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

MIN_CLUSTERS = 10
"""Below this many resampling units a percentile interval says little; the plan says so."""


@dataclass(frozen=True)
class Estimate:
    """A point value with its bootstrap interval (lo = hi = nan when no bootstrap ran)."""

    value: float
    lo: float = float("nan")
    hi: float = float("nan")

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi}


@dataclass(frozen=True)
class BootstrapPlan:
    """Row multiplicities of every replicate, shared by all metrics so differences pair up."""

    row_weights: np.ndarray  # [B, N] float32: copies of row n in replicate b
    unit: str
    """'viewer' or 'row' (no viewer ids at all)."""
    n_clusters: int
    confidence: float
    note: str
    """Says how the resampling unit was chosen (and when it fell back to rows)."""

    def describe(self) -> dict:
        return {"unit": self.unit, "n_clusters": self.n_clusters, "n_boot": int(self.row_weights.shape[0]),
                "confidence": self.confidence, "note": self.note}


def cluster_ids(viewer_ids: Sequence[str | None]) -> tuple[np.ndarray, str, str]:
    """Map rows to cluster ids; a row without viewer id becomes its own cluster."""
    missing = sum(v is None for v in viewer_ids)
    index: dict[str, int] = {}
    ids = np.empty(len(viewer_ids), dtype=np.int64)
    for i, viewer in enumerate(viewer_ids):
        key = f"\0row{i}" if viewer is None else viewer  # NUL never occurs in real ids
        ids[i] = index.setdefault(key, len(index))
    if missing == len(viewer_ids):
        return ids, "row", ("no viewer_id on these rows: resampled ROWS; intervals are too narrow "
                            "if one viewer contributed several rows")
    if missing:
        return ids, "viewer", f"resampled viewers; {missing} rows without viewer_id counted as their own viewer"
    return ids, "viewer", "resampled viewers (all their rows together)"


def make_plan(
    viewer_ids: Sequence[str | None], n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
) -> BootstrapPlan | None:
    """Draw `n_boot` cluster resamples (None when n_boot == 0 or there are no rows)."""
    if n_boot <= 0 or not viewer_ids:
        return None
    ids, unit, note = cluster_ids(viewer_ids)
    n_clusters = int(ids.max()) + 1
    if n_clusters < MIN_CLUSTERS:
        note += f"; only {n_clusters} {unit}s: the intervals are unreliable (need >= {MIN_CLUSTERS})"
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_boot)  # [B, C]
    return BootstrapPlan(counts[:, ids].astype(np.float32), unit, n_clusters, confidence, note)


def _interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


def mean_estimate(values: np.ndarray, plan: BootstrapPlan | None, mask: np.ndarray | None = None) -> Estimate:
    """Mean of `values` over the rows in `mask`, with a clustered percentile interval.

    Subgroups keep the full-data replicates (their size varies per replicate, as in
    a fresh sample); replicates that drew no row of the subgroup are ignored.
    """
    values = np.asarray(values, dtype=np.float64)
    mask = np.ones(values.shape[0], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if not mask.any():
        return Estimate(float("nan"))
    value = float(values[mask].mean())
    if plan is None:
        return Estimate(value)
    weights = plan.row_weights[:, mask].astype(np.float64)  # [B, n]
    totals = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        replicates = weights @ values[mask] / totals
    return Estimate(value, *_interval(replicates, plan.confidence))


def statistic_estimate(
    statistic: Callable[[np.ndarray], float], n_rows: int, plan: BootstrapPlan | None
) -> Estimate:
    """Any statistic written over row weights (`statistic(np.ones(n))` = the point value)."""
    value = float(statistic(np.ones(n_rows)))
    if plan is None:
        return Estimate(value)
    replicates = np.array([statistic(w.astype(np.float64)) for w in plan.row_weights])
    return Estimate(value, *_interval(replicates, plan.confidence))
