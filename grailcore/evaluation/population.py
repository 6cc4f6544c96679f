"""Population fidelity: do the model's AGGREGATE choice and opinion-change shares match
the participants', overall and within groups (issue, study, slate design, ideology)?

Aggregate choice shares need a category that means the same thing on every slate.
The option's stance side (`Example.meta["option_stances"]`, the latent slant of each
shown option: against < 0 < pro) is used when every row has it; otherwise the shown
POSITION is the category (then population fidelity of choices is position-bias
fidelity, and the report says so). Each row weighs 1 and contributes its choice
distribution (`fidelity.choice_shares`: the exact answer-slot one, or without it the share
of its samples); off-slate mass / unparsed samples form an extra 'unparsed' bin that
counts in TV (people never fall there). The 1-Wasserstein distance treats the categories as ordered, one unit apart
(against, neutral, pro; or positions 1..n; or decrease, no_change, increase), on the
parsed mass renormalised.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Sequence

import numpy as np

from grailcore.data.schema import OPINION_DIRECTIONS, Example
from grailcore.evaluation.baselines import Baseline
from grailcore.evaluation.bootstrap import BootstrapPlan, Estimate, statistic_estimate
from grailcore.evaluation.fidelity import choice_shares, opinion_shares
from grailcore.evaluation.rows import NONE, ScoredRows, opinion_code

STANCE_SIDES = ("against", "neutral", "pro")
STANCE_NEUTRAL_BAND = 1e-9
"""|stance| at most this is 'neutral'."""
OPINION_ORDER = ("decrease", "no_change", "increase")
"""Opinion categories in their W1 order."""
GROUPS = ("issue", "study", "slate_design", "viewer_ideology")
_VIEWPOINT = re.compile(r"Initial Viewpoint:\s*(.+)")


def stance_side(stance: float | None) -> str | None:
    if stance is None:
        return None
    return "pro" if stance > STANCE_NEUTRAL_BAND else "against" if stance < -STANCE_NEUTRAL_BAND else "neutral"


def option_categories(examples: Sequence[Example]) -> tuple[str, tuple[str, ...], list[list[int]], str]:
    """(kind, ordered labels, per row the category index of each shown option, note)."""
    stances = [ex.meta.get("option_stances") for ex in examples]
    if examples and all(s is not None and len(s) == ex.n_options and all(v is not None for v in s)
                        for s, ex in zip(stances, examples)):
        cats = [[STANCE_SIDES.index(stance_side(v)) for v in s] for s in stances]
        return "stance_side", STANCE_SIDES, cats, "option stance side (meta option_stances: <0 against, >0 pro)"
    width = max((ex.n_options or 0 for ex in examples), default=0)
    missing = sum(s is None for s in stances)
    return ("position", tuple(str(p) for p in range(1, width + 1)),
            [list(range(ex.n_options or 0)) for ex in examples],
            f"shown position ({missing} of {len(examples)} rows lack option stances, so no common "
            "content category exists across slates)")


def _share_matrix(codes: np.ndarray, mask: np.ndarray, n_categories: int) -> np.ndarray:
    """[N, C+1] per-row shares of category codes (NONE -> last bin); each row sums to 1."""
    out = np.zeros((codes.shape[0], n_categories + 1))
    counts = mask.sum(axis=1, keepdims=True)
    r, s = np.nonzero(mask)
    bins = np.where(codes[r, s] == NONE, n_categories, codes[r, s])
    np.add.at(out, (r, bins), 1.0)
    return out / np.maximum(counts, 1)


def aggregate(shares: np.ndarray, w: np.ndarray) -> np.ndarray:
    total = w.sum()
    return (w[:, None] * shares).sum(axis=0) / total if total > 0 else np.full(shares.shape[1], np.nan)


def tv_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Total variation 0.5 * sum |p - q| (bins as given, e.g. with an 'unparsed' bin)."""
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def w1_distance(p: np.ndarray, q: np.ndarray) -> float:
    """1-Wasserstein between two distributions on ordered categories one unit apart:
    sum over cut points of |CDF_p - CDF_q|; each side is renormalised first (NaN if empty)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    return float(np.abs(np.cumsum(p / p.sum()) - np.cumsum(q / q.sum()))[:-1].sum())


def _distances(model: np.ndarray, human: np.ndarray, mask: np.ndarray, plan: BootstrapPlan | None) -> dict:
    """TV (all bins) and W1 (ordered bins, without the last 'none' bin) of the group in `mask`."""
    n = model.shape[0]

    def pair(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return aggregate(model, w * mask), aggregate(human, w * mask)

    m, h = pair(np.ones(n))
    return {"n_rows": int(mask.sum()),
            "tv": statistic_estimate(lambda w: tv_distance(*pair(w)), n, plan),
            "w1": statistic_estimate(lambda w: w1_distance(*(x[:-1] for x in pair(w))), n, plan),
            "model_shares": m.tolist(), "human_shares": h.tolist()}


def group_labels(rows: ScoredRows, examples: Sequence[Example]) -> dict[str, np.ndarray | str]:
    """Group name -> [N] labels, or a sentence saying why the group is unavailable."""
    out: dict[str, np.ndarray | str] = {"issue": np.asarray(rows.issue, dtype=object),
                                        "study": np.asarray(rows.study, dtype=object)}
    for key in ("slate_design", "viewer_ideology"):
        values = [ex.meta.get(key) for ex in examples]
        if all(v is None for v in values):
            out[key] = f"unavailable: no row has meta '{key}'"
        else:
            out[key] = np.asarray([str(v) if v is not None else "unknown" for v in values], dtype=object)
    return out


def _by_group(groups: dict, restrict: np.ndarray, compute) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, labels in groups.items():
        if isinstance(labels, str):
            out[name] = {"unavailable": labels}
            continue
        out[name] = {str(label): compute((labels == label) & restrict)
                     for label in sorted(set(labels[restrict].tolist()), key=str)}
    return out


def choice_population(rows: ScoredRows, examples: Sequence[Example], plan: BootstrapPlan | None) -> dict:
    """Model vs human aggregate choice shares (TV, W1), overall and per group."""
    kind, labels, cats, note = option_categories(examples)
    n_cat = len(labels)
    positions = choice_shares(rows)  # [N, max_n + 1], last = off-slate / unparsed
    model = np.zeros((rows.n_rows, n_cat + 1))
    for i, row_cats in enumerate(cats):
        np.add.at(model[i], row_cats, positions[i, :len(row_cats)])
    model[:, n_cat] = positions[:, -1]
    gold = np.array([[cats[i][g - 1]] for i, g in enumerate(rows.gold)], dtype=np.int64)
    human = _share_matrix(gold, np.ones_like(gold, dtype=bool), n_cat)
    everyone = np.ones(rows.n_rows, dtype=bool)
    return {"category": kind, "category_note": note, "labels": [*labels, "unparsed"],
            "overall": _distances(model, human, everyone, plan),
            "groups": _by_group(group_labels(rows, examples), everyone,
                                lambda mask: _distances(model, human, mask, plan))}


def initial_viewpoint(example: Example) -> str | None:
    """The pre-treatment viewpoint: meta 'initial_viewpoint', else the 'Initial Viewpoint:' line
    of the state text or prompt."""
    if example.meta.get("initial_viewpoint"):
        return str(example.meta["initial_viewpoint"]).strip()
    for text in (example.state_text, example.prompt if example.messages else ""):
        match = _VIEWPOINT.search(text or "")
        if match:
            return match.group(1).strip()
    return None


def _majority(codes: Sequence[int]) -> int:
    """Most frequent direction code; ties go to the earlier OPINION_DIRECTIONS entry."""
    counts = Counter(codes)
    return min(counts, key=lambda c: (-counts[c], c))


def fit_pre_attitude(train: Sequence[Example]) -> tuple[dict[str, int], int | None]:
    """Majority direction code per initial viewpoint, and the overall majority (for unseen
    viewpoints), from rows with a gold direction; (empty, None) when none has one."""
    by_view: dict[str, list[int]] = {}
    every: list[int] = []
    for ex in train:
        code = opinion_code(ex.opinion_direction)
        if code == NONE:
            continue
        every.append(code)
        by_view.setdefault(initial_viewpoint(ex) or "", []).append(code)
    if not every:
        return {}, None
    return {view: _majority(codes) for view, codes in by_view.items()}, _majority(every)


def pre_attitude_predictions(examples: Sequence[Example], train: Sequence[Example] | None,
                             fallback_rows: Sequence[Example] | None = None) -> tuple[np.ndarray, str]:
    """[N] predicted direction codes of the pre-attitude-only predictor, and where it was fitted."""
    source = f"train ({len(train)} rows)" if train else None
    table, overall = fit_pre_attitude(train or ())
    if overall is None:
        table, overall = fit_pre_attitude(fallback_rows or examples)
        source = f"the evaluated rows themselves ({len(examples)}; optimistic, no train directions)"
    if overall is None:
        return np.full(len(examples), NONE, dtype=np.int64), "no row has a gold direction"
    preds = np.array([table.get(initial_viewpoint(ex) or "", overall) for ex in examples], dtype=np.int64)
    return preds, source


def pre_attitude_baseline(rows: ScoredRows, examples: Sequence[Example],
                          train: Sequence[Example] | None) -> dict[str, Baseline]:
    """The pre-attitude predictor as an opinion-accuracy baseline (empty without gold directions)."""
    has = rows.has_gold_opinion
    if not has.any():
        return {}
    preds, source = pre_attitude_predictions(examples, train)
    return {"pre_attitude": Baseline((preds == rows.gold_opinion).astype(float),
                                     f"majority direction per initial viewpoint, fitted on {source}", has)}


def opinion_population(rows: ScoredRows, examples: Sequence[Example], train: Sequence[Example] | None,
                       plan: BootstrapPlan | None) -> dict | None:
    """Model vs human aggregate opinion-change shares (TV, W1), beside constant 'no_change'
    and the pre-attitude-only predictor; None when no row has a gold direction."""
    has = rows.has_gold_opinion
    if not has.any():
        return None
    reorder = np.array([OPINION_ORDER.index(d) for d in OPINION_DIRECTIONS])  # code -> W1 order

    def ordered(codes: np.ndarray) -> np.ndarray:
        return np.where(codes == NONE, NONE, reorder[np.maximum(codes, 0)])

    n_cat = len(OPINION_ORDER)
    human = _share_matrix(ordered(rows.gold_opinion[:, None]), np.ones((rows.n_rows, 1), bool), n_cat)
    preds, source = pre_attitude_predictions(examples, train)
    no_change = np.full((rows.n_rows, 1), OPINION_DIRECTIONS.index("no_change"))
    shares = opinion_shares(rows)  # [N, 4] in OPINION_DIRECTIONS order + none
    predictors = {
        "model": np.concatenate([shares[:, np.argsort(reorder)], shares[:, -1:]], axis=1),
        "always_no_change": _share_matrix(ordered(no_change), np.ones((rows.n_rows, 1), bool), n_cat),
        "pre_attitude": _share_matrix(ordered(preds[:, None]), np.ones((rows.n_rows, 1), bool), n_cat),
    }

    def compute(mask: np.ndarray) -> dict:
        return {name: _distances(shares, human, mask, plan) for name, shares in predictors.items()}

    return {"labels": [*OPINION_ORDER, "none"], "pre_attitude_fitted_on": source,
            "overall": compute(has),
            "groups": _by_group(group_labels(rows, examples), has, compute)}


def population_fidelity(rows: ScoredRows, examples: Sequence[Example], train: Sequence[Example] | None,
                        plan: BootstrapPlan | None) -> dict:
    return {"choice": choice_population(rows, examples, plan),
            "opinion": opinion_population(rows, examples, train, plan)}


def _group_key(group: str, label: str) -> str:
    return f"{group}={label}".replace("/", "_").replace(" ", "_")


def flat_population(block: dict) -> dict[str, Estimate]:
    """Scalars under the names `flatten` uses (after 'population/')."""
    out: dict[str, Estimate] = {}
    choice = block["choice"]
    for metric in ("tv", "w1"):
        out[f"choice_{metric}"] = choice["overall"][metric]
        for group, table in choice["groups"].items():
            for label, row in table.items():
                if label != "unavailable":
                    out[f"choice_{metric}/{_group_key(group, label)}"] = row[metric]
    if block["opinion"]:
        for name, row in block["opinion"]["overall"].items():
            for metric in ("tv", "w1"):
                out[f"opinion_{metric}/{name}"] = row[metric]
        for group, table in block["opinion"]["groups"].items():
            for label, per in table.items():
                if label != "unavailable":
                    for metric in ("tv", "w1"):
                        out[f"opinion_{metric}/model/{_group_key(group, label)}"] = per["model"][metric]
    return out
