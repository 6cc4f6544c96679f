"""Parity with the peers' own implementations of the same losses: Liger-Kernel's
`LigerFusedLinearGRPOLoss` (its chunked torch path, compiled=False, on CPU) against
`fused_grpo_loss`, and TRL's `GRPOTrainer._compute_loss` against the shared objective.
Both are benchmark/test extras (pip install -e ".[bench]"); the tests skip without them."""

import collections
import types

import pytest
import torch

from kernel_cases import assert_matches
from kernels.grpo_loss import fused_grpo_loss
from kernels.objective import Objective, engine_importance_weights, objective_loss, padded_tokens

BATCH, SEQ, HIDDEN, VOCAB, TEMPERATURE, MAX_LEN = 4, 6, 16, 301, 0.7, 8
LENGTHS = [6, 4, 1, 5]
EPS_LOW, EPS_HIGH, BETA, CAP = 0.2, 0.28, 0.04, 1.3
# (ours: policy_loss, loss_type) -> the peer's (loss_type, importance_sampling_level); CISPO
# is token-normalised (dapo) in both peers.
CASES = [("grpo", t) for t in ("grpo", "bnpo", "dapo", "dr_grpo")] + [("gspo", "grpo"), ("gspo", "dapo"),
                                                                      ("cispo", "dapo")]


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=gen)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) * 2 / HIDDEN**0.5
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.arange(SEQ)[None, :] < torch.tensor(LENGTHS)[:, None]
    with torch.no_grad():
        logprobs = torch.log_softmax(hidden @ weight.T / TEMPERATURE, -1).gather(-1, targets[..., None])[..., 0]
    old = logprobs + 0.3 * torch.randn(BATCH, SEQ, generator=gen)  # ratios on both sides of the clip
    ref = logprobs + 0.2 * torch.randn(BATCH, SEQ, generator=gen)
    engine = old + 0.4 * torch.randn(BATCH, SEQ, generator=gen)
    advantages = torch.tensor([1.0, -0.7, 0.4, -1.3])
    return hidden, weight, targets, mask, old, ref, engine, advantages


def _peer_epsilons(policy):
    """The peers take CISPO's cap itself as epsilon_high; ours is 1 + epsilon_high."""
    return (EPS_LOW, 1 + EPS_HIGH) if policy == "cispo" else (EPS_LOW, EPS_HIGH)


def _is_ratio(old, engine, mask):
    """Our token-level truncated IS weights as a [B, T] tensor, what the peers multiply in."""
    index, tokens = padded_tokens(mask, torch.zeros(BATCH), loss_type="dapo", old_logprobs=old, engine_logprobs=engine)
    weights, _, _ = engine_importance_weights(tokens.old_logprobs, tokens.engine_logprobs, tokens,
                                              Objective(engine_is_cap=CAP))
    return torch.ones(BATCH * SEQ, dtype=weights.dtype).index_put((index,), weights).view(BATCH, SEQ)


@pytest.mark.parametrize("policy, loss_type", CASES)
@pytest.mark.parametrize("correction", [False, True])
def test_fused_loss_matches_liger(policy, loss_type, correction):
    liger = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
    hidden, weight, targets, mask, old, ref, engine, advantages = _problem()
    eps_low, eps_high = _peer_epsilons(policy)
    peer = liger.LigerFusedLinearGRPOLoss(
        beta=BETA, compiled=False, use_ref_model=True, chunk_size=1, epsilon_low=eps_low, epsilon_high=eps_high,
        loss_type="cispo" if policy == "cispo" else loss_type, max_completion_length=MAX_LEN,
        importance_sampling_level="sequence" if policy == "gspo" else "token", temperature=TEMPERATURE,
    )
    results = []
    for run in ("liger", "ours"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if run == "liger":
            loss, _ = peer(h, w, targets, mask.long(), advantages, ref_per_token_logps=ref, old_per_token_logps=old,
                           vllm_is_ratio=_is_ratio(old, engine, mask) if correction else None)
        else:
            extra = dict(engine_logprobs=engine, engine_is_cap=CAP) if correction else {}
            loss, _ = fused_grpo_loss(h, w, targets, old, ref, advantages, mask, temperature=TEMPERATURE,
                                      epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=BETA, loss_type=loss_type,
                                      policy_loss=policy, max_completion_length=MAX_LEN, chunk_size=5, **extra)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    (peer_loss, peer_gh, peer_gw), (loss, gh, gw) = results
    assert peer_gh.abs().sum() > 0
    assert_matches(loss, peer_loss, torch.float32, "values", "loss")
    assert_matches(gh, peer_gh, torch.float32, "grads", "grad_hidden")
    assert_matches(gw, peer_gw, torch.float32, "grads", "grad_weight")


def _trl_self(policy, loss_type, logprobs, correction):
    """A stand-in for a GRPOTrainer instance holding what `_compute_loss` reads: one process,
    no gradient accumulation, no entropy bonus, its log-probs our tensor."""
    accelerator = types.SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                        reduce=lambda x, reduction: x)
    eps_low, eps_high = _peer_epsilons(policy)
    return types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logprobs, torch.zeros_like(logprobs), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="sequence" if policy == "gspo" else "token", beta=BETA,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type="cispo" if policy == "cispo" else loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
        use_vllm=correction, vllm_importance_sampling_correction=correction,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=MAX_LEN, _entropy_bonus_enabled=False, accelerator=accelerator,
        _metrics={"train": collections.defaultdict(list)},
    )


@pytest.mark.parametrize("policy, loss_type", CASES)
@pytest.mark.parametrize("correction", [False, True])
def test_objective_matches_trl_compute_loss(policy, loss_type, correction):
    trl = pytest.importorskip("trl.trainer.grpo_trainer")
    _, _, targets, mask, old, ref, engine, advantages = _problem()
    base = torch.log_softmax(torch.randn(BATCH, SEQ, 7, generator=torch.Generator().manual_seed(3)), -1)[..., 0]
    old, ref, engine, base = old.double(), ref.double(), engine.double(), (old + 0.1 * base).double()
    inputs = {
        "prompt_ids": torch.zeros(BATCH, 1, dtype=torch.long), "prompt_mask": torch.ones(BATCH, 1, dtype=torch.long),
        "completion_ids": targets, "completion_mask": mask.long(), "advantages": advantages.double(),
        "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum().double(),
        "importance_sampling_ratio": _is_ratio(old, engine, mask).double(),
    }
    grads = []
    for run in ("trl", "ours"):
        logprobs = base.clone().requires_grad_()
        if run == "trl":
            loss = trl.GRPOTrainer._compute_loss(_trl_self(policy, loss_type, logprobs, correction), None, inputs)
        else:
            index, tokens = padded_tokens(mask, advantages.double(), loss_type=loss_type, old_logprobs=old,
                                          ref_logprobs=ref, engine_logprobs=engine if correction else None,
                                          max_completion_length=MAX_LEN)
            objective = Objective(policy_loss=policy, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=BETA,
                                  engine_is_cap=CAP if correction else None)
            loss, _ = objective_loss(logprobs.reshape(-1)[index], tokens, objective)
        loss.backward()
        grads.append((loss.detach(), logprobs.grad))
    (peer_loss, peer_grad), (ours, grad) = grads
    assert peer_grad.abs().sum() > 0
    # fp64 log-probs; our aggregation weights are fp32, hence not 1e-12
    torch.testing.assert_close(ours, peer_loss, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad, peer_grad, rtol=1e-6, atol=1e-9)
