"""The answer-slot distributions (grailcore/evaluation/answer_slot.py) on real tokenizers and
real tiny models: candidate tokenizations, where the slot is, every probability against a
brute-force product of plain forwards, the direct layout, completions files, and the
Rao-Blackwellised mean converging to a marginal computed by enumeration."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from grailcore.config import DataConfig
from grailcore.data.loaders import load_examples
from grailcore.data.prompt import encode_prompt
from grailcore.data.schema import OPINION_DIRECTIONS, SchemaError
from grailcore.evaluation import answer_slot as slot
from grailcore.evaluation.completions_io import EvalSamples, read_completions, write_completions
from grailcore.evaluation.generate import eval_sampling_params, generate_samples
from grailcore.model import load_policy, load_tokenizer, resolve_model_path
from grailcore.rollout.hf import HFEngine
from grailcore.rollout.next_token import trie_next_token_logprobs


@pytest.fixture(scope="module")
def micro():
    path = resolve_model_path("micro-llama")
    return load_tokenizer(path), load_policy(path, "float32").eval()


@pytest.fixture(scope="module")
def smol_tokenizer():
    return load_tokenizer(resolve_model_path("smollm2-135m-instruct"))


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_candidates_cover_leading_space_and_two_digit_numbers(micro, smol_tokenizer):
    micro_vocab, smol_vocab = slot.SlotVocabulary(micro[0]), slot.SlotVocabulary(smol_tokenizer)
    # micro-llama has ' 3' tokens, SmolLM2 writes ' ' then '3': both variants are candidates
    assert [micro_vocab.decode(v) for v in micro_vocab.choices(4)[2]] == ["3", " 3"]
    assert [len(v) for v in micro_vocab.choices(4)[2]] == [1, 1]
    assert sorted(smol_vocab.decode(v) for v in smol_vocab.choices(4)[2]) == [" 3", "3"]
    assert sorted(len(v) for v in smol_vocab.choices(4)[2]) == [1, 2]  # ' ' alone decides nothing
    # on a 12-option slate '1' also starts 10, 11, 12: option 1 needs the closing tag's first token
    twelve = smol_vocab.choices(12)
    assert sorted(smol_vocab.decode(v) for v in twelve[0]) == [" 1</", "1</"]
    assert sorted(smol_vocab.decode(v) for v in twelve[11]) == [" 12", "12"]
    assert sorted(smol_vocab.decode(v) for v in twelve[1]) == [" 2", "2"]  # no other option starts with 2
    # opinions: cut where the direction is decided, but not before 3 characters ('no' could start 'not')
    no_change = smol_vocab.opinions[OPINION_DIRECTIONS.index("no_change")]
    assert {smol_vocab.decode(v) for v in no_change} == {"no_", " no_", "no change", " no change", "no-", " no-"}
    increase = micro_vocab.opinions[OPINION_DIRECTIONS.index("increase")]
    assert {micro_vocab.decode(v) for v in increase} == {"increase", " increase"}  # micro-llama's 'in' decides nothing
    with pytest.raises(ValueError, match="overlap"):
        slot._check_prefix_free([(1, 2), (1, 2, 3)], "test")
    # a same-label candidate that starts another absorbs it; across labels the cut is the shortest deciding one
    letters = dict(zip(range(5, 9), "abcd"))
    decode = lambda ids: "".join(letters[i] for i in ids)  # noqa: E731
    assert slot.distinguishing([[(5, 6, 7), (5, 6)], [(5, 8)]], "t", decode) == [((5, 6),), ((5, 8),)]
    assert slot.distinguishing([[(5, 6, 7)], [(6, 8)]], "t", decode) == [((5,),), ((6,),)]
    assert slot.distinguishing([[(5, 6, 7)], [(6, 8)]], "t", decode, min_chars=3) == [((5, 6, 7),), ((6, 8),)]
    with pytest.raises(ValueError, match="overlap"):
        slot.distinguishing([[(5, 6)], [(5, 6, 7)]], "t", decode)


def test_the_slot_is_after_the_first_answer_tag_and_its_whitespace(micro):
    tokenizer = micro[0]
    vocab = slot.SlotVocabulary(tokenizer)
    head = encode(tokenizer, "<think>a b</think><answer>")
    ids = head + encode(tokenizer, "\n\n3</answer>")
    assert vocab.decode(vocab.slot_after(ids, "<answer>")) == "<think>a b</think><answer>\n\n"
    # an EOS right after the tag is not whitespace the model wrote into the slot
    assert vocab.slot_after(head + [tokenizer.eos_token_id], "<answer>") == tuple(head)
    assert vocab.slot_after(encode(tokenizer, "<think>no answer"), "<answer>") is None
    # '><' is one micro-llama token: the slot cuts it at the tag's end and re-encodes '>'
    straddle = encode(tokenizer, "<answer") + [tokenizer.convert_tokens_to_ids("><")] + encode(tokenizer, "x")
    assert vocab.slot_after(straddle, "<answer>") == tuple(encode(tokenizer, "<answer") + encode(tokenizer, ">"))


@functools.lru_cache(maxsize=None)
def plain_next_logprobs(model, sequence: tuple[int, ...], temperature: float) -> torch.Tensor:
    """[V] log_softmax(logits / T) after `sequence`, one plain full forward (no cache, no packing)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([list(sequence)])).logits[0, -1].float() / temperature, -1)


def brute_force(model, prefix: tuple[int, ...], candidate: tuple[int, ...], temperature: float) -> float:
    """p_T(candidate | prefix) as a product of plain forwards, one per token."""
    return float(np.exp(sum(float(plain_next_logprobs(model, prefix + candidate[:i], temperature)[token])
                            for i, token in enumerate(candidate))))


def option_mass(model, vocab, prefix, candidates, temperature) -> np.ndarray:
    return np.array([sum(brute_force(model, prefix, v, temperature) for v in variants) for variants in candidates])


def test_every_probability_equals_a_brute_force_product_of_forwards(micro, monkeypatch):
    monkeypatch.setattr(slot, "PRUNE_BELOW", 0.0)  # a random model's words are rarer than the default cut
    tokenizer, model = micro
    vocab, t = slot.SlotVocabulary(tokenizer), 0.8
    prompt = tuple(encode(tokenizer, "viewer prompt"))
    texts = {"sampled": "<think>x</think><answer> 2</answer><opinion>increase</opinion>",
             "forced_opinion": "<think>x</think><answer>2</answer>",
             "forced_both": "<think>never answers"}
    completions = [encode(tokenizer, text) + [tokenizer.eos_token_id] for text in texts.values()]
    score = functools.partial(trie_next_token_logprobs, model)
    row, = slot.slot_distributions(score, vocab, [prompt], [completions], [4], ["think"], t, mixture="exact")
    assert row.estimator == slot.EXACT and row.temperature == t
    kinds = [(s.choice_slot, s.opinion_slot) for s in row.samples]
    assert kinds == [("sampled", "sampled"), ("sampled", "forced"), ("forced", "mixture")]
    ids = {name: tuple(encode(tokenizer, text)) for name, text in texts.items()}
    answer_slots = [prompt + ids["sampled"][:len(encode(tokenizer, "<think>x</think><answer>"))],
                    prompt + tuple(encode(tokenizer, "<think>x</think><answer>")),
                    prompt + ids["forced_both"] + tuple(encode(tokenizer, "</think>\n<answer>"))]
    for sample, answer in zip(row.samples, answer_slots):
        expected = option_mass(model, vocab, answer, vocab.choices(4), t)
        np.testing.assert_allclose(sample.choice, expected, rtol=1e-4)
        assert 0 < sum(sample.choice) < 1  # a random model leaves most of the mass off-slate
    sampled_opinion = prompt + ids["sampled"][:len(encode(tokenizer, "<think>x</think><answer> 2</answer><opinion>"))]
    np.testing.assert_allclose(row.samples[0].opinion, option_mass(model, vocab, sampled_opinion, vocab.opinions, t),
                               rtol=1e-4)
    forced_opinion = prompt + ids["forced_opinion"] + tuple(encode(tokenizer, "<opinion>"))
    np.testing.assert_allclose(row.samples[1].opinion, option_mass(model, vocab, forced_opinion, vocab.opinions, t),
                               rtol=1e-4)
    mixture = np.zeros(3)
    for k in range(1, 5):
        path = tuple(encode(tokenizer, f"{k}</answer><opinion>"))
        mixture += row.samples[2].choice[k - 1] * option_mass(model, vocab, answer_slots[2] + path, vocab.opinions, t)
    np.testing.assert_allclose(row.samples[2].opinion, mixture, rtol=1e-4)


def test_a_drawn_mixture_is_unbiased_and_reads_one_path(micro):
    tokenizer, model = micro
    vocab = slot.SlotVocabulary(tokenizer)
    prompt = tuple(encode(tokenizer, "viewer prompt"))
    unclosed = encode(tokenizer, "<think>never answers")
    reads = []

    def score(sequences, token_ids, temperature):
        reads.extend(map(tuple, sequences))
        return trie_next_token_logprobs(model, sequences, token_ids, temperature)

    def read(copies: int, mixture: str, seed: int = 0):
        reads.clear()
        row, = slot.slot_distributions(score, vocab, [prompt], [[unclosed] * copies], [4], ["think"], 1.0,
                                       prune_below=0.0, mixture=mixture, seed=seed)
        return np.array([s.opinion for s in row.samples]), [s.opinion_slot for s in row.samples], set(reads)

    exact, kinds, exact_reads = read(1, "exact")
    assert kinds == ["mixture"]
    once, kinds, drawn_reads = read(1, "draw")
    assert kinds == ["mixture_draw"] and len(drawn_reads) < len(exact_reads)
    answer = prompt + tuple(unclosed) + tuple(encode(tokenizer, "</think>\n<answer>"))
    choice = option_mass(model, vocab, answer, vocab.choices(4), 1.0)
    after = [option_mass(model, vocab, answer + tuple(encode(tokenizer, f"{k}</answer><opinion>")), vocab.opinions, 1.0)
             for k in range(1, 5)]
    # one draw is S p(opinion | K) for some option K, S = sum_k p(k)
    assert min(np.abs(once[0] - choice.sum() * m).max() for m in after) < 1e-6 * choice.sum()
    draws, _, _ = read(4000, "draw", seed=1)  # copies of one completion: each copy draws its own K
    mean, spread = draws.mean(axis=0), draws.std(axis=0) / np.sqrt(len(draws))
    assert np.all(np.abs(mean - exact[0]) <= 4 * spread + 1e-12)
    assert np.all(spread > 0)  # the draws differ, so the check above has power
    assert np.array_equal(read(8, "draw", seed=3)[0], read(8, "draw", seed=3)[0])  # seeded
    with pytest.raises(ValueError, match="mixture must be one of"):
        read(1, "sometimes")


def test_pruned_branches_cost_no_reads_and_at_most_the_cut(micro, monkeypatch):
    tokenizer, model = micro
    vocab = slot.SlotVocabulary(tokenizer)
    prompt = tuple(encode(tokenizer, "viewer prompt"))
    completions = [[encode(tokenizer, "<think>x</think><answer>2</answer><opinion>no_change</opinion>"),
                    encode(tokenizer, "<think>never answers")]]
    calls = []

    def score(sequences, token_ids, temperature):
        calls.append(len(sequences))
        return trie_next_token_logprobs(model, sequences, token_ids, temperature)

    def read(cut: float):
        monkeypatch.setattr(slot, "PRUNE_BELOW", cut)
        calls.clear()
        row, = slot.slot_distributions(score, vocab, [prompt], completions, [4], ["think"], 1.0, mixture="exact")
        return np.array([s.choice + s.opinion for s in row.samples]), sum(calls)

    exact, all_reads = read(0.0)
    pruned, fewer_reads = read(1e-4)
    assert fewer_reads < all_reads
    branches = 2 * len([c for cs in vocab.choices(4) for c in cs]) + 5 * len([c for cs in vocab.opinions for c in cs])
    assert np.all(pruned <= exact + 1e-12) and np.all(exact - pruned <= branches * 1e-4)
    assert np.any(pruned < exact)  # this random model's multi-token words were cut


def test_direct_layout_reads_one_slot_at_the_prompt(micro):
    tokenizer, model = micro
    vocab = slot.SlotVocabulary(tokenizer)
    prompt = tuple(encode(tokenizer, "viewer prompt"))
    score = functools.partial(trie_next_token_logprobs, model)
    row, = slot.slot_distributions(score, vocab, [prompt], [[]], [3], ["direct"], 1.0)
    assert row.estimator == slot.DIRECT and len(row.samples) == 1
    assert (row.samples[0].choice_slot, row.samples[0].opinion_slot) == ("direct", "mixture")
    at = prompt + tuple(encode(tokenizer, "<answer>"))
    np.testing.assert_allclose(row.samples[0].choice, option_mass(model, vocab, at, vocab.choices(3), 1.0), rtol=1e-4)


def test_engine_samples_carry_slots_through_a_completions_file(micro, tmp_path):
    tokenizer, model = micro
    examples = load_examples("synthetic:gun_control", DataConfig(synthetic_n=60), split="validation").examples
    assert len(examples) >= 2
    engine = HFEngine(model, tokenizer)
    drawn = generate_samples(engine, tokenizer, examples, eval_sampling_params(2, 1.0, 12, seed=0))
    assert len(drawn.slots) == len(examples) and all(len(r.samples) == 2 for r in drawn.slots)
    # a random model writes no <answer> in 12 tokens: every slot forced, and counted as such
    assert all(s.choice_slot == "forced" for r in drawn.slots for s in r.samples)
    path = write_completions(tmp_path / "c.jsonl", drawn)
    back = read_completions(path)
    assert back.slots == drawn.slots and back.texts == drawn.texts
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    row["answer_slot"]["choice"][0] = [0.9, 0.9] + [0.0] * (examples[1].n_options - 2)
    path.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")
    with pytest.raises(SchemaError, match=r"c.jsonl:2: field 'answer_slot'"):
        read_completions(path)
    del row["answer_slot"]
    path.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")
    with pytest.raises(SchemaError, match="row 2 .* no field 'answer_slot' while other rows do"):
        read_completions(path)
    texts_only = write_completions(tmp_path / "t.jsonl", EvalSamples(drawn.examples, drawn.texts))
    assert read_completions(texts_only).slots is None  # scored with the labelled histogram fallback
    direct = [ex.replace(meta={**ex.meta, "layout": "direct"}) for ex in examples]
    one_read = generate_samples(engine, tokenizer, direct, eval_sampling_params(2, 1.0, 12, seed=0))
    assert all(r.estimator == slot.DIRECT and len(r.samples) == 1 for r in one_read.slots)


def test_exact_mean_converges_to_the_marginal_enumerated_over_reasoning_prefixes():
    """SmolLM2 on a real viewer prompt. The 'reasoning' is one token drawn from the model's
    top-48 next tokens (renormalised); then the slot is forced. The true marginal is the sum
    over those 48 prefixes, enumerated; the exact estimator from k draws must be unbiased and
    approach it as k grows, and beat a histogram of k sampled answers at every k."""
    path = resolve_model_path("smollm2-135m-instruct")
    tokenizer, model = load_tokenizer(path), load_policy(path, "float32").eval()
    example = load_examples("synthetic:gun_control", DataConfig(synthetic_n=60), split="validation").examples[0]
    prompt = encode_prompt(tokenizer, example)
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    weights, tokens = first.topk(48)
    weights = (weights / weights.sum()).numpy()
    vocab = slot.SlotVocabulary(tokenizer)
    score = functools.partial(trie_next_token_logprobs, model)
    n = example.n_options
    forced = vocab.encode(slot.forced_suffix("think", ""))
    queries = [(tuple(prompt) + (t,) + forced, tuple(c for cs in vocab.choices(n) for c in cs)) for t in tokens.tolist()]
    per_prefix = np.array([slot.candidate_mass(lps, vocab.choices(n)) for lps in slot.sequence_logprobs(score, queries, 1.0)])
    assert per_prefix.shape == (48, n)
    marginal = weights @ per_prefix
    assert marginal.sum() > 0.05  # the forced slot puts real mass on the options
    rng = np.random.default_rng(0)
    exact_tv, histogram_tv = {}, {}
    for k in (1, 4, 16, 64):
        draws = rng.choice(48, size=(400, k), p=weights)  # [repeats, k] reasoning prefixes
        estimates = per_prefix[draws].mean(axis=1)  # [repeats, n]
        exact_tv[k] = 0.5 * np.abs(estimates - marginal).sum(axis=1).mean()
        if k == 1:  # unbiased: the mean over repeats of one-draw estimates is the marginal
            np.testing.assert_allclose(estimates.mean(axis=0), marginal, atol=0.1 * marginal.max())
        off = np.clip(1 - per_prefix.sum(axis=1, keepdims=True), 0, 1)
        answer_probs = np.concatenate([per_prefix, off], axis=1)[draws]  # sampled answers, off-slate last
        answers = (answer_probs.cumsum(-1) > rng.uniform(size=(400, k, 1))).argmax(-1)
        counts = np.stack([(answers == j).mean(axis=1) for j in range(n)], axis=1)
        histogram_tv[k] = 0.5 * np.abs(counts - marginal).sum(axis=1).mean()
    assert exact_tv[1] > exact_tv[4] > exact_tv[16] > exact_tv[64]
    assert exact_tv[64] < 0.25 * exact_tv[1]
    assert all(exact_tv[k] < histogram_tv[k] for k in exact_tv)
