"""Every setting of grailcore, as frozen dataclasses with documented fields.

Presets are plain `Config` instances in `configs/*.py`; the CLI (tyro) overrides any
field (`--optim.lr 1e-6 --grpo.group-size 8`). Nothing mutates a config once built;
`grailcore.validation.validate` rejects impossible settings before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kernels.objective import KLEstimator, LossType, PolicyLoss


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"
    """Registry name (see `python -m grailcore.models list`) or a local HF model dir."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype of the trained policy (optimizer states follow it)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = True
    trainable_layers: int = 0
    """Train only the top N decoder layers and the final norm (0 = every parameter). The
    frozen bottom runs without autograd, so a step costs far less on small machines."""
    logprob_impl: Literal["fused", "naive"] = "fused"
    """Token log-probs through kernels/ (never builds [N, V] logits) or plain log_softmax."""
    logprob_chunk_size: int = 1024
    """Rows per chunk of the fused log-prob and loss kernels: fewer rows hold less memory and
    take more time (the loss at 4096 tokens and V=151936 on CPU, 128 rows: 0.06x naive's peak
    memory at about half its time; bench/RESULTS.md)."""
    lora_rank: int = 0
    """Train LoRA adapters of this rank (peft) instead of the weights; 0 = off (full
    fine-tuning, the default). Only the adapters train and sit in the optimizer; with
    grpo.beta > 0 the reference is the same model with its adapters off (no second copy);
    the engine receives merged weights; checkpoints hold the adapters; the export is a
    merged plain HF model. LoRA usually wants a larger optim.lr than full fine-tuning."""
    lora_alpha: float = 32.0
    """LoRA scale: a targeted weight W acts as W + (lora_alpha / lora_rank) * B @ A."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input in training. Keep 0 for GRPO: the engine samples from
    the merged weights without it, so > 0 biases the trainer's log-probs against the engine's."""
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                            "gate_proj", "up_proj", "down_proj")
    """Names (peft suffix match) of the linear layers inside the decoder layers that get
    adapters; the defaults are every projection of Llama / Qwen2 blocks."""


@dataclass(frozen=True)
class MixtureSource:
    """One dataset of a training mixture (`data.mixture`)."""

    path: str
    """A dataset dir/file or `synthetic:<issue>`, as `data.train_path`."""
    weight: float = 1.0
    """Relative share of the prompts drawn from this source (normalised over the mixture)."""
    name: str | None = None
    """Label in per-source metrics (`reward/total/<name>`); None derives it from `path`."""
    system_prompt: str | None = None
    """This source's system prompt; None uses `data.system_prompt` (then the task's default)."""
    task: Literal["viewer", "math"] | None = None
    """This source's task; None uses `data.task`."""
    eval_path: str | None = None
    """Held-out data of this source; None uses the validation split of `path`."""


@dataclass(frozen=True)
class DataConfig:
    train_path: str = "synthetic:gun_control"
    """A dataset dir/file (synthetic dir, JSONL, parquet, HF on-disk, pre-rendered
    prompts) or `synthetic:<issue>` to generate the study in memory."""
    eval_path: str | None = None
    """Evaluation data; None uses the validation split of `train_path`."""
    task: Literal["viewer", "math"] = "viewer"
    synthetic_n: int = 3000
    """Decisions generated for `synthetic:<issue>` paths."""
    seed: int = 0
    """Seed of data generation, option shuffling and data order."""
    max_history: int = 12
    """Watched videos shown in RECENTLY WATCHED; 0 = all."""
    show_ids: bool = False
    """Show video ids in OPTIONS."""
    shuffle_options: bool = True
    """Shuffle each slate with a seeded RNG (gold index remapped), for every source: synthetic,
    Decision rows and pre-rendered prompts alike. False shows the order the data stores (logged
    as a warning: a gold-position bias in the data then reaches training)."""
    allow_leaks: bool = False
    """Train even when the leak audit run at build (raw rows and rows as trained, training and
    eval data) says LEAK; otherwise such a run stops before loading the model. Recorded in
    the run's config and summary; use it only after reading `python -m grailcore.data.audit PATH`."""
    system_prompt: str | None = None
    """Override the task's default system prompt."""
    layout: Literal["think", "direct"] = "think"
    """Viewer answer layout: 'think' asks for `<think>..</think><answer>k</answer><opinion>..</opinion>`;
    'direct' for `<answer>k</answer><opinion>..</opinion>` with no reasoning, whose exact choice
    distribution is one forward pass (no sampling). Rewards, SFT targets and evaluation follow it."""
    skip_bad_rows: bool = False
    """Count and report malformed rows instead of stopping at the first one."""
    max_train_samples: int | None = None
    continue_order: bool = True
    """When the starting model is a grailcore export trained on these same training rows (an
    SFT warm start), continue its prompt order where that run stopped, so this stage draws the
    rows it has not trained on first (logged at start); false starts the order afresh."""
    mixture: tuple[MixtureSource, ...] = ()
    """Train on several datasets at once, drawn by weight (see grailcore.mixture); when set it
    replaces train_path/eval_path, and max_train_samples caps each source."""


@dataclass(frozen=True)
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"
    """Rollout engine: transformers `generate` or in-process vLLM."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_tokens: int = 1024
    max_completion_tokens: int = 128
    vllm_kv_cache_bytes: int = 1 << 30
    """KV cache size for vLLM (explicit bytes; fractions are fragile on CPU)."""
    vllm_gpu_memory_utilization: float = 0.3
    engine_dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    """Parameter dtype of the vLLM engine. "auto": bfloat16 where the hardware multiplies in it
    natively (a CPU with AVX512-BF16 or AMX-BF16, a CUDA GPU with bf16), float32 otherwise
    (grailcore/rollout/precision.py); the choice and its reason are logged at start and written
    to config.yaml. The HF engine always samples from the policy in model.dtype. A bf16 engine
    against an fp32 trainer puts `rollout/logprob_diff` near 0.015 nats instead of ~0."""
    engine_threads: int = 1
    """CPU: torch threads the vLLM engine generates, scores and reloads weights on (the
    trainer gets its own count back after each call); 0 = the trainer's count. 1 is vLLM's
    serving policy and the safe choice where other jobs share the cores: there 2 threads
    decoded 7-10x slower. On a dedicated 2-core machine 2 threads decoded in 0.82-0.86x the
    time and pushed a full sync in 0.67-0.74x (bench/RESULTS.md). With several ranks on one machine
    keep ranks x threads <= cores. Unused on GPU."""
    sync_every: int = 1
    """Push trainer weights into the engine every N optimizer steps. The first push sends every
    weight, later ones only what training changes (trainable layers, LoRA-merged layers)."""
    sync_bucket_mib: int = 8
    """Under FSDP, all-gather the weights to sync this many MiB of parameters per collective
    (one flattened buffer, cast to the engine's dtype: an fp32 policy's 8 MiB travel as 4 MiB to
    a bf16 engine); 0 = one collective per tensor. 8 MiB: 0.79x the per-tensor time at world
    size 2 on gloo (bench/RESULTS.md, weight sync)."""
    fallback_to_hf: bool = False
    """If the vLLM engine fails to start, continue with the HF engine (else stop)."""


@dataclass(frozen=True)
class GRPOConfig:
    prompts_per_step: int = 2
    """Distinct prompts per optimizer step (all ranks together)."""
    group_size: int = 4
    """Completions sampled per prompt."""
    num_iterations: int = 1
    """Optimisation passes over each batch of rollouts (>1 uses old-policy ratios)."""
    beta: float = 0.0
    """KL weight to the reference model; 0 loads no reference model."""
    kl_estimator: KLEstimator = "k3"
    """Per-token estimate of KL(policy || reference), with log r = ref - logp: k1 = -log r,
    k2 = (log r)^2 / 2, k3 = r - 1 - log r (Schulman's estimators; see docs/objective.md)."""
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    """Clip range [1 - epsilon_low, 1 + epsilon_high] of the ratio; cispo caps its weight at
    1 + epsilon_high only. GSPO's sequence ratios want far smaller values (its paper: 3e-4, 4e-4)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    reward_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    """How several rewards become one advantage. sum_then_normalize: the weighted total,
    normalised per `scale_rewards`. normalize_then_sum (GDPO, TRL's multi_objective_aggregation
    of that name): each reward normalised within its group on its own, the weighted sum, then
    divided by the step's std, so a reward with a small spread (D's among the options) is not
    drowned by one with a large spread (the layout); needs scale_rewards="group"."""
    policy_loss: PolicyLoss = "grpo"
    """Policy term per token: grpo = -min(r A, clip(r) A), r the token's ratio (PPO/GRPO);
    gspo = the same with one ratio per sequence, exp(mean of its tokens' log-ratios) (GSPO);
    cispo = -sg(min(r, 1 + epsilon_high)) A log p (CISPO). See docs/objective.md."""
    loss_type: LossType = "grpo"
    """Aggregation: grpo = mean over each sequence's tokens, then over sequences; bnpo/dapo =
    mean over the step's tokens (dapo: across ranks); dr_grpo = sum / (sequences *
    rollout.max_completion_tokens)."""
    engine_is_correction: Literal["auto", "on", "off"] = "auto"
    """Correct for sampling from the engine rather than the trainer: scale each token's policy
    loss by min(exp(old - engine log-prob), engine_is_cap) and drop sequences outside
    engine_seq_band. auto = on when they can differ: rollout.engine "vllm" (its own kernels and
    dtype) or rollout.sync_every > 1 (stale engine weights). The mismatch metrics are logged
    either way."""
    engine_is_cap: float = 2.0
    """C of the truncated importance weight min(ratio, C); >= 1."""
    engine_seq_band: tuple[float, float] | None = (0.5, 2.0)
    """Drop a sequence whose geometric-mean engine ratio exp(mean(old - engine)) is outside
    [low, high]: wide enough that bf16-vs-fp32 noise never trips it, narrow enough for a stale
    or broken rollout. None keeps every sequence."""
    slot_nll_coef: float = 0.0
    """Viewer task: add coef x the mean NLL of the person's option among the slate's options
    (and of their opinion direction among the three) at each answer slot the sampled
    completions reach, under softmax(logits / T): the direct half of the gradient of the
    likelihood rewards' objective, which the advantages alone miss (grailcore/slot_nll.py,
    docs/training.md). Its optimum is people's distribution at the slot, not the mode. 0 = off.
    With the likelihood rewards, 2 / (max_completion_tokens x the group's reward std) weighs the
    two halves of their gradient alike (0.017-0.025 on the CPU demo); 0.01 there turned the
    likelihood arm and GRAIL toward people (experiments/results/grpo_reward_exact/)."""
    causal_slot_credit: bool = True
    """A slot reward (`choice_likelihood`, `opinion_likelihood`) is read at its slot, so the
    token sampled there and those after it cannot change it: their advantage leaves out its
    share (per-token advantages, grailcore/credit.py). Same expected gradient, less noise;
    False gives every token of a completion its whole advantage. Other rewards unchanged."""
    mask_truncated: bool = False
    """Drop completions that hit max_completion_tokens from the loss."""
    dynamic_sampling: bool = False
    """Resample zero-variance groups (up to `max_resample_attempts`)."""
    reject_threshold: float | None = None
    """Resample a group whose best reward is below this (reject sampling)."""
    max_resample_attempts: int = 0
    """Rounds of resampling for `dynamic_sampling` / `reject_threshold`; either needs >= 1
    (validation refuses the pair with 0, which would resample nothing)."""
    prefix_sharing: bool = True
    """Training forward runs each distinct prompt once, its completions packed behind it
    under a tree attention mask (grailcore/prefix.py): same loss and gradients, no repeated
    prompt, no padding computed. Helps when prompts are long next to completions (viewer
    prompts: ~3x fewer training tokens); attention grows with (prompt + all completions)^2,
    so time long-completion jobs before relying on it. Needs sdpa/eager attention and a
    Llama/Qwen2 model; set False for flash_attention_2 or other families."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    micro_batch_size: int = 4
    """Sequences per forward/backward; gradients accumulate to the full step."""
    max_steps: int = 100
    max_consecutive_bad_steps: int = 3
    """Skip a step whose loss or gradient is NaN/inf; stop after this many in a row."""


@dataclass(frozen=True)
class RewardsConfig:
    names: tuple[str, ...] = ("slate_accuracy", "format")
    """Every reward of a training step: rule rewards (`grailcore.rewards.available_rewards()` lists
    every name), the policy's own log-probability of the person's choice (`choice_likelihood`,
    `opinion_likelihood`, read at the answer slot) and the learned `gail` reward (GRAIL's
    discriminator, set up by `gail.*`)."""
    weights: tuple[float, ...] = (1.0, 0.5)
    """One weight per name: total reward = sum of weight * reward, the discriminator's included."""
    math_verify_timeout_s: float = 5.0
    length_target: int = 200
    """`length` reward: target completion length in words."""
    likelihood_floor: float = -10.0
    """`choice_likelihood` / `opinion_likelihood`: log-probabilities are clipped below here
    (nats; -10 = p of 4.5e-5), and a completion without a committed answer gets it."""


@dataclass(frozen=True)
class GailConfig:
    """The slate-aware discriminator behind the `gail` reward (it scores the chosen option
    against the whole slate, see docs/training.md); on when rewards.names lists `gail`,
    weighted by its rewards.weights entry like every other reward."""

    model: str = "minilm-l6"
    """Discriminator encoder: registry name or local HF encoder dir."""
    reward: Literal["d", "log_d", "neg_log_1m_d", "logit"] = "logit"
    """r(D): D, log D, -log(1 - D) or log D - log(1 - D), clipped to +-reward_clip. A completion
    without a committed answer in the layout gets the floor of that range (0 for d and
    neg_log_1m_d, -reward_clip for log_d and logit), so dodging never pays."""
    dodge: Literal["floor", "worst_option"] = "floor"
    """What a dodge (no committed answer in the layout) is paid. floor: the bottom of r(D)'s
    range (above). worst_option: r(D) of its own slate's least human-looking option, the
    least any committed answer to that prompt is paid; dodging still never beats answering,
    but this reward then carries no layout signal (D's reward spread is among options only)
    and `format` alone pays the layout. Under floor, committing is worth up to 2 *
    reward_clip more than dodging, which can outweigh what D says about the options."""
    reward_clip: float = 5.0
    lr: float = 2e-5
    """The pretrained encoder's learning rate."""
    head_lr: float = 3e-3
    """The head's (fresh, its output layer zero at the start). At the encoder's rate the
    logits move by about lr per AdamW step and D sat at 0.5 through the CPU demo's runs;
    in `tests/rewards/test_discriminator.py`'s position-habit case, 36 D steps with the
    encoder at 1e-4 open a logit gap of 0.007 with the head at 1e-4, 0.15 at 1e-3, 1.06 at 3e-3."""
    freeze_encoder: bool = False
    """Keep the pretrained encoder fixed and train the head alone. Each training example's
    slate is then encoded once (no dropout) and its features kept, so a D step costs the
    head only: pair it with many disc_steps and a large replay. For runs whose few policy
    choices a step (the CPU demo: ~15) cannot fine-tune an encoder (D stayed at chance)."""
    disc_steps: int = 1
    max_tokens: int = 256
    """Token budget of one (option, state) pair; each slate is K such pairs."""
    label_smoothing: float = 0.0
    negatives: Literal["differing", "all"] = "differing"
    replay_size: int = 0
    replay_ratio: float = 0.5
    """Replayed past policy negatives per fresh negative in each D update (above 1 with a
    frozen encoder, whose replayed slates cost no encoder pass)."""
    frozen_path: str | None = None
    """Load D from this file and never update it."""
    warmup_steps: int = 0
    """The run's first warmup_steps steps train D alone: rollouts are sampled and scored and
    D learns from them, the policy is not updated (no loss, no optimizer step, no weight
    sync). They count in optim.max_steps, so a policy trained for N steps needs
    max_steps = warmup_steps + N. D then starts the policy's steps having seen the
    starting policy's own choices instead of at chance."""


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0
    """Evaluate every N steps (0 = only at the end)."""
    on_start: bool = False
    max_samples: int = 64
    samples_per_row: int = 1
    """1 = greedy; k > 1 = k samples per row (choice distributions)."""
    temperature: float = 1.0
    """Sampling temperature when samples_per_row > 1."""
    best_metric: str = "eval/accuracy"
    permutations: int = 0
    """Order robustness (eval/order/*): also sample every eval row under R seeded option
    permutations (seeded by `seed`); each evaluation then samples R + 1 times as many rows."""
    exact_distributions: bool = True
    """Read the model's own choice/opinion distribution at the answer slot of every sampled
    completion (one extra scoring pass, docs/evaluation.md); False = sampled answers only, and
    the fidelity metrics fall back to a smoothed histogram of them."""


@dataclass(frozen=True)
class SFTConfig:
    batch_size: int = 8
    """Examples per optimizer step (split into optim.micro_batch_size chunks)."""
    rationale: str = "The viewer's profile and recent viewing point to option {answer}."
    """Viewer task: the <think> text of each target; {answer} is the gold option number."""


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0
    """Save every N steps (0 = only at the end)."""
    keep: int = 2
    sharded: bool = True
    """Every rank writes its own shards of model and optimizer (torch.distributed.checkpoint);
    False gathers them to rank 0 into model.safetensors + optimizer.pt. Resume reads either,
    at any world size."""
    export_final: bool = True
    """Export the final policy as a safetensors HF dir."""
    push_to_hub: str | None = None
    """Upload the final export to this Hugging Face Hub repo (`owner/name`; needs network and a
    token); None uploads nothing."""


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    progress: bool = True
    log_samples: int = 1
    """Completions printed per step (rank 0)."""
    rollouts: bool = False
    """Write every completion of every GRPO step (its answer, rewards and advantage) to
    run_dir/rollouts/step_NNNNNN.rankR.jsonl; `experiments/rollout_positions.py` reads them."""
    wandb_project: str | None = None
    """Also log metrics to this Weights & Biases project (needs `wandb`); None = local only."""
    wandb_entity: str | None = None
    """W&B team or user owning the project; None = the account's default."""


@dataclass(frozen=True)
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    resume: bool = False
    """Continue from the latest good checkpoint in run_dir."""
    deterministic: bool = False
    dry_run: bool = False
    """Run one step with its update withheld and print what a full run costs (tokens,
    memory); writes run_dir/dry_run.json, no checkpoint and no metrics."""
    collective_timeout_s: float = 1800.0
    """Under torchrun: a collective that does not complete within this many seconds (a peer
    rank died or is stuck) fails the job with a message naming the phase it was in
    (rollout, update, weight sync, checkpoint, evaluation), instead of hanging."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    gail: GailConfig = field(default_factory=GailConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


class ConfigError(ValueError):
    """An impossible or inconsistent setting; the message names the field and the fix."""
