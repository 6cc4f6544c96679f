"""The engine protocol. Engines know nothing about tasks or rewards."""

from __future__ import annotations

from typing import Iterable, Protocol

import torch

from grailcore.rollout.precision import EngineDtype
from grailcore.types import Completion, SamplingParams


class RolloutEngine(Protocol):
    precision: EngineDtype
    """The dtype the engine samples in, and why (logged at start, noted in config.yaml)."""

    def generate(
        self, prompt_token_ids: list[list[int]], params: SamplingParams
    ) -> list[list[Completion]]:
        """For each prompt (already chat-templated token ids), `params.n` completions."""
        ...

    def load_units(self, names: set[str]) -> set[str]:
        """`names` completed to what the engine must receive together (fused layers)."""
        ...

    def next_token_logprobs(self, sequences: list[list[int]], token_ids: list[list[int]],
                            temperature: float) -> list[list[float]]:
        """For each token sequence (a chat-templated prompt and whatever follows it), the
        log-probability under softmax(logits / temperature) that the next token is each of
        `token_ids[i]` (top_p ignored): `out[i][j]` = log p(token_ids[i][j] | sequences[i])."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights (HF names: all, or whole `load_units`) into the engine;
        weights not given stay; must reset any cache."""
        ...

    def close(self) -> None: ...
