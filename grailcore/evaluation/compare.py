"""Paired comparison of two models scored on the same rows: the per-row differences in TV
to the true choice probabilities, NLL of the human's choice, accuracy, parse rate and
accuracy among parsed answers, with one bootstrap over viewers, so the interval is that of
the difference. Two per-model intervals
can overlap while the paired difference clearly excludes 0 (and vice versa). TV and NLL
come from each row's choice distribution (`fidelity.choice_distribution`): the exact
answer-slot one the files carry, or the histogram fallback for files without; both files
must use the same estimator.

    python -m grailcore.evaluation.compare runs/eval_a/completions.jsonl runs/eval_b/completions.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from grailcore.evaluation.answer_slot import HISTOGRAM
from grailcore.evaluation.bootstrap import Estimate, make_plan, mean_estimate, statistic_estimate
from grailcore.evaluation.completions_io import read_completions
from grailcore.evaluation.fidelity import choice_distribution, gold_nll, tv_to_truth
from grailcore.evaluation.metrics import per_row_choice_scores
from grailcore.evaluation.rows import ScoredRows, score_completions


def per_row_scores(rows: ScoredRows, alpha: float) -> dict[str, np.ndarray]:
    """[N] each: TV to the true probabilities (synthetic rows only) and NLL of the gold
    option under each row's choice distribution (`alpha` smooths the histogram fallback
    only), off-slate mass, mean accuracy over k (an unparsed sample counts as wrong), share
    of the k samples with a parseable answer and share in the strict answer layout."""
    dist = choice_distribution(rows, alpha)  # as grailcore.eval's fidelity metrics estimate it
    choice = per_row_choice_scores(rows)  # the per-row scores grailcore.eval's summary averages
    out = {"nll": gold_nll(dist.probs, rows.gold), "off_slate": dist.off_slate, "acc": choice["accuracy_sample_mean"],
           "parsed": choice["parsed_rate"], "format": choice["format_rate"]}
    if rows.true_choice_probs is not None:
        out["tv"] = tv_to_truth(dist, rows.true_choice_probs)
    return out


def estimator_of(rows: ScoredRows) -> str:
    return choice_distribution(rows, 1.0).estimator


def paired_differences(path_a: str | Path, path_b: str | Path, alpha: float, n_boot: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> dict[str, Estimate | str]:
    """Mean of (A - B) per row for every score both files support, from two completions
    files of `grailcore.eval` over the same rows in the same order (negative TV / NLL
    differences favour A). Raises ValueError naming the first row that differs."""
    a, b = read_completions(path_a), read_completions(path_b)
    examples_a, examples_b = a.examples, b.examples
    if len(examples_a) != len(examples_b):
        raise ValueError(f"{path_a} has {len(examples_a)} rows and {path_b} {len(examples_b)}: "
                         "a paired comparison needs the same rows (same --split, --max-samples and --seed)")
    for i, (ex_a, ex_b) in enumerate(zip(examples_a, examples_b)):
        if (ex_a.example_id, ex_a.gold_index, ex_a.n_options) != (ex_b.example_id, ex_b.gold_index, ex_b.n_options):
            raise ValueError(f"row {i + 1} differs: {ex_a.example_id!r} (gold {ex_a.gold_index}) in {path_a} vs "
                             f"{ex_b.example_id!r} (gold {ex_b.gold_index}) in {path_b}; evaluate both on the same rows")
    rows_a, rows_b = score_completions(a.examples, a.texts, a.slots), score_completions(b.examples, b.texts, b.slots)
    estimators = estimator_of(rows_a), estimator_of(rows_b)
    if (estimators[0] == HISTOGRAM) != (estimators[1] == HISTOGRAM):
        raise ValueError(f"{path_a} gives choice distributions by {estimators[0]!r} and {path_b} by "
                         f"{estimators[1]!r}: a model's exact distribution and another's sample histogram are not "
                         "comparable (files without 'answer_slot' use the histogram fallback); rerun the older "
                         "evaluation with this grailcore")
    scores_a, scores_b = per_row_scores(rows_a, alpha), per_row_scores(rows_b, alpha)
    plan = make_plan([ex.viewer_id for ex in examples_a], n_boot, seed, confidence)
    diffs = {name: mean_estimate(scores_a[name] - scores_b[name], plan) for name in scores_a if name in scores_b}

    def among_parsed(weights: np.ndarray, scores: dict[str, np.ndarray]) -> float:
        # rows of one eval have equal k, so sum(acc) / sum(parsed) is correct answers over parsed answers
        return float(weights @ scores["acc"] / (weights @ scores["parsed"]))

    with np.errstate(invalid="ignore", divide="ignore"):  # a replicate without a parsed answer is nan
        diffs["acc_parsed"] = statistic_estimate(
            lambda w: among_parsed(w, scores_a) - among_parsed(w, scores_b), len(examples_a), plan)
    diffs["estimator"] = estimators[0] if estimators[0] == estimators[1] else f"A {estimators[0]}, B {estimators[1]}"
    return diffs


def main(argv: list[str] | None = None) -> dict[str, Estimate | str]:
    parser = argparse.ArgumentParser(prog="python -m grailcore.evaluation.compare",
                                     description="Paired differences A - B of two `grailcore.eval` completions files "
                                                 "over the same rows (negative TV / NLL favour A).")
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--alpha", type=float, default=1.0,
                        help="smoothing of the histogram fallback (grailcore.eval's default: 1)")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    diffs = paired_differences(args.a, args.b, args.alpha, args.n_boot, args.seed)
    print(f"choice distributions: {diffs.pop('estimator')}")
    print("| score | mean(A - B) | 95% interval | excludes 0 |\n|---|---|---|---|")
    for name, d in diffs.items():
        print(f"| {name} | {d.value:+.4f} | [{d.lo:+.4f}, {d.hi:+.4f}] | {'yes' if d.lo > 0 or d.hi < 0 else 'no'} |")
    return diffs


if __name__ == "__main__":
    main()
