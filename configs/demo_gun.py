"""CPU demo, part 2: GRPO on the synthetic gun-control study, starting from the SFT warm
start of configs/demo_sft_gun.py (`make demo` runs both).

`python -m grailcore.train --cfg configs/demo_gun.py`"""

from grailcore.config import (CheckpointConfig, Config, DataConfig, EvalConfig, GRPOConfig, LoggingConfig,
                              ModelConfig, OptimConfig, RewardsConfig, RolloutConfig)

config = Config(
    run_dir="runs/demo_gun",
    seed=0,
    model=ModelConfig(name_or_path="runs/demo_sft_gun/final", dtype="float32", gradient_checkpointing=False,
                      trainable_layers=8),
    data=DataConfig(train_path="synthetic:gun_control", synthetic_n=2000, max_history=2),
    rollout=RolloutConfig(engine="vllm", temperature=1.0, max_prompt_tokens=768, max_completion_tokens=48,
                          fallback_to_hf=True),
    grpo=GRPOConfig(prompts_per_step=8, group_size=4, beta=0.0, loss_type="dr_grpo", scale_rewards="group",
                    prefix_sharing=True),
    optim=OptimConfig(lr=3e-5, max_steps=24, micro_batch_size=8),
    rewards=RewardsConfig(names=("slate_accuracy", "format"), weights=(1.0, 0.5)),
    # The simulator is sampled, so it is scored sampled: 4 draws per held-out row at the
    # rollout temperature (greedy decoding hides what GRPO changes in the distribution).
    # 96 rows at steps 0, 12 and 24; each evaluation's completions land in RUN_DIR/eval/, so
    # `python -m grailcore.evaluation.compare` gives the paired change with an interval.
    eval=EvalConfig(every=12, on_start=True, max_samples=96, samples_per_row=4, temperature=1.0),
    checkpoint=CheckpointConfig(every=5, keep=2),
    logging=LoggingConfig(log_samples=1),
)
