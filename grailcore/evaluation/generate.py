"""Sample evaluation completions through any `RolloutEngine` (greedy when k = 1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from grailcore.data.schema import Example

if TYPE_CHECKING:  # torch-free import: scoring completion files needs no torch
    from grailcore.rollout.base import RolloutEngine
    from grailcore.types import Completion, SamplingParams


def eval_sampling_params(samples_per_row: int, temperature: float, max_tokens: int, top_p: float = 1.0,
                         seed: int | None = None) -> SamplingParams:
    """k = 1 is greedy (the model's single best guess); k > 1 samples at `temperature`."""
    from grailcore.types import SamplingParams

    if samples_per_row < 1:
        raise ValueError(f"samples_per_row must be >= 1, got {samples_per_row}")
    if samples_per_row > 1 and temperature <= 0:
        raise ValueError("samples_per_row > 1 needs temperature > 0 (greedy samples would all be equal)")
    return SamplingParams(n=samples_per_row, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                          greedy=samples_per_row == 1, seed=seed)


def generate_raw(engine: RolloutEngine, tokenizer, examples: Sequence[Example], params: SamplingParams,
                 chunk_size: int = 64) -> list[list[Completion]]:
    """`params.n` completions per example, in example order (chunks bound host memory)."""
    from grailcore.data.prompt import encode_prompt

    out: list[list[Completion]] = []
    for start in range(0, len(examples), chunk_size):
        chunk = examples[start:start + chunk_size]
        prompts = [encode_prompt(tokenizer, ex) for ex in chunk]
        results = engine.generate(prompts, params)
        if len(results) != len(chunk) or any(len(r) != params.n for r in results):
            raise RuntimeError(f"engine returned {[len(r) for r in results]} completions for "
                               f"{len(chunk)} prompts x n={params.n}")
        out.extend(results)
    return out


def generate_completions(engine: RolloutEngine, tokenizer, examples: Sequence[Example], samples_per_row: int,
                         temperature: float, max_tokens: int, top_p: float = 1.0) -> list[list[str]]:
    """Completion texts per example: `samples_per_row` each, the first one greedy when k = 1."""
    params = eval_sampling_params(samples_per_row, temperature, max_tokens, top_p)
    return [[c.text for c in row] for row in generate_raw(engine, tokenizer, examples, params)]


def generate_permuted(engine: RolloutEngine, tokenizer, examples: Sequence[Example], permutations: int,
                      params: SamplingParams, seed: int = 0) -> list[tuple[list[Example], list[list[Completion]]]]:
    """Order robustness: sample every row again under `permutations` seeded option orders;
    returns (permuted copy of `examples`, its completions) per order (`evaluate(permuted=...)`)."""
    from grailcore.evaluation.order import permuted_copies

    return [(copy, generate_raw(engine, tokenizer, copy, params))
            for copy in permuted_copies(examples, permutations, seed)]
