"""Plain-torch references for the fused kernels: readable, materialise the full
[N, V] logits, and compute in float32 or wider. Tests compare every kernel to these."""

import torch

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


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


def grpo_token_loss(logprobs, old_logprobs, ref_logprobs, advantages, epsilon_low, epsilon_high, beta):
    """Per-token clipped policy loss plus beta * k3 KL. logprobs, old and ref log-probs
    share a shape ([B, T], or [n] for a chunk of tokens); advantages broadcast to it.

    Returns (loss, is_clipped, kl); kl is None when ref_logprobs is None."""
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    ratio = torch.exp(logprobs - old)  # [B, T]
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    low_clipped = (ratio < 1 - epsilon_low) & (advantages < 0)
    is_clipped = low_clipped | ((ratio > 1 + epsilon_high) & (advantages > 0))
    kl = None
    if ref_logprobs is not None:
        log_ratio_ref = ref_logprobs - logprobs
        kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1  # k3 estimator, >= 0
        loss = loss + beta * kl
    return loss, is_clipped, kl


def aggregate_token_loss(token_loss, mask, loss_type, max_completion_length=None, num_items=None):
    """Reduce a [B, T] per-token loss over the [B, T] 0/1 mask to a scalar.

    grpo: mean over each sequence's tokens, then over sequences; bnpo/dapo: sum over
    tokens / number of tokens (or `num_items`, e.g. a global count across ranks);
    dr_grpo: sum over tokens / (B * max_completion_length)."""
    mask = mask.bool()
    # where, not multiply: padded positions may hold inf/nan old or ref log-probs.
    token_loss = torch.where(mask, token_loss, 0.0)  # [B, T]
    masked_sum = token_loss.sum()
    if loss_type == "grpo":
        per_sequence = token_loss.sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
        return per_sequence.mean()
    if loss_type in ("bnpo", "dapo"):
        denominator = mask.sum().clamp(min=1) if num_items is None else num_items
        return masked_sum / denominator
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        return masked_sum / (mask.shape[0] * max_completion_length)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def grpo_loss_ref(
    hidden, weight, targets, old_logprobs, ref_logprobs, advantages, mask, *,
    temperature=1.0, epsilon_low=0.2, epsilon_high=0.2, beta=0.0, loss_type="grpo",
    max_completion_length=None, num_items=None, compute_entropy=False,
):
    """Reference for `kernels.grpo_loss.fused_grpo_loss`: same arguments, same result."""
    batch, seq = targets.shape
    flat_hidden = hidden.reshape(batch * seq, -1)  # [B*T, H]
    logprobs, entropy = logprobs_entropy_ref(flat_hidden, weight, targets.reshape(-1), temperature)
    logprobs, entropy = logprobs.view(batch, seq), entropy.view(batch, seq)  # [B, T]
    token_loss, is_clipped, kl = grpo_token_loss(
        logprobs, old_logprobs, ref_logprobs, advantages[:, None], epsilon_low, epsilon_high, beta
    )
    loss = aggregate_token_loss(token_loss, mask, loss_type, max_completion_length, num_items)
    entropy = entropy if compute_entropy else None
    return loss, masked_means(mask, clip_fraction=is_clipped, kl=kl, entropy=entropy)


def masked_means(mask, **values):
    """Mean of each [B, T] value over the masked tokens; None values are left out."""
    mask = mask.bool()
    n_tokens = mask.sum().clamp(min=1)
    return {
        name: torch.where(mask, _upcast(value.detach()), 0.0).sum() / n_tokens
        for name, value in values.items() if value is not None
    }
