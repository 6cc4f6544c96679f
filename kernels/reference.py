"""Plain-torch references for the fused kernels: readable, materialise the full
[N, V] logits, and compute in float32 or wider. Tests compare every kernel to these."""

import torch

from kernels.objective import Objective, objective_loss, padded_tokens, summarize


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # fp64 inputs stay fp64 so tests can build an fp64 ground truth.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _logprobs_and_entropy_ref(hidden, weight, targets, temperature, ignore_index):
    logits = _upcast(hidden) @ _upcast(weight).T / temperature  # [N, V]
    log_probs = torch.log_softmax(logits, dim=-1)  # [N, V]
    valid = targets != ignore_index  # [N]
    safe_targets = torch.where(valid, targets, 0)
    logprobs = log_probs.gather(-1, safe_targets[:, None]).squeeze(-1)  # [N]
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # [N]
    zero = logprobs.new_zeros(())
    return torch.where(valid, logprobs, zero), torch.where(valid, entropy, zero)


def logprobs_ref(hidden, weight, targets, temperature=1.0, ignore_index=-100):
    """log p(target) under softmax(hidden @ weight.T / temperature); [N] in fp32 (fp64
    for fp64 inputs). Rows whose target is `ignore_index` give 0."""
    return _logprobs_and_entropy_ref(hidden, weight, targets, temperature, ignore_index)[0]


def logprobs_entropy_ref(hidden, weight, targets, temperature=1.0, ignore_index=-100):
    """Like `logprobs_ref`, plus the entropy [N] of each row's full distribution."""
    return _logprobs_and_entropy_ref(hidden, weight, targets, temperature, ignore_index)


def grpo_loss_ref(
    hidden, weight, targets, old_logprobs, ref_logprobs, advantages, mask, *, temperature=1.0,
    epsilon_low=0.2, epsilon_high=0.2, beta=0.0, loss_type="grpo", policy_loss="grpo", kl_estimator="k3",
    max_completion_length=None, num_items=None, num_sequences=None, engine_logprobs=None, engine_is_cap=None,
    engine_seq_band=None, compute_entropy=False,
):
    """Reference for `kernels.grpo_loss.fused_grpo_loss`: same arguments, same result, from
    the full logits (the objective itself is the shared `kernels.objective`)."""
    batch, seq = targets.shape
    index, tokens = padded_tokens(
        mask, advantages, loss_type=loss_type, targets=targets, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
        engine_logprobs=engine_logprobs, max_completion_length=max_completion_length, num_items=num_items,
        num_sequences=num_sequences)
    flat_hidden = hidden.reshape(batch * seq, -1)[index]  # [K, H]
    logprobs, entropy = logprobs_entropy_ref(flat_hidden, weight, targets.reshape(-1)[index], temperature)
    objective = Objective(policy_loss=policy_loss, epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
                          kl_estimator=kl_estimator, engine_is_cap=engine_is_cap, engine_seq_band=engine_seq_band)
    loss, stats = objective_loss(logprobs, tokens, objective)
    if compute_entropy:
        stats["entropy"] = entropy.detach().sum()
    return loss, summarize(stats)
