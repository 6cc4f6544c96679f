"""Paired comparison of two models scored on the same rows: the per-row differences in TV
to the true choice probabilities, NLL of the human's choice, accuracy, parse rate and
accuracy among parsed answers, with one bootstrap over viewers, so the interval is that of
the difference. Two per-model intervals
can overlap while the paired difference clearly excludes 0 (and vice versa).

    python -m grailcore.evaluation.compare runs/eval_a/completions.jsonl runs/eval_b/completions.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from grailcore.evaluation.bootstrap import Estimate, make_plan, mean_estimate, statistic_estimate
from grailcore.evaluation.completions_io import read_completions
from grailcore.evaluation.fidelity import choice_probs, gold_nll, total_variation
from grailcore.evaluation.metrics import per_row_choice_scores
from grailcore.evaluation.rows import ScoredRows, score_completions


def per_row_scores(rows: ScoredRows, alpha: float) -> dict[str, np.ndarray]:
    """[N] each: TV to the true probabilities (synthetic rows only), NLL of the gold option
    under the k-sample choice distribution smoothed with `alpha`, mean accuracy over k
    (an unparsed sample counts as wrong), share of the k samples with a parseable answer and
    share in the strict answer layout."""
    probs = choice_probs(rows, alpha)  # [N, W], as grailcore.eval's fidelity metrics estimate it
    choice = per_row_choice_scores(rows)  # the per-row scores grailcore.eval's summary averages
    out = {"nll": gold_nll(probs, rows.gold), "acc": choice["accuracy_sample_mean"],
           "parsed": choice["parsed_rate"], "format": choice["format_rate"]}
    if rows.true_choice_probs is not None:
        out["tv"] = total_variation(probs, rows.true_choice_probs)
    return out


def paired_differences(path_a: str | Path, path_b: str | Path, alpha: float, n_boot: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> dict[str, Estimate]:
    """Mean of (A - B) per row for every score both files support, from two completions
    files of `grailcore.eval` over the same rows in the same order (negative TV / NLL
    differences favour A). Raises ValueError naming the first row that differs."""
    examples_a, completions_a = read_completions(path_a)
    examples_b, completions_b = read_completions(path_b)
    if len(examples_a) != len(examples_b):
        raise ValueError(f"{path_a} has {len(examples_a)} rows and {path_b} {len(examples_b)}: "
                         "a paired comparison needs the same rows (same --split, --max-samples and --seed)")
    for i, (a, b) in enumerate(zip(examples_a, examples_b)):
        if (a.example_id, a.gold_index, a.n_options) != (b.example_id, b.gold_index, b.n_options):
            raise ValueError(f"row {i + 1} differs: {a.example_id!r} (gold {a.gold_index}) in {path_a} vs "
                             f"{b.example_id!r} (gold {b.gold_index}) in {path_b}; evaluate both on the same rows")
    scores_a = per_row_scores(score_completions(examples_a, completions_a), alpha)
    scores_b = per_row_scores(score_completions(examples_b, completions_b), alpha)
    plan = make_plan([ex.viewer_id for ex in examples_a], n_boot, seed, confidence)
    diffs = {name: mean_estimate(scores_a[name] - scores_b[name], plan) for name in scores_a if name in scores_b}

    def among_parsed(weights: np.ndarray, scores: dict[str, np.ndarray]) -> float:
        # rows of one eval have equal k, so sum(acc) / sum(parsed) is correct answers over parsed answers
        return float(weights @ scores["acc"] / (weights @ scores["parsed"]))

    with np.errstate(invalid="ignore", divide="ignore"):  # a replicate without a parsed answer is nan
        diffs["acc_parsed"] = statistic_estimate(
            lambda w: among_parsed(w, scores_a) - among_parsed(w, scores_b), len(examples_a), plan)
    return diffs


def main(argv: list[str] | None = None) -> dict[str, Estimate]:
    parser = argparse.ArgumentParser(prog="python -m grailcore.evaluation.compare",
                                     description="Paired differences A - B of two `grailcore.eval` completions files "
                                                 "over the same rows (negative TV / NLL favour A).")
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--alpha", type=float, default=1.0, help="choice smoothing (grailcore.eval's default: 1)")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    diffs = paired_differences(args.a, args.b, args.alpha, args.n_boot, args.seed)
    print("| score | mean(A - B) | 95% interval | excludes 0 |\n|---|---|---|---|")
    for name, d in diffs.items():
        print(f"| {name} | {d.value:+.4f} | [{d.lo:+.4f}, {d.hi:+.4f}] | {'yes' if d.lo > 0 or d.hi < 0 else 'no'} |")
    return diffs


if __name__ == "__main__":
    main()
