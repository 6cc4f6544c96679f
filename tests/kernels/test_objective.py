"""kernels.objective's pieces by hand (the paper-formula tests of the whole loss are in
tests/test_loss.py) and the fused kernel's chunk plan."""

import math

import pytest
import torch

from kernels.grpo_loss import chunk_sizes
from kernels.objective import (LOSS_TYPES, Objective, Tokens, aggregation_weights, clipped_surrogate,
                               engine_importance_weights, kl_estimate, merge_stats, objective_loss)


def test_clipped_surrogate_by_hand():
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.0])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    loss, low, high = clipped_surrogate(ratio, advantages, 0.2, 0.3)
    # -min(r A, clip(r, 0.8, 1.3) A)
    torch.testing.assert_close(loss, torch.tensor([-1.3, 1.5, -0.5, 0.8, -2.0]))
    assert high.tolist() == [True, False, False, False, False]
    assert low.tolist() == [False, False, False, True, False]


def test_kl_estimators_by_hand():
    logprobs, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])  # log r = ref - logp = -0.5, 1.0
    torch.testing.assert_close(kl_estimate(logprobs, ref, "k1"), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(kl_estimate(logprobs, ref, "k2"), torch.tensor([0.125, 0.5]))
    torch.testing.assert_close(kl_estimate(logprobs, ref, "k3"),
                               torch.tensor([math.exp(-0.5) - 0.5, math.exp(1.0) - 2.0]))


def test_aggregation_weights_by_hand():
    token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    expected = {"grpo": (2.0 + 4.0) / 2, "bnpo": 10.0 / 4, "dapo": 10.0 / 4, "dr_grpo": 10.0 / (2 * 5)}
    assert set(expected) == set(LOSS_TYPES)
    for loss_type, value in expected.items():
        weights = aggregation_weights(mask, loss_type, max_completion_length=5)
        assert (weights * token_loss).sum().item() == pytest.approx(value)
    assert (aggregation_weights(mask, "dapo", num_items=8) * token_loss).sum().item() == pytest.approx(10.0 / 8)
    assert (aggregation_weights(mask, "grpo", num_sequences=4) * token_loss).sum().item() == pytest.approx(6.0 / 4)


def test_engine_weights_by_hand():
    behaviour = torch.tensor([0.0, 0.0, 0.0, 0.0])
    engine = torch.tensor([-1.0, 0.1, -0.1, 0.0])  # ratios e, e^-0.1, e^0.1, 1
    tokens = Tokens(sequence=torch.tensor([0, 0, 1, 1]), advantages=torch.ones(4), weights=torch.ones(4),
                    num_sequences=2)
    objective = Objective(engine_is_cap=2.0, engine_seq_band=(0.8, 1.2))
    weights, capped, dropped = engine_importance_weights(behaviour, engine, tokens, objective)
    # sequence 0: geometric mean exp((1 - 0.1) / 2) = 1.57 > 1.2: dropped; sequence 1: exp(0.05): kept
    torch.testing.assert_close(weights, torch.tensor([0.0, 0.0, math.exp(0.1), 1.0]))
    assert capped.tolist() == [True, False, False, False] and dropped.tolist() == [True, True, False, False]


def test_gather_and_take_follow_the_index():
    mask_shape = (2, 3)
    index = torch.tensor([4, 0, 1])  # (1, 1), (0, 0), (0, 1): any order
    old = torch.arange(6.0).view(mask_shape)
    tokens = Tokens.gather(index, 3, torch.tensor([10.0, 20.0]), torch.ones(mask_shape), old=old)
    assert tokens.sequence.tolist() == [1, 0, 0] and tokens.advantages.tolist() == [20.0, 10.0, 10.0]
    assert tokens.old_logprobs.tolist() == [4.0, 0.0, 1.0] and tokens.ref_logprobs is None
    part = tokens.take(torch.tensor([2]))
    assert part.old_logprobs.tolist() == [1.0] and part.num_sequences == 2


def test_chunk_plan_keeps_sequences_whole_when_asked():
    sequence = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    assert chunk_sizes(sequence, 4, False) == [4, 4, 1]
    assert chunk_sizes(sequence, 5, True) == [5, 4]
    assert chunk_sizes(sequence, 3, True) is None  # sequence 2 has 4 tokens: two passes
    assert chunk_sizes(torch.tensor([0, 1, 0]), 3, True) is None  # a sequence split in two
    assert chunk_sizes(torch.zeros(0, dtype=torch.long), 3, True) == []


def test_stats_of_parts_merge_to_the_stats_of_the_whole():
    gen = torch.Generator().manual_seed(0)
    n = 10
    tokens = Tokens(sequence=torch.tensor([0] * 4 + [1] * 6), advantages=torch.randn(n, generator=gen),
                    weights=torch.rand(n, generator=gen), old_logprobs=-torch.rand(n, generator=gen),
                    ref_logprobs=-torch.rand(n, generator=gen), engine_logprobs=-torch.rand(n, generator=gen),
                    num_sequences=2)
    logprobs = -torch.rand(n, generator=gen)
    objective = Objective(beta=0.1, engine_is_cap=1.5, engine_seq_band=(0.5, 2.0))
    whole_loss, whole = objective_loss(logprobs, tokens, objective)
    first, second = torch.arange(4), torch.arange(4, n)  # whole sequences
    loss_a, part_a = objective_loss(logprobs[first], tokens.take(first), objective)
    loss_b, part_b = objective_loss(logprobs[second], tokens.take(second), objective)
    merged = merge_stats(merge_stats({}, part_a), part_b)
    assert merged.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(merged[name], whole[name], msg=name)
    torch.testing.assert_close(loss_a + loss_b, whole_loss)
