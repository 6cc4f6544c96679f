import math

import pytest
import torch

from grailcore.advantages import group_advantages, informative_groups

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
