"""RewardStack (grailcore/rewards/stack.py): one weight table for rule and learned rewards,
table-order totals, rule rewards only with learned=False, and learned state in and out."""

from __future__ import annotations

import pytest
import torch

from grailcore.config import RewardsConfig
from grailcore.data.schema import Example
from grailcore.rewards import RewardStack, learned_rewards, score_completions

VIEWER = Example(example_id="v1", task="viewer", messages=({"role": "user", "content": "q"},),
                 gold_index=2, n_options=3, opinion_direction="increase")
RIGHT = "<think>x</think><answer>2</answer><opinion>increase</opinion>"
WRONG = "<answer>3</answer> trailing"


class CountingReward:
    """A learned reward that pays its update count: enough to check what the stack does with one."""

    def __init__(self) -> None:
        self.updates, self.scored = 0, 0

    def score(self, examples, completions):
        self.scored += len(completions)
        return torch.full((len(completions),), float(self.updates))

    def update(self, examples, completions, rewards):
        assert "gail" in rewards.per_reward  # it learns from the rewards it was scored with
        self.updates += 1

    def metrics(self):
        return {"gail/updates": float(self.updates)}

    def state_dict(self):
        return {"updates": self.updates}

    def load_state_dict(self, state):
        self.updates = state["updates"]


def _stack(reward: CountingReward) -> RewardStack:
    return RewardStack(RewardsConfig(names=("slate_accuracy", "gail", "format"), weights=(1.0, 2.0, 0.5)),
                       {"gail": reward})


def test_the_discriminator_is_registered_as_a_learned_reward():
    assert "gail" in learned_rewards()


def test_total_is_the_weighted_sum_of_every_reward_in_the_table():
    reward = CountingReward()
    stack = _stack(reward)
    before = stack([VIEWER] * 2, [RIGHT, WRONG])
    stack.update([VIEWER] * 2, [RIGHT, WRONG], before)
    after = stack([VIEWER] * 2, [RIGHT, WRONG])
    assert list(after.per_reward) == ["slate_accuracy", "gail", "format"]  # table order
    assert after.per_reward["gail"].tolist() == [1.0, 1.0] and after.errors["gail"] == 0
    assert after.total.tolist() == [1.0 + 2.0 + 0.5, 0.0 + 2.0 + 0.0]
    assert stack.metrics() == {"gail/updates": 1.0}


def test_without_learned_rewards_it_matches_score_completions_and_never_runs_them():
    reward = CountingReward()
    rules = _stack(reward)([VIEWER] * 2, [RIGHT, WRONG], learned=False)
    expected = score_completions([VIEWER] * 2, [RIGHT, WRONG],
                                 RewardsConfig(names=("slate_accuracy", "format"), weights=(1.0, 0.5)))
    assert reward.scored == 0 and set(rules.per_reward) == {"slate_accuracy", "format"}
    assert torch.equal(rules.total, expected.total)


def test_a_stack_built_without_learned_rewards_refuses_to_score_them():
    stack = RewardStack(RewardsConfig(names=("format", "gail"), weights=(1.0, 1.0)), {})
    assert stack([VIEWER], [RIGHT], learned=False).total.tolist() == [1.0]
    with pytest.raises(RuntimeError, match="'gail' was not built"):
        stack([VIEWER], [RIGHT])


def test_learned_state_round_trips_and_a_missing_one_is_an_error():
    reward = CountingReward()
    stack = _stack(reward)
    stack.update([VIEWER], [RIGHT], stack([VIEWER], [RIGHT]))
    restored = CountingReward()
    _stack(restored).load_state_dict(stack.state_dict())
    assert stack.state_dict() == {"gail": {"updates": 1}} and restored.updates == 1
    with pytest.raises(ValueError, match=r"no state of learned reward\(s\) \['gail'\].*rewards.names"):
        _stack(CountingReward()).load_state_dict({})
