"""Viewer rewards on hand-made rows."""

import pytest

from grailcore.data.schema import Example
from grailcore.rewards.viewer import (
    format_reward,
    opinion_accuracy,
    option_accuracy,
    slate_accuracy,
    tag_count,
)


def viewer_example(gold_index=2, n_options=4, opinion_direction="decrease"):
    return Example(example_id="v1", task="viewer", messages=({"role": "user", "content": "Which next?"},),
                   gold_index=gold_index, n_options=n_options, opinion_direction=opinion_direction)


def completion(answer="2", opinion="decrease", tail=""):
    return f"<think>reasons</think>\n<answer>{answer}</answer>\n<opinion>{opinion}</opinion>{tail}"


@pytest.mark.parametrize("answer, opinion, slate, option, opinion_score", [
    ("2", "decrease", 1.0, 1.0, 1.0),
    ("2", "increase", 0.5, 1.0, 0.0),
    ("3", "decrease", 0.5, 0.0, 1.0),
    ("3", "no_change", 0.0, 0.0, 0.0),
    ("Option 2", "decrease", 0.5, 0.0, 1.0),  # unparsed answer earns nothing
    ("5", "Decrease", 0.5, 0.0, 1.0),  # out of range
])
def test_accuracy_rewards(answer, opinion, slate, option, opinion_score):
    ex, text = viewer_example(), completion(answer, opinion)
    assert slate_accuracy(ex, text) == slate
    assert option_accuracy(ex, text) == option
    assert opinion_accuracy(ex, text) == opinion_score


def test_slate_accuracy_without_gold_opinion_scores_the_option_on_0_to_1():
    ex = viewer_example(opinion_direction=None)
    assert slate_accuracy(ex, completion("2", "increase")) == 1.0
    assert slate_accuracy(ex, "<think>x</think><answer>2</answer>") == 1.0
    assert slate_accuracy(ex, completion("1")) == 0.0
    assert opinion_accuracy(ex, completion("2", "increase")) == 0.0


def test_format_reward():
    ex = viewer_example()
    assert format_reward(ex, completion()) == 1.0
    assert format_reward(ex, completion(answer="9")) == 0.0  # layout needs a valid k
    assert format_reward(ex, completion(tail=" Hope this helps")) == 0.0
    assert format_reward(ex, "<think>x</think><answer>2</answer>") == 0.0


def test_tag_count_gives_one_sixth_per_unique_tag():
    ex = viewer_example()
    assert tag_count(ex, completion()) == 1.0
    assert tag_count(ex, "<think>x</think><answer>2</answer>") == pytest.approx(4 / 6)
    assert tag_count(ex, "<think>x</think><answer>2</answer><answer>2</answer>") == pytest.approx(2 / 6)
    assert tag_count(ex, "<answer>2") == pytest.approx(1 / 6)
    assert tag_count(ex, "2") == 0.0


def test_viewer_reward_on_a_row_without_gold_index_raises():
    ex = viewer_example().replace(gold_index=None)
    with pytest.raises(ValueError, match="gold_index"):
        option_accuracy(ex, completion())


def test_format_and_tag_count_follow_a_direct_layout_row():
    ex = viewer_example().replace(meta={"layout": "direct"})
    assert format_reward(ex, "<answer>2</answer><opinion>decrease</opinion>") == 1.0
    assert format_reward(ex, completion()) == 0.0
    assert tag_count(ex, "<answer>2</answer><opinion>decrease</opinion>") == 1.0
    assert tag_count(ex, "<answer>2</answer>") == pytest.approx(2 / 4)
    assert slate_accuracy(ex, "<answer>2</answer><opinion>decrease</opinion>") == 1.0
