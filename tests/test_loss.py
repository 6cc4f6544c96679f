"""grailcore.loss (the plain-torch loss on the shared objective) against the papers'
formulas, written here token by token in float64: GRPO/DAPO/Dr. GRPO aggregation, GSPO,
CISPO, the k1/k2/k3 KL estimators and the engine importance-sampling correction."""

import math

import pytest
import torch

from grailcore.loss import LOSS_TYPES, PolicyTerms, grpo_loss, step_normalizers
from kernels.objective import Objective

EPS_LOW, EPS_HIGH, BETA, MAX_LEN = 0.2, 0.28, 0.04, 9
GSPO_EPS = (0.05, 0.08)  # sequence ratios spread less than token ones: a tighter clip still bites
LENGTHS = [7, 5, 3, 1, 0, 6]  # right padding; one sequence fully masked (e.g. truncated)
ADVANTAGES = [1.2, -0.7, 0.5, -1.5, 0.9, -0.3]


def make_batch(seed=0):
    """float64 inputs [B, T] whose ratios land on both sides of the clip range, never
    within 1e-3 of its edges (where min/clamp gradients are ambiguous); the engine's
    log-probs differ from the old ones by up to 1 nat per token."""
    gen = torch.Generator().manual_seed(seed)
    batch, seq = len(LENGTHS), max(LENGTHS)
    logprobs = -3 * torch.rand(batch, seq, generator=gen, dtype=torch.float64)
    log_ratio = 1.2 * torch.rand(batch, seq, generator=gen, dtype=torch.float64) - 0.6  # ratio in [0.55, 1.82]
    for edge in (math.log(1 - EPS_LOW), math.log(1 + EPS_HIGH)):
        near = (log_ratio - edge).abs() < 1e-3
        log_ratio = torch.where(near, log_ratio + 0.01, log_ratio)
    ref = logprobs + 0.3 * torch.randn(batch, seq, generator=gen, dtype=torch.float64)
    old = logprobs - log_ratio
    engine = old - (2 * torch.rand(batch, seq, generator=gen, dtype=torch.float64) - 1)
    mask = torch.arange(seq)[None, :] < torch.tensor(LENGTHS)[:, None]  # [B, T]
    return dict(logprobs=logprobs, old_logprobs=old, ref_logprobs=ref, engine_logprobs=engine,
                advantages=torch.tensor(ADVANTAGES, dtype=torch.float64), mask=mask)


def reference_loss(batch, logprobs, loss_type, *, policy="grpo", eps=(EPS_LOW, EPS_HIGH), beta=BETA, kl="k3",
                   num_items=None, cap=None, band=None, engine=True):
    """Straight from the papers, one token at a time in float64.

    DeepSeekMath eq. 3 (grpo): -1/G sum_i 1/|o_i| sum_t [min(r A, clip(r) A) - beta D_KL].
    GSPO eq. 5-7: r replaced by s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|), clipped alike.
    CISPO (MiniMax-M1 eq. 4): -sg(min(r, 1 + eps_high)) A log pi per token.
    KL (Schulman): with log r = log(ref / pi): k1 = -log r, k2 = (log r)^2 / 2, k3 = r - 1 - log r.
    Truncated IS: the policy term times min(pi_old / pi_engine, cap), 0 for a sequence whose
    geometric-mean ratio leaves the band. DAPO eq. 8 / TRL bnpo: divided by sum_i |o_i|.
    Dr. GRPO: divided by the constant G * max_completion_length."""
    old = logprobs.detach() if batch["old_logprobs"] is None else batch["old_logprobs"]
    ref, engine, adv, mask = batch["ref_logprobs"], batch["engine_logprobs"], batch["advantages"], batch["mask"]
    low, high = eps
    token_sums, lengths = [], []
    for i in range(logprobs.shape[0]):
        ts = [t for t in range(logprobs.shape[1]) if mask[i, t]]
        if ts:
            seq_ratio = torch.exp(sum(logprobs[i, t] - old[i, t] for t in ts) / len(ts))
            seq_engine = math.exp(sum(float(old[i, t] - engine[i, t]) for t in ts) / len(ts))
        terms = []
        for t in ts:
            ratio = torch.exp(logprobs[i, t] - old[i, t])
            if policy == "cispo":
                policy_term = -min(float(ratio.detach()), 1 + high) * adv[i] * logprobs[i, t]
            else:
                r = seq_ratio if policy == "gspo" else ratio
                policy_term = -torch.min(r * adv[i], r.clamp(1 - low, 1 + high) * adv[i])
            if cap is not None:
                weight = min(math.exp(float(old[i, t] - engine[i, t])), cap)
                if band is not None and not band[0] <= seq_engine <= band[1]:
                    weight = 0.0
                policy_term = policy_term * weight
            log_r = ref[i, t] - logprobs[i, t]
            divergence = {"k1": -log_r, "k2": log_r**2 / 2, "k3": torch.exp(log_r) - 1 - log_r}[kl]
            terms.append(policy_term + beta * divergence)
        token_sums.append(sum(terms, torch.zeros((), dtype=torch.float64)))
        lengths.append(len(terms))
    group = len(token_sums)
    if loss_type == "grpo":
        return sum(s / n for s, n in zip(token_sums, lengths) if n) / group
    if loss_type in ("bnpo", "dapo"):
        return sum(token_sums) / (sum(lengths) if num_items is None else num_items)
    return sum(token_sums) / (group * MAX_LEN)


def run_loss(batch, loss_type, *, policy="grpo", eps=(EPS_LOW, EPS_HIGH), beta=BETA, kl="k3", cap=None, band=None,
             num_items=None, num_sequences=None, engine=True):
    """grpo_loss in float32 on a batch of float64 leaves; returns (output, d loss / d logprobs)."""
    logprobs = batch["logprobs"].float().requires_grad_()
    f32 = lambda x: None if x is None else x.float()  # noqa: E731
    terms = PolicyTerms.build(
        batch["mask"], batch["advantages"].float(), loss_type=loss_type, old_logprobs=f32(batch["old_logprobs"]),
        ref_logprobs=f32(batch["ref_logprobs"]), engine_logprobs=f32(batch["engine_logprobs"]) if engine else None,
        max_completion_length=MAX_LEN, num_items=num_items, num_sequences=num_sequences,
    )
    objective = Objective(policy_loss=policy, epsilon_low=eps[0], epsilon_high=eps[1], beta=beta, kl_estimator=kl,
                          engine_is_cap=cap, engine_seq_band=band)
    out = grpo_loss(logprobs, terms, objective)
    out.loss.backward()
    return out, logprobs.grad


def run_reference(batch, loss_type, **kwargs):
    logprobs = batch["logprobs"].clone().requires_grad_()
    loss = reference_loss(batch, logprobs, loss_type, **kwargs)
    loss.backward()
    return loss, logprobs.grad


def assert_matches_reference(batch, loss_type, **kwargs):
    num_items = {"dapo": 40.0}.get(loss_type)  # dapo: a global count, not this batch's 22
    out, grad = run_loss(batch, loss_type, num_items=num_items, **kwargs)
    ref_loss, ref_grad = run_reference(batch, loss_type, num_items=num_items, **kwargs)
    assert out.loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-5)
    assert grad.abs().sum() > 0 and (grad[~batch["mask"]] == 0).all()
    return out, grad


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
    assert_matches_reference(make_batch(), loss_type, beta=beta)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gspo_matches_its_formula(loss_type):
    batch = make_batch()
    out, _ = assert_matches_reference(batch, loss_type, policy="gspo", eps=GSPO_EPS)
    # the clip bites on some sequences and not others
    assert 0 < out.clip_fraction.item() < 1


def test_gspo_with_grpo_aggregation_is_the_papers_sequence_objective():
    """-1/G sum_i min(s_i A_i, clip(s_i) A_i), and an unclipped sequence's gradient is
    -A_i s_i / (G |y_i|) on each of its tokens: every token of a sequence moves alike."""
    batch = make_batch()
    out, grad = run_loss(batch, "grpo", policy="gspo", eps=GSPO_EPS, beta=0.0)
    mask, adv = batch["mask"], batch["advantages"]
    lengths = mask.sum(1)
    log_s = ((batch["logprobs"] - batch["old_logprobs"]) * mask).sum(1) / lengths.clamp(min=1)
    s = torch.exp(log_s)
    per_sequence = torch.min(s * adv, s.clamp(1 - GSPO_EPS[0], 1 + GSPO_EPS[1]) * adv)
    expected = -(per_sequence * (lengths > 0)).sum() / len(LENGTHS)
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    for i in range(len(LENGTHS)):
        clipped = not (1 - GSPO_EPS[0] < s[i] < 1 + GSPO_EPS[1])
        if lengths[i] and not clipped:
            want = -adv[i] * s[i] / (len(LENGTHS) * lengths[i])
            torch.testing.assert_close(grad[i, : lengths[i]].double(), want.expand(int(lengths[i])), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_cispo_matches_its_formula_and_keeps_clipped_tokens_gradient(loss_type):
    batch = make_batch()
    out, grad = assert_matches_reference(batch, loss_type, policy="cispo", beta=0.0)
    ratio = torch.exp(batch["logprobs"] - batch["old_logprobs"])
    capped = (ratio > 1 + EPS_HIGH) & batch["mask"]
    assert capped.sum() >= 2 and out.clip_high_fraction.item() == pytest.approx(capped.sum().item() / sum(LENGTHS))
    # PPO's clip zeroes these tokens' gradient when A > 0; CISPO's capped weight keeps it.
    assert (grad[capped] != 0).all()
    if loss_type == "dapo":  # sg(min(r, 1 + eps)) * A / num_items, sign flipped
        want = -(ratio.clamp(max=1 + EPS_HIGH) * batch["advantages"][:, None] / 40.0)[batch["mask"]]
        torch.testing.assert_close(grad[batch["mask"]].double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_kl_estimators_match_their_formulas(kl):
    out, _ = assert_matches_reference(make_batch(), "bnpo", kl=kl)
    batch = make_batch()
    log_r = (batch["ref_logprobs"] - batch["logprobs"])[batch["mask"]]
    values = {"k1": -log_r, "k2": log_r**2 / 2, "k3": torch.exp(log_r) - 1 - log_r}[kl]
    assert out.kl_mean.item() == pytest.approx(values.mean().item(), rel=1e-5)


@pytest.mark.parametrize("kl, value, slope", [
    ("k1", -0.5, 1.0),  # k1 = logp - ref; d/dlogp = 1
    ("k2", 0.125, -0.5),  # (ref - logp)^2 / 2; d/dlogp = -(ref - logp)
    ("k3", math.exp(0.5) - 1.5, 1 - math.exp(0.5)),  # e^d - d - 1; d/dlogp = 1 - e^d
])
def test_kl_value_and_gradient_by_hand(kl, value, slope):
    # ref - logp = 0.5 everywhere, no policy term (A = 0), grpo aggregation of 3 tokens
    logprobs = torch.full((1, 3), -1.0, requires_grad=True)
    terms = PolicyTerms.build(torch.ones(1, 3), torch.zeros(1), loss_type="grpo", ref_logprobs=torch.full((1, 3), -0.5))
    out = grpo_loss(logprobs, terms, Objective(beta=2.0, kl_estimator=kl))
    out.loss.backward()
    assert out.kl_mean.item() == pytest.approx(value, rel=1e-6)
    assert out.loss.item() == pytest.approx(2.0 * value, rel=1e-6)
    torch.testing.assert_close(logprobs.grad, torch.full((1, 3), 2.0 * slope / 3))


@pytest.mark.parametrize("policy", ["grpo", "gspo", "cispo"])
@pytest.mark.parametrize("band", [None, (0.8, 1.25)])
def test_engine_correction_matches_its_formula(policy, band):
    batch = make_batch()
    eps = GSPO_EPS if policy == "gspo" else (EPS_LOW, EPS_HIGH)
    out, grad = assert_matches_reference(batch, "dapo", policy=policy, eps=eps, cap=1.5, band=band)
    log_w = (batch["old_logprobs"] - batch["engine_logprobs"])[batch["mask"]]
    assert 0 < out.sums["is_capped"].item() == (log_w > math.log(1.5)).sum().item()
    plain, plain_grad = run_loss(batch, "dapo", policy=policy, eps=eps, num_items=40.0)
    assert not torch.allclose(grad, plain_grad)  # the correction is not a no-op here
    if band is not None:
        assert out.sums["is_dropped"].item() > 0


def test_engine_correction_with_the_engine_equal_to_old_is_a_no_op():
    batch = make_batch()
    batch["engine_logprobs"] = batch["old_logprobs"].clone()
    plain, plain_grad = run_loss(batch, "dapo")
    corrected, grad = run_loss(batch, "dapo", cap=2.0, band=(0.5, 2.0))
    assert corrected.loss.item() == plain.loss.item() and torch.equal(grad, plain_grad)
    assert corrected.sums["is_capped"].item() == corrected.sums["is_dropped"].item() == 0
    assert corrected.sums["mismatch_kl"].item() == 0 and corrected.sums["engine_abs_diff"].item() == 0


def test_mismatch_diagnostics():
    batch = make_batch()
    out, _ = run_loss(batch, "dapo")  # correction off: the diagnostics are still summed
    log_r = (batch["old_logprobs"] - batch["engine_logprobs"])[batch["mask"]]
    assert out.mean("engine_abs_diff").item() == pytest.approx(log_r.abs().mean().item(), rel=1e-5)
    assert out.mean("mismatch_kl").item() == pytest.approx((torch.exp(log_r) - 1 - log_r).mean().item(), rel=1e-5)
    assert "is_capped" not in out.sums


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_first_iteration_without_old_logprobs(loss_type):
    batch = make_batch() | {"old_logprobs": None}
    out, _ = assert_matches_reference(batch, loss_type, engine=False)
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


def split_rows(batch, rows):
    """Micro-batches of the given rows, each trimmed to its own longest completion."""
    out = []
    for idx in rows:
        width = max(1, max(LENGTHS[i] for i in idx))
        out.append({k: None if v is None else v[idx, :width] if v.dim() == 2 else v[idx] for k, v in batch.items()})
    return out


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("policy", ["grpo", "gspo", "cispo"])
def test_micro_batch_accumulation_equals_full_batch(loss_type, policy):
    batch = make_batch()
    full, full_grad = run_loss(batch, loss_type, policy=policy, cap=1.5, band=(0.8, 1.25))
    micro = split_rows(batch, [[0, 1], [2, 3, 4], [5]])
    norms = step_normalizers([mb["mask"] for mb in micro])
    assert (norms.num_sequences, norms.num_items) == (6.0, float(sum(LENGTHS)))
    total, grads = 0.0, []
    for mb in micro:
        out, grad = run_loss(mb, loss_type, policy=policy, cap=1.5, band=(0.8, 1.25), num_items=norms.num_items,
                             num_sequences=norms.num_sequences)
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
    clean, clean_grad = run_loss(batch, "dapo", cap=2.0)
    dirty = dict(batch)
    pad = ~batch["mask"]
    dirty["old_logprobs"] = batch["old_logprobs"].masked_fill(pad, -math.inf)
    dirty["ref_logprobs"] = batch["ref_logprobs"].masked_fill(pad, math.nan)
    dirty["engine_logprobs"] = batch["engine_logprobs"].masked_fill(pad, math.inf)
    out, grad = run_loss(dirty, "dapo", cap=2.0)
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
        (dict(ref_logprobs=None), "needs reference log-probs"),
        (dict(loss_type="token_mean"), "loss_type must be one of"),
        (dict(loss_type="dr_grpo", max_completion_length=3), "max_completion_length >= T"),
        (dict(advantages=torch.zeros(2, 1)), "advantages must be"),
        (dict(old_logprobs=torch.ones(2, 4)), "old_logprobs has shape"),
    ],
)
def test_bad_input_is_rejected_with_a_reason(change, match):
    args = dict(mask=torch.ones(2, 5), advantages=torch.zeros(2), loss_type="grpo", old_logprobs=None,
                ref_logprobs=torch.zeros(2, 5), max_completion_length=5) | change
    with pytest.raises(ValueError, match=match):
        terms = PolicyTerms.build(**args)
        grpo_loss(torch.zeros(2, 5), terms, Objective(beta=0.1))


@pytest.mark.parametrize("field, value, match", [
    ("policy_loss", "ppo", "policy_loss must be one of"), ("kl_estimator", "k4", "kl_estimator must be one of"),
    ("engine_is_cap", 0.5, "engine_is_cap must be >= 1"), ("engine_seq_band", (1.2, 2.0), "engine_seq_band"),
])
def test_bad_objective_is_rejected_with_a_reason(field, value, match):
    with pytest.raises(ValueError, match=match):
        Objective(**{field: value})
