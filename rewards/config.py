"""The `rewards:` section of a recipe: which reward functions score each task type, and how they are run.

Reward names are checked when the config is built, so a typo fails before any GPU time is spent, with the key
named by pydantic (e.g. `rewards.routes.grounding.1.fn`).
"""

from __future__ import annotations

import importlib
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from morl.rewards.registry import get_reward

DEFAULT_ROUTES: dict[str, list[dict[str, str]]] = {
    task: [{"fn": task}] for task in ("math", "grounding", "point", "counting", "temporal", "choice")
}


class RewardSpec(BaseModel, extra="forbid"):
    """One reward function on a route: its name (or `package.module:function`), weight and calling convention."""

    fn: str
    weight: float = Field(1.0, gt=0, allow_inf_nan=False)
    adapter: Literal["morl", "trl", "verl"] = "morl"

    @field_validator("fn")
    @classmethod
    def _known(cls, fn: str) -> str:
        try:
            get_reward(fn)
        except LookupError as e:
            raise ValueError(str(e)) from None
        return fn


class RewardsConfig(BaseModel, extra="forbid"):
    """Routes from task type to weighted reward functions, plus the sandbox pool that runs them.

    `routes` given in a recipe override the built-in routing task by task; tasks not named keep their default.
    """

    # Declared before `routes`: pydantic validates fields in order, so the modules are imported (and their
    # @reward decorators have run) by the time the route names are checked.
    modules: list[str] = []  # extra modules to import, in the driver and in every worker, to register rewards
    routes: dict[str, Annotated[list[RewardSpec], Field(min_length=1)]] = Field(
        # built-in names need no check, and skipping it keeps `import morl.config` from importing sympy and scipy
        default_factory=lambda: {
            task: [RewardSpec.model_construct(**spec) for spec in specs] for task, specs in DEFAULT_ROUTES.items()
        }
    )
    num_workers: int = Field(2, ge=1)  # sandbox processes
    timeout_s: float = Field(10.0, gt=0)  # hard limit per reward call; a hung call is killed and counted as an error
    max_error_rate: float = Field(0.05, ge=0, le=1)  # share of errored samples in the window that stops the run
    error_window: int = Field(1000, ge=1)  # samples in that window

    @field_validator("modules")
    @classmethod
    def _import_modules(cls, modules: list[str]) -> list[str]:
        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise ValueError(f"cannot import reward module {name!r}: {e}") from None
        return modules

    @field_validator("routes", mode="before")
    @classmethod
    def _over_defaults(cls, routes: object) -> object:
        return {**DEFAULT_ROUTES, **routes} if isinstance(routes, dict) else routes
