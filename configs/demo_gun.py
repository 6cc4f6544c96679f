"""CPU demo: GRPO on SmolLM2-135M-Instruct and the synthetic gun-control study.

`python -m grailcore.train --cfg configs/demo_gun.py` (README's main job)."""

from grailcore.config import (CheckpointConfig, Config, DataConfig, EvalConfig, GRPOConfig, ModelConfig,
                              OptimConfig, RewardsConfig, RolloutConfig)

config = Config(
    run_dir="runs/demo_gun",
    seed=0,
    model=ModelConfig(name_or_path="smollm2-135m-instruct", dtype="float32", gradient_checkpointing=True),
    data=DataConfig(train_path="synthetic:gun_control", synthetic_n=2000, max_history=3),
    rollout=RolloutConfig(engine="hf", temperature=1.0, max_prompt_tokens=768, max_completion_tokens=48),
    grpo=GRPOConfig(prompts_per_step=4, group_size=4, beta=0.0, loss_type="dr_grpo", scale_rewards="group"),
    optim=OptimConfig(lr=1e-5, max_steps=20, micro_batch_size=8, warmup_steps=2),
    rewards=RewardsConfig(names=("slate_accuracy", "format", "tag_count"), weights=(1.0, 0.5, 0.5)),
    eval=EvalConfig(every=10, on_start=True, max_samples=48),
    checkpoint=CheckpointConfig(every=10, keep=2),
)
