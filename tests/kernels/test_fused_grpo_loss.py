import math

import pytest
import torch

from kernel_cases import assert_matches
from kernels.grpo_loss import fused_grpo_loss
from kernels.objective import LOSS_TYPES
from kernels.reference import grpo_loss_ref, logprobs_ref

BATCH, SEQ, HIDDEN, VOCAB = 3, 7, 32, 1003


def _problem(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) * 3 / HIDDEN**0.5).to(dtype)
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    mask = torch.ones(BATCH, SEQ, dtype=torch.bool)
    mask[0, 5:] = False  # right padding of different lengths
    mask[2, 2:] = False
    targets[~mask] = -100
    with torch.no_grad():
        logprobs = logprobs_ref(hidden.double().view(-1, HIDDEN), weight.double(), targets.view(-1), 0.7).view(BATCH, SEQ)
    # old/ref near the current policy, some far enough to clip; garbage where masked
    old = (logprobs + 0.3 * torch.randn(BATCH, SEQ, generator=generator)).masked_fill(~mask, float("nan"))
    ref = (logprobs + 0.2 * torch.randn(BATCH, SEQ, generator=generator)).masked_fill(~mask, float("inf"))
    advantages = torch.tensor([1.0, -0.5, 2.0])
    return hidden, weight, targets, old, ref, advantages, mask


def _engine(old, seed=1):
    """Engine log-probs up to 0.7 nats off the old ones: some tokens capped, some sequences
    outside a (0.97, 1.03) band."""
    generator = torch.Generator().manual_seed(seed)
    return old - 1.4 * (torch.rand(old.shape, generator=generator) - 0.5)


def _run(loss_fn, hidden, weight, *args, **kwargs):
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    loss, stats = loss_fn(hidden, weight, *args, **kwargs)
    loss.backward()
    return loss.detach(), stats, hidden.grad, weight.grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("with_old, with_ref", [(True, True), (False, True), (True, False)])
def test_matches_fp64_reference(loss_type, with_old, with_ref):
    hidden, weight, targets, old, ref, advantages, mask = _problem()
    args = (targets, old if with_old else None, ref if with_ref else None, advantages, mask)
    kwargs = dict(
        temperature=0.7, epsilon_low=0.2, epsilon_high=0.28, beta=0.04 if with_ref else 0.0, loss_type=loss_type,
        max_completion_length=10, compute_entropy=True,
    )
    loss, stats, grad_hidden, grad_weight = _run(fused_grpo_loss, hidden, weight, *args, chunk_size=4, **kwargs)
    ref_loss, ref_stats, ref_grad_hidden, ref_grad_weight = _run(grpo_loss_ref, hidden.double(), weight.double(), *args, **kwargs)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert_matches(loss, ref_loss, torch.float32, "values", "loss")
    assert stats.keys() == ref_stats.keys() and ("kl" in stats) == with_ref and "entropy" in stats
    for name in stats:
        assert_matches(stats[name], ref_stats[name], torch.float32, "values", name)
    assert_matches(grad_hidden, ref_grad_hidden, torch.float32, "grads", "grad_hidden")
    assert_matches(grad_weight, ref_grad_weight, torch.float32, "grads", "grad_weight")
    assert (grad_hidden[~mask] == 0).all()
    if with_old:  # the problem is built so that some tokens clip
        assert 0 < stats["clip_fraction"] < 1


@pytest.mark.parametrize("policy_loss, kl_estimator, engine, chunk_size", [
    ("gspo", "k3", False, 7),  # whole sequences per chunk
    ("gspo", "k1", False, 3),  # a sequence longer than a chunk: two passes
    ("cispo", "k2", False, 4),
    ("grpo", "k3", True, 7),
    ("gspo", "k3", True, 3),
    ("cispo", "k1", True, 4),
])
def test_policy_losses_estimators_and_engine_correction_match_fp64_reference(policy_loss, kl_estimator, engine,
                                                                             chunk_size):
    hidden, weight, targets, old, ref, advantages, mask = _problem()
    correction = dict(engine_logprobs=_engine(old), engine_is_cap=1.3, engine_seq_band=(0.97, 1.03)) if engine else {}
    args = (targets, old, ref, advantages, mask)
    kwargs = dict(temperature=0.7, epsilon_low=0.1, epsilon_high=0.12, beta=0.04, loss_type="dapo",
                  policy_loss=policy_loss, kl_estimator=kl_estimator, compute_entropy=True, **correction)
    loss, stats, grad_hidden, grad_weight = _run(fused_grpo_loss, hidden, weight, *args, chunk_size=chunk_size, **kwargs)
    ref_loss, ref_stats, ref_grad_hidden, ref_grad_weight = _run(grpo_loss_ref, hidden.double(), weight.double(), *args, **kwargs)
    assert_matches(loss, ref_loss, torch.float32, "values", "loss")
    assert stats.keys() == ref_stats.keys()
    for name in stats:
        assert_matches(stats[name], ref_stats[name], torch.float32, "values", name)
    assert_matches(grad_hidden, ref_grad_hidden, torch.float32, "grads", "grad_hidden")
    assert_matches(grad_weight, ref_grad_weight, torch.float32, "grads", "grad_weight")
    if engine:  # the correction changed something on this problem
        assert stats["is_capped_fraction"] > 0 and stats["is_dropped_fraction"] > 0


def test_bf16_matches_reference():
    hidden, weight, targets, old, ref, advantages, mask = _problem(torch.bfloat16)
    args = (targets, old, ref, advantages, mask)
    kwargs = dict(temperature=0.7, beta=0.04, loss_type="dapo")
    loss, _, grad_hidden, grad_weight = _run(fused_grpo_loss, hidden, weight, *args, **kwargs)
    ref_loss, _, ref_grad_hidden, ref_grad_weight = _run(grpo_loss_ref, hidden.double(), weight.double(), *args, **kwargs)
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    assert_matches(loss, ref_loss, torch.bfloat16, "values", "loss")
    assert_matches(grad_hidden, ref_grad_hidden, torch.bfloat16, "grads", "grad_hidden")
    assert_matches(grad_weight, ref_grad_weight, torch.bfloat16, "grads", "grad_weight")


def test_flat_hidden_no_grad_and_num_items():
    hidden, weight, targets, old, ref, advantages, mask = _problem()
    args = (targets, old, ref, advantages, mask)
    loss, _ = fused_grpo_loss(hidden, weight, *args, loss_type="dapo", num_items=40)
    with torch.no_grad():
        flat_loss, _ = fused_grpo_loss(hidden.view(-1, HIDDEN), weight, *args, loss_type="dapo", num_items=40)
    local_loss, _ = fused_grpo_loss(hidden, weight, *args, loss_type="dapo")
    torch.testing.assert_close(flat_loss, loss)
    torch.testing.assert_close(loss * 40, local_loss * mask.sum())


def test_bad_arguments_are_rejected():
    hidden, weight, targets, old, ref, advantages, mask = _problem()
    with pytest.raises(ValueError, match="max_completion_length"):
        fused_grpo_loss(hidden, weight, targets, old, ref, advantages, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        fused_grpo_loss(hidden, weight, targets, old, ref, advantages, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="advantages"):
        fused_grpo_loss(hidden, weight, targets, old, ref, advantages[:2], mask)
    with pytest.raises(ValueError, match="targets under mask"):
        fused_grpo_loss(hidden, weight, targets, old, ref, advantages, torch.ones_like(mask))
