"""Rollout engine on transformers `generate`: the fallback where vLLM is absent.

It samples from the module it is given. In a single process that module IS the
policy, so no weight sync is needed (`shares_weights`); otherwise it holds its own
copy and `update_weights` copies new tensors in.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from transformers import GenerationConfig

from grailcore.rng import derive_seed
from grailcore.rollout.next_token import trie_next_token_logprobs
from grailcore.rollout.precision import EngineDtype
from grailcore.types import Completion, SamplingParams


@contextlib.contextmanager
def _without_checkpoint_settings(model):
    """transformers fills every field a `generate` config leaves unset from the model's own
    `generation_config` (the checkpoint's: a repetition penalty, suppressed tokens, ...);
    with an empty one there, only transformers' neutral defaults fill them."""
    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = own


class HFEngine:
    def __init__(self, model, tokenizer, *, shares_weights: bool = True, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.shares_weights = shares_weights
        self.batch_size = batch_size
        """Max sequences per `generate` call (prompts x n), bounding memory."""
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.precision = EngineDtype(dtype, f"the HF engine samples from the policy's weights (model.dtype={dtype})")

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if params.greedy and params.n != 1:
            raise ValueError("greedy decoding with n > 1 gives n identical samples; use temperature > 0")
        if params.seeds is not None and len(params.seeds) != len(prompt_token_ids):
            raise ValueError(f"params.seeds has {len(params.seeds)} seeds for {len(prompt_token_ids)} prompts")
        per_call = max(1, self.batch_size // params.n)
        results: list[list[Completion]] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(prompt_token_ids), per_call):
                results.extend(self._generate_batch(prompt_token_ids[start:start + per_call], params,
                                                    self._call_seed(params, start, per_call)))
        finally:
            self.model.train(was_training)
        return results

    @staticmethod
    def _call_seed(params: SamplingParams, start: int, per_call: int) -> int | None:
        """The seed of the generate call over prompts [start, start + per_call): a hash of
        their own seeds, or of the call's seed and `start`, so no two calls draw one stream.
        (One call samples all its rows from one stream, so a prompt's samples depend on the
        prompts batched with it; both are the same again on resume.)"""
        if params.seeds is not None:
            return derive_seed(*params.seeds[start:start + per_call])
        return None if params.seed is None else derive_seed(params.seed, start)

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams,
                        seed: int | None) -> list[list[Completion]]:
        pad_id = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        # Left padding so every prompt ends where generation starts.
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention_mask[i, width - len(p):] = 1
        if seed is not None:
            torch.manual_seed(seed)
        config = self._generation_config(params)  # before the model's own config is set aside: its EOS ids count
        with _without_checkpoint_settings(self.model):
            out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                      generation_config=config)
        new_tokens = out.sequences[:, width:]  # [P*n, T_new]
        # Raw logits / T: the same distribution the trainer's log-probs use (top-p aside).
        temperature = 1.0 if params.greedy else params.temperature
        logits = torch.stack(out.logits, dim=1).float() / temperature  # [P*n, T_new, V]
        all_logprobs = torch.log_softmax(logits, dim=-1)
        logprobs = all_logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        watch = list(params.watch_token_ids)
        watched = all_logprobs[..., watch].cpu() if watch else None  # SamplingParams: only at T with top_p = 1
        return self._to_completions(new_tokens.cpu(), logprobs.cpu(), len(prompts), params.n,
                                    (watch, watched) if watched is not None else None)

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        """Every setting that shapes the sampled distribution, set here: plain sampling from
        softmax(logits / T) (top-p aside), which is what the trainer scores. Unset fields
        fall back to transformers' neutral defaults (see `_without_checkpoint_settings`);
        top_k=0 because that default is 50."""
        sampling = {} if params.greedy else dict(temperature=params.temperature, top_p=params.top_p, top_k=0,
                                                 typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
        return GenerationConfig(
            do_sample=not params.greedy, **sampling, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
            max_new_tokens=params.max_tokens, num_beams=1, num_return_sequences=params.n,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self._stop_ids(),
            return_dict_in_generate=True, output_logits=True, use_cache=True)

    def _stop_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif gen_eos:
            ids.update(gen_eos)
        return sorted(i for i in ids if i is not None)

    def _to_completions(self, tokens, logprobs, n_prompts: int, n: int, watched=None) -> list[list[Completion]]:
        """`watched`: (ids, [P*n, T_new, len(ids)] log-probs) to report per step, or None."""
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
                steps = None
                if watched is not None:
                    watch, values = watched
                    steps = tuple(dict(zip(watch, step)) for step in values[row, :len(ids)].tolist())
                group.append(Completion(text=text, token_ids=tuple(ids),
                                        logprobs=tuple(logprobs[row, :len(ids)].tolist()),
                                        finish_reason=finish, watched=steps))
            grouped.append(group)
        return grouped

    def load_units(self, names: set[str]) -> set[str]:
        """Any subset of parameters can be updated on its own here."""
        return set(names)

    def next_token_logprobs(self, sequences: list[list[int]], token_ids: list[list[int]],
                            temperature: float) -> list[list[float]]:
        """The protocol's scoring pass, on the module this engine samples from (sequences
        sharing a prompt run as one packed trie, see `grailcore.rollout.next_token`)."""
        return trie_next_token_logprobs(self.model, sequences, token_ids, temperature)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the given HF-named tensors (all or some) into the engine's own model."""
        if self.shares_weights:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                params[name].copy_(tensor.to(params[name].dtype))

    def close(self) -> None:
        self.model = None
