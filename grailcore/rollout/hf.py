"""Rollout engine on transformers `generate`: the fallback where vLLM is absent.

It samples from the module it is given. In a single process that module IS the
policy, so no weight sync is needed (`shares_weights`); otherwise it holds its own
copy and `update_weights` copies new tensors in.
"""

from __future__ import annotations

from typing import Iterable

import torch

from grailcore.rollout.next_token import trie_next_token_logprobs
from grailcore.types import Completion, SamplingParams


class HFEngine:
    def __init__(self, model, tokenizer, *, shares_weights: bool = True, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.shares_weights = shares_weights
        self.batch_size = batch_size
        """Max sequences per `generate` call (prompts x n), bounding memory."""

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if params.greedy and params.n != 1:
            raise ValueError("greedy decoding with n > 1 gives n identical samples; use temperature > 0")
        per_call = max(1, self.batch_size // params.n)
        results: list[list[Completion]] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(prompt_token_ids), per_call):
                results.extend(self._generate_batch(prompt_token_ids[start:start + per_call], params))
        finally:
            self.model.train(was_training)
        return results

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        pad_id = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        # Left padding so every prompt ends where generation starts.
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention_mask[i, width - len(p):] = 1
        generator_kwargs = {}
        if params.seed is not None:
            torch.manual_seed(params.seed)
        out = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            do_sample=not params.greedy, temperature=params.temperature if not params.greedy else None,
            top_p=params.top_p if not params.greedy else None, top_k=None,
            max_new_tokens=params.max_tokens, num_return_sequences=params.n,
            pad_token_id=pad_id, eos_token_id=self._stop_ids(),
            return_dict_in_generate=True, output_logits=True, use_cache=True, **generator_kwargs,
        )
        new_tokens = out.sequences[:, width:]  # [P*n, T_new]
        # Raw logits / T: the same distribution the trainer's log-probs use (top-p aside).
        temperature = 1.0 if params.greedy else params.temperature
        logits = torch.stack(out.logits, dim=1).float() / temperature  # [P*n, T_new, V]
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        return self._to_completions(new_tokens.cpu(), logprobs.cpu(), len(prompts), params.n)

    def _stop_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif gen_eos:
            ids.update(gen_eos)
        return sorted(i for i in ids if i is not None)

    def _to_completions(self, tokens, logprobs, n_prompts: int, n: int) -> list[list[Completion]]:
        stop_ids = set(self._stop_ids())
        grouped: list[list[Completion]] = []
        for p in range(n_prompts):
            group = []
            for j in range(n):
                row = p * n + j
                ids = tokens[row].tolist()
                end = next((k + 1 for k, t in enumerate(ids) if t in stop_ids), None)
                finish = "stop" if end is not None else "length"
                ids = ids[:end] if end is not None else ids
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                group.append(Completion(text=text, token_ids=tuple(ids),
                                        logprobs=tuple(logprobs[row, :len(ids)].tolist()),
                                        finish_reason=finish))
            grouped.append(group)
        return grouped

    def next_token_logprobs(self, sequences: list[list[int]], token_ids: list[list[int]],
                            temperature: float) -> list[list[float]]:
        """The protocol's scoring pass, on the module this engine samples from (sequences
        sharing a prompt run as one packed trie, see `grailcore.rollout.next_token`)."""
        return trie_next_token_logprobs(self.model, sequences, token_ids, temperature)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.shares_weights:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                params[name].copy_(tensor.to(params[name].dtype))

    def close(self) -> None:
        self.model = None
