"""Population fidelity: TV / W1 of aggregate choice and opinion shares on hand values,
groups, and the pre-attitude-only opinion predictor."""

import numpy as np
import pytest

from grailcore.evaluation import evaluate, flatten
from grailcore.evaluation import population as pop
from grailcore.evaluation.answer_slot import EXACT, RowSlots, SampleSlots
from grailcore.evaluation.completions_io import EvalSamples
from grailcore.evaluation.evaluate import EvalOptions
from grailcore.evaluation.rows import build_rows, opinion_code

from .helpers import completion
from .order_helpers import viewer_example


def test_tv_and_w1_by_hand():
    assert pop.tv_distance([1, 0, 0], [0, 0, 1]) == 1.0
    assert pop.w1_distance([1, 0, 0], [0, 0, 1]) == 2.0  # two category steps
    assert pop.tv_distance([0.5, 0.5, 0], [0, 0.5, 0.5]) == 0.5
    assert pop.w1_distance([0.5, 0.5, 0], [0, 0.5, 0.5]) == pytest.approx(1.0)
    assert pop.w1_distance([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0
    assert pop.w1_distance([2, 0], [0, 1]) == 1.0  # renormalised first
    assert np.isnan(pop.w1_distance([0, 0], [1, 0]))


def test_stance_side():
    assert [pop.stance_side(s) for s in (-0.3, 0.0, 0.9, None)] == ["against", "neutral", "pro", None]


STANCES = (-0.8, 0.0, 0.6)


def test_choice_shares_use_stance_sides_by_hand():
    # gold sides: pro, pro, against, neutral; the model always answers 1 -> against x4
    examples = [viewer_example(i, gold=g, n=3, stances=STANCES, meta={"viewer_ideology": ideo})
                for i, (g, ideo) in enumerate([(3, "liberal"), (3, "liberal"), (1, "conservative"), (2, None)])]
    block = pop.choice_population(build_rows(examples, [[1]] * 4), examples, plan=None)
    assert block["category"] == "stance_side" and block["labels"] == ["against", "neutral", "pro", "unparsed"]
    overall = block["overall"]
    assert overall["model_shares"] == [1.0, 0.0, 0.0, 0.0]
    assert overall["human_shares"] == [0.25, 0.25, 0.5, 0.0]
    assert overall["tv"].value == pytest.approx(0.75)
    assert overall["w1"].value == pytest.approx(0.25 * 1 + 0.5 * 2)  # mass moved 1 and 2 steps
    groups = block["groups"]
    assert groups["viewer_ideology"]["liberal"]["tv"].value == pytest.approx(1.0)
    assert groups["viewer_ideology"]["liberal"]["w1"].value == pytest.approx(2.0)
    assert groups["viewer_ideology"]["conservative"]["tv"].value == 0.0
    assert groups["viewer_ideology"]["unknown"]["n_rows"] == 1
    assert "unavailable" in groups["slate_design"]
    assert set(groups["issue"]) == {"gun_control"}


def test_unparsed_counts_in_tv_and_positions_are_the_fallback():
    examples = [viewer_example(i, gold=1, n=2) for i in range(2)]  # no stances
    rows = build_rows(examples, [[1, -1], [1, 1]])  # row 0: half its samples unparsed
    block = pop.choice_population(rows, examples, plan=None)
    assert block["category"] == "position" and "shown position" in block["category_note"]
    assert block["overall"]["model_shares"] == [0.75, 0.0, 0.25]
    assert block["overall"]["tv"].value == pytest.approx(0.25)
    assert block["overall"]["w1"].value == 0.0  # parsed mass matches exactly


TRAIN = [("A", "increase"), ("A", "increase"), ("A", "decrease"),
         ("B", "no_change"), ("B", "decrease"), ("B", "decrease")]


def train_rows():
    return [viewer_example(100 + i, gold=1, viewpoint=v, opinion=d) for i, (v, d) in enumerate(TRAIN)]


def test_pre_attitude_predictor_by_hand():
    table, overall = pop.fit_pre_attitude(train_rows())
    assert table == {"A": opinion_code("increase"), "B": opinion_code("decrease")}
    assert overall == opinion_code("decrease")  # 3 of 6
    evaluated = [viewer_example(i, gold=1, viewpoint=v, opinion=d)
                 for i, (v, d) in enumerate([("A", "increase"), ("B", "no_change"), ("C", "decrease")])]
    preds, source = pop.pre_attitude_predictions(evaluated, train_rows())
    assert preds.tolist() == [opinion_code(d) for d in ("increase", "decrease", "decrease")]  # C unseen -> overall
    assert source.startswith("train")
    assert pop.initial_viewpoint(evaluated[0].replace(meta={"initial_viewpoint": "Z "})) == "Z"
    rows = build_rows(evaluated, [[1]] * 3)
    base = pop.pre_attitude_baseline(rows, evaluated, train_rows())["pre_attitude"]
    assert base.scores.tolist() == [1.0, 0.0, 1.0]
    # no train rows: fitted on the evaluated rows, and labelled so
    assert "optimistic" in pop.pre_attitude_predictions(evaluated, None)[1]


def test_opinion_population_and_evaluate_wiring():
    directions = ["increase", "decrease", "no_change", "no_change"] * 3
    examples = [viewer_example(i, gold=1, n=3, stances=STANCES, opinion=d, viewpoint="A" if i % 2 else "B",
                               meta={"slate_design": "balanced"}) for i, d in enumerate(directions)]
    completions = [[completion(1, "no_change")] for _ in examples]
    results = evaluate(examples, completions, train_rows(), EvalOptions(n_boot=100))
    block = results["population"]["opinion"]
    assert block["labels"] == ["decrease", "no_change", "increase", "none"]
    overall = block["overall"]
    # human: decrease .25, no_change .5, increase .25; model == always 'no_change'
    assert overall["model"]["human_shares"] == [0.25, 0.5, 0.25, 0.0]
    assert overall["model"]["tv"].value == overall["always_no_change"]["tv"].value == pytest.approx(0.5)
    assert overall["model"]["w1"].value == pytest.approx(0.5)
    # pre-attitude: A (odd rows) -> increase, B (even rows) -> decrease
    assert overall["pre_attitude"]["model_shares"] == [0.5, 0.0, 0.5, 0.0]
    assert overall["pre_attitude"]["tv"].value == pytest.approx(0.5)
    assert np.isfinite(overall["model"]["tv"].lo)  # viewer-clustered interval
    assert "balanced" in block["groups"]["slate_design"]
    assert "pre_attitude" in results["opinion_baselines"]
    flat = flatten(results, prefix="")
    for name in ("population/choice_tv", "population/choice_w1", "population/choice_tv/issue=gun_control",
                 "population/choice_w1/slate_design=balanced", "population/opinion_tv/model",
                 "population/opinion_w1/always_no_change", "population/opinion_tv/pre_attitude",
                 "population/opinion_tv/model/study=study1", "baseline/pre_attitude"):
        assert name in flat, name


def test_report_shows_order_and_population_sections(tmp_path):
    from grailcore.evaluation.order import permuted_copies
    from grailcore.evaluation.report import summary_table, write_report

    from .order_helpers import always_first

    examples = [viewer_example(i, gold=i % 3 + 1, n=3, stances=STANCES, opinion="no_change") for i in range(12)]
    permuted = [EvalSamples(copy, [always_first(ex) for ex in copy]) for copy in permuted_copies(examples, 2)]
    results = evaluate(examples, [always_first(ex) for ex in examples], None, EvalOptions(n_boot=20), permuted)
    paths = write_report(results, tmp_path, {"model": "fake"})
    text = paths["report"].read_text()
    assert "## Order robustness" in text and "recall at shown position 1" in text
    assert "## Population fidelity" in text and "option stance side" in text
    assert "slate_design" in text and "unavailable" in text and "pre-attitude" in text
    import json
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["order_robustness"]["position_recall"]["1"]["value"] == 1.0
    assert "order robustness: accuracy std" in summary_table(results)


def test_exact_distributions_give_the_population_shares():
    # two rows; the model's slot distribution over positions (0.5, 0.2, 0.2), off-slate 0.1; the
    # opinion (increase 0.1, decrease 0.2, no_change 0.6), off-slate 0.1; the sampled answers ignored
    examples = [viewer_example(i, gold=3, n=3, stances=STANCES, opinion="no_change") for i in range(2)]
    slots = [RowSlots(EXACT, 1.0, (SampleSlots((0.5, 0.2, 0.2), (0.1, 0.2, 0.6), "sampled", "sampled"),))] * 2
    rows = build_rows(examples, [[1]] * 2, slots=slots)
    block = pop.population_fidelity(rows, examples, None, plan=None)
    sides = [STANCES[0], STANCES[1], STANCES[2]]
    expected = np.zeros(4)
    for p, stance in zip((0.5, 0.2, 0.2), sides):
        expected[pop.STANCE_SIDES.index(pop.stance_side(stance))] += p
    expected[3] = 0.1
    np.testing.assert_allclose(block["choice"]["overall"]["model_shares"], expected)
    # opinion shares in W1 order (decrease, no_change, increase) + none
    np.testing.assert_allclose(block["opinion"]["overall"]["model"]["model_shares"], [0.2, 0.6, 0.1, 0.1])
