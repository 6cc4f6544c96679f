"""generate_completions through a fake engine: order, greedy for k = 1, sampling for k > 1
(texts only: the answer-slot reads need a real tokenizer, tests/evaluation/test_answer_slot.py)."""

import pytest

from grailcore.evaluation.generate import eval_sampling_params, generate_completions, generate_raw
from grailcore.types import Completion

from .helpers import example


class FakeTokenizer:
    chat_template = "fake"

    def apply_chat_template(self, messages, **kwargs):
        return [int(messages[-1]["content"].split()[-1])]  # 'prompt 7' -> [7]


class FakeEngine:
    def __init__(self, short: bool = False):
        self.calls, self.short = [], short

    def generate(self, prompt_token_ids, params):
        self.calls.append((prompt_token_ids, params))
        n = params.n - 1 if self.short else params.n
        return [[Completion(f"p{ids[0]}s{j}", (1,), None, "stop") for j in range(n)] for ids in prompt_token_ids]


EXAMPLES = [example(i, 1, 2) for i in range(5)]


def test_greedy_for_one_sample_and_order_kept_across_chunks():
    engine = FakeEngine()
    raw, slots = generate_raw(engine, FakeTokenizer(), EXAMPLES, eval_sampling_params(1, 0.7, 16), exact=False,
                              chunk_size=2)
    assert slots is None
    assert [[c.text for c in row] for row in raw] == [[f"p{i}s0"] for i in range(5)]
    assert [len(ids) for ids, _ in engine.calls] == [2, 2, 1]
    params = engine.calls[0][1]
    assert params.greedy and params.n == 1 and params.max_tokens == 16


def test_k_samples_at_the_given_temperature():
    engine = FakeEngine()
    drawn = generate_completions(engine, FakeTokenizer(), EXAMPLES[:2], samples_per_row=3, temperature=0.7,
                                 max_tokens=8, top_p=0.9, exact=False)
    assert drawn.examples == EXAMPLES[:2] and drawn.slots is None
    assert drawn.texts == [["p0s0", "p0s1", "p0s2"], ["p1s0", "p1s1", "p1s2"]]
    params = engine.calls[0][1]
    assert not params.greedy and (params.n, params.temperature, params.top_p) == (3, 0.7, 0.9)


def test_bad_settings_and_short_engine_answers_fail():
    with pytest.raises(ValueError, match="temperature > 0"):
        eval_sampling_params(4, 0.0, 8)
    with pytest.raises(ValueError, match=">= 1"):
        eval_sampling_params(0, 1.0, 8)
    with pytest.raises(RuntimeError, match="completions for"):
        generate_completions(FakeEngine(short=True), FakeTokenizer(), EXAMPLES[:1], 2, 1.0, 8, exact=False)
