"""trie_next_token_logprobs (grailcore/rollout/next_token.py) against one plain forward per
sequence, on real tiny models in fp32: shared prefixes, several packs, temperature, and
the model families it refuses."""

from __future__ import annotations

import pytest
import torch

from grailcore.model import load_policy, resolve_model_path
from grailcore.rollout.next_token import ancestor_mask, pack_sequences, trie_next_token_logprobs

# A prompt shared by three "samples", one of them a prefix of another, two branches at the
# last token, and an unrelated sequence: every trie shape the answer slot produces.
SEQUENCES = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 9], [5, 6, 7, 8, 11], [5, 6, 7, 12, 13], [20, 21]]
TOKEN_IDS = [[1, 2, 3], [4], [1, 7, 9], [9], [30, 31]]


def plain_logprobs(model, seq: list[int], ids: list[int], temperature: float) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, -1].float() / temperature
    return torch.log_softmax(logits, dim=-1)[ids].tolist()


@pytest.mark.parametrize("name", ["micro-llama", "tiny-qwen2"])
@pytest.mark.parametrize("max_tokens", [2048, 7])  # one packed row / several packs
def test_equals_one_forward_per_sequence(name, max_tokens):
    model = load_policy(resolve_model_path(name), "float32").eval()
    got = trie_next_token_logprobs(model, SEQUENCES, TOKEN_IDS, temperature=0.7, max_tokens=max_tokens)
    for seq, ids, values in zip(SEQUENCES, TOKEN_IDS, got):
        assert values == pytest.approx(plain_logprobs(model, seq, ids, 0.7), abs=2e-5)
    # the temperature is applied: T = 1 differs from T = 0.7
    assert trie_next_token_logprobs(model, SEQUENCES[:1], TOKEN_IDS[:1], 1.0)[0] != pytest.approx(got[0], abs=1e-3)


def test_packing_shares_prefixes_and_the_mask_sees_only_ancestors():
    (members, pack), = pack_sequences(SEQUENCES[:4], max_tokens=100)
    assert members == [0, 1, 2, 3]
    assert len(pack.input_ids) == 9  # 5,6,7,8,9,10,11,12,13: the shared prompt once
    order = pack.input_ids.tolist()
    assert order[:6] == [5, 6, 7, 8, 9, 10] and pack.position_ids.tolist()[:6] == list(range(6))
    allowed = ancestor_mask(pack.subtree_end, torch.float32)[0, 0] == 0  # [query, key]
    q11, q13 = order.index(11), order.index(13)
    assert [order[k] for k in allowed[q11].nonzero().flatten().tolist()] == [5, 6, 7, 8, 11]
    assert [order[k] for k in allowed[q13].nonzero().flatten().tolist()] == [5, 6, 7, 12, 13]
    assert pack.position_ids[q13] == 4
    # a budget of 7 nodes: the third sequence still fits (one new node), the fourth opens a new pack
    packs = pack_sequences(SEQUENCES, max_tokens=7)
    assert [(members, len(p.input_ids)) for members, p in packs] == [([0, 1, 2], 7), ([3, 4], 7)]


def test_bad_input_is_refused():
    model = load_policy(resolve_model_path("micro-llama"), "float32")
    with pytest.raises(ValueError, match="empty"):
        trie_next_token_logprobs(model, [[]], [[1]], 1.0)
    with pytest.raises(ValueError, match="temperature"):
        trie_next_token_logprobs(model, [[1]], [[1]], 0.0)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="tree mask"):
        trie_next_token_logprobs(model, [[1]], [[1]], 1.0)
