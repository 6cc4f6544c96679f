import inspect
import math
import textwrap
import types

import pytest
import torch

from grailcore.advantages import decoupled_advantages, group_advantages, informative_groups

# Two groups of 4: one informative, one with identical rewards.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
EPS = 1e-4


def test_group_scale_uses_unbiased_group_std():
    out = group_advantages(REWARDS, group_size=4, scale="group", eps=EPS)
    # group 0: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.57735 (biased would be 0.5)
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(out.advantages, expected, rtol=0, atol=1e-6)
    assert out.advantages.dtype == torch.float32 and out.advantages.shape == (8,)


def test_zero_variance_group_is_zero_and_counted():
    out = group_advantages(REWARDS, group_size=4, scale="group")
    assert out.zero_variance_groups == 1
    assert out.zero_variance_mask.tolist() == [False, True]
    assert torch.equal(out.advantages[4:], torch.zeros(4))


def test_batch_scale_uses_unbiased_std_of_all_raw_rewards():
    out = group_advantages(REWARDS, group_size=4, scale="batch", eps=EPS)
    # all 8 rewards: mean 1.25, sum of squared deviations 5.5 -> unbiased std sqrt(5.5 / 7)
    a = 0.5 / (math.sqrt(5.5 / 7) + EPS)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(out.advantages, expected, rtol=0, atol=1e-6)


def test_none_scale_only_centres():
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 5.0])
    out = group_advantages(rewards, group_size=4, scale="none")
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(out.advantages, expected, rtol=0, atol=1e-7)
    assert out.zero_variance_groups == 1


def test_identical_rewards_give_exact_zeros_despite_rounding():
    # In float32 the mean of three 0.9s is off by an ulp: the centred rewards are ~6e-8
    # and the std ~7e-8, so dividing would turn rounding noise into advantages of ~6e-4.
    rewards = torch.tensor([0.9, 0.9, 0.9, 1.0, 0.0, 1.0], dtype=torch.float64)
    out = group_advantages(rewards, group_size=3, scale="group")
    assert out.zero_variance_mask.tolist() == [True, False]
    assert out.zero_variance_groups == 1
    assert torch.equal(out.advantages[:3], torch.zeros(3))
    assert out.advantages.dtype == torch.float32


def test_informative_groups():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.25])
    assert informative_groups(rewards, group_size=2).tolist() == [True, False, False, True]


@pytest.mark.parametrize(
    "rewards, group_size, scale, match",
    [
        (torch.ones(6), 4, "group", "multiple of group_size"),
        (torch.ones(4), 1, "group", "group_size must be >= 2"),
        (torch.ones(2, 4), 4, "group", "1-D"),
        (torch.tensor([0.0, float("nan"), 1.0, 1.0]), 2, "group", "non-finite reward"),
        (torch.ones(4), 2, "global", "scale must be one of"),
    ],
)
def test_bad_input_is_rejected_with_a_reason(rewards, group_size, scale, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, group_size, scale)


# ---- GDPO: normalize_then_sum ----------------------------------------------------------------

# Two rewards (a layout reward with a wide spread, a choice reward with a narrow one) over
# three groups of 4; group 2 gives both rewards one value each (no signal).
PER_REWARD = torch.tensor([[1.0, 0.3], [0.0, -2.0], [1.0, -0.2], [1.0, 0.4],
                           [0.0, -2.0], [1.0, 0.1], [0.0, -2.0], [0.0, -2.0],
                           [1.0, 0.5], [1.0, 0.5], [1.0, 0.5], [1.0, 0.5]])
WEIGHTS = (0.5, 1.0)


def test_decoupled_advantages_normalise_each_reward_in_its_group_then_the_sum_over_the_step():
    out = decoupled_advantages(PER_REWARD, WEIGHTS, group_size=4, eps=EPS)
    columns = [group_advantages(PER_REWARD[:, r], 4, "group", EPS).advantages for r in range(2)]
    summed = 0.5 * columns[0] + columns[1]
    expected = (summed - summed.mean()) / (summed.std() + EPS)
    expected[8:] = 0.0
    torch.testing.assert_close(out.advantages, expected, rtol=0, atol=1e-6)
    assert out.zero_variance_groups == 1 and out.zero_variance_mask.tolist() == [False, False, True]
    assert torch.equal(out.advantages[8:], torch.zeros(4))


def test_decoupled_advantages_let_a_narrow_reward_rank_the_committed_answers():
    """One group: a layout reward (a dodge, completion 1, gets 0) and a choice reward with a
    narrow spread among the committed answers (the dodge paid the slate's worst option,
    gail.dodge="worst_option"). Summed first, the choice reward's ranking of completions 3
    and 0 is a tenth of the layout's gap between 0 and the dodge; normalised apart, about half."""
    per_reward = torch.tensor([[1.0, 0.30], [0.0, 0.25], [1.0, 0.25], [1.0, 0.35]])
    weights = (0.5, 1.0)
    summed_first = group_advantages(per_reward @ torch.tensor(weights), 4, "group").advantages
    decoupled = decoupled_advantages(per_reward, weights, 4).advantages
    for advantages, low, high in ((summed_first, 0.05, 0.15), (decoupled, 0.4, 0.6)):
        ratio = (advantages[3] - advantages[0]) / (advantages[0] - advantages[1])
        assert low < ratio < high, (advantages.tolist(), ratio)


def test_decoupled_advantages_refuse_a_matrix_that_does_not_match_the_weights():
    with pytest.raises(ValueError, match=r"\[P\*G, 3\]"):
        decoupled_advantages(PER_REWARD, (1.0, 1.0, 1.0), 4)
    with pytest.raises(ValueError, match="multiple of group_size"):
        decoupled_advantages(PER_REWARD[:6], WEIGHTS, 4)


def _trl_aggregation(name: str):
    """TRL's own `multi_objective_aggregation == name` block, cut from
    `GRPOTrainer._generate_and_score_completions` (the method also generates, so it cannot be
    called on fixed rewards) and run as it is."""
    trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    source = textwrap.dedent(inspect.getsource(trainer.GRPOTrainer._generate_and_score_completions))
    lines = source.splitlines()
    start = next((i for i, line in enumerate(lines) if f'multi_objective_aggregation == "{name}"' in line), None)
    if start is None:
        pytest.skip(f"this TRL has no {name} block")
    indent = len(lines[start + 1]) - len(lines[start + 1].lstrip())
    body = []
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        body.append(line)
    return compile(textwrap.dedent("\n".join(body)), f"trl_{name}", "exec"), trainer.nanstd


def _run_trl_aggregation(name: str, scale_rewards: str = "group") -> torch.Tensor:
    """TRL's advantages for PER_REWARD (3 groups of 4, two rewards) with WEIGHTS."""
    code, nanstd = _trl_aggregation(name)
    scope = {"torch": torch, "nanstd": nanstd, "rewards_per_func": PER_REWARD.clone(), "num_generations": 4,
             "device": "cpu", "unscorable_mask": torch.zeros(12, dtype=torch.bool),
             "self": types.SimpleNamespace(reward_funcs=[None, None], reward_weights=torch.tensor(WEIGHTS),
                                           scale_rewards=scale_rewards)}
    exec(code, scope)  # noqa: S102 - the peer's own lines, on fixed inputs
    return scope["advantages"]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl_sum_then_normalize(scale):
    """GRPO's own estimator (weighted sum of the rewards, then normalised) against TRL's lines
    for each `scale_rewards`; the last group's rewards are constant, so it gets 0 in both."""
    theirs = _run_trl_aggregation("sum_then_normalize", scale)
    ours = group_advantages(PER_REWARD @ torch.tensor(WEIGHTS), 4, scale, EPS).advantages
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert torch.equal(ours[8:], torch.zeros(4))


def test_decoupled_advantages_match_trl_normalize_then_sum():
    theirs = _run_trl_aggregation("normalize_then_sum")
    ours = decoupled_advantages(PER_REWARD, WEIGHTS, 4).advantages
    # TRL centres the zero-signal group on the step's mean (~1e-8 here); ours is exactly 0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
