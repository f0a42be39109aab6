"""The trainer: feedback stream -> store -> reward model -> PPO -> policy registry -> policy topic."""
