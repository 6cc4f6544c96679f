"""Per-token log-probs [B, T] float32 (and entropy) of the completion tokens under an HF
causal LM, for the loss (policy) and the KL (reference). The fused path goes through
`kernels` and never holds the [B*T, V] logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from kernels.logprobs import fused_linear_logprobs

IGNORE_INDEX = -100
# Config fields of models whose logits are not plain `lm_head(h)`; both paths here
# would silently compute something else, so such models are refused.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass(frozen=True)
class TokenLogprobs:
    logprobs: torch.Tensor
    """[B, T] float32, log p(token) under softmax(logits / temperature); 0 where masked."""
    entropy: torch.Tensor | None
    """[B, T] float32 entropy of that distribution (0 where masked); None unless asked."""


@dataclass(frozen=True)
class TokenHidden:
    """What the lm head needs for the K trained tokens of a [B, T] completion block; made
    by the padded forward (`padded_token_hidden`) or the prefix-shared one (`grailcore.prefix`)."""

    hidden: torch.Tensor
    """[M, H] final (normed) hidden states."""
    rows: torch.Tensor
    """[K] long: the row of `hidden` that predicts each trained token."""
    targets: torch.Tensor
    """[K] long: the trained tokens."""
    index: torch.Tensor
    """[K] long: flat position b * T + t of each token in the [B, T] block."""
    weight: torch.Tensor
    """[V, H] the lm head (the embedding when tied)."""
    shape: tuple[int, int]
    """(B, T)."""


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    *,
    temperature: float = 1.0,
    impl: Literal["fused", "naive"] = "fused",
    chunk_size: int | None = None,
    completion_mask: torch.Tensor | None = None,
    return_entropy: bool = False,
) -> TokenLogprobs:
    """Log-probs of the last `logits_to_keep` tokens of each row.

    input_ids, attention_mask: [B, L] = left-padded prompt + right-padded completion;
    the completion is the last T = logits_to_keep columns. completion_mask [B, T]
    (optional) marks the tokens wanted; the others give 0 and cost nothing.
    impl "fused": `kernels.fused_linear_logprobs` (chunk_size rows at a time);
    "naive": log_softmax over the full logits, the reference the fused path must match.
    Temperature must be the sampling temperature, or the ratios compare different
    distributions.
    """
    tokens = padded_token_hidden(model, input_ids, attention_mask, logits_to_keep, completion_mask)
    return logprob_head(tokens, temperature=temperature, impl=impl, chunk_size=chunk_size,
                        return_entropy=return_entropy)


def padded_token_hidden(model, input_ids, attention_mask, logits_to_keep, completion_mask=None) -> TokenHidden:
    """`TokenHidden` of the completion tokens from one padded [B, L] decoder pass."""
    if not 1 <= logits_to_keep < input_ids.shape[1]:
        raise ValueError(f"logits_to_keep must be in [1, L={input_ids.shape[1]}) (a prompt token comes first), "
                         f"got {logits_to_keep}")
    weight = _output_weight(model)  # [V, H]
    hidden = completion_hidden_states(model, input_ids, attention_mask, logits_to_keep)  # [B, T, H]
    if completion_mask is None:  # every completion column, padding included
        index = torch.arange(input_ids.shape[0] * logits_to_keep, device=input_ids.device)
    else:
        index = completion_mask.bool().reshape(-1).nonzero().squeeze(1)  # [K]
    return TokenHidden(hidden=hidden.flatten(0, 1), rows=index, targets=input_ids[:, -logits_to_keep:].reshape(-1)[index],
                       index=index, weight=weight, shape=(input_ids.shape[0], logits_to_keep))


def logprob_head(tokens: TokenHidden, *, temperature: float = 1.0, impl: str = "fused",
                 chunk_size: int | None = None, return_entropy: bool = False) -> TokenLogprobs:
    """[B, T] log-probs (and entropy) of the tokens; 0 elsewhere. Without tokens the zeros
    still depend on every hidden state and the head, so backward reaches every layer (FSDP2
    ranks must all run the same backward)."""
    if impl not in ("fused", "naive"):
        raise ValueError(f"impl must be 'fused' or 'naive', got {impl!r}")
    hidden, weight = tokens.hidden, tokens.weight
    if impl == "fused":
        # The kernel's own device dispatch (triton on CUDA, chunked torch elsewhere).
        targets = torch.full(hidden.shape[:1], IGNORE_INDEX, dtype=torch.long, device=hidden.device)
        targets[tokens.rows] = tokens.targets
        out = fused_linear_logprobs(hidden, weight, targets, temperature, return_entropy=return_entropy,
                                    ignore_index=IGNORE_INDEX, chunk_size=chunk_size)
        logprobs, entropy = out if return_entropy else (out, None)
        logprobs, entropy = logprobs[tokens.rows], None if entropy is None else entropy[tokens.rows]
    else:
        logprobs, entropy = _naive_logprobs(hidden[tokens.rows], weight, tokens.targets, temperature, return_entropy)
    batch, seq = tokens.shape

    def scatter(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(batch * seq).index_put((tokens.index,), values).view(batch, seq)

    logprobs = scatter(logprobs)
    if tokens.rows.numel() == 0:
        logprobs = logprobs + 0 * (hidden.sum() + weight.sum()).float()
    return TokenLogprobs(logprobs=logprobs, entropy=None if entropy is None else scatter(entropy))


def completion_hidden_states(model, input_ids, attention_mask, logits_to_keep) -> torch.Tensor:
    """Final (normed) hidden states [B, T, H] at the positions that predict the last
    T = logits_to_keep tokens: position t predicts token t + 1."""
    # Number positions as `generate` and vLLM do (first real token = 0): RoPE ignores
    # the left-padding shift only up to rounding, absolute positions not at all.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
    body = model.get_decoder()
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if getattr(out, "last_hidden_state", None) is None:
        raise TypeError(f"{type(model).__name__}.get_decoder() returned {type(body).__name__}, which gives no "
                        "last_hidden_state: token_logprobs needs an HF causal LM with a separate decoder body")
    return out.last_hidden_state[:, -logits_to_keep - 1 : -1]  # [B, T, H]


def _output_weight(model) -> torch.Tensor:
    """The lm_head weight [V, H] (the embedding itself when tied)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: token_logprobs needs a bias-free linear lm_head")
    config = getattr(model, "config", None)
    transforms = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
    if transforms:
        raise ValueError(f"{type(model).__name__} transforms its logits ({', '.join(transforms)}); "
                         "token_logprobs computes plain lm_head(h) / temperature and does not support it")
    return head.weight


def _naive_logprobs(hidden, weight, targets, temperature, return_entropy):
    """hidden [N, H], weight [V, H], targets [N] -> logprobs [N], entropy [N] or None."""
    log_probs = torch.log_softmax(F.linear(hidden, weight).float() / temperature, dim=-1)  # [N, V]
    valid = targets != IGNORE_INDEX  # [N]
    picked = log_probs.gather(-1, torch.where(valid, targets, 0)[:, None]).squeeze(-1)  # [N]
    logprobs = torch.where(valid, picked, 0.0)
    entropy = None
    if return_entropy:
        entropy = torch.where(valid, -(log_probs.exp() * log_probs).sum(-1), 0.0)  # [N]
    return logprobs, entropy
