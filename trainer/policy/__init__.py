"""The policy-optimisation stage: supervised fine-tuning (sft.py, config `SFTConfig`) and PPO on a LoRA
adapter (ppo.py, config `PPOConfig`; its losses in ppo_losses.py), with rollouts sampled by transformers or
a vLLM engine (rollout.py) and step checkpoints to resume a run from (checkpoint.py).
"""
