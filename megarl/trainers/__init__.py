"""Training loops composed of models, rollout, rewards and algorithms: RL (GRPO/PPO family) and SFT."""
