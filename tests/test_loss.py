import math

import pytest
import torch

from grailcore.loss import LOSS_TYPES, grpo_loss, step_normalizers

EPS_LOW, EPS_HIGH, BETA, MAX_LEN = 0.2, 0.28, 0.04, 9
LENGTHS = [7, 5, 3, 1, 0, 6]  # right padding; one sequence fully masked (e.g. truncated)
ADVANTAGES = [1.2, -0.7, 0.5, -1.5, 0.9, -0.3]


def make_batch(seed=0):
    """float64 inputs [B, T] whose ratios land on both sides of the clip range, never
    within 1e-3 of its edges (where min/clamp gradients are ambiguous)."""
    gen = torch.Generator().manual_seed(seed)
    batch, seq = len(LENGTHS), max(LENGTHS)
    logprobs = -3 * torch.rand(batch, seq, generator=gen, dtype=torch.float64)
    log_ratio = 1.2 * torch.rand(batch, seq, generator=gen, dtype=torch.float64) - 0.6  # ratio in [0.55, 1.82]
    for edge in (math.log(1 - EPS_LOW), math.log(1 + EPS_HIGH)):
        near = (log_ratio - edge).abs() < 1e-3
        log_ratio = torch.where(near, log_ratio + 0.01, log_ratio)
    ref = logprobs + 0.3 * torch.randn(batch, seq, generator=gen, dtype=torch.float64)
    mask = torch.arange(seq)[None, :] < torch.tensor(LENGTHS)[:, None]  # [B, T]
    return dict(
        logprobs=logprobs, old_logprobs=logprobs - log_ratio, ref_logprobs=ref,
        advantages=torch.tensor(ADVANTAGES, dtype=torch.float64), mask=mask,
    )


def reference_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, beta, loss_type, num_items=None):
    """Straight from the papers, one token at a time in float64.

    DeepSeekMath eq. 3 (grpo): -1/G sum_i 1/|o_i| sum_t [min(r A, clip(r) A) - beta D_KL],
    D_KL = pi_ref/pi - log(pi_ref/pi) - 1. DAPO eq. 8 / TRL bnpo: token-level, divided by
    sum_i |o_i|. Dr. GRPO: divided by the constant G * max_completion_length."""
    token_sums, lengths = [], []
    for i in range(logprobs.shape[0]):
        terms = []
        for t in range(logprobs.shape[1]):
            if not mask[i, t]:
                continue
            ratio = torch.exp(logprobs[i, t] - old_logprobs[i, t])
            clipped = min(max(ratio, 1 - EPS_LOW), 1 + EPS_HIGH)
            surrogate = min(ratio * advantages[i], clipped * advantages[i])
            ref_over_pi = torch.exp(ref_logprobs[i, t] - logprobs[i, t])
            kl = ref_over_pi - torch.log(ref_over_pi) - 1
            terms.append(-(surrogate - beta * kl))
        token_sums.append(sum(terms, torch.zeros((), dtype=torch.float64)))
        lengths.append(len(terms))
    group = len(token_sums)
    if loss_type == "grpo":
        return sum(s / n for s, n in zip(token_sums, lengths) if n) / group
    if loss_type in ("bnpo", "dapo"):
        return sum(token_sums) / (sum(lengths) if num_items is None else num_items)
    return sum(token_sums) / (group * MAX_LEN)


def run_loss(batch, loss_type, beta=BETA, **kwargs):
    """grpo_loss in float32 on a batch of float64 leaves; returns (output, d loss / d logprobs)."""
    logprobs = batch["logprobs"].float().requires_grad_()
    out = grpo_loss(
        logprobs,
        None if batch["old_logprobs"] is None else batch["old_logprobs"].float(),
        batch["ref_logprobs"].float(), batch["advantages"].float(), batch["mask"],
        epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=beta, loss_type=loss_type,
        max_completion_length=MAX_LEN, **kwargs,
    )
    out.loss.backward()
    return out, logprobs.grad


def run_reference(batch, loss_type, beta=BETA, **kwargs):
    logprobs = batch["logprobs"].clone().requires_grad_()
    old = logprobs.detach() if batch["old_logprobs"] is None else batch["old_logprobs"]
    loss = reference_loss(logprobs, old, batch["ref_logprobs"], batch["advantages"], batch["mask"], beta, loss_type, **kwargs)
    loss.backward()
    return loss, logprobs.grad


def test_batch_hits_both_clip_sides():
    batch = make_batch()
    ratio = torch.exp(batch["logprobs"] - batch["old_logprobs"])
    adv = batch["advantages"][:, None]
    low = (ratio < 1 - EPS_LOW) & (adv < 0) & batch["mask"]
    high = (ratio > 1 + EPS_HIGH) & (adv > 0) & batch["mask"]
    assert low.sum() >= 2 and high.sum() >= 2
    out, _ = run_loss(batch, "grpo")
    n = batch["mask"].sum()
    assert out.clip_low_fraction.item() == pytest.approx(low.sum().item() / n.item())
    assert out.clip_high_fraction.item() == pytest.approx(high.sum().item() / n.item())
    assert out.clip_fraction.item() == pytest.approx((low | high).sum().item() / n.item())
    assert out.num_tokens.item() == sum(LENGTHS)
    masked_ratio = ratio[batch["mask"]]
    assert out.ratio_min.item() == pytest.approx(masked_ratio.min().item(), rel=1e-6)
    assert out.ratio_max.item() == pytest.approx(masked_ratio.max().item(), rel=1e-6)
    assert out.ratio_mean.item() == pytest.approx(masked_ratio.mean().item(), rel=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, BETA])
def test_loss_and_gradient_match_paper_formulas(loss_type, beta):
    batch = make_batch()
    num_items = {"dapo": 40.0}.get(loss_type)  # dapo: a global count, not this batch's 22
    out, grad = run_loss(batch, loss_type, beta=beta, num_items=num_items)
    ref_loss, ref_grad = run_reference(batch, loss_type, beta=beta, num_items=num_items)
    assert out.loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-5)
    assert grad.abs().sum() > 0 and (grad[~batch["mask"]] == 0).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_first_iteration_without_old_logprobs(loss_type):
    batch = make_batch() | {"old_logprobs": None}
    out, grad = run_loss(batch, loss_type)
    ref_loss, ref_grad = run_reference(batch, loss_type)
    assert out.loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-5)
    assert out.ratio_min.item() == out.ratio_max.item() == 1.0 and out.clip_fraction.item() == 0.0


def test_aggregations_differ_on_this_batch():
    batch = make_batch()
    losses = {t: run_loss(batch, t, num_items=40.0 if t == "dapo" else None)[0].loss.item() for t in LOSS_TYPES}
    assert len({round(v, 6) for v in losses.values()}) == 4, losses


def test_k3_is_zero_when_reference_equals_policy():
    batch = make_batch()
    batch["ref_logprobs"] = batch["logprobs"].clone()
    with_kl, grad_kl = run_loss(batch, "grpo", beta=0.5)
    without, grad = run_loss(batch, "grpo", beta=0.0)
    assert with_kl.kl_mean.item() == 0.0
    assert with_kl.loss.item() == without.loss.item()
    torch.testing.assert_close(grad_kl, grad, rtol=0, atol=1e-7)


def test_k3_value_and_its_gradient():
    # ref - logp = 0.5 everywhere: k3 = e^0.5 - 1.5; d k3 / d logp = 1 - e^0.5
    logprobs = torch.full((1, 3), -1.0, requires_grad=True)
    out = grpo_loss(
        logprobs, None, torch.full((1, 3), -0.5), torch.zeros(1), torch.ones(1, 3),
        epsilon_low=0.2, epsilon_high=0.2, beta=2.0, loss_type="grpo",
    )
    out.loss.backward()
    assert out.kl_mean.item() == pytest.approx(math.exp(0.5) - 1.5, rel=1e-6)
    assert out.loss.item() == pytest.approx(2.0 * (math.exp(0.5) - 1.5), rel=1e-6)
    torch.testing.assert_close(logprobs.grad, torch.full((1, 3), 2.0 * (1 - math.exp(0.5)) / 3))


def split_rows(batch, rows):
    """Micro-batches of the given rows, each trimmed to its own longest completion."""
    out = []
    for idx in rows:
        width = max(1, max(LENGTHS[i] for i in idx))
        out.append({k: None if v is None else v[idx, :width] if v.dim() == 2 else v[idx] for k, v in batch.items()})
    return out


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batch_accumulation_equals_full_batch(loss_type):
    batch = make_batch()
    full, full_grad = run_loss(batch, loss_type)
    micro = split_rows(batch, [[0, 1], [2, 3, 4], [5]])
    norms = step_normalizers([mb["mask"] for mb in micro])
    assert (norms.num_sequences, norms.num_items) == (6.0, float(sum(LENGTHS)))
    total, grads = 0.0, []
    for mb in micro:
        out, grad = run_loss(mb, loss_type, num_items=norms.num_items, num_sequences=norms.num_sequences)
        total += out.loss.item()
        grads.append(torch.nn.functional.pad(grad, (0, full_grad.shape[1] - grad.shape[1])))
    assert total == pytest.approx(full.loss.item(), abs=1e-6)
    torch.testing.assert_close(torch.cat(grads), full_grad, rtol=0, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_ranks_averaging_gradients_equal_full_batch(loss_type):
    # Two ranks x two micro-batches; DDP averages the ranks' accumulated gradients.
    batch = make_batch()
    full, full_grad = run_loss(batch, loss_type)
    ranks = [split_rows(batch, [[0], [1, 2]]), split_rows(batch, [[3, 4], [5]])]
    global_items = sum(step_normalizers([mb["mask"] for mb in r]).num_items for r in ranks)
    world = len(ranks)
    rank_grads = []
    for micro in ranks:
        norms = step_normalizers([mb["mask"] for mb in micro])
        num_items = global_items / world if loss_type == "dapo" else norms.num_items
        grads = [run_loss(mb, loss_type, num_items=num_items, num_sequences=norms.num_sequences)[1] for mb in micro]
        rank_grads.append([torch.nn.functional.pad(g, (0, full_grad.shape[1] - g.shape[1])) for g in grads])
    averaged = torch.cat([torch.cat(g) for g in rank_grads]) / world
    torch.testing.assert_close(averaged, full_grad, rtol=0, atol=1e-7)


def test_non_finite_values_under_padding_do_not_leak():
    batch = make_batch()
    clean, clean_grad = run_loss(batch, "dapo")
    dirty = dict(batch)
    pad = ~batch["mask"]
    dirty["old_logprobs"] = batch["old_logprobs"].masked_fill(pad, -math.inf)
    dirty["ref_logprobs"] = batch["ref_logprobs"].masked_fill(pad, math.nan)
    out, grad = run_loss(dirty, "dapo")
    assert out.loss.item() == clean.loss.item() and out.kl_mean.item() == clean.kl_mean.item()
    assert torch.equal(grad, clean_grad)


def test_empty_micro_batch_gives_zero_loss_and_neutral_stats():
    batch = make_batch()
    batch["mask"] = torch.zeros_like(batch["mask"])
    out, grad = run_loss(batch, "grpo")
    assert out.loss.item() == 0.0 and (grad == 0).all()
    assert out.num_tokens.item() == 0 and out.ratio_min.item() == out.ratio_max.item() == 1.0


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(ref_logprobs=None), "needs ref_logprobs"),
        (dict(loss_type="token_mean"), "loss_type must be one of"),
        (dict(loss_type="dr_grpo", max_completion_length=3), "max_completion_length >= T"),
        (dict(advantages=torch.zeros(2, 1)), "advantages must be"),
        (dict(mask=torch.ones(2, 4)), "mask has shape"),
    ],
)
def test_bad_input_is_rejected_with_a_reason(change, match):
    args = dict(
        logprobs=torch.zeros(2, 5), old_logprobs=None, ref_logprobs=torch.zeros(2, 5),
        advantages=torch.zeros(2), mask=torch.ones(2, 5), epsilon_low=0.2, epsilon_high=0.2,
        beta=0.1, loss_type="grpo", max_completion_length=5,
    )
    with pytest.raises(ValueError, match=match):
        grpo_loss(**(args | change))
