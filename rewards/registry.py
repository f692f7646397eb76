"""Reward functions by name: the `@reward` decorator, and `package.module:function` paths imported on demand.

Workers resolve rewards by name (never receive function objects), so a name must mean the same function in the
driver and in every worker process.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, overload

from morl.rewards.types import RewardInput

RewardFn = Callable[[str, RewardInput], Any]  # returns a number, or a dict with a "score" number

_REGISTRY: dict[str, RewardFn] = {}
_LABEL_KEYS: dict[RewardFn, tuple[str, ...]] = {}  # the label keys each function declares it reads


@overload
def reward(name: RewardFn) -> RewardFn: ...
@overload
def reward(name: str | None = None, *, label_keys: Sequence[str] = ()) -> Callable[[RewardFn], RewardFn]: ...
def reward(
    name: str | RewardFn | None = None, *, label_keys: Sequence[str] = ()
) -> RewardFn | Callable[[RewardFn], RewardFn]:
    """Register `fn(response, sample)` under `name` (default: the function's name); usable bare or called.

    `label_keys`: the keys of `sample.label` the function cannot score without; every row of a task routed to it
    is checked for them when the data loads, so a missing key stops the run naming the file and line."""
    if callable(name):
        return reward(None)(name)

    def register(fn: RewardFn) -> RewardFn:
        key = name or fn.__name__
        if ":" in key:
            raise ValueError(f"reward name {key!r} must not contain ':' (reserved for module:function paths)")
        old = _REGISTRY.get(key)
        if old is not None and _origin(old) != _origin(fn):
            raise ValueError(f"reward {key!r} is already registered by {old.__module__}.{old.__qualname__}")
        _REGISTRY[key] = fn
        _LABEL_KEYS[fn] = tuple(label_keys)
        return fn

    return register


def get_reward(name_or_path: str) -> RewardFn:
    """A registered reward by name, or the function at `package.module:function` (the module is imported)."""
    if ":" in name_or_path:
        module_name, _, attr = name_or_path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise LookupError(f"cannot import {module_name!r} for reward {name_or_path!r}: {e}") from e
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise LookupError(f"module {module_name!r} has no function {attr!r}")
        return fn
    _load_builtins()
    try:
        return _REGISTRY[name_or_path]
    except KeyError:
        raise LookupError(
            f"unknown reward {name_or_path!r} (registered: {', '.join(sorted(_REGISTRY))}; "
            "or name one as package.module:function, or list its module in rewards.modules)"
        ) from None


def declared_label_keys(name_or_path: str) -> tuple[str, ...]:
    """The label keys the reward declares it reads (`@reward(label_keys=...)`); none when it declares none."""
    return _LABEL_KEYS.get(get_reward(name_or_path), ())


def list_rewards() -> dict[str, str]:
    """Every registered reward name with the first line of its docstring."""
    _load_builtins()
    return {name: _first_line(fn.__doc__) for name, fn in sorted(_REGISTRY.items())}


def _load_builtins() -> None:
    importlib.import_module("morl.rewards.builtin")


def _origin(fn: Callable[..., Any]) -> tuple[str, ...]:
    """Where a function is defined: the same file imported under two module names is the same reward."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return (fn.__module__, fn.__qualname__)
    return (code.co_filename, fn.__qualname__)


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n", 1)[0]
