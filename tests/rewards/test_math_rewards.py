"""Math rewards: math-verify equivalences, the hard timeout, and the shape rewards."""

import functools
import math
import time

import pytest

from grailcore.config import Config, ConfigError, RewardsConfig
from grailcore.data.schema import Example
from grailcore.rewards import registry
from grailcore.rewards.math_rewards import (
    DEFAULT_MATH_REWARDS,
    VerifyTimeout,
    VerifyWorker,
    answers_equivalent,
    length,
    math_accuracy,
    math_format,
    math_tag_count,
    mathematical_rigor,
    reasoning_steps,
)
from grailcore.rewards.registry import score_completions
from grailcore.validation import validate


def math_example(answer="\\frac{1}{2}"):
    return Example(example_id="m1", task="math", messages=({"role": "user", "content": "Solve."},), answer=answer)


def answered(answer):
    return f"<think>work</think><answer>{answer}</answer>"


def sleepy_check(gold, predicted):
    """Stands in for a pathological expression: never finishes in time."""
    time.sleep(60)
    return True


def failing_check(gold, predicted):
    raise ValueError("cannot compare")


@pytest.fixture(scope="module")
def worker():
    worker = VerifyWorker()
    yield worker
    worker.close()


@pytest.mark.parametrize("gold, predicted", [
    ("\\frac{1}{2}", "0.5"), ("0.5", "$\\frac{1}{2}$"), ("2", "x=2"), ("2", "x = 2"),
    ("-\\frac{5}{2}", "-2.5"), ("x^2+1", "1+x^2"), ("\\sqrt{2}", "\\sqrt{2}"), ("7", "\\boxed{7}"),
    ("12", "12.0"),
])
def test_equivalent_answers(gold, predicted):
    assert answers_equivalent(gold, predicted)


@pytest.mark.parametrize("gold, predicted", [("2", "3"), ("\\frac{1}{2}", "0.25"), ("3", "-3"), ("2", "y = 2x")])
def test_different_answers(gold, predicted):
    assert not answers_equivalent(gold, predicted)


def test_unparseable_gold_raises():
    with pytest.raises(ValueError, match="gold answer"):
        answers_equivalent("", "2")


def test_math_accuracy_through_the_worker(worker):
    ex = math_example()
    assert math_accuracy(ex, answered("0.5"), worker=worker) == 1.0
    assert math_accuracy(ex, answered("\\frac{2}{4}"), worker=worker) == 1.0
    assert math_accuracy(ex, answered("0.6"), worker=worker) == 0.0
    # No answer tag: 0 without asking math-verify (a sleepy check would time out).
    assert math_accuracy(ex, "the answer is 0.5", check=sleepy_check, worker=worker,
                         math_verify_timeout_s=0.1) == 0.0


def test_timeout_kills_the_call_and_the_worker_recovers(worker):
    ex = math_example()
    assert math_accuracy(ex, answered("0.5"), worker=worker) == 1.0  # warm: start-up not timed
    start = time.monotonic()
    with pytest.raises(VerifyTimeout):
        math_accuracy(ex, answered("0.5"), check=sleepy_check, worker=worker, math_verify_timeout_s=0.5)
    assert 0.5 <= time.monotonic() - start < 5
    assert math_accuracy(ex, answered("0.5"), worker=worker) == 1.0  # a fresh worker answers


def test_worker_side_exception_is_raised_in_the_caller(worker):
    with pytest.raises(RuntimeError, match="cannot compare"):
        math_accuracy(math_example(), answered("0.5"), check=failing_check, worker=worker)
    assert math_accuracy(math_example(), answered("0.5"), worker=worker) == 1.0


def test_timeouts_in_score_completions_score_zero_and_are_counted():
    slow = functools.partial(math_accuracy, check=sleepy_check)
    registry.register("test_slow_math", task="math")(slow)
    try:
        cfg = RewardsConfig(names=("test_slow_math", "math_format"), weights=(4.0, 1.0), math_verify_timeout_s=0.3)
        start = time.monotonic()
        out = score_completions([math_example()] * 2, [answered("0.5"), answered("1")], cfg)
        assert time.monotonic() - start < 30  # two timeouts and worker restarts, no hang
    finally:
        registry._REGISTRY.pop("test_slow_math")
        registry._warned.discard("test_slow_math")
    assert out.errors == {"test_slow_math": 2, "math_format": 0}
    assert out.per_reward["test_slow_math"].tolist() == [0.0, 0.0]
    assert out.total.tolist() == [1.0, 1.0]


def test_math_accuracy_needs_a_gold_answer():
    with pytest.raises(ValueError, match="gold 'answer'"):
        math_accuracy(math_example(answer=None), answered("1"))


def test_format_and_tag_count():
    ex = math_example()
    assert math_format(ex, "<think>\nwork\n</think>\n<answer>2</answer>") == 1.0
    assert math_format(ex, "<think>work</think>2") == 0.0
    assert math_tag_count(ex, "<think>work</think><answer>2</answer>") == 1.0
    assert math_tag_count(ex, "<think>work</think>") == 0.5
    assert math_tag_count(ex, "<think><think>work</think><answer>2</answer>") == 0.75


def test_reasoning_steps():
    ex = math_example()
    assert reasoning_steps(ex, "Step 1: add.\nStep 2: divide.\nFinally, simplify.") == 1.0
    assert reasoning_steps(ex, "1. add\n2. divide\n3. simplify") == 1.0
    assert reasoning_steps(ex, "First, add. Then divide.") == pytest.approx(2 / 3)
    assert reasoning_steps(ex, "首先相加，然后相除") == pytest.approx(2 / 3)
    assert reasoning_steps(ex, "It is 4.") == 0.0


def test_length_is_a_gaussian_around_the_target():
    ex = math_example()
    assert length(ex, "w " * 10, length_target=10) == pytest.approx(1.0)
    assert length(ex, "w " * 5, length_target=10) == pytest.approx(math.exp(-0.5))
    assert length(ex, "w " * 15, length_target=10) == pytest.approx(math.exp(-0.5))
    assert length(ex, "", length_target=10) == pytest.approx(math.exp(-2))
    with pytest.raises(ValueError, match="length_target"):
        length(ex, "w", length_target=0)


def test_length_target_comes_from_the_config():
    cfg = RewardsConfig(names=("length",), weights=(1.0,), length_target=4)
    out = score_completions([math_example()], ["one two three four"], cfg)
    assert out.per_reward["length"].tolist() == [1.0]


def test_mathematical_rigor():
    ex = math_example()
    rigorous = ("Since $2x = 1$, we have $x = \\frac{1}{2}$ because division by 2 is allowed. "
                "Check: 2 * 0.5 = 1, and \\cdot 3 + 4 holds.")
    assert mathematical_rigor(ex, rigorous) == 1.0
    assert mathematical_rigor(ex, "I think it is one half.") == 0.0
    assert mathematical_rigor(ex, "x = 1") == pytest.approx(0.125)  # one of two equations


def test_default_math_rewards_follow_the_r1_recipe():
    names, weights = DEFAULT_MATH_REWARDS
    assert dict(zip(names, weights)) == {"math_accuracy": 4.0, "math_format": 1.0, "reasoning_steps": 2.0,
                                         "math_tag_count": 1.0, "length": 0.8, "mathematical_rigor": 1.5}
    validate(Config(rewards=RewardsConfig(names=names, weights=weights)))
    with pytest.raises(ConfigError, match="accuracy"):
        validate(Config(rewards=RewardsConfig(names=("accuracy",), weights=(1.0,))))
