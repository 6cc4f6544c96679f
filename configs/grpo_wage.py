"""GRPO on the minimum-wage study with Qwen2.5-1.5B-Instruct (GPU, vLLM rollouts): the baseline arm
beside configs/grail_wage.py (same settings, no discriminator).

The model path is a PLACEHOLDER: put an HF dir of Qwen2.5-1.5B-Instruct at
models/Qwen2.5-1.5B-Instruct or pass `--model.name-or-path /your/dir` (nothing is
downloaded). Data defaults to the synthetic study; for real data pass
`--data.train-path <study dir | JSONL | parquet>` and `--data.eval-path`.
Launch: `torchrun --nproc_per_node 8 -m grailcore.train --cfg configs/grpo_wage.py`.
"""

from grailcore.config import (CheckpointConfig, Config, DataConfig, EvalConfig, GRPOConfig, ModelConfig,
                              OptimConfig, RewardsConfig, RolloutConfig)

config = Config(
    run_dir="runs/grpo_wage",
    seed=0,
    model=ModelConfig(name_or_path="models/Qwen2.5-1.5B-Instruct", dtype="bfloat16", gradient_checkpointing=True),
    data=DataConfig(train_path="synthetic:minimum_wage", synthetic_n=20000, max_history=12),
    rollout=RolloutConfig(engine="vllm", temperature=1.0, max_prompt_tokens=2048, max_completion_tokens=512,
                          vllm_gpu_memory_utilization=0.3),
    grpo=GRPOConfig(prompts_per_step=64, group_size=8, beta=0.0, loss_type="dr_grpo", scale_rewards="group"),
    optim=OptimConfig(lr=1e-6, max_steps=500, micro_batch_size=4, warmup_steps=10, schedule="cosine"),
    rewards=RewardsConfig(names=("slate_accuracy", "format"), weights=(1.0, 0.5)),
    eval=EvalConfig(every=50, on_start=True, max_samples=512),
    checkpoint=CheckpointConfig(every=50, keep=3),
)
