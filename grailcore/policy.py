"""The trained causal LM behind ONE forward that returns completion log-probs.

Wrapping the HF model this way keeps the whole computation (decoder body + fused
lm-head log-probs) inside a single root module call, so FSDP2's root hooks gather the
embedding / lm-head shards around it; checkpoint and export use `.lm`, the HF model.
"""

from __future__ import annotations

import torch

from grailcore.token_logprobs import TokenLogprobs, token_logprobs
from grailcore.prefix import shared_prefix_logprobs


class PolicyModel(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module, impl: str = "fused", chunk_size: int | None = None):
        super().__init__()
        self.lm = lm
        self.impl = impl
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, *,
                temperature: float, completion_mask: torch.Tensor | None = None,
                return_entropy: bool = False, prefix_sharing: bool = False) -> TokenLogprobs:
        """input_ids/attention_mask [B, L]; returns [B, T = logits_to_keep] log-probs.
        prefix_sharing: one decoder pass per distinct prompt (`grailcore.prefix`)."""
        forward = shared_prefix_logprobs if prefix_sharing else token_logprobs
        return forward(self.lm, input_ids, attention_mask, logits_to_keep, temperature=temperature,
                       impl=self.impl, chunk_size=self.chunk_size, completion_mask=completion_mask,
                       return_entropy=return_entropy)
