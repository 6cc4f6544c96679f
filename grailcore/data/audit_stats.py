"""Statistics of the leak audit: Wilson intervals, the design effect of repeated viewers,
the chi-square tail, and gold-position uniformity tests. Pure functions of numbers."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Sequence


def wilson_interval(p: float, n: float, z: float) -> tuple[float, float]:
    """Wilson score interval for a proportion `p` seen over `n` (possibly effective) trials;
    unlike the normal or bootstrap interval it stays honest for tiny n and p near 0 or 1."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def design_effect(credits: Sequence[float], clusters: Sequence[str]) -> float:
    """Variance inflation from correlated rows (several decisions per viewer): ratio of the
    cluster-robust to the independent-rows variance of the mean, at least 1."""
    n = len(credits)
    mean = sum(credits) / n if n else 0.0
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for y, c in zip(credits, clusters):
        sums[c][0] += y
        sums[c][1] += 1
    n_clusters = len(sums)
    if n < 2 or n_clusters < 2:
        return 1.0
    iid = sum((y - mean) ** 2 for y in credits) * n / (n - 1)
    clustered = sum((s - mean * m) ** 2 for s, m in sums.values()) * n_clusters / (n_clusters - 1)
    return max(1.0, clustered / iid) if iid > 0 else 1.0


def chi2_sf(stat: float, df: int) -> float:
    """P(X >= stat) for X ~ chi-square(df), from the closed forms of the regularized upper
    incomplete gamma Q(df/2, stat/2) at integer and half-integer df/2."""
    if stat <= 0:
        return 1.0
    half = stat / 2
    if df % 2 == 0:
        term = total = math.exp(-half)
        for k in range(1, df // 2):
            term *= half / k
            total += term
        return min(1.0, total)
    total = math.erfc(math.sqrt(half))
    term = math.exp(-half) * math.sqrt(half) / math.gamma(1.5)
    for k in range((df - 1) // 2):
        total += term
        term *= half / (k + 1.5)
    return min(1.0, total)


@dataclass(frozen=True)
class PositionTest:
    """Gold positions of the slates of one size against a uniform distribution."""

    n_options: int
    rows: int
    counts: tuple[int, ...]
    """Gold count per position 1..n_options."""
    chi2: float
    df: int
    p_value: float
    min_expected: float
    """Below ~5 the chi-square p-value is only a rough guide."""


def position_tests(golds_by_size: dict[int, list[int]]) -> list[PositionTest]:
    tests = []
    for n, golds in sorted(golds_by_size.items()):
        counts = Counter(golds)
        observed = tuple(counts[p] for p in range(1, n + 1))
        expected = len(golds) / n
        chi2 = sum((o - expected) ** 2 / expected for o in observed) if n > 1 else 0.0
        p_value = chi2_sf(chi2, n - 1) if n > 1 else 1.0
        tests.append(PositionTest(n, len(golds), observed, chi2, n - 1, p_value, expected))
    return tests
