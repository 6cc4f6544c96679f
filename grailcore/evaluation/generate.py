"""Sample evaluation completions through any `RolloutEngine` (greedy when k = 1) and read
the model's answer-slot distribution of each (`answer_slot`), chunk by chunk, so a vLLM
scoring pass finds the chunk's prompts and completions still in its prefix cache."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

from grailcore.data.schema import Example
from grailcore.evaluation.completions_io import EvalSamples

if TYPE_CHECKING:  # torch-free import: scoring completion files needs no torch
    from grailcore.rollout.base import RolloutEngine
    from grailcore.types import Completion, SamplingParams


def eval_sampling_params(samples_per_row: int, temperature: float, max_tokens: int, top_p: float = 1.0,
                         seed: int | None = None) -> SamplingParams:
    """k = 1 is greedy (the model's single best guess); k > 1 samples at `temperature`.
    The answer-slot distributions are read at `temperature` either way."""
    from grailcore.types import SamplingParams

    if samples_per_row < 1:
        raise ValueError(f"samples_per_row must be >= 1, got {samples_per_row}")
    if samples_per_row > 1 and temperature <= 0:
        raise ValueError("samples_per_row > 1 needs temperature > 0 (greedy samples would all be equal)")
    return SamplingParams(n=samples_per_row, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                          greedy=samples_per_row == 1, seed=seed)


def generate_raw(engine: RolloutEngine, tokenizer, examples: Sequence[Example], params: SamplingParams,
                 exact: bool = True, chunk_size: int = 64,
                 sampled_reads: bool = True, prune_below: float | None = None, mixture: str = "draw",
                 ) -> tuple[list[list[Completion]], list | None]:
    """`params.n` completions per example, in example order (chunks bound host memory),
    and with `exact` each row's `answer_slot.RowSlots` (a row rendered in the direct
    layout reads one slot, from its prompt alone). `sampled_reads`: take a slot on a
    sampled path from what the engine reported while sampling (`sampled_reads.py`);
    False scores every slot in a separate pass (the benchmark's baseline). `prune_below`
    and `mixture`: `answer_slot.slot_distributions`'s cut (default `answer_slot.PRUNE_BELOW`)
    and how an unclosed answer's opinion mixture is read (default one drawn option; the
    draws are seeded by the chunk's position)."""
    from grailcore.data.prompt import encode_prompt
    from grailcore.evaluation.answer_slot import SlotVocabulary, slot_distributions
    from grailcore.evaluation.sampled_reads import SampledReads, watch_ids

    if exact and params.temperature <= 0:
        raise ValueError("exact distributions are read under softmax(logits / T): give a temperature > 0")
    vocab = SlotVocabulary(tokenizer) if exact else None
    if params.seeds is not None and len(params.seeds) != len(examples):
        raise ValueError(f"params.seeds has {len(params.seeds)} seeds for {len(examples)} examples")
    out: list[list[Completion]] = []
    slots: list | None = [] if exact else None
    for start in range(0, len(examples), chunk_size):
        chunk = examples[start:start + chunk_size]
        prompts = [encode_prompt(tokenizer, ex) for ex in chunk]
        seeds = None if params.seeds is None else params.seeds[start:start + len(chunk)]
        # Sampled answer slots are read while sampling where the engine reports the
        # candidates' log-probs at temperature T (not greedy, no nucleus): no scoring request.
        watch = (watch_ids(vocab, [ex.n_options for ex in chunk])
                 if exact and sampled_reads and not params.greedy and params.top_p == 1.0 else ())
        results = engine.generate(prompts, replace(params, seeds=seeds, watch_token_ids=watch))
        if len(results) != len(chunk) or any(len(r) != params.n for r in results):
            raise RuntimeError(f"engine returned {[len(r) for r in results]} completions for "
                               f"{len(chunk)} prompts x n={params.n}")
        out.extend(results)
        if exact:
            layouts = [ex.meta.get("layout", "think") for ex in chunk]
            sampled = [[] if layout == "direct" else [c.token_ids for c in row] for row, layout in zip(results, layouts)]
            score = SampledReads(prompts, results).scorer(engine.next_token_logprobs, params.temperature)
            slots.extend(slot_distributions(score, vocab, prompts, sampled,
                                            [ex.n_options for ex in chunk], layouts, params.temperature,
                                            prune_below, mixture, seed=start))
    return out, slots


def generate_samples(engine: RolloutEngine, tokenizer, examples: Sequence[Example], params: SamplingParams,
                     exact: bool = True) -> EvalSamples:
    """`generate_raw` as the evaluation's hand-off: texts, slots, finish reasons."""
    raw, slots = generate_raw(engine, tokenizer, examples, params, exact)
    return EvalSamples(list(examples), [[c.text for c in row] for row in raw], slots,
                       [[c.finish_reason for c in row] for row in raw])


def generate_completions(engine: RolloutEngine, tokenizer, examples: Sequence[Example], samples_per_row: int,
                         temperature: float, max_tokens: int, top_p: float = 1.0,
                         exact: bool = True, seeds: Sequence[int] | None = None) -> EvalSamples:
    """`samples_per_row` completions per example (the first one greedy when k = 1) and
    their answer-slot distributions (`exact`). `seeds`: one per example (its samples then
    depend on that seed alone); None leaves the engine's own RNG running."""
    params = eval_sampling_params(samples_per_row, temperature, max_tokens, top_p)
    if seeds is not None:
        params = replace(params, seeds=tuple(seeds))
    return generate_samples(engine, tokenizer, examples, params, exact)


def generate_permuted(engine: RolloutEngine, tokenizer, examples: Sequence[Example], permutations: int,
                      params: SamplingParams, seed: int = 0, exact: bool = True) -> list[EvalSamples]:
    """Order robustness: sample every row again under `permutations` seeded option orders;
    one `EvalSamples` (a permuted copy of `examples`) per order (`evaluate(permuted=...)`)."""
    from grailcore.evaluation.order import permuted_copies

    return [generate_samples(engine, tokenizer, copy, params, exact)
            for copy in permuted_copies(examples, permutations, seed)]
