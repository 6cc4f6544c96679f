"""Next-token log-probabilities of many token sequences that share long prefixes, from a
plain HF causal LM in few forwards: the sequences are merged into a token trie (a prompt
shared by k samples, each sample's completion, each scored continuation), the trie is
packed in depth-first order into one row, and a token attends exactly to its ancestors.

Contract (`trie_next_token_logprobs`): for each `sequences[i]`, the log-probability under
softmax(logits / temperature) that the next token is `token_ids[i][j]`, for every j.
Every token sees the keys, values and RoPE position (its depth) it has in a plain forward
of its own sequence, so the result equals scoring each sequence alone (tested). Used by
`HFEngine.next_token_logprobs` and directly on the trainer's policy (no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from grailcore.prefix import check_supported


@dataclass
class _Trie:
    """Token trie; node 0 is a virtual root (no token)."""

    tokens: list[int]
    parents: list[int]
    children: list[dict[int, int]]
    ends: list[int]
    """The node each query sequence ends at, in query order."""

    @classmethod
    def empty(cls) -> _Trie:
        return cls(tokens=[-1], parents=[-1], children=[{}], ends=[])

    @property
    def size(self) -> int:
        return len(self.tokens) - 1

    def missing(self, seq: Sequence[int]) -> int:
        """Nodes `seq` would add."""
        node = 0
        for depth, token in enumerate(seq):
            nxt = self.children[node].get(token)
            if nxt is None:
                return len(seq) - depth
            node = nxt
        return 0

    def add(self, seq: Sequence[int]) -> None:
        node = 0
        for token in seq:
            nxt = self.children[node].get(token)
            if nxt is None:
                nxt = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(node)
                self.children.append({})
                self.children[node][token] = nxt
            node = nxt
        self.ends.append(node)


@dataclass(frozen=True)
class PackedTrie:
    """One packed row: trie nodes in depth-first order."""

    input_ids: torch.Tensor
    """[N] long: each node's token."""
    position_ids: torch.Tensor
    """[N] long: each node's depth (its position in its own sequence)."""
    subtree_end: torch.Tensor
    """[N] long: node q is a descendant of node a (or a itself) iff a <= q < subtree_end[a]."""
    query_index: torch.Tensor
    """[Q] long: the row position of each query sequence's last token."""


def _pack(trie: _Trie) -> PackedTrie:
    order: list[int] = []  # node ids in depth-first preorder
    depth = [0] * len(trie.tokens)
    stack = list(reversed(trie.children[0].values()))
    while stack:
        node = stack.pop()
        order.append(node)
        for child in reversed(trie.children[node].values()):
            depth[child] = depth[node] + 1
            stack.append(child)
    rank = {node: i for i, node in enumerate(order)}
    size = [1] * len(trie.tokens)
    for node in reversed(order):  # children come after their parent in preorder
        parent = trie.parents[node]
        if parent > 0:
            size[parent] += size[node]
    return PackedTrie(
        input_ids=torch.tensor([trie.tokens[n] for n in order], dtype=torch.long),
        position_ids=torch.tensor([depth[n] for n in order], dtype=torch.long),
        subtree_end=torch.tensor([rank[n] + size[n] for n in order], dtype=torch.long),
        query_index=torch.tensor([rank[n] for n in trie.ends], dtype=torch.long),
    )


def pack_sequences(sequences: Sequence[Sequence[int]], max_tokens: int) -> list[tuple[list[int], PackedTrie]]:
    """Consecutive sequences merged into tries of at most `max_tokens` nodes (a longer
    single sequence gets a trie of its own); (query indices, packed row) per trie."""
    packs, trie, members = [], _Trie.empty(), []
    for i, seq in enumerate(sequences):
        if not seq:
            raise ValueError(f"sequence {i} is empty: a next token needs at least one token before it")
        if members and trie.size + trie.missing(seq) > max_tokens:
            packs.append((members, _pack(trie)))
            trie, members = _Trie.empty(), []
        trie.add(seq)
        members.append(i)
    if members:
        packs.append((members, _pack(trie)))
    return packs


def ancestor_mask(subtree_end: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, N, N] additive mask: query q attends to key a iff a is q or an ancestor of q."""
    n = subtree_end.shape[0]
    index = torch.arange(n, device=subtree_end.device)
    allowed = (index[None, :] <= index[:, None]) & (index[:, None] < subtree_end[None, :])  # [N(q), N(a)]
    mask = torch.zeros(n, n, dtype=dtype, device=subtree_end.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


@torch.no_grad()
def trie_next_token_logprobs(model, sequences: Sequence[Sequence[int]], token_ids: Sequence[Sequence[int]],
                             temperature: float, max_tokens: int = 2048) -> list[list[float]]:
    """See the module docstring. `model` is a Llama/Qwen2-style HF causal LM with sdpa or
    eager attention (`grailcore.prefix.check_supported`); `max_tokens` bounds one packed
    row (its dense mask is max_tokens^2)."""
    if len(sequences) != len(token_ids):
        raise ValueError(f"{len(sequences)} sequences but {len(token_ids)} token-id lists")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    try:
        check_supported(model)
    except ValueError as err:
        raise ValueError(f"exact next-token scoring packs sequences under a tree mask, which this model "
                         f"cannot take ({err}); use a Llama/Qwen2 model with sdpa or eager attention") from None
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    body, head = model.get_decoder(), model.get_output_embeddings()
    out: list[list[float]] = [[] for _ in sequences]
    was_training = model.training
    model.eval()
    try:
        for members, pack in pack_sequences(sequences, max_tokens):
            hidden = body(input_ids=pack.input_ids[None].to(device),
                          attention_mask=ancestor_mask(pack.subtree_end.to(device), dtype),
                          position_ids=pack.position_ids[None].to(device), use_cache=False).last_hidden_state
            logits = head(hidden[0, pack.query_index.to(device)]).float() / temperature  # [Q, V]
            logprobs = torch.log_softmax(logits, dim=-1)
            for row, i in enumerate(members):
                wanted = torch.tensor(list(token_ids[i]), dtype=torch.long, device=device)
                out[i] = logprobs[row, wanted].tolist()
    finally:
        model.train(was_training)
    return out
