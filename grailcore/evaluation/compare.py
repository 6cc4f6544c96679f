"""Paired comparison of two models scored on the same rows: the per-row differences in TV
to the true choice probabilities, NLL of the human's choice, accuracy, parse rate and
accuracy among parsed answers, with one bootstrap over viewers, so the interval is that of
the difference. Two per-model intervals
can overlap while the paired difference clearly excludes 0 (and vice versa). TV and NLL
come from each row's choice distribution (`fidelity.choice_distribution`): the exact
answer-slot one the files carry, or the histogram fallback for files without; both files
must use the same estimator.

    python -m grailcore.evaluation.compare runs/eval_a/completions.jsonl runs/eval_b/completions.jsonl

A side may be several files of the same rows, comma-separated (an arm's seeds:
`runs/a_s0/eval/step_000024.jsonl,runs/a_s1/eval/step_000024.jsonl`): its per-row scores are
the mean over its files, so the difference is that of the seed-averaged arms. The interval
is still a bootstrap over viewers: it covers the rows and the draws, not how differently
another training seed would have turned out; compare each seed on its own beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

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


def _paths(side: str | Path | Sequence[str | Path]) -> list[Path]:
    """One side's files: a path, a comma-separated string of paths, or a sequence of paths."""
    if isinstance(side, (str, Path)):
        side = [part for part in str(side).split(",") if part]
    if not side:
        raise ValueError("a side of the comparison names no completions file")
    return [Path(p) for p in side]


def _check_same_rows(reference: Path, examples_ref: list, path: Path, examples: list) -> None:
    if len(examples_ref) != len(examples):
        raise ValueError(f"{reference} has {len(examples_ref)} rows and {path} {len(examples)}: "
                         "a paired comparison needs the same rows (same --split, --max-samples and --seed)")
    for i, (ex_a, ex_b) in enumerate(zip(examples_ref, examples)):
        if (ex_a.example_id, ex_a.gold_index, ex_a.n_options) != (ex_b.example_id, ex_b.gold_index, ex_b.n_options):
            raise ValueError(f"row {i + 1} differs: {ex_a.example_id!r} (gold {ex_a.gold_index}) in {reference} vs "
                             f"{ex_b.example_id!r} (gold {ex_b.gold_index}) in {path}; evaluate both on the same rows")


def paired_differences(path_a: str | Path | Sequence[str | Path], path_b: str | Path | Sequence[str | Path],
                       alpha: float, n_boot: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> dict[str, Estimate | str]:
    """Mean of (A - B) per row for every score both sides support, from completions files
    of `grailcore.eval` over the same rows in the same order (negative TV / NLL differences
    favour A). A side of several files (see `_paths`) scores each row by the mean over its
    files. Raises ValueError naming the first file and row that differ."""
    files = [_paths(path_a), _paths(path_b)]
    loaded = [[read_completions(p) for p in side] for side in files]
    examples_a = loaded[0][0].examples
    for path, samples in list(zip(files[0], loaded[0]))[1:] + list(zip(files[1], loaded[1])):
        _check_same_rows(files[0][0], examples_a, path, samples.examples)
    rows = [[score_completions(s.examples, s.texts, s.slots) for s in side] for side in loaded]
    estimators = [{estimator_of(r) for r in side} for side in rows]
    kinds = {name == HISTOGRAM for side in estimators for name in side}
    if len(kinds) > 1:
        raise ValueError(f"{', '.join(map(str, files[0]))} give choice distributions by {sorted(estimators[0])} and "
                         f"{', '.join(map(str, files[1]))} by {sorted(estimators[1])}: a model's exact distribution "
                         "and another's sample histogram are not comparable (files without 'answer_slot' use the "
                         "histogram fallback); rerun the older evaluation with this grailcore")
    scores_a, scores_b = (_mean_scores([per_row_scores(r, alpha) for r in side]) for side in rows)
    plan = make_plan([ex.viewer_id for ex in examples_a], n_boot, seed, confidence)
    diffs = {name: mean_estimate(scores_a[name] - scores_b[name], plan) for name in scores_a if name in scores_b}

    def among_parsed(weights: np.ndarray, scores: dict[str, np.ndarray]) -> float:
        # rows of one eval have equal k, so sum(acc) / sum(parsed) is correct answers over parsed answers
        return float(weights @ scores["acc"] / (weights @ scores["parsed"]))

    with np.errstate(invalid="ignore", divide="ignore"):  # a replicate without a parsed answer is nan
        diffs["acc_parsed"] = statistic_estimate(
            lambda w: among_parsed(w, scores_a) - among_parsed(w, scores_b), len(examples_a), plan)
    named = [", ".join(sorted(side)) for side in estimators]
    diffs["estimator"] = named[0] if named[0] == named[1] else f"A {named[0]}, B {named[1]}"
    return diffs


def _mean_scores(per_file: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-row scores averaged over one side's files (the scores every file has)."""
    names = set.intersection(*(set(scores) for scores in per_file))
    return {name: np.mean([scores[name] for scores in per_file], axis=0) for name in per_file[0] if name in names}


def main(argv: list[str] | None = None) -> dict[str, Estimate | str]:
    parser = argparse.ArgumentParser(prog="python -m grailcore.evaluation.compare",
                                     description="Paired differences A - B of two `grailcore.eval` completions files "
                                                 "over the same rows (negative TV / NLL favour A).")
    parser.add_argument("a", help="completions file(s) of model A; several (an arm's seeds) comma-separated")
    parser.add_argument("b", help="completions file(s) of model B, the same rows")
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
