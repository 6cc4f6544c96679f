"""The trained causal LM behind ONE forward that returns completion log-probs, or the loss.

Wrapping the HF model this way keeps the whole computation (decoder body + fused lm-head
log-probs or loss) inside a single root module call, so FSDP2's root hooks gather the
embedding / lm-head shards around it; checkpoint and export use `.lm`, the HF model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from grailcore.token_logprobs import TokenHidden, TokenLogprobs, logprob_head, padded_token_hidden
from grailcore.prefix import shared_token_hidden


class PolicyModel(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module, impl: str = "fused", chunk_size: int | None = None):
        super().__init__()
        self.lm = lm
        self.impl = impl
        """"fused" (kernels/, no [tokens, vocab] tensor) or "naive" (full logits, the reference)."""
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, *,
                temperature: float, completion_mask: torch.Tensor | None = None,
                return_entropy: bool = False, prefix_sharing: bool = False,
                loss: Callable[..., Any] | None = None) -> TokenLogprobs | Any:
        """input_ids/attention_mask [B, L]; returns [B, T = logits_to_keep] log-probs, or, given
        `loss`, loss(token_hidden, temperature=..., chunk_size=...) for the trained tokens'
        `TokenHidden` (e.g. `grailcore.loss.fused_loss`). prefix_sharing: one decoder pass
        per distinct prompt (`grailcore.prefix`)."""
        hidden_of = shared_token_hidden if prefix_sharing else padded_token_hidden
        tokens: TokenHidden = hidden_of(self.lm, input_ids, attention_mask, logits_to_keep, completion_mask)
        if loss is not None:
            return loss(tokens, temperature=temperature, chunk_size=self.chunk_size)
        return logprob_head(tokens, temperature=temperature, impl=self.impl, chunk_size=self.chunk_size,
                            return_entropy=return_entropy)
