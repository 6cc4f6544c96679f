"""Prefix sharing must be invisible to training: the same log-probs, loss and gradient
of every parameter as the padded forward, for every loss type, on Llama and Qwen2."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from grailcore.batch import micro_batches
from grailcore.config import Config, GRPOConfig, ModelConfig, OptimConfig, RolloutConfig
from grailcore.token_logprobs import token_logprobs
from grailcore.loss import LOSS_TYPES
from grailcore.model import load_policy, resolve_model_path
from grailcore.optimize import policy_update
from grailcore.policy import PolicyModel
from grailcore.prefix import attention_pair_cost, pack_by_prompt, shared_prefix_logprobs, tree_attention_mask
from grailcore.types import Completion
from test_dist import torchrun
from test_optimize import _GradRecorder, _NoSchedule

GROUP_SIZE = 3
PROMPT_LENGTHS = [9, 4, 13]  # one prompt per group, left padded to each micro-batch's widest
COMPLETION_LENGTHS = [[6, 2, 7], [0, 5, 1], [7, 3, 4]]
TRUNCATED = {(0, 2), (2, 0)}  # (group, member) hitting max_tokens: masked out with mask_truncated
MAX_COMPLETION_TOKENS = 7
MICRO_BATCH_SIZE = 4  # 9 rows -> 4 + 4 + 1: groups straddle micro-batches


def _rollouts(vocab: int, prompt_lengths=PROMPT_LENGTHS, completion_lengths=COMPLETION_LENGTHS, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    prompt_ids, completions = [], []
    for group, (p_len, lengths) in enumerate(zip(prompt_lengths, completion_lengths)):
        prompt = torch.randint(1, vocab, (p_len,), generator=gen).tolist()
        for member, n in enumerate(lengths):
            prompt_ids.append(prompt)
            completions.append(Completion(
                text="", token_ids=tuple(torch.randint(1, vocab, (n,), generator=gen).tolist()),
                logprobs=tuple((-torch.rand(n, generator=gen)).tolist()),
                finish_reason="length" if (group, member) in TRUNCATED else "stop"))
    advantages = torch.randn(len(completions), generator=gen)
    return prompt_ids, completions, advantages


def _lm(name: str, attn: str = "sdpa", checkpointing: bool = False):
    lm = load_policy(resolve_model_path(name), "float32", attn)
    lm.config.use_cache = False
    if checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return lm.train()


def _update(lm, cfg: Config, ref_lm=None):
    """policy_update on the fixed rollouts; returns its stats and recorded gradients."""
    prompt_ids, completions, advantages = _rollouts(lm.config.vocab_size)
    batches = micro_batches(prompt_ids, completions, advantages, pad_id=0,
                            micro_batch_size=MICRO_BATCH_SIZE, mask_truncated=True)
    model = PolicyModel(lm, "fused", chunk_size=5)  # several chunks in the fused head
    ref = None if ref_lm is None else PolicyModel(ref_lm, "fused")
    recorder = _GradRecorder(model)
    stats = policy_update(model, ref, recorder, _NoSchedule(), batches, cfg)
    return stats, recorder.grads


def _config(loss_type: str, prefix_sharing: bool, **grpo) -> Config:
    return Config(
        model=ModelConfig(gradient_checkpointing=False),
        rollout=RolloutConfig(temperature=0.7, max_completion_tokens=MAX_COMPLETION_TOKENS),
        grpo=GRPOConfig(group_size=GROUP_SIZE, loss_type=loss_type, mask_truncated=True,
                        prefix_sharing=prefix_sharing, **grpo),
        optim=OptimConfig(grad_clip=1e9),  # compare raw gradients, not clipped ones
    )


def _assert_same_update(padded, shared):
    (stats_p, grads_p), (stats_s, grads_s) = padded, shared
    for a, b in zip(stats_p, stats_s):
        assert a.tokens == b.tokens
        for field in ("loss", "entropy", "clip_fraction", "kl", "grad_norm"):
            assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-5, abs=1e-6), field
    assert stats_s[0].logprob_diff == pytest.approx(stats_p[0].logprob_diff, rel=1e-5)
    assert len(grads_p) == len(grads_s) == len(stats_p)
    for g_p, g_s in zip(grads_p, grads_s):
        assert g_p.keys() == g_s.keys() and len(g_p) > 0
        for name in g_p:
            scale = float(g_p[name].abs().max()) + 1e-12
            err = float((g_p[name] - g_s[name]).abs().max())
            assert err <= 1e-5 * max(scale, 1.0), f"{name}: max |diff| {err:.2e} (max |grad| {scale:.2e})"


@pytest.mark.parametrize("model_name", ["micro-llama", "tiny-qwen2"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_update_matches_the_padded_forward(model_name, loss_type):
    lm = _lm(model_name)
    padded = _update(lm, _config(loss_type, prefix_sharing=False))
    shared = _update(lm, _config(loss_type, prefix_sharing=True))
    _assert_same_update(padded, shared)


def test_old_and_reference_logprobs_and_checkpointing_match():
    """num_iterations > 1 (old log-probs), beta > 0 (reference model) and HF gradient
    checkpointing all go through the shared forward too."""
    lm = _lm("micro-llama")
    ref_lm = copy.deepcopy(lm).eval().requires_grad_(False)
    with torch.no_grad():
        for p in ref_lm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    grpo = dict(num_iterations=2, beta=0.05)
    padded = _update(lm, _config("dapo", False, **grpo), ref_lm)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shared = _update(lm, _config("dapo", True, **grpo), ref_lm)
    assert padded[0][0].kl > 0
    _assert_same_update(padded, shared)


def test_eager_attention_takes_the_additive_mask():
    lm = _lm("micro-llama", attn="eager")
    _assert_same_update(_update(lm, _config("grpo", False)), _update(lm, _config("grpo", True)))


def _one_batch(vocab: int, *lengths):
    prompt_ids, completions, advantages = _rollouts(vocab, *lengths)
    return micro_batches(prompt_ids, completions, advantages, pad_id=0, micro_batch_size=len(completions),
                         mask_truncated=True)[0]


def test_logprobs_and_entropy_equal_per_token():
    lm = _lm("micro-llama")
    b = _one_batch(lm.config.vocab_size)
    args = (lm, b.input_ids, b.attention_mask, b.num_completion_tokens)
    kwargs = dict(temperature=0.7, completion_mask=b.completion_mask, return_entropy=True)
    with torch.no_grad():
        padded, shared = token_logprobs(*args, **kwargs), shared_prefix_logprobs(*args, **kwargs)
        naive = shared_prefix_logprobs(*args, **kwargs, impl="naive")
    for out in (shared, naive):
        torch.testing.assert_close(out.logprobs, padded.logprobs, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.entropy, padded.entropy, rtol=0, atol=1e-5)
    assert (shared.logprobs[b.completion_mask == 0] == 0).all()


def test_split_packs_give_the_same_logprobs_and_gradients():
    """Short prompts, long completions and a high pair cost: the prompt is repeated."""
    lm = _lm("tiny-qwen2")
    b = _one_batch(lm.config.vocab_size, [2, 3], [[12, 10, 11], [9, 12, 4]])
    args = (lm, b.input_ids, b.attention_mask, b.num_completion_tokens)

    def run(fn, **extra):
        lm.zero_grad(set_to_none=True)
        out = fn(*args, temperature=0.7, completion_mask=b.completion_mask, **extra)
        (out.logprobs * torch.linspace(-1, 1, out.logprobs.numel()).view_as(out.logprobs)).sum().backward()
        return out.logprobs.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}

    assert len(pack_by_prompt(*args[1:], b.completion_mask, pair_cost=1.0)) == int(b.completion_mask.any(1).sum())
    (lp_padded, g_padded), (lp_split, g_split) = run(token_logprobs), run(shared_prefix_logprobs, pair_cost=1.0)
    torch.testing.assert_close(lp_split, lp_padded, rtol=0, atol=1e-5)
    for name in g_padded:
        torch.testing.assert_close(g_split[name], g_padded[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("prompt_len, completion_len, packs", [(600, 48, 1), (100, 500, 8)])
def test_cost_model_shares_long_prompts_and_splits_long_completions(prompt_len, completion_len, packs):
    """SmolLM2's shapes: a viewer prompt with short answers runs once for the group of 8;
    a short math prompt with 500-token answers is repeated rather than attended densely."""
    from transformers import AutoConfig

    pair_cost = attention_pair_cost(AutoConfig.from_pretrained(resolve_model_path("smollm2-135m-instruct")))
    rows, width = 8, prompt_len + completion_len
    input_ids = torch.arange(width).repeat(rows, 1)  # one prompt, 8 completions
    attention_mask = torch.ones(rows, width, dtype=torch.long)
    got = pack_by_prompt(input_ids, attention_mask, completion_len, pair_cost=pair_cost)
    assert len(got) == packs


def test_pack_groups_rows_by_prompt_and_skips_untrained_tokens():
    b = _one_batch(vocab=50)
    packs = pack_by_prompt(b.input_ids, b.attention_mask, b.num_completion_tokens, b.completion_mask)
    assert len(packs) == len(PROMPT_LENGTHS)
    for pack, p_len, lengths, group in zip(packs, PROMPT_LENGTHS, COMPLETION_LENGTHS, range(3)):
        trained = [n for member, n in enumerate(lengths) if (group, member) not in TRUNCATED and n > 0]
        # The prompt once, then each trained completion minus its last token.
        assert pack.input_ids.shape[0] == p_len + sum(n - 1 for n in trained)
        assert pack.targets.shape[0] == sum(trained)
        assert pack.position_ids[:p_len].tolist() == list(range(p_len))
        # A one-token completion needs no inputs of its own: the prompt predicts it.
        assert pack.segment_ids[pack.segment_ids > 0].unique().numel() == sum(n > 1 for n in trained)
        # Every first completion token is predicted by the prompt's last position.
        first = pack.output_index % b.num_completion_tokens == 0
        assert (pack.hidden_index[first] == p_len - 1).all()
    covered = torch.cat([p.output_index for p in packs])
    assert sorted(covered.tolist()) == b.completion_mask.flatten().nonzero().flatten().tolist()


def test_tree_mask_lets_completions_see_the_prompt_but_not_each_other():
    segments = torch.tensor([0, 0, 1, 1, 2])
    mask = tree_attention_mask(segments, torch.float32)[0, 0]
    assert (mask == 0).int().tolist() == [[1, 0, 0, 0, 0],
                                          [1, 1, 0, 0, 0],
                                          [1, 1, 1, 0, 0],
                                          [1, 1, 1, 1, 0],
                                          [1, 1, 0, 0, 1]]
    assert set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}


def test_nothing_trained_gives_zeros_with_a_backward_through_every_layer():
    lm = _lm("micro-llama")
    b = _one_batch(lm.config.vocab_size)
    out = shared_prefix_logprobs(lm, b.input_ids, b.attention_mask, b.num_completion_tokens,
                                 completion_mask=torch.zeros_like(b.completion_mask))
    assert out.logprobs.shape == b.completion_mask.shape and (out.logprobs == 0).all()
    out.logprobs.sum().backward()
    assert all(p.grad is not None for p in lm.parameters())


@pytest.mark.parametrize("change", ["flash_attention_2", "sliding"])
def test_refuses_models_a_tree_mask_would_misread(change):
    lm = _lm("tiny-qwen2")
    b = _one_batch(lm.config.vocab_size)
    if change == "flash_attention_2":
        lm.config._attn_implementation = "flash_attention_2"
    else:
        lm.config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="grpo.prefix_sharing"):
        shared_prefix_logprobs(lm, b.input_ids, b.attention_mask, b.num_completion_tokens)



FSDP_WORKER = '''
import json, sys, torch
from grailcore import dist as gdist
from grailcore.batch import micro_batches
from grailcore.config import Config
from grailcore.model import load_policy, resolve_model_path
from grailcore.parallel import parallelize
from grailcore.policy import PolicyModel
from grailcore.prefix import attention_pair_cost, pack_by_prompt
from grailcore.types import Completion

info = gdist.init_distributed()


def lm():
    model = load_policy(resolve_model_path("micro-llama"), "float32", "sdpa")
    model.config.use_cache = False
    return model.train()


def rank_batches(rank, vocab):
    """Rank 0: one prompt twice (1 pack), then a group cut at max_tokens (0 packs, masked);
    rank 1: two prompts (2 packs), then one prompt (1 pack). 2 micro-batches of 2 each."""
    gen = torch.Generator().manual_seed(rank)
    prompt = lambda n: torch.randint(1, vocab, (n,), generator=gen).tolist()
    shapes = [(5, 5, 7, 7), (3, 6, 4, 4)][rank]  # prompt length per sequence (same value = same prompt)
    prompts = {{n: prompt(n) for n in set(shapes)}}
    completions = [Completion(text="", token_ids=tuple(torch.randint(1, vocab, (4,), generator=gen).tolist()),
                              logprobs=None, finish_reason="length" if rank == 0 and k >= 2 else "stop")
                   for k in range(4)]
    return micro_batches([prompts[n] for n in shapes], completions, torch.ones(4), pad_id=0,
                         micro_batch_size=2, mask_truncated=True)


def loss(model, batch):
    out = model(batch.input_ids, batch.attention_mask, batch.num_completion_tokens, temperature=1.0,
                completion_mask=batch.completion_mask, prefix_sharing=True)
    weights = torch.linspace(0.5, 1.5, out.logprobs.numel()).view_as(out.logprobs)
    return (out.logprobs * weights).sum(), out.logprobs.detach()


reference = PolicyModel(lm(), "naive")  # the same global batch in one process: both ranks' micro-batches
vocab = reference.lm.config.vocab_size
for rank in range(2):
    for b in rank_batches(rank, vocab):
        (loss(reference, b)[0] / 2).backward()  # FSDP2 averages the ranks' gradients
sharded = parallelize(PolicyModel(lm(), "naive"), Config(), info)
mine = []
for b in rank_batches(info.rank, vocab):
    value, logprobs = loss(sharded, b)
    value.backward()
    mine.append(logprobs)
expected = [loss(reference, b)[1] for b in rank_batches(info.rank, vocab)]
errors = {{name: float((p.grad.full_tensor() - dict(reference.named_parameters())[name].grad).abs().max())
          for name, p in sharded.named_parameters()}}
packs = [len(pack_by_prompt(b.input_ids, b.attention_mask, b.num_completion_tokens, b.completion_mask,
                            attention_pair_cost(reference.lm.config))) for b in rank_batches(info.rank, vocab)]
result = {{"packs": packs, "grad_error": max(errors.values()), "grad_scale": max(float(p.grad.abs().max()) for p in reference.parameters()),
          "logprob_error": max(float((a - b).abs().max()) for a, b in zip(mine, expected))}}
with open(f"{{sys.argv[1]}}/rank{{info.rank}}.json", "w") as f:
    json.dump(result, f)
gdist.finish_worker()  # barrier, destroy, exit without finalization (no exit abort)
'''


def test_fsdp2_ranks_with_different_pack_counts_match_one_process(tmp_path):
    """2 ranks (FSDP2 on gloo) whose micro-batches pack into 1 vs 2 and 0 vs 1 decoder calls:
    every rank makes the same number of calls, and the gradients and log-probs equal a
    1-process run of the same global batch. (Unequal calls pair one rank's layer all-gather
    with another layer's, or hang.)"""
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER.format())
    torchrun(script, str(tmp_path), timeout=240)
    for rank, packs in enumerate([[1, 0], [2, 1]]):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["packs"] == packs and result["grad_scale"] > 0
        assert result["grad_error"] <= 1e-5 * max(result["grad_scale"], 1.0), result
        assert result["logprob_error"] <= 1e-5, result
