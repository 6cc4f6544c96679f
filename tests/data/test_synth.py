"""Synthetic study: determinism, splits by viewer, the known choice/opinion models, sessions."""

import json
import re
from collections import defaultdict

import pytest

from grailcore.data.schema import OPINION_DIRECTIONS, opinion_direction
from grailcore.data.synth import (
    StudyParams, generate_study, main, split_by_viewer, summarize, write_study,
)


@pytest.fixture(scope="module")
def study():
    return generate_study("gun_control", 4000, seed=0)


def test_same_seed_same_study_other_seed_differs():
    a, b = generate_study("minimum_wage", 300, seed=5), generate_study("minimum_wage", 300, seed=5)
    assert a == b
    assert a != generate_study("minimum_wage", 300, seed=6)
    assert len(a) == 300


def test_cli_writes_identical_files_for_the_same_seed(tmp_path, capsys):
    for name in ("a", "b"):
        main(["--issue", "gun_control", "--n", "300", "--out", str(tmp_path / name), "--seed", "2"])
    out = capsys.readouterr().out
    assert "bayes-optimal accuracy" in out
    for file in ("train.jsonl", "validation.jsonl", "test.jsonl", "study.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    lines = sum(len((tmp_path / "a" / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "validation", "test"))
    assert lines == 300


def test_study_json_reports_parameters_counts_and_bayes_accuracy(tmp_path):
    study = write_study(str(tmp_path), "minimum_wage", 400, seed=1)
    assert json.loads((tmp_path / "study.json").read_text()) == json.loads(json.dumps(study))
    assert sum(s["decisions"] for s in study["splits"].values()) == 400
    assert study["params"]["choice"]["affinity"] == StudyParams().choice.affinity
    for split in study["splits"].values():
        assert split["uniform_accuracy"] < split["bayes_optimal_accuracy"] < 1


def test_split_by_viewer_shares_no_viewer_and_keeps_every_row(study):
    splits = split_by_viewer(study, seed=0)
    viewers = {name: {d.viewer.viewer_id for d in rows} for name, rows in splits.items()}
    assert not viewers["train"] & viewers["validation"]
    assert not viewers["train"] & viewers["test"]
    assert not viewers["validation"] & viewers["test"]
    assert sorted(d.row_id for rows in splits.values() for d in rows) == sorted(d.row_id for d in study)
    n_viewers = len({d.viewer.viewer_id for d in study})
    assert abs(len(viewers["train"]) / n_viewers - 0.8) < 0.01
    assert split_by_viewer(study, seed=0) == splits
    assert split_by_viewer(study, seed=1)["test"] != splits["test"]


def test_bayes_optimal_accuracy_is_clearly_above_uniform_and_below_one(study):
    summary = summarize(study)
    four = summary["bayes_optimal_accuracy_by_n_options"][4]
    assert 0.42 <= four <= 0.62, four
    assert summary["bayes_optimal_accuracy"] > summary["uniform_accuracy"] + 0.15


def test_choices_are_drawn_from_the_stored_probabilities(study):
    # If gold ~ true_choice_probs then E[p(gold)] = E[sum_k p_k^2] and the argmax hits as often as E[max p].
    n = len(study)
    mean_p_gold = sum(d.true_choice_probs[d.gold_index - 1] for d in study) / n
    mean_sq = sum(sum(p * p for p in d.true_choice_probs) for d in study) / n
    hits = sum(max(range(d.n_options), key=lambda k: d.true_choice_probs[k]) == d.gold_index - 1 for d in study) / n
    assert abs(mean_p_gold - mean_sq) < 0.02
    assert abs(hits - summarize(study)["bayes_optimal_accuracy"]) < 0.03


def test_viewers_prefer_videos_on_their_side(study):
    # The affinity term: a pro-regulation viewer picks pro-regulation videos more often than an opponent.
    def pro_share(rows):
        return sum(d.slate[d.gold_index - 1].stance > 0 for d in rows) / len(rows)
    balanced = [d for d in study if d.slate_design == "balanced"]
    supporters = [d for d in balanced if d.opinion_before > 0.7]
    opponents = [d for d in balanced if d.opinion_before < 0.3]
    assert pro_share(supporters) > pro_share(opponents) + 0.25


def test_opinion_model_mostly_no_change_and_consistent(study):
    tolerance = StudyParams().opinion.tolerance
    for d in study:
        assert d.opinion_direction == opinion_direction(d.opinion_before, d.opinion_after, tolerance)
        assert 0 <= d.opinion_after <= 1
        assert abs(sum(d.true_opinion_probs) - 1) < 1e-9 and len(d.true_opinion_probs) == len(OPINION_DIRECTIONS)
    no_change = sum(d.opinion_direction == "no_change" for d in study) / len(study)
    assert 0.65 < no_change < 0.95

    def increase_rate(rows):
        return sum(d.opinion_direction == "increase" for d in rows) / len(rows)
    after_pro = [d for d in study if d.slate[d.gold_index - 1].stance > 0.5]
    after_anti = [d for d in study if d.slate[d.gold_index - 1].stance < -0.5]
    assert increase_rate(after_pro) > increase_rate(after_anti) + 0.05


def test_sessions_grow_history_and_carry_state(study):
    sessions = defaultdict(list)
    for d in study:
        sessions[d.session_id].append(d)
    assert sum(len(s) > 1 for s in sessions.values()) > 0.8 * len(sessions)
    for steps in sessions.values():
        assert [d.step for d in steps] == list(range(len(steps)))
        for prev, nxt in zip(steps, steps[1:]):
            assert nxt.history[:-1] == prev.history and nxt.history[-1].video == prev.current
            assert nxt.current == prev.slate[prev.gold_index - 1]
            assert nxt.opinion_before == prev.opinion_after
            assert nxt.survey == prev.survey and nxt.viewer == prev.viewer
        for d in steps:
            seen = {d.current.video_id} | {h.video.video_id for h in d.history}
            assert not seen & {v.video_id for v in d.slate}, "a slate offered an already-watched video"
            assert all(0 <= h.watched_s <= h.video.duration_s for h in d.history)


def test_slate_designs_and_sizes(study):
    assert {d.n_options for d in study} == {3, 4, 5}
    assert {d.slate_design for d in study} == {"balanced", "slanted", "rabbit_hole"}
    for d in study:
        sides = sorted((v.stance > 0.15) - (v.stance < -0.15) for v in d.slate)
        if d.slate_design == "balanced":
            assert sides.count(1) == sides.count(-1) == d.n_options // 2
        else:  # n-1 on one side, 1 on the other
            assert sorted([sides.count(1), sides.count(-1)]) == [1, d.n_options - 1]


def test_titles_look_like_real_titles(study):
    titles = {v.title for d in study for v in d.slate}
    assert len(titles) > 200
    assert not any(re.fullmatch(r"(Video|Option) \d+", t) for t in titles)
    issue_words = r"Gun|Second Amendment|Armed|Background Checks|Weapons|Red Flag|Handgun|Magazine|Waiting|Licensing"
    assert sum(bool(re.search(issue_words, t)) for t in titles) > 0.9 * len(titles)
    for d in study[:500]:
        assert len({v.title for v in d.slate}) == d.n_options


def test_unknown_issue_is_rejected():
    with pytest.raises(ValueError, match="unknown issue 'abortion'"):
        generate_study("abortion", 10)


def test_too_small_catalog_is_rejected_with_a_fix():
    with pytest.raises(ValueError, match="raise n_videos"):
        generate_study("gun_control", 10, params=StudyParams(n_videos=20))
