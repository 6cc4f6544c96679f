"""One entry for all viewer metrics: `evaluate` (nested results, for reports) and
`evaluate_examples` (flat `eval/...` floats, for the trainer's logger)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from grailcore.data.audit import audit_examples
from grailcore.data.schema import Example
from grailcore.evaluation import baselines as bl
from grailcore.evaluation import fidelity, metrics, order, population
from grailcore.evaluation.bootstrap import Estimate, make_plan, mean_estimate
from grailcore.evaluation.rows import ScoredRows, score_completions


@dataclass(frozen=True)
class EvalOptions:
    n_boot: int = 1000
    """Bootstrap replicates for the 95% intervals (0 = point values only)."""
    confidence: float = 0.95
    smoothing_alpha: float = 1.0
    """Additive smoothing of per-row choice probabilities estimated from k samples (1 = Laplace)."""
    n_bins: int = 10
    """Equal-width confidence bins of the calibration error."""
    seed: int = 0


def _baseline_table(model_scores: np.ndarray, baselines: dict[str, bl.Baseline], plan) -> dict[str, dict]:
    """Each baseline's mean and the paired model-minus-baseline difference (same replicates)."""
    table = {}
    for name, base in baselines.items():
        table[name] = {
            "accuracy": mean_estimate(base.scores, plan, base.rows_mask),
            "model_minus_baseline": mean_estimate(model_scores - base.scores, plan, base.rows_mask),
            "description": base.description,
        }
    return table


def scored_rows_audit(examples: Sequence[Example]) -> dict[str, Any]:
    """What the leak audit finds on the scored rows as the model saw them: its verdict, the
    rules over threshold and each artifact rule's margin over random (all rows pooled)."""
    report = audit_examples(examples)
    return {"verdict": report.verdict, "n_rows": report.n_examples, "rules_over_threshold": report.reasons,
            "margins": {r.name: r.margin for r in report.groups[0].rules if r.kind == "artifact"}}


def evaluate_rows(rows: ScoredRows, examples: Sequence[Example], train_examples: Sequence[Example] | None = None,
                  options: EvalOptions = EvalOptions(),
                  permuted_runs: Sequence[order.OrderRun] = ()) -> dict[str, Any]:
    """All metrics for parsed rows; values are `Estimate`s, floats, lists and strings.
    `permuted_runs` are the same rows scored under other option orders (order robustness)."""
    if rows.n_rows == 0:
        raise ValueError("nothing to evaluate: 0 rows")
    plan = make_plan(rows.viewer_id, options.n_boot, options.seed, options.confidence)
    prior = bl.prior_source(rows, train_examples, options.smoothing_alpha)
    opinion_correct = (rows.opinions[:, 0] == rows.gold_opinion).astype(float)
    return {
        "n_rows": rows.n_rows,
        "samples_per_row": int(rows.sample_mask.sum(axis=1).max()),
        "synthetic": rows.true_choice_probs is not None,
        "bootstrap": plan.describe() if plan else None,
        "choice": metrics.choice_summary(rows, plan),
        "baselines": _baseline_table(metrics.correct_first(rows), bl.choice_baselines(rows, examples, prior), plan),
        "data_audit": scored_rows_audit(examples),
        "breakdowns": metrics.breakdowns(rows, plan),
        "opinion": metrics.opinion_summary(rows, plan),
        "opinion_baselines": _baseline_table(
            opinion_correct, {**bl.opinion_baselines(rows, train_examples),
                              **population.pre_attitude_baseline(rows, examples, train_examples)}, plan),
        "fidelity": fidelity.choice_fidelity(rows, prior, options.smoothing_alpha, plan, options.n_bins, options.seed),
        "opinion_fidelity": fidelity.opinion_fidelity(rows, options.smoothing_alpha, plan),
        "order_robustness": order.order_robustness([order.identity_run(rows), *permuted_runs], plan),
        "population": population.population_fidelity(rows, examples, train_examples, plan),
        "confusion": {
            "position": metrics.position_confusion(rows).tolist(),
            "opinion": metrics.opinion_confusion(rows).tolist() if rows.has_gold_opinion.any() else None,
        },
    }


def score_permuted(examples: Sequence[Example],
                   permuted: Sequence[tuple[Sequence[Example], Sequence[Sequence[str]]]]) -> list[order.OrderRun]:
    """Parse each (permuted copy of `examples`, its completions) pair into an `OrderRun`."""
    runs = []
    for copy, texts in permuted:
        if len(copy) != len(examples):
            raise ValueError(f"a permuted copy has {len(copy)} rows for {len(examples)} examples")
        runs.append(order.OrderRun(score_completions(copy, texts),
                                   [order.recover_permutation(a, b) for a, b in zip(examples, copy)]))
    return runs


def evaluate(examples: Sequence[Example], completions: Sequence[Sequence[str]],
             train_examples: Sequence[Example] | None = None, options: EvalOptions = EvalOptions(),
             permuted: Sequence[tuple[Sequence[Example], Sequence[Sequence[str]]]] = ()) -> dict[str, Any]:
    """Parse `completions[i]` (samples of `examples[i]`) and compute every metric; `permuted`
    holds (copy of `examples` with reordered options, its completions) pairs (`order.permuted_copies`)."""
    return evaluate_rows(score_completions(examples, completions), examples, train_examples, options,
                         score_permuted(examples, permuted))


def _value(x: Any) -> float | None:
    return x.value if isinstance(x, Estimate) else (float(x) if isinstance(x, (int, float)) else None)


def flatten(results: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """Flat scalar view of `evaluate`'s results (point values; NaN-free keys only)."""
    flat: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        v = _value(value)
        if v is not None and np.isfinite(v):
            flat[prefix + name] = v

    for name, est in results["choice"].items():
        put(name, est)
    for name, est in results["opinion"].items():
        put(f"opinion_{name}", est)
    for name, row in {**results["baselines"], **results["opinion_baselines"]}.items():
        put(f"baseline/{name}", row["accuracy"])
    audit = results["data_audit"]
    put("audit/leak", float(audit["verdict"] == "LEAK"))
    put("audit/suspect", float(audit["verdict"] == "SUSPECT"))
    for name, margin in audit["margins"].items():
        put(f"audit/margin/{name}", margin)
    fid = results["fidelity"]
    for key in ("tv_choice", "tv_choice_sampling_floor", "tv_position_histogram", "ece", "unparsed_sample_share"):
        put(key, fid.get(key))
    for name, est in fid["nll"].items():
        put(f"nll_choice/{name}", est)
    if results["opinion_fidelity"]:
        put("opinion_tv", results["opinion_fidelity"]["tv_model"])
        put("opinion_tv_always_no_change", results["opinion_fidelity"]["tv_always_no_change"])
    for name, value in order.flat_order(results["order_robustness"]).items():
        put(f"order/{name}", value)
    for name, value in population.flat_population(results["population"]).items():
        put(f"population/{name}", value)
    return flat


def evaluate_examples(examples: Sequence[Example], completions: Sequence[Sequence[str]],
                      train_examples: Sequence[Example] | None = None,
                      permuted: Sequence[tuple[Sequence[Example], Sequence[Sequence[str]]]] = ()) -> dict[str, float]:
    """Trainer hook: flat `eval/...` metrics, no bootstrap (it runs every few steps)."""
    return flatten(evaluate(examples, completions, train_examples, EvalOptions(n_boot=0), permuted))
