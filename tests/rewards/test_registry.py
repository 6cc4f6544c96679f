"""Registry look-ups and `score_completions`: weighted totals, task routing, failures."""

import logging

import pytest
import torch

from grailcore.config import RewardsConfig
from grailcore.data.schema import Example
from grailcore.rewards import registry
from grailcore.rewards.registry import available_rewards, get_reward, register, score_completions

VIEWER = Example(example_id="v1", task="viewer", messages=({"role": "user", "content": "q"},),
                 gold_index=2, n_options=3, opinion_direction="increase")
MATH = Example(example_id="m1", task="math", messages=({"role": "user", "content": "1+1?"},), answer="2")
RIGHT = "<think>x</think><answer>2</answer><opinion>increase</opinion>"
HALF = "<think>x</think><answer>2</answer><opinion>decrease</opinion>"
WRONG = "<answer>3</answer> trailing"


@pytest.fixture
def temporary_rewards():
    """Register rewards for one test and remove them (and their warned state) after."""
    added = []

    def add(name, fn, task=None):
        register(name, task)(fn)
        added.append(name)

    yield add
    for name in added:
        registry._REGISTRY.pop(name)
        registry._warned.discard(name)


def test_unknown_reward_lists_the_available_ones():
    with pytest.raises(KeyError, match="slate_accuracy"):
        get_reward("no_such_reward")


def test_both_tasks_are_registered_without_collisions():
    names = set(available_rewards())
    assert {"slate_accuracy", "option_accuracy", "opinion_accuracy", "format", "tag_count"} <= names
    assert {"math_accuracy", "math_format", "math_tag_count", "reasoning_steps", "length",
            "mathematical_rigor"} <= names
    assert registry.reward_task("format") == "viewer" and registry.reward_task("math_format") == "math"


def test_registering_a_name_twice_or_an_unknown_task_fails():
    with pytest.raises(ValueError, match="already registered"):
        register("format")(lambda example, completion: 0.0)
    with pytest.raises(ValueError, match="task"):
        register("test_bad_task", task="chess")
    assert "test_bad_task" not in available_rewards()


def test_weighted_total_and_dtypes():
    cfg = RewardsConfig(names=("slate_accuracy", "format"), weights=(1.0, 0.5))
    out = score_completions([VIEWER] * 3, [RIGHT, HALF, WRONG], cfg)
    assert out.per_reward["slate_accuracy"].tolist() == [1.0, 0.5, 0.0]
    assert out.per_reward["format"].tolist() == [1.0, 1.0, 0.0]
    assert out.total.tolist() == [1.5, 1.0, 0.0]
    assert out.total.dtype == torch.float32 and out.total.shape == (3,)
    assert all(t.dtype == torch.float32 for t in out.per_reward.values())
    assert out.errors == {"slate_accuracy": 0, "format": 0}


def test_a_reward_scores_zero_on_examples_of_another_task():
    cfg = RewardsConfig(names=("option_accuracy", "math_format"), weights=(1.0, 1.0))
    out = score_completions([VIEWER, MATH], [RIGHT, "<think>x</think><answer>2</answer>"], cfg)
    assert out.per_reward["option_accuracy"].tolist() == [1.0, 0.0]
    assert out.per_reward["math_format"].tolist() == [0.0, 1.0]
    assert out.errors == {"option_accuracy": 0, "math_format": 0}


def test_config_settings_are_bound_by_parameter_name(temporary_rewards):
    def target(example, completion, *, length_target=0):
        return float(length_target)

    temporary_rewards("test_echo_target", target)
    out = score_completions([VIEWER], ["x"], RewardsConfig(names=("test_echo_target",), weights=(1.0,),
                                                            length_target=37))
    assert out.per_reward["test_echo_target"].tolist() == [37.0]


def _raise_on_wrong(example, completion):
    if "3" in completion:
        raise RuntimeError("boom")
    return 1.0


def test_raising_reward_scores_zero_is_counted_and_logged_once(temporary_rewards, caplog):
    temporary_rewards("test_raising", _raise_on_wrong)
    cfg = RewardsConfig(names=("test_raising", "option_accuracy"), weights=(1.0, 2.0))
    long_wrong = WRONG + "x" * 5000
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        first = score_completions([VIEWER] * 3, [RIGHT, long_wrong, long_wrong], cfg)
        second = score_completions([VIEWER] * 2, [long_wrong, RIGHT], cfg)
    assert first.per_reward["test_raising"].tolist() == [1.0, 0.0, 0.0]
    assert first.errors == {"test_raising": 2, "option_accuracy": 0}
    assert first.total.tolist() == [3.0, 0.0, 0.0]
    assert second.errors["test_raising"] == 1
    warnings = [r for r in caplog.records if "test_raising" in r.getMessage()]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "boom" in message and "<answer>3</answer>" in message and len(message) < 1000


def test_non_finite_reward_counts_as_an_error(temporary_rewards):
    temporary_rewards("test_nan", lambda example, completion: float("nan"))
    out = score_completions([VIEWER], [RIGHT], RewardsConfig(names=("test_nan",), weights=(1.0,)))
    assert out.errors == {"test_nan": 1}
    assert out.total.tolist() == [0.0]


def test_misaligned_or_duplicate_inputs_are_rejected():
    cfg = RewardsConfig(names=("format",), weights=(1.0,))
    with pytest.raises(ValueError, match="group_size"):
        score_completions([VIEWER], [RIGHT, RIGHT], cfg)
    with pytest.raises(ValueError, match="twice"):
        score_completions([VIEWER], [RIGHT], RewardsConfig(names=("format", "format"), weights=(1.0, 1.0)))
    with pytest.raises(KeyError, match="unknown reward"):
        score_completions([VIEWER], [RIGHT], RewardsConfig(names=("nope",), weights=(1.0,)))
