"""Next-video and opinion-direction metrics over `ScoredRows`, with clustered CIs and
breakdowns by slate size, issue, study and gold position."""

from __future__ import annotations

import numpy as np

from grailcore.data.schema import OPINION_DIRECTIONS
from grailcore.evaluation.bootstrap import BootstrapPlan, Estimate, mean_estimate, statistic_estimate
from grailcore.evaluation.rows import NONE, ScoredRows

N_OPINIONS = len(OPINION_DIRECTIONS)


def row_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[N, K] -> [N]: mean over each row's real samples (padding excluded)."""
    return (values * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1)


def correct_first(rows: ScoredRows) -> np.ndarray:
    """[N] 1.0 where the first (greedy) sample chose the gold option."""
    return (rows.first_answer == rows.gold).astype(np.float64)


def correct_sample_mean(rows: ScoredRows) -> np.ndarray:
    """[N] fraction of samples that chose the gold option (expected one-sample accuracy)."""
    return row_mean(rows.answers == rows.gold[:, None], rows.sample_mask)


def per_row_choice_scores(rows: ScoredRows) -> dict[str, np.ndarray]:
    """Every per-row choice score the summary and breakdowns average."""
    mask = rows.sample_mask
    return {
        "accuracy": correct_first(rows),
        "accuracy_sample_mean": correct_sample_mean(rows),
        "parsed_rate": row_mean(rows.answers != NONE, mask),
        "format_rate": row_mean(rows.format_ok, mask),
        # The original system's rule: the integer in <answer> equals the gold index.
        "original_accuracy": (rows.original_answers[:, 0] == rows.gold).astype(np.float64),
        "original_parsed_rate": row_mean(rows.original_answers != NONE, mask),
        "original_format_rate": row_mean(rows.original_formatted, mask),
    }


def choice_summary(rows: ScoredRows, plan: BootstrapPlan | None) -> dict[str, Estimate]:
    """Overall choice metrics; `accuracy_sample_mean` only when some row has k > 1."""
    scores = per_row_choice_scores(rows)
    if rows.sample_mask.sum(axis=1).max() <= 1:
        del scores["accuracy_sample_mean"]
    return {name: mean_estimate(values, plan) for name, values in scores.items()}


def group_keys(rows: ScoredRows) -> dict[str, np.ndarray]:
    """Breakdown name -> [N] group label of each row."""
    return {
        "n_options": rows.n_options.astype(str),
        "issue": np.asarray(rows.issue, dtype=object),
        "study": np.asarray(rows.study, dtype=object),
        "gold_position": rows.gold.astype(str),
    }


def _sort_key(label: str) -> tuple[int, int | str]:
    return (0, int(label)) if label.isdigit() else (1, label)


def breakdowns(rows: ScoredRows, plan: BootstrapPlan | None) -> dict[str, dict[str, dict]]:
    """{breakdown: {group: {n_rows, accuracy, parsed_rate, format_rate, original_accuracy}}}."""
    scores = per_row_choice_scores(rows)
    shown = ("accuracy", "parsed_rate", "format_rate", "original_accuracy")
    out: dict[str, dict[str, dict]] = {}
    for name, labels in group_keys(rows).items():
        table = {}
        for label in sorted(set(labels.tolist()), key=_sort_key):
            mask = labels == label
            table[label] = {"n_rows": int(mask.sum())}
            table[label].update({m: mean_estimate(scores[m], plan, mask) for m in shown})
        out[name] = table
    return out


def confusion(gold: np.ndarray, predicted: np.ndarray, n_classes: int, weights: np.ndarray | None = None) -> np.ndarray:
    """[n_classes, n_classes + 1] weighted counts; classes are 0-based, NONE goes to the last column."""
    weights = np.ones(len(gold)) if weights is None else weights
    columns = np.where(predicted == NONE, n_classes, predicted)
    out = np.zeros((n_classes, n_classes + 1))
    np.add.at(out, (gold, columns), weights)
    return out


def position_confusion(rows: ScoredRows) -> np.ndarray:
    """[max_n, max_n + 1] rows = gold position, columns = first-sample choice (last = unparsed)."""
    predicted = np.where(rows.first_answer == NONE, NONE, rows.first_answer - 1)
    return confusion(rows.gold - 1, predicted, rows.max_options)


def macro_f1(gold: np.ndarray, predicted: np.ndarray, n_classes: int, weights: np.ndarray | None = None) -> float:
    """Mean F1 over the classes that occur in gold or predictions; an unparsed
    prediction is a miss for its gold class (a false negative, never a true positive)."""
    counts = confusion(gold, predicted, n_classes, weights)
    true_pos = np.diag(counts[:, :n_classes])
    support = counts.sum(axis=1)
    predicted_total = counts[:, :n_classes].sum(axis=0)
    present = (support + predicted_total) > 0
    if not present.any():
        return float("nan")
    f1 = 2 * true_pos / np.maximum(support + predicted_total, 1e-12)
    return float(f1[present].mean())


def opinion_summary(rows: ScoredRows, plan: BootstrapPlan | None) -> dict[str, Estimate]:
    """Opinion tags parsed (all rows); accuracy and macro-F1 of the first sample on rows
    with a gold direction (absent when no row has one)."""
    out = {"parsed_rate": mean_estimate(row_mean(rows.opinions != NONE, rows.sample_mask), plan)}
    has = rows.has_gold_opinion
    if not has.any():
        return out
    gold, predicted = rows.gold_opinion, rows.opinions[:, 0]

    def f1(weights: np.ndarray) -> float:
        return macro_f1(gold[has], predicted[has], N_OPINIONS, weights[has])

    out["accuracy"] = mean_estimate((predicted == gold).astype(np.float64), plan, has)
    out["macro_f1"] = statistic_estimate(f1, rows.n_rows, plan)
    return out


def opinion_confusion(rows: ScoredRows) -> np.ndarray:
    """[3, 4] gold direction x first-sample direction (last column = no opinion parsed)."""
    has = rows.has_gold_opinion
    return confusion(rows.gold_opinion[has], rows.opinions[has, 0], N_OPINIONS)
