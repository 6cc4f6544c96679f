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
    (optional) marks the tokens wanted; the others give 0, and cost nothing when fused.
    impl "fused": `kernels.fused_linear_logprobs` (chunk_size rows at a time);
    "naive": log_softmax over the full logits, the reference the fused path must match.
    Temperature must be the sampling temperature, or the ratios compare different
    distributions.
    """
    if impl not in ("fused", "naive"):
        raise ValueError(f"impl must be 'fused' or 'naive', got {impl!r}")
    if not 1 <= logits_to_keep < input_ids.shape[1]:
        raise ValueError(f"logits_to_keep must be in [1, L={input_ids.shape[1]}) (a prompt token comes first), "
                         f"got {logits_to_keep}")
    weight = _output_weight(model)  # [V, H]
    hidden = completion_hidden_states(model, input_ids, attention_mask, logits_to_keep)  # [B, T, H]
    targets = input_ids[:, -logits_to_keep:]  # [B, T]
    if completion_mask is not None:
        targets = targets.masked_fill(~completion_mask.bool(), IGNORE_INDEX)
    flat_hidden, flat_targets = hidden.flatten(0, 1), targets.flatten()  # [B*T, H], [B*T]
    if impl == "fused":
        # The kernel's own device dispatch (triton on CUDA, chunked torch elsewhere).
        out = fused_linear_logprobs(
            flat_hidden, weight, flat_targets, temperature,
            return_entropy=return_entropy, ignore_index=IGNORE_INDEX, chunk_size=chunk_size,
        )
        logprobs, entropy = out if return_entropy else (out, None)
    else:
        logprobs, entropy = _naive_logprobs(flat_hidden, weight, flat_targets, temperature, return_entropy)
    return TokenLogprobs(
        logprobs=logprobs.view_as(targets),
        entropy=None if entropy is None else entropy.view_as(targets),
    )


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
