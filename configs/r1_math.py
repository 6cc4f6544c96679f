"""R1-style GRPO on math with the seed's weighted rule rewards (Qwen2.5-1.5B-Instruct, GPU).

The model path is a PLACEHOLDER (`--model.name-or-path /your/dir`); data defaults to the
generated problems; for your own pass `--data.train-path problems.jsonl --data.eval-path
held_out.jsonl` (columns `problem`, `answer`). Evaluation every 25 steps, reject sampling
of groups whose best reward is under 1.0 (up to 2 resamples)."""

from grailcore.config import (CheckpointConfig, Config, DataConfig, EvalConfig, GRPOConfig, ModelConfig,
                              OptimConfig, RewardsConfig, RolloutConfig)
from grailcore.rewards import DEFAULT_MATH_REWARDS

names, weights = DEFAULT_MATH_REWARDS

config = Config(
    run_dir="runs/r1_math",
    seed=0,
    model=ModelConfig(name_or_path="models/Qwen2.5-1.5B-Instruct", dtype="bfloat16", gradient_checkpointing=True),
    data=DataConfig(task="math", train_path="synthetic:math", synthetic_n=20000),
    rollout=RolloutConfig(engine="vllm", temperature=1.0, max_prompt_tokens=512, max_completion_tokens=512,
                          vllm_gpu_memory_utilization=0.3),
    grpo=GRPOConfig(prompts_per_step=64, group_size=8, beta=0.04, loss_type="grpo", scale_rewards="group",
                    reject_threshold=1.0, max_resample_attempts=2),
    optim=OptimConfig(lr=3e-6, max_steps=500, micro_batch_size=4, warmup_steps=10, schedule="cosine"),
    rewards=RewardsConfig(names=names, weights=weights, length_target=200),
    eval=EvalConfig(every=25, on_start=True, max_samples=256, best_metric="eval/accuracy"),
    checkpoint=CheckpointConfig(every=50, keep=3),
)
