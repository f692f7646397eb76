"""Rewards for MORL: a registry of reward functions, a router from task type to weighted rewards, built-in rule
rewards, and a sandboxed process pool that runs them under a hard timeout. See rewards/README.md.

Kept light on purpose (every sandbox worker imports it): the router and config live in their own modules.
"""

from morl.rewards.registry import get_reward, list_rewards, reward
from morl.rewards.types import RewardInput, RewardResult

__all__ = ["RewardInput", "RewardResult", "get_reward", "list_rewards", "reward"]
