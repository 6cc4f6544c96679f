"""Prefix-shared training forward: each distinct prompt of a micro-batch runs once, its
completions packed behind it under a tree attention mask, so no prompt is repeated and
no padding is computed. Same contract and results as `grailcore.token_logprobs.token_logprobs`.

One packed row per prompt (N = prompt + the completions' inputs; a prompt whose
completions are long gets a few rows, see `pack_by_prompt`):

    [prompt p_0 .. p_{P-1} | c1_0 .. c1_{n1-2} | c2_0 .. c2_{n2-2} | ...]

A prompt token attends causally to the prompt; a completion token to the whole prompt
and causally to its own completion, never to a sibling. Positions continue from the
prompt in every completion, so each token sees exactly the keys, values and RoPE phase
it has in the padded [B, P+T] forward. Gradients from all G completions flow back into
the one prompt pass. No KV cache is involved, so HF gradient checkpointing still works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grailcore.token_logprobs import IGNORE_INDEX, TokenLogprobs, _naive_logprobs, _output_weight
from kernels.logprobs import fused_linear_logprobs

# Families whose decoders take a custom 4D mask as-is (checked by tests/test_prefix.py).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
_MASKED_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class PackedPrompt:
    """One decoder forward: a prompt and the completions that share it, as one row."""

    input_ids: torch.Tensor
    """[N] long: the prompt, then each completion's tokens except the last predicted one."""
    position_ids: torch.Tensor
    """[N] long: 0.. over the prompt, continuing from the prompt in each completion."""
    segment_ids: torch.Tensor
    """[N] long: 0 on the prompt, k on the k-th completion of the row (k >= 1)."""
    hidden_index: torch.Tensor
    """[K] long: position in the row whose hidden state predicts each trained token."""
    targets: torch.Tensor
    """[K] long: the trained tokens."""
    output_index: torch.Tensor
    """[K] long: flat index b * T + t of each trained token in the [B, T] output."""


def pack_by_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                   completion_mask: torch.Tensor | None = None, pair_cost: float = 0.0) -> list[PackedPrompt]:
    """Rows of a `grailcore.batch.Batch` layout (input_ids/attention_mask [B, P+T], the
    completion in the last T = logits_to_keep columns, completion_mask [B, T]) packed by
    identical prompt. Rows without trained tokens cost nothing; a completion stops at its
    last trained token (its later tokens predict nothing wanted).

    The attention over a packed row is dense, N^2 (query, key) pairs, so a long row can
    cost more than repeating the prompt: `pair_cost` is one pair's cost in units of one
    token's projections + MLP (`attention_pair_cost`); a completion goes into the open
    pack of its prompt unless a new pack (the prompt again) is cheaper. 0 = one pack per
    prompt."""
    input_ids, attention_mask = input_ids.cpu(), attention_mask.cpu()  # planning is host-side
    rows, width = input_ids.shape
    prompt_width = width - logits_to_keep
    if prompt_width < 1:
        raise ValueError(f"logits_to_keep must be in [1, L={width}) (a prompt token comes first), "
                         f"got {logits_to_keep}")
    real = attention_mask.bool()
    wanted = real[:, prompt_width:] if completion_mask is None else completion_mask.cpu().bool()  # [B, T]
    if (wanted & ~real[:, prompt_width:]).any():
        raise ValueError("completion_mask marks tokens that attention_mask calls padding")
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # [B, L], as the padded forward numbers them
    packs: dict[tuple[int, ...], list[list[int]]] = {}  # prompt -> rows of each of its packs
    open_length: dict[tuple[int, ...], int] = {}  # prompt -> tokens in its last pack
    for row in range(rows):
        if not wanted[row].any():
            continue
        prompt = tuple(input_ids[row, :prompt_width][real[row, :prompt_width]].tolist())
        inputs = int(wanted[row].nonzero()[-1])  # completion tokens this row feeds
        n = open_length.get(prompt)
        grow = inputs + pair_cost * ((n + inputs) ** 2 - n**2) if n is not None else None
        fresh = len(prompt) + inputs + pair_cost * (len(prompt) + inputs) ** 2
        if grow is not None and grow <= fresh:
            packs[prompt][-1].append(row)
            open_length[prompt] = n + inputs
        else:
            packs.setdefault(prompt, []).append([row])
            open_length[prompt] = len(prompt) + inputs
    return [_pack_one(list(prompt), members, input_ids, positions, wanted, prompt_width)
            for prompt, prompt_packs in packs.items() for members in prompt_packs]


def attention_pair_cost(config) -> float:
    """FLOPs of one (query, key) pair (QK^T and AV) over those of one token's
    projections and MLP, per layer, for a Llama/Qwen2-style decoder config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_token = 2 * config.hidden_size * (2 * q_out + 2 * kv_out + 3 * config.intermediate_size)
    return 4 * q_out / per_token


def _pack_one(prompt: list[int], members: list[int], input_ids, positions, wanted, prompt_width) -> PackedPrompt:
    if not prompt:
        raise ValueError(f"rows {members} have an empty prompt: their first token has nothing to predict it")
    num_completion = wanted.shape[1]
    ids = [torch.tensor(prompt, dtype=torch.long)]
    pos = [torch.arange(len(prompt))]
    seg = [torch.zeros(len(prompt), dtype=torch.long)]
    hidden_index, targets, output_index = [], [], []
    start = len(prompt)  # where the next completion's inputs begin in the row
    for k, row in enumerate(members, start=1):
        t = wanted[row].nonzero().flatten()  # [k_row] trained completion columns
        used = int(t[-1])  # inputs c_0 .. c_{used-1}: enough to predict token `used`
        columns = slice(prompt_width, prompt_width + used)
        ids.append(input_ids[row, columns])
        pos.append(positions[row, columns])
        seg.append(torch.full((used,), k, dtype=torch.long))
        # Token t is predicted by the hidden state before it: the prompt's last for t = 0.
        hidden_index.append(torch.where(t == 0, len(prompt) - 1, start + t - 1))
        targets.append(input_ids[row, prompt_width + t])
        output_index.append(row * num_completion + t)
        start += used
    return PackedPrompt(
        input_ids=torch.cat(ids), position_ids=torch.cat(pos), segment_ids=torch.cat(seg),
        hidden_index=torch.cat(hidden_index), targets=torch.cat(targets), output_index=torch.cat(output_index),
    )


def tree_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, N, N] additive mask (0 = attend, dtype min = not) of one packed row: query q
    sees key k <= q when k is in the prompt (segment 0) or in q's own segment. Additive
    works for SDPA and eager alike and spares SDPA a bool-to-float conversion per layer."""
    n = segment_ids.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = causal & ((segment_ids[None, :] == 0) | (segment_ids[None, :] == segment_ids[:, None]))  # [N, N]
    mask = torch.zeros(n, n, dtype=dtype, device=segment_ids.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def check_supported(model) -> None:
    """Raise unless `model`'s decoder honours a custom 4D mask over every layer."""
    config = model.config
    attn = config._attn_implementation
    problems = []
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model_type {config.model_type!r} is untested (supported: {SUPPORTED_MODEL_TYPES}; "
                        "add it once tests/test_prefix.py passes on it)")
    if attn not in _MASKED_ATTENTION:
        problems.append(f"attention {attn!r} cannot take a tree mask (use one of {_MASKED_ATTENTION})")
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        problems.append(f"layer types {sorted(layer_types)}: a custom mask would drop the sliding window")
    if problems:
        raise ValueError("grpo.prefix_sharing: " + "; ".join(problems) + ". Set grpo.prefix_sharing=False.")


def shared_prefix_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    *,
    temperature: float = 1.0,
    impl: str = "fused",
    chunk_size: int | None = None,
    completion_mask: torch.Tensor | None = None,
    return_entropy: bool = False,
    pair_cost: float | None = None,
) -> TokenLogprobs:
    """`token_logprobs` with one decoder pass per distinct prompt (or a few, see
    `pack_by_prompt`; pair_cost None = from the model's config). Same arguments and
    [B, T] outputs; 0 (and no gradient) wherever completion_mask (default: the
    completion's attention_mask) is 0, including tokens that are padding."""
    if impl not in ("fused", "naive"):
        raise ValueError(f"impl must be 'fused' or 'naive', got {impl!r}")
    check_supported(model)
    rows = input_ids.shape[0]
    if pair_cost is None:
        pair_cost = attention_pair_cost(model.config)
    packs = pack_by_prompt(input_ids, attention_mask, logits_to_keep, completion_mask, pair_cost)
    weight = _output_weight(model)  # [V, H]
    body = model.get_decoder()
    device = input_ids.device
    if not packs:
        # Nothing trained: zeros, but through every layer as the padded forward would,
        # so backward reaches each block (FSDP2 ranks must all run the same backward).
        out = body(input_ids=input_ids[:1, -1:], use_cache=False).last_hidden_state
        zeros = 0 * (out.sum() + weight.sum()).float() + weight.new_zeros(rows, logits_to_keep, dtype=torch.float32)
        return TokenLogprobs(logprobs=zeros, entropy=zeros.detach().clone() if return_entropy else None)
    hidden = []
    for pack in packs:
        mask = tree_attention_mask(pack.segment_ids.to(device), weight.dtype)
        out = body(input_ids=pack.input_ids[None].to(device), attention_mask=mask,
                   position_ids=pack.position_ids[None].to(device), use_cache=False)
        hidden.append(out.last_hidden_state[0, pack.hidden_index.to(device)])  # [K_u, H]
    flat_hidden = torch.cat(hidden)  # [K, H]
    targets = torch.cat([p.targets for p in packs]).to(device)  # [K]
    if impl == "fused":
        out = fused_linear_logprobs(flat_hidden, weight, targets, temperature, return_entropy=return_entropy,
                                    ignore_index=IGNORE_INDEX, chunk_size=chunk_size)
        logprobs, entropy = out if return_entropy else (out, None)
    else:
        logprobs, entropy = _naive_logprobs(flat_hidden, weight, targets, temperature, return_entropy)
    index = torch.cat([p.output_index for p in packs]).to(device)  # [K] into [B*T]

    def scatter(values: torch.Tensor) -> torch.Tensor:
        flat = values.new_zeros(rows * logits_to_keep).index_put((index,), values)
        return flat.view(rows, logits_to_keep)

    return TokenLogprobs(logprobs=scatter(logprobs), entropy=None if entropy is None else scatter(entropy))
