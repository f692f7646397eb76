"""The `toy_world` section of a recipe: the settings a quickstart world is built from, and that name its folder."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ToyWorldConfig(BaseModel):
    """The locally built quickstart world: tiny Qwen2.5-VL, synthetic image tasks, SFT warm-up."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)  # as every section of morl.config

    root: str = "~/.cache/morl/toy-world"
    seed: int = 0
    tasks: tuple[str, ...] = ("counting", "grounding", "math", "choice")
    train_per_task: int = Field(512, gt=0)
    eval_per_task: int = Field(256, gt=0)
    sft_steps: int = Field(400, ge=0)
    sft_batch_size: int = Field(32, gt=0)
    sft_lr: float = Field(1e-3, gt=0)
