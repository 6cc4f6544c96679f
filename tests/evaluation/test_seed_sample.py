"""Scoring the original system's completions reproduces its own numbers on the seed rows."""

import numpy as np
import pytest

from grailcore.evaluation.completions_io import read_completions
from grailcore.evaluation.evaluate import EvalOptions, evaluate
from grailcore.evaluation.rows import score_completions

from .helpers import example, seed_sample


def test_seed_completions_reproduce_the_original_rule():
    samples = read_completions(seed_sample())
    examples, completions = samples.examples, samples.texts
    assert len(examples) == 6 and all(len(c) == 1 for c in completions)
    rows = score_completions(examples, completions)
    # Its answers are 5, 2, 2, 1, 1, 1 against gold 5, 2, 2, 3, 2, 2: the gun rows right, the wage rows wrong.
    assert rows.original_answers[:, 0].tolist() == [5, 2, 2, 1, 1, 1]
    assert rows.gold.tolist() == [5, 2, 2, 3, 2, 2]
    results = evaluate(examples, completions, options=EvalOptions(n_boot=0))
    choice = results["choice"]
    # The original rule: correct when the <answer> integer equals the gold; every row parsed and formatted.
    assert choice["original_accuracy"].value == pytest.approx(0.5)
    assert choice["original_parsed_rate"].value == 1.0
    assert choice["original_format_rate"].value == 1.0
    # Strict: the same answers parse, but no completion has the <opinion> block, so none is well formatted.
    assert choice["accuracy"].value == pytest.approx(0.5)
    assert choice["parsed_rate"].value == 1.0
    assert choice["format_rate"].value == 0.0
    # No opinion tags and no gold directions: only the (zero) opinion parsed rate is reported.
    assert list(results["opinion"]) == ["parsed_rate"] and results["opinion"]["parsed_rate"].value == 0.0


def test_seed_breakdown_matches_the_original_pattern():
    samples = read_completions(seed_sample())
    examples, completions = samples.examples, samples.texts
    by = evaluate(examples, completions, options=EvalOptions(n_boot=0))["breakdowns"]
    assert by["issue"]["gun_control"]["original_accuracy"].value == 1.0
    assert by["issue"]["minimum_wage"]["original_accuracy"].value == 0.0
    assert by["study"]["study2"]["n_rows"] == 2


@pytest.mark.parametrize("text, strict, original", [
    ("<answer>Option 3</answer>", None, 3),  # the original rule read 'option N'
    ("<think>a</think><answer>3</answer><opinion>increase</opinion>", 3, 3),
    ("<answer>3</answer><answer>2</answer>", None, 3),  # the original took the first tag
    ("<answer>9</answer>", None, 9),  # out of range: parsed by the original rule, never correct
    ("I pick 3", None, None),
])
def test_strict_and_original_rules_where_they_differ(text, strict, original):
    rows = score_completions([example(0, 3, 4)], [[text]])
    assert rows.first_answer[0] == (-1 if strict is None else strict)
    assert rows.original_answers[0, 0] == (-1 if original is None else original)
    assert np.array_equal(rows.original_formatted[0], ["<answer>" in text])
