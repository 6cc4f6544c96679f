"""Distribution fidelity: does the model's choice/opinion DISTRIBUTION match people's,
not just its top guess (TV distances, NLL of the human choice, calibration).

Every measure reads one per-row distribution, from one of three estimators (named in the
results): `exact_answer_slot` (the mean of the sampled completions' answer-slot
distributions, `answer_slot.py`), `direct` (one read at the prompt, direct layout) or
`histogram_fallback` (a smoothed histogram of the parsed sampled answers, only for
completions without slot distributions, e.g. another system's outputs).

Off-slate mass (the model names no option of the slate) is never renormalised away: the
NLL scores the unnormalised probability of the human's option, and TV to the truth and
the position histograms carry it as an extra bin the truth gives 0. Not answering can
only cost, so the measures stay proper: a model whose distribution equals the truth has
the lowest expected NLL and a TV of 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from grailcore.data.schema import OPINION_DIRECTIONS
from grailcore.evaluation.answer_slot import HISTOGRAM
from grailcore.evaluation.baselines import PositionPrior
from grailcore.evaluation.bootstrap import BootstrapPlan, mean_estimate, statistic_estimate
from grailcore.evaluation.rows import NONE, ScoredRows

N_OPINIONS = len(OPINION_DIRECTIONS)
PROB_FLOOR = 1e-12
"""NLL reads max(p, PROB_FLOOR): a probability the engine rounded to 0 costs 27.6 nats, not inf."""


@dataclass(frozen=True)
class RowDistribution:
    """Each row's distribution over its categories, plus the off-slate mass."""

    estimator: str
    probs: np.ndarray  # [N, C] float, 0 beyond a row's own categories
    off_slate: np.ndarray  # [N] float, 1 - probs.sum(axis=1) (0 for the histogram)

    @property
    def with_off_slate(self) -> np.ndarray:
        """[N, C + 1]: the off-slate mass as a last bin."""
        return np.concatenate([self.probs, self.off_slate[:, None]], axis=1)


def choice_counts(rows: ScoredRows) -> np.ndarray:
    """[N, max_n] how many parsed samples of each row chose each option."""
    counts = np.zeros((rows.n_rows, rows.max_options))
    row_idx, sample_idx = np.nonzero(rows.sample_mask & (rows.answers != NONE))
    np.add.at(counts, (row_idx, rows.answers[row_idx, sample_idx] - 1), 1.0)
    return counts


def smoothed_probs(counts: np.ndarray, n_options: np.ndarray, alpha: float) -> np.ndarray:
    """[N, W] (count + alpha) / (total + alpha n) over each row's n options, 0 beyond;
    a row with no counts (and alpha = 0) gets the uniform distribution."""
    valid = np.arange(counts.shape[1])[None, :] < n_options[:, None]
    mass = np.where(valid, counts + alpha, 0.0)
    totals = mass.sum(axis=1, keepdims=True)
    uniform = valid / n_options[:, None]
    return np.where(totals > 0, mass / np.maximum(totals, 1e-300), uniform)


def _off(probs: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - probs.sum(axis=1), 0.0, 1.0)


def choice_distribution(rows: ScoredRows, alpha: float) -> RowDistribution:
    """Each row's choice distribution: the exact/direct one when the rows carry answer-slot
    distributions, else the histogram of parsed samples smoothed with `alpha` (unparsed
    samples left out of the counts)."""
    if rows.slots is not None:
        probs = rows.slots.row_choice
        return RowDistribution(rows.slots.estimator, probs, _off(probs))
    probs = smoothed_probs(choice_counts(rows), rows.n_options, alpha)
    return RowDistribution(HISTOGRAM, probs, np.zeros(rows.n_rows))


def opinion_distribution(rows: ScoredRows, alpha: float) -> RowDistribution:
    """Each row's opinion-direction distribution (OPINION_DIRECTIONS order), likewise."""
    if rows.slots is not None:
        probs = rows.slots.row_opinion
        return RowDistribution(rows.slots.estimator, probs, _off(probs))
    counts = np.zeros((rows.n_rows, N_OPINIONS))
    r, s = np.nonzero(rows.sample_mask & (rows.opinions != NONE))
    np.add.at(counts, (r, rows.opinions[r, s]), 1.0)
    return RowDistribution(HISTOGRAM, smoothed_probs(counts, np.full(rows.n_rows, N_OPINIONS), alpha),
                           np.zeros(rows.n_rows))


def _sample_shares(codes: np.ndarray, mask: np.ndarray, width: int) -> np.ndarray:
    """[N, width + 1] each row's share of its samples per 0-based code (NONE -> last bin)."""
    out = np.zeros((codes.shape[0], width + 1))
    r, s = np.nonzero(mask)
    np.add.at(out, (r, np.where(codes[r, s] == NONE, width, codes[r, s])), 1.0)
    return out / np.maximum(mask.sum(axis=1, keepdims=True), 1)


def choice_shares(rows: ScoredRows) -> np.ndarray:
    """[N, max_n + 1] each row's mass on each shown position and a last off-slate bin: the
    row's exact distribution, or without one the share of its samples (unparsed = last)."""
    if rows.slots is not None:
        return choice_distribution(rows, 0.0).with_off_slate
    return _sample_shares(np.where(rows.answers == NONE, NONE, rows.answers - 1), rows.sample_mask, rows.max_options)


def opinion_shares(rows: ScoredRows) -> np.ndarray:
    """[N, 4] each row's mass on (increase, decrease, no_change, none), likewise."""
    if rows.slots is not None:
        return opinion_distribution(rows, 0.0).with_off_slate
    return _sample_shares(rows.opinions, rows.sample_mask, N_OPINIONS)


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """0.5 * sum |p - q| over the last axis."""
    return 0.5 * np.abs(p - q).sum(axis=-1)


def tv_to_truth(dist: RowDistribution, true: np.ndarray) -> np.ndarray:
    """[N] TV between each row's distribution (with its off-slate bin) and the truth (none off-slate)."""
    return 0.5 * (np.abs(dist.probs - true).sum(axis=-1) + dist.off_slate)


def gold_nll(probs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """[N] -log p(gold) with gold 1-based (p floored at PROB_FLOOR)."""
    return -np.log(np.maximum(probs[np.arange(len(gold)), gold - 1], PROB_FLOOR))


def top_choice(probs: np.ndarray, gold: np.ndarray, tol: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """[N] confidence (the probability of the top option) and the expected accuracy of
    answering it, ties broken uniformly at random: 1/|ties| when gold is among them, so
    no position is favoured."""
    confidence = probs.max(axis=1)
    ties = probs >= confidence[:, None] - tol
    return confidence, ties[np.arange(len(gold)), gold - 1] / ties.sum(axis=1)


def prior_matrix(prior: PositionPrior, n_options: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((len(n_options), width))
    for i, n in enumerate(n_options):
        out[i, :n] = prior.probs(int(n))
    return out


def sampling_floor_tv(true_probs: np.ndarray, n_options: np.ndarray, k: np.ndarray | int, alpha: float,
                      seed: int = 0, repeats: int = 20) -> np.ndarray:
    """[N] expected TV of the histogram estimator fed k[i] draws from the truth (k[i]: the
    parsed samples row i's histogram rests on): finite k alone keeps TV above 0."""
    rng = np.random.default_rng(seed)
    k = np.broadcast_to(np.asarray(k), (len(true_probs),))
    out = np.zeros(len(true_probs))
    for i, (p, n, draws_k) in enumerate(zip(true_probs, n_options, k)):
        draws = rng.multinomial(int(draws_k), p[:n] / p[:n].sum(), size=repeats)  # [R, n]
        denom = draws_k + alpha * n
        est = (draws + alpha) / denom if denom > 0 else np.full((repeats, n), 1 / n)
        out[i] = total_variation(est, p[None, :n]).mean()
    return out


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10,
                               weights: np.ndarray | None = None) -> tuple[float, list[dict]]:
    """Equal-width-bin ECE = sum_b |B|/N |acc(B) - conf(B)|, and the reliability bins."""
    weights = np.ones(len(confidence)) if weights is None else weights
    bin_of = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    total, ece, bins = weights.sum(), 0.0, []
    for b in range(n_bins):
        w = weights * (bin_of == b)
        mass = w.sum()
        if mass == 0:
            continue
        conf, acc = float((w * confidence).sum() / mass), float((w * correct).sum() / mass)
        ece += mass / total * abs(acc - conf)
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": float(mass),
                     "confidence": conf, "accuracy": acc})
    return float(ece), bins


def _weighted_histogram(shares: np.ndarray, weights: np.ndarray) -> np.ndarray:
    model = (shares * weights[:, None]).sum(axis=0)
    return model / model.sum()


def position_histograms(rows: ScoredRows, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model vs gold distribution over positions 1..max_n plus a last off-slate/unparsed bin;
    each row weighs 1 (`choice_shares`)."""
    gold = np.bincount(rows.gold - 1, weights=weights, minlength=rows.max_options + 1)
    return _weighted_histogram(choice_shares(rows), weights), gold / gold.sum()


def _answer_slot_summary(rows: ScoredRows, dist: RowDistribution, plan: BootstrapPlan | None) -> dict:
    slots = rows.slots
    forced = slots.forced & slots.mask
    return {"temperature": slots.temperature, "entries_per_row": int(slots.mask.sum(axis=1).max()),
            "forced_slot_share": float(forced.sum() / slots.mask.sum()),
            "rows_with_forced_slot": int(forced.any(axis=1).sum()),
            "off_slate_mass": mean_estimate(dist.off_slate, plan)}


def choice_fidelity(rows: ScoredRows, prior: PositionPrior, alpha: float, plan: BootstrapPlan | None,
                    n_bins: int = 10, seed: int = 0) -> dict:
    """TV, NLL and calibration of each row's choice distribution (`choice_distribution`)."""
    k = int(rows.sample_mask.sum(axis=1).max())
    dist = choice_distribution(rows, alpha)
    confidence, correct = top_choice(dist.probs, rows.gold)
    uniform = smoothed_probs(np.zeros_like(dist.probs), rows.n_options, 1.0)
    out: dict = {
        "estimator": dist.estimator,
        "samples_per_row": k,
        "unparsed_sample_share": float(1 - (rows.answers != NONE)[rows.sample_mask].mean()),
        "tv_position_histogram": statistic_estimate(
            lambda w: float(total_variation(*position_histograms(rows, w))), rows.n_rows, plan),
        "nll": {
            "model": mean_estimate(gold_nll(dist.probs, rows.gold), plan),
            "uniform": mean_estimate(gold_nll(uniform, rows.gold), plan),
            "position_prior": mean_estimate(gold_nll(prior_matrix(prior, rows.n_options, dist.probs.shape[1]),
                                                     rows.gold), plan),
        },
        "ece": statistic_estimate(
            lambda w: expected_calibration_error(confidence, correct, n_bins, w)[0], rows.n_rows, plan),
        "reliability": expected_calibration_error(confidence, correct, n_bins)[1],
        "position_prior_fitted_on": prior.fitted_on,
    }
    if rows.slots is not None:
        out["answer_slot"] = _answer_slot_summary(rows, dist, plan)
    else:
        out["smoothing_alpha"] = alpha
    model_hist, gold_hist = position_histograms(rows, np.ones(rows.n_rows))
    out["position_histogram"] = {"model": model_hist.tolist(), "gold": gold_hist.tolist()}
    if rows.true_choice_probs is not None:
        true = rows.true_choice_probs
        out["tv_choice"] = mean_estimate(tv_to_truth(dist, true), plan)
        if rows.slots is None:
            # The exact estimator needs no floor: a model answering from the truth scores TV 0
            # at any k when its reasoning carries no information (see docs/evaluation.md).
            parsed = (rows.sample_mask & (rows.answers != NONE)).sum(axis=1)
            out["tv_choice_sampling_floor"] = float(sampling_floor_tv(true, rows.n_options, parsed, alpha,
                                                                      seed).mean())
        # Truth can give 0 to the gold option only if the data are broken; clip to stay finite.
        out["nll"]["true"] = mean_estimate(gold_nll(np.clip(true, 1e-12, None), rows.gold), plan)
    return out


def opinion_histograms(rows: ScoredRows, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model vs gold distribution over (increase, decrease, no_change, none) on rows with gold."""
    has = rows.has_gold_opinion
    model = _weighted_histogram(opinion_shares(rows)[has], weights[has])
    gold = np.bincount(rows.gold_opinion[has], weights=weights[has], minlength=N_OPINIONS + 1)
    return model, gold / gold.sum()


def opinion_fidelity(rows: ScoredRows, alpha: float, plan: BootstrapPlan | None) -> dict | None:
    """TV between predicted and gold direction distributions, beside always-'no_change';
    NLL of the gold direction under each row's distribution."""
    has = rows.has_gold_opinion
    if not has.any():
        return None
    model_hist, gold_hist = opinion_histograms(rows, np.ones(rows.n_rows))
    constant = np.zeros(N_OPINIONS + 1)
    constant[OPINION_DIRECTIONS.index("no_change")] = 1.0
    dist = opinion_distribution(rows, alpha)
    out = {
        "estimator": dist.estimator,
        "tv_model": statistic_estimate(
            lambda w: float(total_variation(*opinion_histograms(rows, w))), rows.n_rows, plan),
        "tv_always_no_change": float(total_variation(constant, gold_hist)),
        "nll_model": mean_estimate(gold_nll(dist.probs, np.maximum(rows.gold_opinion, 0) + 1), plan, has),
        "model_distribution": model_hist.tolist(),
        "gold_distribution": gold_hist.tolist(),
    }
    if rows.true_opinion_probs is not None:
        out["tv_opinion_rows"] = mean_estimate(tv_to_truth(dist, rows.true_opinion_probs), plan, has)
    return out
