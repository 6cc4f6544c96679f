"""Causal credit for the slot rewards (grailcore/credit.py, `grpo.causal_slot_credit`): each
reward's share of the advantage sums to the advantage of the total, a slot reward's share is
cut at the token sampled at its slot, and the step's gradient is then exactly
-sum_t A_t grad log pi(token t) with those per-token advantages, on both loss paths."""

from __future__ import annotations

import json

import pytest
import torch

from grailcore.advantages import advantage_components, decoupled_advantages, group_advantages
from grailcore.batch import micro_batches
from grailcore.config import Config, GRPOConfig, ModelConfig, OptimConfig, RolloutConfig
from grailcore.credit import WHOLE, slot_cuts, token_advantages
from grailcore.data.schema import Example
from grailcore.model import load_policy, load_tokenizer, resolve_model_path
from grailcore.optimize import policy_update
from grailcore.policy import PolicyModel
from grailcore.slot_nll import SlotTargetBuilder
from grailcore.types import Completion
from test_optimize import _GradRecorder, _NoSchedule

TEMPERATURE = 0.7
MAX_TOKENS = 32
DONE = "<think>a b</think>\n<answer>{k}</answer><opinion>increase</opinion>"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path("micro-llama"))


def _example(gold: int = 3) -> Example:
    return Example(example_id="e", task="viewer", messages=({"role": "user", "content": "q"},),
                   gold_index=gold, n_options=5, opinion_direction="decrease")


def _completion(tokenizer, text: str) -> Completion:
    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) + (tokenizer.eos_token_id,)
    return Completion(text=text, token_ids=ids, logprobs=None, finish_reason="stop")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_the_shares_sum_to_the_advantage_of_the_weighted_total(scale):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, 3, generator=gen)
    rewards[4:8] = rewards[4]  # a group where every reward is constant: no signal
    rewards[8:12, 0] = 2.0  # a group where one reward is constant
    weights = (1.0, 0.5, 2.0)
    shares = advantage_components(rewards, weights, group_size=4, scale=scale)
    total = (rewards * torch.tensor(weights)).sum(dim=1)
    torch.testing.assert_close(shares.sum(dim=1), group_advantages(total, 4, scale).advantages, rtol=1e-5, atol=1e-6)
    assert torch.equal(shares[4:8], torch.zeros(4, 3)) and torch.equal(shares[8:12, 0], torch.zeros(4))


def test_the_shares_sum_to_gdpos_advantage_under_normalize_then_sum():
    rewards = torch.randn(12, 2, generator=torch.Generator().manual_seed(1))
    rewards[0:4] = 1.0
    shares = advantage_components(rewards, (1.0, 0.25), 4, aggregation="normalize_then_sum")
    expected = decoupled_advantages(rewards, (1.0, 0.25), 4).advantages
    torch.testing.assert_close(shares.sum(dim=1), expected, rtol=1e-5, atol=1e-6)


def test_a_slot_reward_is_cut_at_the_token_sampled_at_its_slot(tokenizer):
    names = ("choice_likelihood", "opinion_likelihood", "format")
    done = _completion(tokenizer, DONE.format(k=2))
    dodge = _completion(tokenizer, "<think>a b</think>\n<answer>2</answer>")  # no opinion: not committed
    cuts = slot_cuts(SlotTargetBuilder(tokenizer), names, [_example(), _example()], [done, dodge])
    (answer, opinion, whole), dodged = cuts.tolist()
    assert tokenizer.decode(done.token_ids[answer:answer + 1]) == "2"  # the answer token: not credited
    assert tokenizer.decode(done.token_ids[:answer]).endswith("<answer>")  # everything before it is
    assert tokenizer.decode(done.token_ids[opinion:opinion + 2]) == "increase"
    assert whole == WHOLE and dodged == [WHOLE] * 3  # the floor is the whole completion's doing


def test_per_token_advantages_keep_each_share_before_its_cut():
    shares = torch.tensor([[1.0, 0.5, -0.25], [-2.0, 0.0, 1.0]])
    cuts = torch.tensor([[3, 5, WHOLE], [WHOLE, WHOLE, WHOLE]])
    got = token_advantages(shares, cuts, width=7)
    assert got[0].tolist() == [1.25] * 3 + [0.25] * 2 + [-0.25] * 2
    assert got[1].tolist() == [-1.0] * 7  # no cut: the sequence's advantage on every token


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_the_step_gradient_is_the_per_token_reinforce_sum(tokenizer, impl):
    """On-policy, dr_grpo: grad = -1 / (B * max_tokens) * sum_{b,t} A_{b,t} grad log pi(token),
    with A from `token_advantages`, checked against autograd through plain forwards."""
    lm = load_policy(resolve_model_path("micro-llama"), "float32", "sdpa")
    lm.config.use_cache = False
    lm.train()
    prompt = torch.randint(3, tokenizer.vocab_size, (11,), generator=torch.Generator().manual_seed(0)).tolist()
    completions = [_completion(tokenizer, DONE.format(k=k)) for k in (1, 2, 3, 4)]
    names = ("choice_likelihood", "format")
    shares = advantage_components(torch.tensor([[-1.0, 1.0], [-3.0, 1.0], [-2.0, 0.0], [-0.5, 1.0]]),
                                  (1.0, 0.5), group_size=4)
    cuts = slot_cuts(SlotTargetBuilder(tokenizer), names, [_example()] * 4, completions)
    advantages = token_advantages(shares, cuts, max(len(c.token_ids) for c in completions))
    assert not torch.equal(advantages, shares.sum(1)[:, None].expand_as(advantages))  # the cut changed something
    cfg = Config(model=ModelConfig(gradient_checkpointing=False),
                 rollout=RolloutConfig(temperature=TEMPERATURE, max_completion_tokens=MAX_TOKENS),
                 grpo=GRPOConfig(group_size=4, loss_type="dr_grpo"), optim=OptimConfig(grad_clip=1e9))
    model = PolicyModel(lm, impl, chunk_size=5)
    recorder = _GradRecorder(model)
    batches = micro_batches([prompt] * 4, completions, advantages, 0, 2)
    policy_update(model, None, recorder, _NoSchedule(), batches, cfg)
    lm.zero_grad()
    objective = 0.0
    for b, completion in enumerate(completions):
        ids = torch.tensor([prompt + list(completion.token_ids)])
        logits = lm(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / TEMPERATURE
        logp = logits.log_softmax(-1).gather(1, ids[0, len(prompt):, None]).squeeze(1)
        objective = objective + (advantages[b, :logp.shape[0]] * logp).sum()
    (-objective / (4 * MAX_TOKENS)).backward()
    for name, param in model.named_parameters():
        expected = param.grad if param.grad is not None else torch.zeros_like(param)
        torch.testing.assert_close(recorder.grads[0][name], expected, rtol=1e-4, atol=2e-6)


_TWO_RANKS = '''
import json, sys, dataclasses, torch
from grailcore import dist as gdist
from grailcore.config import Config
from grailcore.steps import step_advantages, step_components

out, scale, aggregation = sys.argv[1:4]
info = gdist.init_distributed()
everyone = torch.load(f"{out}/rewards.pt")  # [world * P * G, R], the same on every rank
n = everyone.shape[0] // info.world_size
mine = everyone[info.rank * n:(info.rank + 1) * n]
cfg = Config()
cfg = dataclasses.replace(cfg, rewards=dataclasses.replace(cfg.rewards, names=("a", "b"), weights=(1.0, 0.5)),
                          grpo=dataclasses.replace(cfg.grpo, group_size=4, scale_rewards=scale,
                                                   reward_aggregation=aggregation))
shares = step_components(mine, cfg)
if aggregation == "normalize_then_sum":
    whole = step_advantages(mine, 4, scale, cfg.rewards.weights).advantages
else:
    whole = step_advantages((mine * torch.tensor(cfg.rewards.weights)).sum(1), 4, scale).advantages
with open(f"{out}/rank{info.rank}.json", "w") as f:
    json.dump({"shares": shares.tolist(), "whole": whole.tolist()}, f)
gdist.shutdown()
'''


@pytest.mark.parametrize(("scale", "aggregation"), [("batch", "sum_then_normalize"), ("group", "normalize_then_sum")])
def test_two_ranks_split_the_advantage_as_one_rank_does_where_the_scale_needs_the_whole_step(
        tmp_path, scale, aggregation):
    """Batch scaling and GDPO divide by a std of the whole step: at world size 2 each rank's
    shares are the one-rank shares of the gathered rewards, cut back to its rows, and they sum
    to the advantage `step_advantages` gives that rank."""
    from test_dist import torchrun

    rewards = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    rewards[8:12, 0] = 1.0  # rank 1's first group: one reward constant
    torch.save(rewards, tmp_path / "rewards.pt")
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    torchrun(script, str(tmp_path), scale, aggregation, timeout=120)
    one_rank = advantage_components(rewards, (1.0, 0.5), 4, scale, aggregation)
    for rank in range(2):
        result = {k: torch.tensor(v) for k, v in json.loads((tmp_path / f"rank{rank}.json").read_text()).items()}
        torch.testing.assert_close(result["shares"], one_rank[rank * 8:(rank + 1) * 8])
        torch.testing.assert_close(result["shares"].sum(1), result["whole"], rtol=1e-5, atol=1e-6)
    # a per-rank split would divide by each rank's own std: the check above would catch it
    assert not torch.allclose(advantage_components(rewards[8:], (1.0, 0.5), 4, scale, aggregation), one_rank[8:])
