"""Distribution fidelity: does the model's choice/opinion DISTRIBUTION match people's,
not just its top guess (TV distances, NLL of the human choice, calibration)."""

from __future__ import annotations

import numpy as np

from grailcore.data.schema import OPINION_DIRECTIONS
from grailcore.evaluation.baselines import PositionPrior
from grailcore.evaluation.bootstrap import BootstrapPlan, mean_estimate, statistic_estimate
from grailcore.evaluation.rows import NONE, ScoredRows

N_OPINIONS = len(OPINION_DIRECTIONS)


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


def choice_probs(rows: ScoredRows, alpha: float) -> np.ndarray:
    """[N, W] each row's choice distribution estimated from its k samples, smoothed with `alpha`."""
    return smoothed_probs(choice_counts(rows), rows.n_options, alpha)


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """0.5 * sum |p - q| over the last axis."""
    return 0.5 * np.abs(p - q).sum(axis=-1)


def gold_nll(probs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """[N] -log p(gold) with gold 1-based; probs must be > 0 at the gold position."""
    return -np.log(probs[np.arange(len(gold)), gold - 1])


def prior_matrix(prior: PositionPrior, n_options: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((len(n_options), width))
    for i, n in enumerate(n_options):
        out[i, :n] = prior.probs(int(n))
    return out


def sampling_floor_tv(true_probs: np.ndarray, n_options: np.ndarray, k: int, alpha: float,
                      seed: int = 0, repeats: int = 20) -> np.ndarray:
    """[N] expected TV of the SAME estimator fed k draws from the truth: finite k alone
    keeps TV above 0, so a model is judged against this floor, not against 0."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(true_probs))
    for i, (p, n) in enumerate(zip(true_probs, n_options)):
        draws = rng.multinomial(k, p[:n] / p[:n].sum(), size=repeats)  # [R, n]
        est = (draws + alpha) / (k + alpha * n) if k + alpha * n > 0 else np.full((repeats, n), 1 / n)
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


def position_histograms(rows: ScoredRows, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model vs gold distribution over positions 1..max_n plus a last 'unparsed' bin;
    each row weighs 1, split evenly over its samples."""
    width = rows.max_options
    per_sample = np.where(rows.answers == NONE, width, rows.answers - 1)
    share = rows.sample_mask / rows.sample_mask.sum(axis=1, keepdims=True) * weights[:, None]
    model = np.zeros(width + 1)
    np.add.at(model, per_sample[rows.sample_mask], share[rows.sample_mask])
    gold = np.bincount(rows.gold - 1, weights=weights, minlength=width + 1)
    return model / model.sum(), gold / gold.sum()


def choice_fidelity(rows: ScoredRows, prior: PositionPrior, alpha: float, plan: BootstrapPlan | None,
                    n_bins: int = 10, seed: int = 0) -> dict:
    """TV, NLL and calibration of the per-row choice distribution estimated from k samples."""
    k = int(rows.sample_mask.sum(axis=1).max())
    probs = choice_probs(rows, alpha)  # [N, W]
    predicted = probs.argmax(axis=1) + 1
    confidence, correct = probs.max(axis=1), (predicted == rows.gold).astype(float)
    uniform = smoothed_probs(np.zeros_like(probs), rows.n_options, 1.0)
    out: dict = {
        "smoothing_alpha": alpha,
        "samples_per_row": k,
        "unparsed_sample_share": float(1 - (rows.answers != NONE)[rows.sample_mask].mean()),
        "tv_position_histogram": statistic_estimate(
            lambda w: float(total_variation(*position_histograms(rows, w))), rows.n_rows, plan),
        "nll": {
            "model": mean_estimate(gold_nll(probs, rows.gold), plan),
            "uniform": mean_estimate(gold_nll(uniform, rows.gold), plan),
            "position_prior": mean_estimate(gold_nll(prior_matrix(prior, rows.n_options, probs.shape[1]),
                                                     rows.gold), plan),
        },
        "ece": statistic_estimate(
            lambda w: expected_calibration_error(confidence, correct, n_bins, w)[0], rows.n_rows, plan),
        "reliability": expected_calibration_error(confidence, correct, n_bins)[1],
        "position_prior_fitted_on": prior.fitted_on,
    }
    model_hist, gold_hist = position_histograms(rows, np.ones(rows.n_rows))
    out["position_histogram"] = {"model": model_hist.tolist(), "gold": gold_hist.tolist()}
    if rows.true_choice_probs is not None:
        true = rows.true_choice_probs
        out["tv_choice"] = mean_estimate(total_variation(probs, true), plan)
        out["tv_choice_sampling_floor"] = float(sampling_floor_tv(true, rows.n_options, k, alpha, seed).mean())
        # Truth can give 0 to the gold option only if the data are broken; clip to stay finite.
        out["nll"]["true"] = mean_estimate(gold_nll(np.clip(true, 1e-12, None), rows.gold), plan)
    return out


def opinion_histograms(rows: ScoredRows, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model vs gold distribution over (increase, decrease, no_change, none) on rows with gold."""
    has = rows.has_gold_opinion
    mask = rows.sample_mask[has]
    codes = np.where(rows.opinions[has] == NONE, N_OPINIONS, rows.opinions[has])
    share = mask / mask.sum(axis=1, keepdims=True) * weights[has][:, None]
    model = np.zeros(N_OPINIONS + 1)
    np.add.at(model, codes[mask], share[mask])
    gold = np.bincount(rows.gold_opinion[has], weights=weights[has], minlength=N_OPINIONS + 1)
    return model / model.sum(), gold / gold.sum()


def opinion_fidelity(rows: ScoredRows, alpha: float, plan: BootstrapPlan | None) -> dict | None:
    """TV between predicted and gold direction distributions, beside always-'no_change'."""
    if not rows.has_gold_opinion.any():
        return None
    model_hist, gold_hist = opinion_histograms(rows, np.ones(rows.n_rows))
    constant = np.zeros(N_OPINIONS + 1)
    constant[OPINION_DIRECTIONS.index("no_change")] = 1.0
    out = {
        "tv_model": statistic_estimate(
            lambda w: float(total_variation(*opinion_histograms(rows, w))), rows.n_rows, plan),
        "tv_always_no_change": float(total_variation(constant, gold_hist)),
        "model_distribution": model_hist.tolist(),
        "gold_distribution": gold_hist.tolist(),
    }
    if rows.true_opinion_probs is not None:
        has = rows.has_gold_opinion
        counts = np.zeros((rows.n_rows, N_OPINIONS))
        r, s = np.nonzero(rows.sample_mask & (rows.opinions != NONE))
        np.add.at(counts, (r, rows.opinions[r, s]), 1.0)
        est = smoothed_probs(counts, np.full(rows.n_rows, N_OPINIONS), alpha)
        out["tv_opinion_rows"] = mean_estimate(total_variation(est, rows.true_opinion_probs), plan, has)
    return out
