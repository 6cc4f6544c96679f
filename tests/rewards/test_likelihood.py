"""The slot rewards (grailcore/rewards/likelihood.py): `choice_likelihood` is a proper scoring
rule where the 0/1 accuracy is not, it pays the policy's own probability of the person's
option read by a real engine on a real model, dodging pays the floor, and the settings that
would make it meaningless are refused."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from grailcore.config import Config, ConfigError, DataConfig, RewardsConfig
from grailcore.data.loaders import load_examples
from grailcore.data.prompt import encode_prompt
from grailcore.data.schema import OPINION_DIRECTIONS, Example
from grailcore.evaluation.answer_slot import SampleSlots, SlotVocabulary
from grailcore.model import load_policy, load_tokenizer, resolve_model_path
from grailcore.rewards import RewardStack, available_rewards, get_reward, score_completions, slot_rewards
from grailcore.rewards.likelihood import SlotReader
from grailcore.rollout.collect import collect_rollouts
from grailcore.rollout.hf import HFEngine
from grailcore.types import SamplingParams
from grailcore.validation import validate

FLOOR = RewardsConfig().likelihood_floor
TRUTH = (0.6, 0.1, 0.1, 0.1, 0.1)
COMMITTED = "<think>t</think><answer>{k}</answer><opinion>increase</opinion>"


def _example(gold: int, n: int = 5, opinion: str | None = "increase") -> Example:
    return Example(example_id=f"e{gold}", task="viewer", messages=({"role": "user", "content": "q"},),
                   gold_index=gold, n_options=n, opinion_direction=opinion)


class FixedReader:
    """Reads the same slot distributions for every completion (what a policy with that
    answer distribution after its reasoning would give)."""

    def __init__(self, choice, opinion=(1 / 3, 1 / 3, 1 / 3)) -> None:
        self.slots = SampleSlots(tuple(choice), tuple(opinion), "sampled", "sampled")

    def __call__(self, examples, tokens, sampled=None):
        assert len(examples) == len(tokens)
        return [self.slots] * len(examples)


def _stack(names=("choice_likelihood",), reader=None, **settings) -> RewardStack:
    stack = RewardStack(RewardsConfig(names=names, weights=(1.0,) * len(names), **settings), {})
    if reader is not None:
        stack.attach_reader(reader)
    return stack


def _expected(reward_of_gold, truth=TRUTH) -> float:
    """E over the person's choice g ~ truth of the reward paid when the person chose g."""
    return sum(p * reward_of_gold(g) for g, p in enumerate(truth, start=1))


def test_the_slot_rewards_are_registered_and_refuse_rule_scoring():
    assert {"choice_likelihood", "opinion_likelihood"} <= set(available_rewards()) & set(slot_rewards())
    with pytest.raises(KeyError, match="reads the policy's answer slot"):
        get_reward("choice_likelihood")
    with pytest.raises(KeyError, match="RewardStack with a reader"):
        score_completions([_example(1)], [COMMITTED.format(k=1)], RewardsConfig(names=("choice_likelihood",),
                                                                                 weights=(1.0,)))


@pytest.mark.parametrize("name", ["choice_likelihood", "option_accuracy"])
def test_proper_choice_reward_is_best_for_the_true_distribution_where_accuracy_pays_the_mode(name):
    """The expected reward of a policy whose answer distribution after its reasoning is q,
    when people choose by TRUTH. choice_likelihood (log q(person's option)) is largest at
    q = TRUTH, above the always-the-mode policy and a sharpened one; option_accuracy, paid on
    an answer sampled from q, is largest for the mode (why the 0/1 reward moved the demo's
    distribution away from people's). A linear reward (q(person's option)) would fail the
    first half: it is maximised by the mode too."""
    mode = (1.0, 0.0, 0.0, 0.0, 0.0)
    sharp = tuple(np.array(TRUTH) ** 3 / (np.array(TRUTH) ** 3).sum())
    flat = (0.2,) * 5
    candidates = {"truth": TRUTH, "mode": mode, "sharp": sharp, "flat": flat}
    value = {}
    for label, q in candidates.items():
        if name == "choice_likelihood":
            stack = _stack(reader=FixedReader(q))

            def paid(g, stack=stack):
                return float(stack([_example(g)], [COMMITTED.format(k=1)], tokens=[((1,), (2,))]).total[0])
        else:  # the answer is drawn from q; the 0/1 reward pays when it is the person's
            def paid(g, q=q):
                return sum(qk * float(score_completions([_example(g)], [COMMITTED.format(k=k)], RewardsConfig(
                    names=("option_accuracy",), weights=(1.0,))).total[0]) for k, qk in enumerate(q, start=1))
        value[label] = _expected(paid)
    if name == "choice_likelihood":
        assert value["truth"] == pytest.approx(sum(p * math.log(p) for p in TRUTH))  # minus the entropy
        assert value["truth"] > max(value["sharp"], value["flat"], value["mode"])
        assert value["mode"] == pytest.approx(0.6 * 0.0 + 0.4 * FLOOR)  # log 1 for the mode, the floor else
    else:
        assert value["mode"] > value["sharp"] > value["truth"]


def test_the_reward_is_the_log_probability_of_the_persons_option_clipped_at_the_floor():
    stack = _stack(("choice_likelihood", "opinion_likelihood"), FixedReader((0.5, 0.2, 0.0, 0.3), (0.7, 0.2, 0.1)),
                   likelihood_floor=-4.0)
    examples = [_example(1, 4, "increase"), _example(2, 4, "decrease"), _example(3, 4, None)]
    out = stack(examples, [COMMITTED.format(k=4)] * 3, tokens=[((1,), (2,))] * 3)
    assert out.per_reward["choice_likelihood"].tolist() == pytest.approx([math.log(0.5), math.log(0.2), -4.0])
    assert out.per_reward["opinion_likelihood"].tolist() == pytest.approx([math.log(0.7), math.log(0.2), 0.0])
    assert stack(examples, [COMMITTED.format(k=4)] * 3, learned=False).per_reward == {}  # evaluation: rules only


def test_dodging_a_slot_reward_pays_the_floor_never_more_than_any_committed_answer():
    """Even where the reasoning made the person's option certain, a completion that does not
    commit to an answer in the layout gets the floor; a committed one never gets less."""
    generous = _stack(("choice_likelihood", "opinion_likelihood"), FixedReader((0.0, 1.0, 0.0), (1.0, 0.0, 0.0)))
    stingy = _stack(("choice_likelihood", "opinion_likelihood"), FixedReader((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)))
    ex = _example(2, 3, "increase")
    dodges = ["<think>t</think><opinion>increase</opinion>", "<think>t</think><answer>9</answer>",
              "<answer>2</answer><opinion>increase</opinion>", "Sure! <think>t</think><answer>2</answer>"]
    committed = [COMMITTED.format(k=k) for k in (1, 2, 3)]
    best_dodge = generous([ex] * len(dodges), dodges, tokens=[((1,), (2,))] * len(dodges)).total.max()
    worst_committed = stingy([ex] * 3, committed, tokens=[((1,), (2,))] * 3).total.min()
    assert best_dodge == pytest.approx(2 * FLOOR) and worst_committed >= best_dodge


def test_a_stack_without_reader_or_tokens_says_what_is_missing():
    with pytest.raises(RuntimeError, match="no reader is attached"):
        _stack()([_example(1)], [COMMITTED.format(k=1)], tokens=[((1,), (2,))])
    with pytest.raises(RuntimeError, match="pass tokens="):
        _stack(reader=FixedReader(TRUTH))([_example(1)], [COMMITTED.format(k=1)])


@pytest.mark.parametrize(("change", "match"), [
    (dict(data=DataConfig(layout="direct")), "the reward is the same for the whole group"),
    (dict(data=DataConfig(task="math", train_path="synthetic:math")), "score viewer choices"),
    (dict(rewards=RewardsConfig(names=("choice_likelihood",), weights=(1.0,), likelihood_floor=0.0)),
     "likelihood_floor must be < 0"),
])
def test_settings_that_make_the_slot_rewards_meaningless_are_refused(change, match):
    cfg = dataclasses.replace(Config(rewards=RewardsConfig(names=("choice_likelihood", "format"), weights=(1.0, 0.5))),
                              **change)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def _plain_logprobs(model, ids, temperature, every_step: bool = False) -> torch.Tensor:
    """log_softmax(logits / T) after `ids` ([V]), or after every prefix of it ([len, V])."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax((logits if every_step else logits[-1]) / temperature, dim=-1)


def test_a_real_engine_pays_the_log_probability_its_model_gives_the_persons_option():
    """collect_rollouts -> RewardStack -> SlotReader on a real HF engine (a tiny Llama, random
    weights) and its real tokenizer: the reward of a committed completion equals log p_T of the
    person's option at its answer slot, summed over the option's tokenizations by plain forwards."""
    path = resolve_model_path("micro-llama")
    tokenizer, model = load_tokenizer(path), load_policy(path, "float32").eval()
    example = load_examples("synthetic:gun_control", DataConfig(synthetic_n=60), split="train").examples[0]
    assert example.n_options <= 9  # one digit: the candidates are the digit, or a space and the digit
    prompt = encode_prompt(tokenizer, example)
    head = "<think>x</think><answer>"
    texts = [f"{head}{k}</answer><opinion>{OPINION_DIRECTIONS[k % 3]}</opinion>" for k in (1, 2)] + ["<think>no"]
    completions = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]

    class Replay:  # the engine's scoring pass, with the completions above as its "samples"
        def __init__(self, engine):
            self.engine = engine

        def generate(self, prompt_ids, params):
            from grailcore.types import Completion
            return [[Completion(text=t, token_ids=tuple(c), logprobs=None, finish_reason="stop")
                     for t, c in zip(texts, completions)] for _ in prompt_ids]

    temperature = 0.8
    engine = HFEngine(model, tokenizer)
    stack = _stack(("choice_likelihood",), SlotReader(engine.next_token_logprobs, tokenizer, temperature),
                   likelihood_floor=-50.0)
    out = collect_rollouts(Replay(engine), [example], [prompt], SamplingParams(n=3, temperature=temperature), stack)
    values = out.rewards.per_reward["choice_likelihood"].tolist()
    slot = prompt + tokenizer(head, add_special_tokens=False)["input_ids"]
    vocab = SlotVocabulary(tokenizer)
    gold = example.gold_index
    expected = 0.0
    for variant in vocab.choices(example.n_options)[gold - 1]:  # each tokenization of the gold number
        logp = sum(float(_plain_logprobs(model, slot + list(variant[:i]), temperature)[tok])
                   for i, tok in enumerate(variant))
        expected += math.exp(logp)
    assert values[0] == pytest.approx(math.log(expected), rel=1e-4)
    assert values[1] == pytest.approx(values[0], rel=1e-4)  # the same slot: the written answer does not change it
    assert values[2] == -50.0  # never answered: the floor, although a forced slot has a probability


def test_the_reader_skips_uncommitted_samples_and_looks_up_sampled_slots():
    """Given the sampled completions, the reader reads nothing for a completion without a
    committed answer (its reward is the floor anyway) and takes a slot on the sampled path
    from the log-probs sampling reported (`watch_ids`): the committed completions' slots
    are those of a full read, with fewer scoring requests."""
    from grailcore.rollout.next_token import trie_next_token_logprobs
    from grailcore.types import Completion

    path = resolve_model_path("micro-llama")
    tokenizer, model = load_tokenizer(path), load_policy(path, "float32").eval()
    example = load_examples("synthetic:gun_control", DataConfig(synthetic_n=60), split="train").examples[0]
    prompt = encode_prompt(tokenizer, example)
    texts = ["<think>x</think><answer>1</answer><opinion>increase</opinion>",
             "<think>y</think><answer>2</answer><opinion>no_change</opinion>", "<think>never answers"]
    temperature, scored = 0.8, []

    def score(sequences, token_ids, at):
        scored.extend(sequences)
        return trie_next_token_logprobs(model, sequences, token_ids, at)

    reader = SlotReader(score, tokenizer, temperature)
    watch = reader.watch_ids([example])
    sampled = []
    for text in texts:  # each as an engine watching `watch` reports it: one plain forward
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        steps = _plain_logprobs(model, prompt + ids, temperature, every_step=True)[len(prompt) - 1:-1]
        sampled.append(Completion(text=text, token_ids=tuple(ids), logprobs=None, finish_reason="stop",
                                  watched=tuple({t: float(row[t]) for t in watch} for row in steps)))
    tokens = [(prompt, c.token_ids) for c in sampled]
    full = reader([example] * 3, tokens)
    scored.clear()
    reader([example] * 2, tokens[:2])
    committed_requests, scored[:] = len(scored), []
    reader([example] * 2, tokens[:2], sampled[:2])
    assert len(scored) < committed_requests  # the sampled slots were looked up, not requested
    fast = reader([example] * 3, tokens, sampled)
    for mine, theirs in zip(fast[:2], full[:2]):
        assert (mine.choice_slot, mine.opinion_slot) == ("sampled", "sampled")
        np.testing.assert_allclose(mine.choice + mine.opinion, theirs.choice + theirs.opinion, atol=1e-5)
    assert (fast[2].choice_slot, sum(fast[2].choice)) == ("skipped", 0.0) and full[2].choice_slot == "forced"
    stack = _stack(("choice_likelihood", "opinion_likelihood"), reader)
    texts_of = [c.text for c in sampled]
    with_sampled = stack([example] * 3, texts_of, tokens=tokens, sampled=sampled)
    without = stack([example] * 3, texts_of, tokens=tokens)
    for name in ("choice_likelihood", "opinion_likelihood"):
        np.testing.assert_allclose(with_sampled.per_reward[name], without.per_reward[name], atol=1e-4)
