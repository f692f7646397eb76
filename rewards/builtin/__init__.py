"""Built-in rewards; importing this package registers them (also done in every sandbox worker)."""

from morl.rewards.builtin import boxes, choice, counting, math_answer, temporal

__all__ = ["boxes", "choice", "counting", "math_answer", "temporal"]
