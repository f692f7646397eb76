"""The policy learner: DeepSpeed ranks that apply one update per rollout batch, and what they share."""
