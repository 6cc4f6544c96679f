"""Order robustness: the same rows shown with their options in other orders.

A model that reads the videos answers the same video wherever it is shown; a model
that leans on positions (the standard selection bias of multiple-choice LMs) changes
its accuracy with the order and recalls the gold option better at some positions.

`permute_example` re-renders an `Example` with its options in another order;
`order_robustness` scores the shown order plus R seeded permutations of every row.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from grailcore.data.schema import Example
from grailcore.evaluation.bootstrap import BootstrapPlan, Estimate, statistic_estimate
from grailcore.evaluation.fidelity import choice_distribution, choice_shares, position_histograms, total_variation
from grailcore.evaluation.rows import NONE, ScoredRows

_OPTIONS_BLOCK = re.compile(r"(?ms)(^OPTIONS\n)(.*?)(\n\n|\Z)")


def options_block(option_texts: Sequence[str]) -> str:
    """'1. text\\n2. text ...', as `grailcore.data.prompt.build_example` renders it."""
    return "\n".join(f"{k}. {text}" for k, text in enumerate(option_texts, 1))


def permute_example(example: Example, perm: Sequence[int]) -> Example:
    """`example` with its options shown in a new order: `perm[j]` (0-based) is the CURRENT
    position shown at new position j. The prompt's OPTIONS block is rebuilt from
    `option_texts`; gold index, true choice probs and per-option meta follow the options."""
    n = example.n_options or 0
    if sorted(perm) != list(range(n)):
        raise ValueError(f"{example.example_id}: {list(perm)} is not a permutation of 0..{n - 1}")
    if len(example.option_texts) != n:
        raise ValueError(f"{example.example_id}: permuting needs option_texts for all {n} options, "
                         f"has {len(example.option_texts)}")
    texts = tuple(example.option_texts[i] for i in perm)
    messages, found = [], False
    for message in example.messages:
        if message["role"] == "user":
            content, hits = _OPTIONS_BLOCK.subn(lambda m: m.group(1) + options_block(texts) + m.group(3),
                                                message["content"], count=1)
            found = hits == 1
            message = {**message, "content": content}
        messages.append(message)
    if not found:
        raise ValueError(f"{example.example_id}: no 'OPTIONS' block in the prompt to reorder")
    meta = dict(example.meta)
    for key, value in example.meta.items():  # per-option meta (shown_order, option_stances) moves too
        if isinstance(value, (list, tuple)) and len(value) == n and key != "permutation":
            meta[key] = tuple(value[i] for i in perm)
    meta["permutation"] = tuple(int(i) for i in perm)
    probs = example.true_choice_probs
    return example.replace(
        messages=tuple(messages), option_texts=texts, gold_index=list(perm).index(example.gold_index - 1) + 1,
        true_choice_probs=tuple(probs[i] for i in perm) if probs is not None else None, meta=meta)


def row_permutations(example_id: str, n: int, count: int, seed: int) -> list[tuple[int, ...]]:
    """`count` permutations of n options, seeded by (seed, row id, copy) so reruns and
    other models see the same orders."""
    out = []
    for r in range(count):
        order = list(range(n))
        random.Random(f"grailcore-permutation:{seed}:{example_id}:{r}").shuffle(order)
        out.append(tuple(order))
    return out


def permuted_copies(examples: Sequence[Example], count: int, seed: int = 0) -> list[list[Example]]:
    """[count][N]: copy r holds every row under its r-th seeded permutation."""
    perms = [row_permutations(ex.example_id, ex.n_options or 0, count, seed) for ex in examples]
    return [[permute_example(ex, perms[i][r]) for i, ex in enumerate(examples)] for r in range(count)]


def recover_permutation(original: Example, permuted: Example) -> tuple[int, ...] | None:
    """The permutation taking `original` to `permuted` (from meta, else by matching option
    texts); None when it cannot be told (duplicate or changed texts)."""
    if "permutation" in permuted.meta:
        return tuple(permuted.meta["permutation"])
    texts = original.option_texts
    if len(set(texts)) != len(texts) or sorted(permuted.option_texts) != sorted(texts):
        return None
    return tuple(texts.index(t) for t in permuted.option_texts)


@dataclass(frozen=True)
class OrderRun:
    """Scored rows of one order of every row; `perms[i]` maps its shown positions to the
    positions of the shown (unpermuted) order, None where unknown."""

    rows: ScoredRows
    perms: Sequence[tuple[int, ...] | None]


def identity_run(rows: ScoredRows) -> OrderRun:
    return OrderRun(rows, [tuple(range(int(n))) for n in rows.n_options])


def _weighted_mean(values: np.ndarray, w: np.ndarray) -> float:
    total = w.sum()
    return float((w * values).sum() / total) if total > 0 else float("nan")


def position_recall(gold: np.ndarray, correct: np.ndarray, w: np.ndarray, width: int) -> np.ndarray:
    """[width] for each shown position p: weighted share of rows with gold at p answered
    right (NaN where no row has gold there). Arrays are [orders, N]; w is [N]."""
    out = np.full(width, np.nan)
    weights = np.broadcast_to(w, gold.shape)
    for p in range(1, width + 1):
        at = (gold == p) * weights
        if at.sum() > 0:
            out[p - 1] = (at * correct).sum() / at.sum()
    return out


def _spread(values: np.ndarray) -> dict[str, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"std": float("nan"), "range": float("nan")}
    return {"std": float(finite.std()), "range": float(finite.max() - finite.min())}


def _original_choice(run: OrderRun) -> np.ndarray:
    """[N] the first sample's choice as a 0-based position of the SHOWN order (NONE if unparsed/unknown)."""
    out = np.full(run.rows.n_rows, NONE, dtype=np.int64)
    for i, (answer, perm) in enumerate(zip(run.rows.first_answer, run.perms)):
        if answer != NONE and perm is not None:
            out[i] = perm[answer - 1]
    return out


def _correct(rows: ScoredRows) -> np.ndarray:
    """[N] per-row accuracy in one order: the probability of the gold option under the
    row's answer-slot distribution, or without one the first sample's 0/1."""
    if rows.slots is not None:
        return choice_distribution(rows, 0.0).probs[np.arange(rows.n_rows), rows.gold - 1]
    return (rows.first_answer == rows.gold).astype(np.float64)


def _tv_across_orders(runs: Sequence[OrderRun]) -> tuple[np.ndarray, np.ndarray]:
    """[N] mean TV between each permuted order's choice distribution, mapped back to the
    videos of the shown order, and the shown order's (off-slate bin kept); [N] known."""
    shown = choice_shares(runs[0].rows)
    n = shown.shape[0]
    tv, known = np.zeros(n), np.ones(n, dtype=bool)
    for run in runs[1:]:
        shares = choice_shares(run.rows)
        for i, perm in enumerate(run.perms):
            if perm is None:
                known[i] = False
                continue
            back = np.zeros_like(shown[i])
            back[list(perm)] = shares[i, :len(perm)]
            back[-1] = shares[i, -1]
            tv[i] += total_variation(back, shown[i]) / (len(runs) - 1)
    return tv, known


def order_robustness(runs: Sequence[OrderRun], plan: BootstrapPlan | None) -> dict:
    """Accuracy across orders (mean, std, min, max), per-position recall pooled over orders
    and its spread, chosen- vs gold-position distributions, and how far the choice moves
    with the order. runs[0] is the shown order. With answer-slot distributions a row's
    accuracy is p(gold) and the movement is the TV between its distributions over the same
    videos in different orders; without, the first sample's 0/1 and whether it picks the
    same video in every order.

    Every interval resamples viewers: a replicate reweights a row in all its orders at once.
    """
    n = runs[0].rows.n_rows
    if any(r.rows.n_rows != n for r in runs):
        raise ValueError("every order must score the same rows")
    width = runs[0].rows.max_options
    gold = np.stack([r.rows.gold for r in runs])  # [O, N]
    correct = np.stack([_correct(r.rows) for r in runs])  # [O, N]
    exact = all(r.rows.slots is not None for r in runs)
    out: dict = {"n_orders": len(runs), "n_permutations": len(runs) - 1,
                 "accuracy_kind": "p(gold) under the answer-slot distribution" if exact else "first sample"}

    def accuracies(w: np.ndarray) -> np.ndarray:
        return np.array([_weighted_mean(c, w) for c in correct])

    if len(runs) > 1:
        out["accuracy_mean"] = statistic_estimate(lambda w: float(accuracies(w).mean()), n, plan)
        out["accuracy_std"] = statistic_estimate(lambda w: float(accuracies(w).std()), n, plan)
        out["accuracy_min"] = statistic_estimate(lambda w: float(accuracies(w).min()), n, plan)
        out["accuracy_max"] = statistic_estimate(lambda w: float(accuracies(w).max()), n, plan)
        out["accuracy_by_order"] = accuracies(np.ones(n)).tolist()
        if exact:
            tv, known = _tv_across_orders(runs)
            if known.any():
                out["choice_tv_across_orders"] = statistic_estimate(lambda w: _weighted_mean(tv, w * known), n, plan)
        else:
            chosen = np.stack([_original_choice(r) for r in runs])  # [O, N]
            known = np.array([all(r.perms[i] is not None for r in runs) for i in range(n)])
            same = ((chosen == chosen[0]).all(axis=0) & (chosen[0] != NONE)).astype(np.float64)
            if known.any():
                out["choice_consistency"] = statistic_estimate(lambda w: _weighted_mean(same, w * known), n, plan)
    else:
        out["note"] = ("shown order only: run with --permutations R to score R reordered copies; "
                       "per-position recall below is from the shown order")
    recall = position_recall(gold, correct, np.ones(n), width)
    out["position_recall"] = {
        str(p + 1): statistic_estimate(lambda w, p=p: float(position_recall(gold, correct, w, width)[p]), n, plan)
        for p in range(width) if np.isfinite(recall[p])}
    out["position_recall_std"] = statistic_estimate(
        lambda w: _spread(position_recall(gold, correct, w, width))["std"], n, plan)
    out["position_recall_range"] = statistic_estimate(
        lambda w: _spread(position_recall(gold, correct, w, width))["range"], n, plan)

    def histograms(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pairs = [position_histograms(r.rows, w) for r in runs]
        return np.mean([m for m, _ in pairs], axis=0), np.mean([g for _, g in pairs], axis=0)

    model_hist, gold_hist = histograms(np.ones(n))
    out["chosen_position_distribution"] = model_hist.tolist()
    out["gold_position_distribution"] = gold_hist.tolist()
    out["tv_chosen_vs_gold_position"] = statistic_estimate(
        lambda w: float(total_variation(*histograms(w))), n, plan)
    return out


def flat_order(block: dict) -> dict[str, Estimate | float]:
    """`order_robustness` scalars under the names `flatten` uses (after 'order/')."""
    out: dict[str, Estimate | float] = {"n_orders": float(block["n_orders"])}
    for key in ("accuracy_mean", "accuracy_std", "accuracy_min", "accuracy_max", "choice_consistency",
                "choice_tv_across_orders",
                "position_recall_std", "position_recall_range", "tv_chosen_vs_gold_position"):
        if key in block:
            out[key] = block[key]
    for p, est in block["position_recall"].items():
        out[f"position_recall/{p}"] = est
    return out
