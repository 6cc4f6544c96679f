"""Answer slots read from what the engine reported while sampling
(grailcore/evaluation/sampled_reads.py): the lookup answers exactly the reads on a sampled
path, everything else still goes to the scoring pass, and the slot distributions are the
same either way. The engines' watched log-probs themselves are checked against forwards in
tests/rollout/test_hf_engine.py and tests/rollout/test_vllm_answer_slot.py."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from grailcore.evaluation import answer_slot as slot
from grailcore.evaluation.sampled_reads import SampledReads, watch_ids
from grailcore.model import load_policy, load_tokenizer, resolve_model_path
from grailcore.rollout.next_token import trie_next_token_logprobs
from grailcore.types import Completion


@pytest.fixture(scope="module")
def micro():
    path = resolve_model_path("micro-llama")
    return load_tokenizer(path), load_policy(path, "float32").eval()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def replayed(model, prompt: list[int], ids: list[int], watch: tuple[int, ...], temperature: float) -> Completion:
    """A completion as an engine that watched `watch` would report it (one plain forward)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float() / temperature
    steps = torch.log_softmax(logits, dim=-1)[:, list(watch)].tolist()
    return Completion(text="", token_ids=tuple(ids), logprobs=None, finish_reason="stop",
                      watched=tuple(dict(zip(watch, row)) for row in steps))


def test_sampled_slots_are_looked_up_and_the_rest_is_scored(micro):
    tokenizer, model = micro
    vocab, t = slot.SlotVocabulary(tokenizer), 0.8
    watch = watch_ids(vocab, [4])
    assert set(c for cs in vocab.choices(4) for v in cs for c in v) <= set(watch)
    prompts = [encode(tokenizer, "viewer prompt one"), encode(tokenizer, "another viewer")]
    texts = [["<think>x</think><answer> 2</answer><opinion>increase</opinion>", "<think>never answers"],
             ["<think>y</think><answer>3</answer>", "<think>z</think><answer>1</answer><opinion>no_change"]]
    completions = [[replayed(model, p, encode(tokenizer, text), watch, t) for text in row]
                   for p, row in zip(prompts, texts)]
    scored = []

    def score(sequences, token_ids, temperature):
        scored.extend(tuple(s) for s in sequences)
        return trie_next_token_logprobs(model, sequences, token_ids, temperature)

    ids = [[list(c.token_ids) for c in row] for row in completions]
    reads = SampledReads(prompts, completions)
    args = (vocab, prompts, ids, [4, 4], ["think", "think"], t)
    fast = slot.slot_distributions(reads.scorer(score, t), *args, prune_below=0.0)
    on_path_scored = [s for s in scored if reads.lookup(s) is not None]
    scored.clear()
    slow = slot.slot_distributions(score, *args, prune_below=0.0)
    assert reads.hits >= 6  # 3 answer slots and 2 opinion slots on sampled paths, and their next tokens
    assert len(scored) == reads.hits + reads.misses
    assert not on_path_scored or all(any(t not in reads.lookup(s) for t in watch) for s in on_path_scored)
    for r, q in zip(fast, slow):
        assert [(s.choice_slot, s.opinion_slot) for s in r.samples] == [(s.choice_slot, s.opinion_slot)
                                                                       for s in q.samples]
        np.testing.assert_allclose([s.choice + s.opinion for s in r.samples],
                                   [s.choice + s.opinion for s in q.samples], atol=1e-5)
    # reads at another temperature than the sampling one are never looked up
    before = reads.hits
    slot.slot_distributions(reads.scorer(score, t), *args[:-1], 1.0, prune_below=0.0)
    assert reads.hits == before


def test_lookup_finds_only_prompt_plus_sampled_prefixes():
    watched = tuple({7: -1.0 - j} for j in range(3))
    reads = SampledReads([[1, 2], [1, 2, 3]], [[Completion("", (9, 8, 5), None, "stop", watched)],
                                               [Completion("", (4,), None, "length", watched[:1])]])
    assert reads.lookup([1, 2]) == {7: -1.0} and reads.lookup([1, 2, 9, 8]) == {7: -3.0}
    assert reads.lookup([1, 2, 3]) == {7: -1.0}  # the second prompt's first step, not the first's path
    assert reads.lookup([1, 2, 9, 5]) is None and reads.lookup([1, 2, 9, 8, 5]) is None  # off path, past the end
    calls = []
    score = reads.scorer(lambda s, ids, t: calls.append(s) or [[-9.0] * len(i) for i in ids], 1.0)
    assert score([[1, 2, 9], [1, 2, 9], [5]], [[7], [7, 6], [7]], 1.0) == [[-2.0], [-9.0, -9.0], [-9.0]]
    assert calls == [[[1, 2, 9], [5]]]  # id 6 was not watched, [5] is no prompt
