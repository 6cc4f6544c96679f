"""Fused GRPO loss: lm-head + log-softmax + the objective (`kernels.objective`) chunk by
chunk, straight from the last hidden states. Each chunk's gradient is formed while its
softmax exists, so backward only hands over stored grads: three [n, V]-sized matmuls per
chunk (like unfused autograd), one [V, n] buffer, never the [N, V] logits.

Sequence-level objectives (GSPO, the engine sequence mask) need a sequence's tokens
together: chunks then hold whole sequences; a sequence longer than a chunk switches to
two passes (log-probs of every token, then the chunks again for the gradient: one more
matmul per chunk, memory unchanged)."""

import dataclasses

import torch

from kernels.logprobs import GradAccumulator, check_inputs, grad_logits_triton, resolve_impl, row_stats_triton
from kernels.objective import Objective, Tokens, merge_stats, objective_loss, padded_tokens, summarize

_IGNORE = -100
# Rows per chunk: from 512 rows the three matmuls run near their large-batch speed on CPU
# (fewer rows trade time for memory, see bench/RESULTS.md); at most 2**26 logits (256 MiB).
_CHUNK_ROWS, _CHUNK_ELEMENTS = 512, 1 << 26


def default_chunk_size(n_rows, vocab_size):
    """Rows per chunk of the fused GRPO loss: 512, fewer when V is so large that 512 rows of
    logits would pass 2**26 elements (V > 131072), never more than there are rows."""
    return max(1, min(n_rows, _CHUNK_ROWS, _CHUNK_ELEMENTS // vocab_size))


class _TorchChunk:
    """One chunk's softmax as e = exp(z - max), kept transposed, [V, n], in one fp32 buffer
    reused by every chunk (W @ h^T runs faster on CPU than h @ W^T). With s = sum(e) and
    E = e^T W [n, H], the chunk needs no other [V, n] pass: sum(p z) = rowdot(h, E) / s
    (entropy), dL/dh = (g W[t] - (g / s) E) / T and dL/dW = onehot(t)^T (g h) - e ((g / s) h),
    h the chunk's hidden rows divided by T."""

    def __init__(self, rows, weight):
        self.weight, self.vocab = weight, weight.shape[0]
        self.exp = torch.empty(self.vocab * rows, dtype=torch.float32, device=weight.device)
        self.low = None if weight.dtype == torch.float32 else torch.empty_like(self.exp, dtype=weight.dtype)

    def forward(self, hidden_rows, targets, want_entropy):
        """(logprobs [n], entropy [n] or None) in fp32; keeps the softmax for `add_grads`."""
        n = hidden_rows.shape[0]
        z = self.exp[: self.vocab * n].view(self.vocab, n)  # [V, n]
        if self.low is None:
            torch.mm(self.weight, hidden_rows.T, out=z)
        else:  # the matmul in the input dtype, as a bf16 lm head computes it; the rest in fp32
            z.copy_(torch.mm(self.weight, hidden_rows.T, out=self.low[: self.vocab * n].view(self.vocab, n)))
        target_z = z.gather(0, targets[None, :]).squeeze(0)
        row_max = z.amax(0)
        self.e = z.sub_(row_max).exp_()  # [V, n], z is gone
        self.sum_exp = self.e.sum(0)
        lse = row_max + self.sum_exp.log()
        self.hidden_rows, self.targets, self._e_weight, self._e_low = hidden_rows, targets, None, None
        entropy = None
        if want_entropy:
            entropy = lse - (hidden_rows.float() * self.e_weight().float()).sum(1) / self.sum_exp
        return target_z - lse, entropy

    def e_low(self):
        """e [V, n] in the input dtype, for the matmuls (the fp32 buffer itself for fp32 inputs)."""
        if self._e_low is None:
            n = self.e.shape[1]
            self._e_low = self.e if self.low is None else self.low[: self.vocab * n].view(self.vocab, n).copy_(self.e)
        return self._e_low

    def e_weight(self):
        """E = e^T W [n, H] (a transposed view), in the input dtype."""
        if self._e_weight is None:
            self._e_weight = (self.weight.T @ self.e_low()).T  # W^T e: ~7% faster than e^T W here
        return self._e_weight

    def add_grads(self, rows, grad_logprobs, grads):
        """Add this chunk's share of d(loss)/d(hidden, weight), given d(loss)/d(logprobs) [n]."""
        scale = grad_logprobs / self.sum_exp  # [n]: dL/dz = g onehot - scale * e
        if grads.grad_hidden is not None:
            grad_rows = grad_logprobs[:, None] * self.weight[self.targets].float()
            grad_rows -= scale[:, None] * self.e_weight().float()
            grads.set_hidden(rows, grad_rows)
        if grads.need_weight:
            hidden = self.hidden_rows.float()
            grads.add_weight(self.e_low(), (hidden * -scale[:, None]).to(self.weight.dtype))
            grads.add_weight_rows(self.targets, hidden * grad_logprobs[:, None])


class _TritonChunk:
    """The same contract with the Triton row kernels (CUDA): the logits buffer becomes
    dL/dz in place, then two matmuls."""

    def __init__(self, rows, weight):
        self.weight = weight
        self.buffer = torch.empty(rows, weight.shape[0], dtype=weight.dtype, device=weight.device)

    def forward(self, hidden_rows, targets, want_entropy):
        logits = torch.mm(hidden_rows, self.weight.T, out=self.buffer[: hidden_rows.shape[0]])
        self.lse, logprobs, entropy = row_stats_triton(logits, targets, want_entropy)
        self.logits, self.hidden_rows, self.targets = logits, hidden_rows, targets
        return logprobs, entropy

    def add_grads(self, rows, grad_logprobs, grads):
        grad_logits = grad_logits_triton(self.logits, self.targets, self.lse, None, grad_logprobs, None)
        grads.add(rows, self.hidden_rows, grad_logits)


def chunk_sizes(sequence, chunk_size, whole_sequences):
    """Rows of consecutive chunks of tokens tagged with `sequence` [K]. whole_sequences: no
    chunk splits a sequence (its tokens must be contiguous); None if that cannot hold."""
    total = sequence.shape[0]
    if not whole_sequences:
        return [chunk_size] * (total // chunk_size) + ([total % chunk_size] if total % chunk_size else [])
    ids, lengths = torch.unique_consecutive(sequence, return_counts=True)
    if total == 0:
        return []
    if ids.unique().numel() != ids.numel() or int(lengths.max()) > chunk_size:
        return None
    sizes = [0]
    for length in lengths.tolist():
        if sizes[-1] + length > chunk_size:
            sizes.append(0)
        sizes[-1] += length
    return sizes


@dataclasses.dataclass
class _Out:
    """What the autograd function hands back besides the loss."""

    stats: dict | None = None
    logprobs: torch.Tensor | None = None


def _loss_and_grad(logprobs, tokens, objective, need_grad):
    """The objective on these tokens and d(loss)/d(logprobs) (None unless need_grad)."""
    with torch.enable_grad():  # autograd.Function.forward runs under no_grad
        logprobs = logprobs.detach().requires_grad_(need_grad)
        loss, stats = objective_loss(logprobs, tokens, objective)
        if not need_grad:
            return None, stats
        (grad,) = torch.autograd.grad(loss, logprobs, allow_unused=True)
    return (torch.zeros_like(logprobs) if grad is None else grad), stats


class _FusedGRPOLoss(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, targets, tokens, objective, temperature, want_entropy, chunk_size,
                impl, need_grads, out):
        sizes = chunk_sizes(tokens.sequence, chunk_size, objective.sequence_level)
        one_pass = sizes is not None
        sizes = sizes if one_pass else chunk_sizes(tokens.sequence, chunk_size, False)
        chunk = (_TritonChunk if impl == "triton" else _TorchChunk)(max(sizes, default=1), weight)
        grads = GradAccumulator(hidden, weight, *need_grads, temperature)
        logprobs = torch.zeros(rows.shape[0], dtype=torch.float32, device=hidden.device)
        empty = torch.zeros(0, dtype=torch.long, device=hidden.device)
        stats = _loss_and_grad(logprobs[empty], tokens.take(empty), objective, False)[1]  # every key, zeros
        entropy_sum = hidden.new_zeros((), dtype=torch.float32)

        def chunks():
            start = 0
            for size in sizes:
                index = torch.arange(start, start + size, device=hidden.device)  # into the K tokens
                hidden_rows = hidden.index_select(0, rows[index])
                if temperature != 1.0:
                    hidden_rows.div_(temperature)  # z / T folded into the small [n, H] side
                yield index, hidden_rows
                start += size

        for index, hidden_rows in chunks():  # one pass: each chunk's gradient while its softmax exists
            logprobs[index], entropy = chunk.forward(hidden_rows, targets[index], want_entropy)
            if want_entropy:
                entropy_sum += entropy.sum()
            if one_pass:
                grad, part = _loss_and_grad(logprobs[index], tokens.take(index), objective, any(need_grads))
                stats = merge_stats(stats, part)
                if grad is not None:
                    chunk.add_grads(rows[index], grad, grads)
        if not one_pass:  # every log-prob first, then the chunks again
            grad_logprobs, stats = _loss_and_grad(logprobs, tokens, objective, any(need_grads))
            for index, hidden_rows in chunks() if grad_logprobs is not None else ():
                chunk.forward(hidden_rows, targets[index], False)
                chunk.add_grads(rows[index], grad_logprobs[index], grads)
        if want_entropy:
            stats["entropy"] = entropy_sum
        out.stats, out.logprobs = stats, logprobs
        ctx.grads = grads.result()  # ours, not inputs: backward scales them in place
        return stats["loss"].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.grads
        del ctx.grads
        if grad_loss.item() != 1.0:
            for grad in (grad_hidden, grad_weight):
                if grad is not None:
                    grad.mul_(grad_loss.to(grad.dtype))
        return grad_hidden, grad_weight, *([None] * 10)


def fused_grpo_loss_tokens(hidden, weight, rows, targets, tokens: Tokens, objective: Objective, *,
                           temperature=1.0, compute_entropy=False, chunk_size=None, impl="auto"):
    """The objective over K tokens straight from hidden states: token k's log-prob is that of
    targets[k] under softmax(hidden[rows[k]] @ weight.T / temperature).

    hidden [N, H], weight [V, H], rows/targets [K] long, tokens: `kernels.objective.Tokens`
    of K tokens. Returns (loss, stats, logprobs): the differentiable scalar loss (gradients
    reach hidden and weight through the log-probs only), the objective's detached sums
    (plus "entropy" if asked) and the detached fp32 log-probs [K]."""
    check_inputs(hidden, weight, torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device), _IGNORE)
    if rows.shape != targets.shape or tokens.sequence.shape != rows.shape:
        raise ValueError(f"rows {tuple(rows.shape)}, targets {tuple(targets.shape)} and tokens "
                         f"{tuple(tokens.sequence.shape)} must all be [K]")
    if targets.numel() and (targets.min() < 0 or targets.max() >= weight.shape[0]):
        raise ValueError(f"targets must be in [0, {weight.shape[0]}); got [{targets.min()}, {targets.max()}]")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    need_grads = tuple(torch.is_grad_enabled() and x.requires_grad for x in (hidden, weight))
    out = _Out()
    loss = _FusedGRPOLoss.apply(
        hidden, weight, rows.long(), targets.long(), tokens.float(), objective, float(temperature), compute_entropy,
        chunk_size or default_chunk_size(rows.shape[0], weight.shape[0]), resolve_impl(impl, hidden.device),
        need_grads, out,
    )
    return loss, out.stats, out.logprobs


def fused_grpo_loss(
    hidden, weight, targets, old_logprobs, ref_logprobs, advantages, mask, *, temperature=1.0,
    epsilon_low=0.2, epsilon_high=0.2, beta=0.0, loss_type="grpo", policy_loss="grpo", kl_estimator="k3",
    max_completion_length=None, num_items=None, num_sequences=None, engine_logprobs=None, engine_is_cap=None,
    engine_seq_band=None, compute_entropy=False, chunk_size=None, impl="auto",
):
    """GRPO loss of a [B, T] batch straight from the last hidden states; same contract as
    `kernels.reference.grpo_loss_ref`.

    hidden [B, T, H] or [B*T, H], weight [V, H], targets/old/ref/engine/mask [B, T] (old
    None: on-policy; ref None: no KL; engine None: no engine terms), advantages [B]. The
    objective's arguments are `kernels.objective.Objective`'s; the aggregation's are
    `aggregation_weights`'. Returns (loss scalar, stats): `kernels.objective.summarize`'s
    means over the masked tokens (entropy if `compute_entropy`)."""
    batch, seq = targets.shape
    index, tokens = padded_tokens(
        mask, advantages, loss_type=loss_type, targets=targets, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
        engine_logprobs=engine_logprobs, max_completion_length=max_completion_length, num_items=num_items,
        num_sequences=num_sequences)
    flat_targets = targets.reshape(-1)[index]
    if flat_targets.numel() and (flat_targets.min() < 0 or flat_targets.max() >= weight.shape[0]):
        raise ValueError(f"targets under mask must be in [0, {weight.shape[0]}); "
                         f"got [{flat_targets.min()}, {flat_targets.max()}]")
    objective = Objective(policy_loss=policy_loss, epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
                          kl_estimator=kl_estimator, engine_is_cap=engine_is_cap, engine_seq_band=engine_seq_band)
    loss, stats, _ = fused_grpo_loss_tokens(
        hidden.reshape(batch * seq, hidden.shape[-1]), weight, index, flat_targets, tokens, objective,
        temperature=temperature, compute_entropy=compute_entropy, chunk_size=chunk_size, impl=impl,
    )
    return loss, summarize(stats)
