"""The MORL update (and the GRPO ablation) as small pure functions and one object per update rule."""
