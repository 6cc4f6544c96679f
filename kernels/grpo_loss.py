"""Fused GRPO loss: lm-head + log-softmax + clipped policy loss + k3 KL in one chunked
pass. Each chunk's gradient is formed while its logits exist, so the backward pass only
scales stored grads: three [n, V] matmuls per chunk, like unfused autograd, and no [N, V]."""

import dataclasses

import torch

from kernels.logprobs import Chunks, GradAccumulator, check_inputs, default_chunk_size, resolve_impl, row_ops
from kernels.reference import LOSS_TYPES, grpo_token_loss

_IGNORE = -100


@dataclasses.dataclass(frozen=True)
class _PolicyTerms:
    """Everything the per-token loss needs besides log-probs; tensors are flat [B*T]."""

    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    advantages: torch.Tensor  # per token: each sequence's advantage repeated
    weights: torch.Tensor  # aggregation weights: loss = sum(weights * token_loss)
    epsilon_low: float
    epsilon_high: float
    beta: float

    def chunk_loss(self, logprobs, rows):
        """For the tokens `rows` [n] with log-probs [n]: d(loss)/d(logprobs) [n] and the
        sums {loss, clipped, kl} that this chunk adds to the totals."""
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        with torch.enable_grad():  # autograd.Function.forward runs under no_grad
            logprobs = logprobs.detach().requires_grad_()
            token_loss, is_clipped, kl = grpo_token_loss(
                logprobs, pick(self.old_logprobs), pick(self.ref_logprobs), self.advantages[rows],
                self.epsilon_low, self.epsilon_high, self.beta,
            )
            loss = (token_loss * self.weights[rows]).sum()
            (grad,) = torch.autograd.grad(loss, logprobs)
        kl_sum = kl.detach().sum() if kl is not None else loss.new_zeros(())
        return grad, {"loss": loss.detach(), "clipped": is_clipped.sum().float(), "kl": kl_sum}


class _FusedGRPOLoss(torch.autograd.Function):
    """Forward computes the loss and its grads chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, terms, temperature, want_entropy, chunk_size, impl, need_grads):
        rows = (targets != _IGNORE).nonzero().squeeze(1)  # [N_valid]
        chunks = Chunks(hidden, weight, rows, chunk_size, temperature)
        ops = row_ops(impl, chunks.chunk_size, weight.shape[0], hidden.dtype, hidden.device)
        grads = GradAccumulator(hidden, weight, *need_grads, temperature)
        totals = dict.fromkeys(("loss", "clipped", "kl", "entropy"), hidden.new_zeros((), dtype=torch.float32))
        for chunk_rows, hidden_rows, logits in chunks:
            chunk_targets = targets[chunk_rows]
            lse, logprobs, entropy = ops.stats(logits, chunk_targets, want_entropy)
            grad_logprobs, sums = terms.chunk_loss(logprobs, chunk_rows)
            if want_entropy:
                sums["entropy"] = entropy.sum()
            totals = {name: total + sums.get(name, 0.0) for name, total in totals.items()}
            if any(need_grads):  # logits become their grad here, while they exist
                grad_logits = ops.grad_logits(logits, chunk_targets, lse, None, grad_logprobs, None)
                grads.add(chunk_rows, hidden_rows, grad_logits)
        ctx.save_for_backward(*grads.result())
        means = torch.stack([totals["clipped"], totals["kl"], totals["entropy"]]) / max(len(rows), 1)
        ctx.mark_non_differentiable(means)
        return totals["loss"], means

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_means):
        scale = lambda grad: None if grad is None else grad * grad_loss.to(grad.dtype)  # noqa: E731
        grad_hidden, grad_weight = ctx.saved_tensors
        return scale(grad_hidden), scale(grad_weight), None, None, None, None, None, None, None


def aggregation_weights(mask, loss_type, max_completion_length=None, num_items=None):
    """[B, T] fp32 weights w with sum(w * token_loss) equal to
    `kernels.reference.aggregate_token_loss(token_loss, mask, ...)`."""
    mask = mask.bool()
    mask_f = mask.float()
    if loss_type == "grpo":
        return mask_f / (mask.sum(-1, keepdim=True).clamp(min=1) * mask.shape[0])
    if loss_type in ("bnpo", "dapo"):
        return mask_f / (mask.sum().clamp(min=1) if num_items is None else num_items)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        return mask_f / (mask.shape[0] * max_completion_length)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def _check_policy_inputs(targets, old_logprobs, ref_logprobs, advantages, mask, vocab_size):
    batch_seq = tuple(targets.shape)
    for name, value in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("mask", mask)):
        if value is not None and tuple(value.shape) != batch_seq:
            raise ValueError(f"{name} must be [B, T]={batch_seq} like targets, got {tuple(value.shape)}")
    if tuple(advantages.shape) != batch_seq[:1]:
        raise ValueError(f"advantages must be [B]={batch_seq[:1]}, got {tuple(advantages.shape)}")
    kept = targets[mask.bool()]
    if kept.numel() and (kept.min() < 0 or kept.max() >= vocab_size):
        raise ValueError(f"targets under mask must be in [0, {vocab_size}); got [{kept.min()}, {kept.max()}]")


def fused_grpo_loss(
    hidden, weight, targets, old_logprobs, ref_logprobs, advantages, mask, *, temperature=1.0,
    epsilon_low=0.2, epsilon_high=0.2, beta=0.0, loss_type="grpo", max_completion_length=None,
    num_items=None, compute_entropy=False, chunk_size=None, impl="auto",
):
    """GRPO loss straight from the last hidden states; same contract as
    `kernels.reference.grpo_loss_ref`.

    hidden [B, T, H] or [B*T, H], weight [V, H], targets/old/ref/mask [B, T] (old None:
    on-policy, ratio 1; ref None: no KL), advantages [B]. `num_items` replaces the token
    count for bnpo/dapo (e.g. the global count across ranks). Returns (loss scalar, stats)
    with stats' clip_fraction, kl (with ref) and entropy (if `compute_entropy`), means over
    masked tokens. Gradients reach hidden and weight through the log-probs only."""
    batch, seq = targets.shape
    flat_hidden = hidden.reshape(batch * seq, hidden.shape[-1])  # [B*T, H]
    _check_policy_inputs(targets, old_logprobs, ref_logprobs, advantages, mask, weight.shape[0])
    flat_targets = torch.where(mask.bool(), targets, _IGNORE).reshape(-1).long()  # [B*T]
    check_inputs(flat_hidden, weight, flat_targets, _IGNORE)
    flat = lambda x: None if x is None else x.reshape(-1).float()  # noqa: E731
    terms = _PolicyTerms(
        old_logprobs=flat(old_logprobs), ref_logprobs=flat(ref_logprobs),
        advantages=flat(advantages[:, None].expand(batch, seq)),
        weights=flat(aggregation_weights(mask, loss_type, max_completion_length, num_items)),
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
    )
    need_grads = tuple(torch.is_grad_enabled() and x.requires_grad for x in (hidden, weight))
    loss, means = _FusedGRPOLoss.apply(
        flat_hidden, weight, flat_targets, terms, float(temperature), compute_entropy,
        chunk_size or default_chunk_size(batch * seq, weight.shape[0]), resolve_impl(impl, hidden.device),
        need_grads,
    )
    stats = {"clip_fraction": means[0]}
    if ref_logprobs is not None:
        stats["kl"] = means[1]
    if compute_entropy:
        stats["entropy"] = means[2]
    return loss, stats
