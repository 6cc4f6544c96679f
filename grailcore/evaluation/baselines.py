"""Reference predictors scored on the same rows as the model: chance, fixed positions,
a fitted position prior, most viewed, majority opinion and (synthetic) the truth."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from grailcore.data.schema import OPINION_DIRECTIONS, Example
from grailcore.evaluation.rows import NONE, ScoredRows, opinion_code

_VIEWS = re.compile(r"\bviews\s+(\d[\d,]*)", re.IGNORECASE)


@dataclass(frozen=True)
class Baseline:
    """Per-row score of a reference predictor: 1/0 correct, or an expected accuracy."""

    scores: np.ndarray  # [N] float, in [0, 1]
    description: str
    rows_mask: np.ndarray | None = None
    """[N] bool: rows it is scored on (opinion baselines: rows with a gold direction)."""


@dataclass(frozen=True)
class PositionPrior:
    """P(gold position | slate size) with additive smoothing, and where it was fitted."""

    by_size: dict[int, np.ndarray]
    overall: np.ndarray
    """Smoothed histogram of gold positions 1..max over all sizes (fallback for unseen sizes)."""
    mode: int
    fitted_on: str

    def probs(self, n_options: int) -> np.ndarray:
        """[n_options] prior for a slate of that size."""
        if n_options in self.by_size:
            return self.by_size[n_options]
        # Unseen size: the overall histogram cut to n positions, renormalised.
        cut = np.ones(n_options) * 1e-12
        m = min(n_options, len(self.overall))
        cut[:m] += self.overall[:m]
        return cut / cut.sum()


def fit_position_prior(gold: Sequence[int], n_options: Sequence[int], alpha: float, fitted_on: str) -> PositionPrior:
    """Smoothed per-size gold-position frequencies (`alpha` added to every position)."""
    gold, n_options = np.asarray(gold), np.asarray(n_options)
    by_size = {}
    for size in np.unique(n_options):
        counts = np.bincount(gold[n_options == size] - 1, minlength=size)[:size] + alpha
        by_size[int(size)] = counts / counts.sum()
    counts = np.bincount(gold - 1, minlength=int(n_options.max())).astype(np.float64)
    mode = int(np.argmax(counts)) + 1  # ties -> the lower position
    return PositionPrior(by_size, (counts + alpha) / (counts + alpha).sum(), mode, fitted_on)


def prior_source(rows: ScoredRows, train: Sequence[Example] | None, alpha: float) -> PositionPrior:
    """Fit on training rows when given, else on the evaluated rows (and say so)."""
    if train:
        return fit_position_prior([ex.gold_index for ex in train], [ex.n_options for ex in train],
                                  alpha, f"train ({len(train)} rows)")
    return fit_position_prior(rows.gold, rows.n_options, alpha,
                              f"the evaluated rows themselves ({rows.n_rows}; optimistic, no train rows given)")


def parse_views(option_text: str) -> int | None:
    """'... views 1,234, likes 5' -> 1234; None when the text carries no view count."""
    match = _VIEWS.search(option_text)
    return int(match.group(1).replace(",", "")) if match else None


def most_viewed_choice(examples: Sequence[Example]) -> np.ndarray:
    """[N] 1-based option with the most views (first on ties); NONE when no option has views."""
    out = np.full(len(examples), NONE, dtype=np.int64)
    for i, ex in enumerate(examples):
        views = [parse_views(t) for t in ex.option_texts]
        if any(v is not None for v in views):
            out[i] = int(np.argmax([-1 if v is None else v for v in views])) + 1
    return out


def choice_baselines(rows: ScoredRows, examples: Sequence[Example], prior: PositionPrior) -> dict[str, Baseline]:
    """Next-video baselines; `examples` align with `rows` (for option texts)."""
    gold, n = rows.gold, rows.n_options
    by_size = np.array([int(np.argmax(prior.probs(int(size)))) + 1 for size in n])
    viewed = most_viewed_choice(examples)
    coverage = float((viewed != NONE).mean()) if len(viewed) else 0.0
    out = {
        "random": Baseline(1.0 / n, "uniform guess: expected accuracy 1/n_options"),
        "always_first": Baseline((gold == 1).astype(float), "always option 1"),
        "always_last": Baseline((gold == n).astype(float), "always the last option"),
        "most_frequent_position": Baseline(
            (gold == np.minimum(prior.mode, n)).astype(float),
            f"always position {prior.mode} (clipped to the slate), fitted on {prior.fitted_on}"),
        "most_frequent_position_by_size": Baseline(
            (gold == by_size).astype(float),
            f"most frequent gold position per slate size, fitted on {prior.fitted_on}"),
        "most_viewed": Baseline(
            (gold == viewed).astype(float),
            f"option with the most views ('views N' in the option text); {coverage:.0%} of rows have views"),
    }
    if rows.true_choice_probs is not None:
        p = rows.true_choice_probs
        out["bayes_optimal"] = Baseline(p.max(axis=1), "synthetic ceiling: argmax of the true probs (expected)")
        out["true_sampling"] = Baseline((p * p).sum(axis=1), "a sample from the true distribution (expected)")
    return out


def majority_opinion(rows: ScoredRows, train: Sequence[Example] | None) -> tuple[int, str]:
    """Most frequent gold direction (code) and where it was counted."""
    if train:
        codes = [opinion_code(ex.opinion_direction) for ex in train]
        codes = [c for c in codes if c != NONE]
        if codes:
            return Counter(codes).most_common(1)[0][0], f"train ({len(codes)} rows with a direction)"
    codes = rows.gold_opinion[rows.has_gold_opinion].tolist()
    return Counter(codes).most_common(1)[0][0], f"the evaluated rows themselves ({len(codes)}; optimistic)"


def opinion_baselines(rows: ScoredRows, train: Sequence[Example] | None) -> dict[str, Baseline]:
    """Constant-direction baselines on rows with a gold direction (empty without any)."""
    has = rows.has_gold_opinion
    if not has.any():
        return {}
    majority, source = majority_opinion(rows, train)
    out = {
        "majority_opinion": Baseline((rows.gold_opinion == majority).astype(float),
                                     f"always '{OPINION_DIRECTIONS[majority]}', the majority in {source}", has),
        "always_no_change": Baseline((rows.gold_opinion == OPINION_DIRECTIONS.index("no_change")).astype(float),
                                     "always 'no_change'", has),
    }
    if rows.true_opinion_probs is not None:
        p = rows.true_opinion_probs
        out["opinion_bayes_optimal"] = Baseline(p.max(axis=1), "synthetic ceiling: argmax of the true probs", has)
    return out
