"""The slot term (grailcore/slot_nll.py, `grpo.slot_nll_coef`): it finds the answer and
opinion slots on the sampled tokens, its value is the person's label's NLL there under the
model's own logits, it adds coef x its mean to the step's loss and gradient on both loss
paths, and trained alone it puts people's distribution at the slot, not their mode."""

from __future__ import annotations

import json

import pytest
import torch

from grailcore.batch import micro_batches
from grailcore.config import Config, ConfigError, DataConfig, GRPOConfig, ModelConfig, OptimConfig, RolloutConfig
from grailcore.data.schema import Example
from grailcore.model import load_policy, load_tokenizer, resolve_model_path
from grailcore.optimize import policy_update
from grailcore.policy import PolicyModel
from grailcore.slot_nll import SlotTargetBuilder, slot_nll
from grailcore.types import Completion
from grailcore.validation import validate
from test_dist import torchrun
from test_optimize import _GradRecorder, _NoSchedule

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path("micro-llama"))


def _lm():
    lm = load_policy(resolve_model_path("micro-llama"), "float32", "sdpa")
    lm.config.use_cache = False
    return lm.train()


def _example(gold: int | None, opinion: str | None = "decrease", n: int = 5) -> Example:
    return Example(example_id="e", task="viewer", messages=({"role": "user", "content": "q"},),
                   gold_index=gold, n_options=n, opinion_direction=opinion)


def _completion(tokenizer, text: str) -> Completion:
    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) + (tokenizer.eos_token_id,)
    return Completion(text=text, token_ids=ids, logprobs=None, finish_reason="stop")


def test_the_slots_are_found_on_the_sampled_tokens_with_the_persons_label(tokenizer):
    build = SlotTargetBuilder(tokenizer)
    done = _completion(tokenizer, "<think>a b</think>\n<answer>2</answer><opinion>increase</opinion>")
    (answer, options, chosen), (opinion, directions, direction) = build(_example(gold=3), done)
    assert tokenizer.decode(done.token_ids[answer:answer + 1]) == "2"  # what was sampled there
    assert [[tokenizer.decode([t]).strip() for t in ids] for ids in options] == [[str(k)] * 2 for k in range(1, 6)]
    assert chosen == 2  # the person's option 3: '3' and ' 3'
    assert tokenizer.decode(done.token_ids[opinion:opinion + 2]) == "increase"
    assert [tokenizer.decode([t]) for t in directions[direction]] == ["decrease"]
    # No slot where the sample never reaches it, or where it ends at the tag; no label, no slot.
    assert build(_example(gold=3), _completion(tokenizer, "<think>a b")) == []
    assert build(_example(gold=3, opinion=None), _completion(tokenizer, "<think>a</think>\n<answer>")) == []
    assert build(_example(gold=None, opinion=None), done) == []
    # On 12 options '1' also starts 10, 11, 12: option 1 has no token of its own, so no slot;
    # for option 2 the sum runs over the options that have one.
    assert [t for t, _, _ in build(_example(gold=1, n=12), done)] == [opinion]
    (_, options, chosen), _ = build(_example(gold=2, n=12), done)
    assert tokenizer.decode([options[chosen][0]]) == "2" and len(options) == 8


def _rollouts(tokenizer, golds, text="<think>a b</think>\n<answer>{k}</answer><opinion>increase</opinion>"):
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, tokenizer.vocab_size, (11,), generator=gen).tolist()
    completions = [_completion(tokenizer, text.format(k=1 + i % 3)) for i in range(len(golds))]
    examples = [_example(gold) for gold in golds]
    build = SlotTargetBuilder(tokenizer)
    return [prompt] * len(golds), completions, [build(e, c) for e, c in zip(examples, completions)]


def _expected_nll(lm, prompt, completion, slots):
    """The person's label's NLL among the labels at each slot, from one plain forward."""
    ids = torch.tensor([prompt + list(completion.token_ids)])
    probs = (lm(input_ids=ids).logits[0].float() / TEMPERATURE).softmax(-1)
    out = []
    for t, labels, gold in slots:
        p = probs[len(prompt) + t - 1]  # the position that predicts completion token t
        mass = torch.stack([p[list(ids)].sum() for ids in labels])
        out.append(-(mass[gold] / mass.sum()).log())
    return out


@pytest.mark.parametrize("prefix_sharing", [True, False])
@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_the_term_is_the_persons_nll_at_each_slot(tokenizer, impl, prefix_sharing):
    lm = _lm()
    prompts, completions, slots = _rollouts(tokenizer, [3, 1, 2, 5])
    (batch,) = micro_batches(prompts, completions, torch.zeros(4), 0, 4, slots=slots)
    assert len(batch.slots) == 8
    got = PolicyModel(lm, impl, chunk_size=5)(
        batch.input_ids, batch.attention_mask, batch.num_completion_tokens, temperature=TEMPERATURE,
        completion_mask=batch.completion_mask, prefix_sharing=prefix_sharing,
        loss=lambda tokens, **kw: slot_nll(tokens, batch.slots, kw["temperature"]))
    expected = torch.stack([v for p, c, s in zip(prompts, completions, slots) for v in _expected_nll(lm, p, c, s)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _cfg(**grpo) -> Config:
    return Config(model=ModelConfig(gradient_checkpointing=False),
                  rollout=RolloutConfig(temperature=TEMPERATURE, max_completion_tokens=32),
                  grpo=GRPOConfig(group_size=2, loss_type="dapo", **grpo), optim=OptimConfig(grad_clip=1e9))


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_the_step_adds_coef_times_the_mean_slot_nll_to_its_loss_and_gradient(tokenizer, impl):
    """Loss and gradients with the term minus those without = coef x (mean NLL over the
    step's slots), its gradient taken by autograd through plain forwards; over 3 micro-batches."""
    lm, coef = _lm(), 0.5
    prompts, completions, slots = _rollouts(tokenizer, [3, 1, 2, 5, 4, 2])
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, -0.2])
    runs = {}
    for c in (0.0, coef):
        model = PolicyModel(lm, impl, chunk_size=5)
        recorder = _GradRecorder(model)
        batches = micro_batches(prompts, completions, advantages, 0, 2, slots=slots)
        (stats,) = policy_update(model, None, recorder, _NoSchedule(), batches, _cfg(slot_nll_coef=c))
        runs[c] = stats, recorder.grads[0]
    nll = torch.stack([v for p, c, s in zip(prompts, completions, slots) for v in _expected_nll(lm, p, c, s)]).mean()
    lm.zero_grad()
    (coef * nll).backward()
    (with_term, grads), (without, base) = runs[coef], runs[0.0]
    assert with_term.slots == 12 and with_term.slot_nll == pytest.approx(float(nll.detach()), rel=1e-5)
    assert with_term.loss - without.loss == pytest.approx(coef * float(nll.detach()), rel=1e-4)
    for name, param in PolicyModel(lm).named_parameters():
        expected = param.grad if param.grad is not None else torch.zeros_like(param)
        torch.testing.assert_close(grads[name] - base[name], expected, rtol=1e-4, atol=2e-6)


def _slot_distribution(lm, prompt, completion, slot, labels):
    """The labels' probabilities at the slot, renormalised over them, and their total."""
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([prompt + list(completion.token_ids)])).logits[0, len(prompt) + slot - 1]
    probs = (logits.float() / TEMPERATURE).softmax(-1)
    mass = torch.stack([probs[list(ids)].sum() for ids in labels])
    return mass / mass.sum(), float(mass.sum())


def test_trained_alone_the_term_puts_peoples_distribution_at_the_slot_not_their_mode(tokenizer):
    """People pick option 1, 2, 3 of a 3-option slate with probability 0.6 / 0.3 / 0.1. With
    the advantages at 0, the slot term alone moves the options' shares at the slot to those
    probabilities (TV < 0.05) from a start far from them, and leaves their total mass small
    (it moves mass among the options only); a 0/1 reward's optimum would be (1, 0, 0)."""
    torch.manual_seed(0)
    lm, truth = _lm(), torch.tensor([0.6, 0.3, 0.1])
    build = SlotTargetBuilder(tokenizer)
    completion = _completion(tokenizer, "<think>a b</think>\n<answer>3</answer>")
    prompt = list(range(40, 51))
    ((slot, labels, _),) = build(_example(1, opinion=None, n=3), completion)
    start, start_mass = _slot_distribution(lm, prompt, completion, slot, labels)
    assert float((start - truth).abs().sum() / 2) > 0.2
    model = PolicyModel(lm, "fused")
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(150):
        golds = (torch.multinomial(truth, 16, replacement=True, generator=gen) + 1).tolist()
        examples = [_example(g, opinion=None, n=3) for g in golds]
        batches = micro_batches([prompt] * 16, [completion] * 16, torch.zeros(16), 0, 16,
                                slots=[build(e, completion) for e in examples])
        policy_update(model, None, optimizer, _NoSchedule(), batches, _cfg(slot_nll_coef=1.0))
    end, end_mass = _slot_distribution(lm, prompt, completion, slot, labels)
    assert float((end - truth).abs().sum() / 2) < 0.05, end
    assert float(end.max()) < 0.7  # not the mode
    # The options' total is not what it trains: it stays near the start's 0.01 (the plain NLL
    # -log p(person's) drove it above 0.95 in this test, and the demo's layout with it).
    assert start_mass < 0.05 and end_mass < 0.1


def test_the_coefficient_is_validated():
    with pytest.raises(ConfigError, match="slot_nll_coef must be >= 0"):
        validate(Config(grpo=GRPOConfig(slot_nll_coef=-1.0)))
    with pytest.raises(ConfigError, match=r"slot_nll_coef=1.0 trains the answer slot .* data.task='math' has none"):
        validate(Config(data=DataConfig(task="math"), grpo=GRPOConfig(slot_nll_coef=1.0)))


FSDP_WORKER = '''
import json, sys, torch
from grailcore import dist as gdist
from grailcore.batch import micro_batches
from grailcore.config import Config, GRPOConfig, ModelConfig, OptimConfig, RolloutConfig
from grailcore.model import load_policy, resolve_model_path
from grailcore.optimize import policy_update
from grailcore.parallel import parallelize
from grailcore.policy import PolicyModel
from grailcore.types import Completion

info = gdist.init_distributed()
cfg = Config(model=ModelConfig(gradient_checkpointing=False),
             rollout=RolloutConfig(temperature=0.7, max_completion_tokens=8),
             grpo=GRPOConfig(group_size=2, loss_type="dapo", slot_nll_coef=0.5), optim=OptimConfig(grad_clip=1e9))


def lm():
    torch.manual_seed(0)
    model = load_policy(resolve_model_path("micro-llama"), "float32", "sdpa")
    model.config.use_cache = False
    return model.train()


def rank_batches(rank, vocab):
    """4 completions per rank, 2 micro-batches of 2; rank 0 has 3 answer slots, rank 1 one."""
    gen = torch.Generator().manual_seed(rank)
    prompt = torch.randint(1, vocab, (6,), generator=gen).tolist()
    completions = [Completion(text="", token_ids=tuple(torch.randint(1, vocab, (5,), generator=gen).tolist()),
                              logprobs=None, finish_reason="stop") for _ in range(4)]
    labels = ((7,), (8,), (9,))
    slots = [[(1 + k, labels, k % 3)] if k < (3 if rank == 0 else 1) else [] for k in range(4)]
    return micro_batches([prompt] * 4, completions, torch.tensor([1.0, -1.0, 0.5, -0.5]), pad_id=0,
                         micro_batch_size=2, slots=slots)


class Recorder:
    def __init__(self, model):
        self.model, self.grads = model, None

    def step(self):
        self.grads = {{n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                      for n, p in self.model.named_parameters()}}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


class NoSchedule:
    def step(self):
        pass


reference = PolicyModel(lm(), "fused")  # the global batch in one process
vocab = reference.lm.config.vocab_size
whole = Recorder(reference)
(ref_stats,) = policy_update(reference, None, whole, NoSchedule(), rank_batches(0, vocab) + rank_batches(1, vocab), cfg)
sharded = parallelize(PolicyModel(lm(), "fused"), cfg, info)
mine = Recorder(sharded)
(stats,) = policy_update(sharded, None, mine, NoSchedule(), rank_batches(info.rank, vocab), cfg, world_size=2)
result = {{"slots": stats.slots, "reference_slots": ref_stats.slots,
          "grad_error": max(float((mine.grads[n] - g).abs().max()) for n, g in whole.grads.items()),
          "grad_scale": max(float(g.abs().max()) for g in whole.grads.values())}}
with open(f"{{sys.argv[1]}}/rank{{info.rank}}.json", "w") as f:
    json.dump(result, f)
gdist.finish_worker()
'''


def test_two_ranks_with_unequal_slot_counts_match_one_process(tmp_path):
    """FSDP2 on gloo: rank 0 holds 3 slots, rank 1 one; the term is a mean over the step's 4
    slots across ranks, so the averaged gradient equals one process's on the whole batch (a
    per-rank mean would weight rank 1's slot 3x)."""
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER.format())
    torchrun(script, str(tmp_path), timeout=240)
    for rank, slots in enumerate([3, 1]):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["slots"] == slots and result["reference_slots"] == 4 and result["grad_scale"] > 0
        assert result["grad_error"] <= 1e-5 * max(result["grad_scale"], 1.0), result
