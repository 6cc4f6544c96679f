"""HFEngine on tiny-llama (fp32): grouping, stop-token handling, log-probs against a
manual forward, the greedy n > 1 guard, and weight updates of a separate copy."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from transformers import GenerationConfig

from grailcore.model import load_policy, load_tokenizer, resolve_model_path
from grailcore.rollout.hf import HFEngine
from grailcore.types import SamplingParams


@pytest.fixture(scope="module")
def tiny():
    path = resolve_model_path("tiny-llama")
    return load_tokenizer(path), load_policy(path, "float32").eval()


@pytest.fixture(scope="module")
def prompts(tiny):
    tokenizer = tiny[0]
    texts = ["Hi", "Tell me about the history of the printing press in Europe.", "What is 2+2?"]
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)) for t in texts]


def manual_logprobs(model, prompt: list[int], completion: tuple[int, ...], temperature: float) -> torch.Tensor:
    """[T] log_softmax(logits / T) of each completion token, one unpadded forward."""
    ids = torch.tensor([prompt + list(completion)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1] / temperature  # [T, V]
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def test_generate_groups_per_prompt_with_matching_lengths(tiny, prompts):
    tokenizer, model = tiny
    groups = HFEngine(model, tokenizer).generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=5, seed=0))
    assert [len(g) for g in groups] == [2, 2, 2]
    for c in (c for g in groups for c in g):
        assert 1 <= len(c.token_ids) <= 5 and len(c.logprobs) == len(c.token_ids)
        assert all(math.isfinite(x) and x <= 0 for x in c.logprobs)
        assert c.finish_reason in ("stop", "length")
        assert c.text == tokenizer.decode(list(c.token_ids), skip_special_tokens=True)


def test_stop_token_ends_completion_and_is_kept(tiny, prompts):
    """A row stops at its first stop token (kept, so the trainer learns to stop); a row of
    the same batch without one runs to max_tokens."""
    tokenizer, model = tiny
    # Seeded sampling draws the same tokens with and without the extra stop id (rows that
    # finished keep consuming random numbers); greedy on this random model repeats one token.
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=3)
    free = HFEngine(model, tokenizer).generate(prompts[:2], params)
    seq, other = list(free[0][0].token_ids), list(free[1][0].token_ids)
    stop = next((t for t in seq[1:4] if t not in other), None)
    if stop is None:
        pytest.fail(f"greedy outputs {seq} and {other} share every candidate stop token; pick other prompts")
    stopping = copy.deepcopy(model)
    stopping.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    cut, full = HFEngine(stopping, tokenizer).generate(prompts[:2], params)
    expected = seq[:seq.index(stop) + 1]
    assert cut[0].token_ids == tuple(expected) and cut[0].finish_reason == "stop"
    assert len(cut[0].logprobs) == len(expected)
    assert full[0].token_ids == tuple(other) and full[0].finish_reason == "length"


def test_logprobs_are_log_softmax_of_logits_over_temperature(tiny, prompts):
    tokenizer, model = tiny
    temperature = 0.7
    # batch_size 4 with n = 2: two generate calls (2 prompts, then 1), left-padded.
    groups = HFEngine(model, tokenizer, batch_size=4).generate(
        prompts, SamplingParams(n=2, temperature=temperature, max_tokens=6, seed=1))
    for prompt, group in zip(prompts, groups):
        for c in group:
            # Scored against its own prompt: a misplaced group would not match.
            expected = manual_logprobs(model, prompt, c.token_ids, temperature)
            # fp32; left padding in the batch changes only the summation order.
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)
    # T matters: at T = 1 the same tokens score differently.
    c = groups[0][0]
    assert (torch.tensor(c.logprobs) - manual_logprobs(model, prompts[0], c.token_ids, 1.0)).abs().max() > 1e-3


def test_seed_makes_sampling_reproducible(tiny, prompts):
    tokenizer, model = tiny
    engine = HFEngine(model, tokenizer)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=5, seed=7)
    first, again = engine.generate(prompts[:1], params), engine.generate(prompts[:1], params)
    assert [c.token_ids for c in first[0]] == [c.token_ids for c in again[0]]
    assert len({c.token_ids for c in first[0]}) > 1


def test_greedy_with_n_above_one_is_rejected(tiny, prompts):
    with pytest.raises(ValueError, match="greedy"):
        HFEngine(tiny[1], tiny[0]).generate(prompts[:1], SamplingParams(n=2, greedy=True, max_tokens=2))


def perturbed_copy(model) -> torch.nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    return other


def test_update_weights_copies_into_a_separate_model(tiny):
    tokenizer, model = tiny
    engine = HFEngine(copy.deepcopy(model).to(torch.bfloat16), tokenizer, shares_weights=False)
    source = perturbed_copy(model)
    engine.update_weights(source.named_parameters())
    mine = dict(engine.model.named_parameters())
    for name, p in source.named_parameters():
        assert mine[name].dtype == torch.bfloat16  # cast to the engine's dtype
        assert torch.equal(mine[name], p.to(torch.bfloat16)), name
        assert mine[name].data_ptr() != p.data_ptr()  # a copy, not the trainer's storage
    with torch.no_grad():
        next(source.parameters()).add_(1.0)
    assert not torch.equal(next(engine.model.parameters()), next(source.parameters()).to(torch.bfloat16))


def test_update_weights_is_a_no_op_when_sharing_the_policy(tiny):
    tokenizer, model = tiny
    own = copy.deepcopy(model)
    engine = HFEngine(own, tokenizer, shares_weights=True)
    before = {n: p.clone() for n, p in own.named_parameters()}
    engine.update_weights(perturbed_copy(model).named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in own.named_parameters())


def test_checkpoint_generation_settings_are_not_inherited(tiny, prompts):
    """A checkpoint's generation_config (repetition penalty, top-k, n-gram ban) must not change
    what the engine samples: the trainer scores log_softmax(logits / T), nothing else."""
    tokenizer, model = tiny
    biased = copy.deepcopy(model)
    biased.generation_config = GenerationConfig(repetition_penalty=5.0, top_k=3, no_repeat_ngram_size=1,
                                                bos_token_id=1, eos_token_id=2, pad_token_id=2)
    # This random model repeats tokens when sampled cold (and greedily): a penalty would show.
    for params in (SamplingParams(greedy=True, max_tokens=8), SamplingParams(n=2, temperature=0.05, max_tokens=8, seed=5)):
        plain = HFEngine(model, tokenizer).generate(prompts, params)
        got = HFEngine(biased, tokenizer).generate(prompts, params)
        assert any(len(set(c.token_ids)) < len(c.token_ids) for g in plain for c in g), "no repeats: the test proves nothing"
        assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in plain]
    assert biased.generation_config.repetition_penalty == 5.0  # the model's own config is left as it was


def test_sampling_draws_from_the_whole_vocabulary(tiny, prompts):
    """No top-k from transformers' defaults (50): at a high temperature on this random model,
    first tokens outside the top 50 logits must appear."""
    tokenizer, model = tiny
    groups = HFEngine(model, tokenizer).generate(prompts, SamplingParams(n=16, temperature=3.0, max_tokens=1, seed=0))
    ranks = []
    for prompt, group in zip(prompts, groups):
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, -1]  # [V]
        for c in group:
            ranks.append(int((logits > logits[c.token_ids[0]]).sum()))
    assert max(ranks) >= 50, ranks


def test_identical_prompts_in_separate_calls_get_different_samples(tiny, prompts):
    """batch_size = n: one generate call per prompt. Each call draws its own stream (one seed
    for all of them would give two identical prompts identical completions)."""
    tokenizer, model = tiny
    engine = HFEngine(model, tokenizer, batch_size=2)
    same = [prompts[1], prompts[1]]
    first, second = engine.generate(same, SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=7))
    assert [c.token_ids for c in first] != [c.token_ids for c in second]
    first, second = engine.generate(same, SamplingParams(n=2, temperature=1.0, max_tokens=6, seeds=(11, 12)))
    assert [c.token_ids for c in first] != [c.token_ids for c in second]


def test_per_prompt_seeds_repeat_whatever_the_process_rng_did(tiny, prompts):
    """A resumed run passes the same seeds again, from a process whose torch RNG went elsewhere."""
    tokenizer, model = tiny
    engine = HFEngine(model, tokenizer, batch_size=2)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=6, seeds=(3, 4, 5))
    first = engine.generate(prompts, params)
    torch.manual_seed(12345)
    torch.rand(100)
    again = engine.generate(prompts, params)
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in first]
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        engine.generate(prompts, SamplingParams(n=2, seeds=(1, 2)))


def test_watched_ids_are_reported_at_every_step_under_the_temperature(tiny, prompts):
    tokenizer, model = tiny
    watch, temperature = (5, 17, 300), 0.7
    groups = HFEngine(model, tokenizer, batch_size=4).generate(
        prompts, SamplingParams(n=2, temperature=temperature, max_tokens=6, seed=1, watch_token_ids=watch))
    for prompt, group in zip(prompts, groups):
        for c in group:
            assert c.watched is not None and len(c.watched) == len(c.token_ids)
            ids = torch.tensor([prompt + list(c.token_ids)])
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1:-1] / temperature
            expected = torch.log_softmax(logits, dim=-1)[:, list(watch)]  # [T, 3]
            got = torch.tensor([[step[t] for t in watch] for step in c.watched])
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # nothing asked, nothing reported; greedy has no distribution at a temperature to report
    plain = HFEngine(model, tokenizer).generate(prompts[:1], SamplingParams(n=1, max_tokens=3, seed=1))
    assert plain[0][0].watched is None
    with pytest.raises(ValueError, match="watch_token_ids"):
        SamplingParams(greedy=True, max_tokens=3, watch_token_ids=watch)
