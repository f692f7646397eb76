"""Rollout: the engines that sample responses (HF generate, vLLM), the Ray worker that hosts one, and the fleet."""
