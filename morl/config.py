"""The run configuration: pydantic models are the single source of truth.

A recipe is YAML whose sections map one-to-one onto the models below. Command-line
overrides (`learner.lr=3e-6`) are applied to the raw mapping before validation, so an
unknown key or a bad value fails exactly like a bad recipe: with the key's dotted name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from morl.data import DataConfig, DatasetSpec
from morl.rewards.config import RewardsConfig


class ConfigError(ValueError):
    """A recipe or override that does not validate; the message names every bad key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    path: str | None = Field(None, description="HF-format Qwen2.5-VL-compatible checkpoint directory (the SFT model)")
    processor_path: str | None = Field(None, description="tokenizer/processor directory when it is not `path`")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class ToyWorldConfig(Section):
    """The locally built quickstart world: tiny Qwen2.5-VL, synthetic image tasks, SFT warm-up."""

    root: str = "~/.cache/morl/toy-world"
    seed: int = 0
    tasks: tuple[str, ...] = ("counting", "grounding", "math", "choice")
    train_per_task: int = Field(512, gt=0)
    eval_per_task: int = Field(256, gt=0)
    sft_steps: int = Field(900, ge=0)
    sft_batch_size: int = Field(32, gt=0)
    sft_lr: float = Field(1e-3, gt=0)


class RolloutConfig(Section):
    engine: Literal["hf"] = "hf"
    num_workers: int = Field(1, ge=1)
    group_size: int = Field(8, ge=2, description="G: responses sampled per prompt")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, gt=0)
    max_prompt_tokens: int = Field(2048, gt=0, description="longer multimodal prompts are refused, never truncated")
    cpus_per_worker: float = Field(1.0, gt=0)


class AlgoConfig(Section):
    name: Literal["morl"] = "morl"
    adv_eps: float = Field(1e-6, gt=0)
    drop_zero_variance_groups: bool = Field(
        True, description="keep groups whose rewards are all equal out of the update (they carry no signal)"
    )


class LearnerConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(64, gt=0, description="sequences per forward/backward; still one optimizer step")
    freeze_vision_tower: bool = Field(False, description="train the language model (and nothing of the ViT)")
    cpus: float = Field(1.0, gt=0)
    max_logprob_mismatch: float | None = Field(
        None, gt=0, description="stop the run when rollout and learner log-probs differ by more than this"
    )


class TrainerConfig(Section):
    seed: int = 0
    max_steps: int = Field(100, ge=0)
    prompts_per_step: int = Field(16, gt=0)
    output_dir: str = "runs/quickstart"


class EvalConfig(Section):
    enabled: bool = True
    max_prompts_per_task: int | None = Field(None, gt=0)


class RunConfig(Section):
    model: ModelConfig = ModelConfig()
    toy_world: ToyWorldConfig | None = None
    data: DataConfig = DataConfig()
    rewards: RewardsConfig = RewardsConfig()
    rollout: RolloutConfig = RolloutConfig()
    algo: AlgoConfig = AlgoConfig()
    learner: LearnerConfig = LearnerConfig()
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _fill_from_toy_world(self) -> RunConfig:
        """A toy world supplies the model and datasets the recipe leaves empty."""
        if self.toy_world is None:
            if self.model.path is None:
                raise ValueError("model.path is required (or a toy_world section)")
            return self
        root = Path(self.toy_world.root).expanduser()
        if self.model.path is None:
            self.model.path = str(root / "sft")
        if not self.data.train:
            self.data.train = [DatasetSpec(path=str(root / "data" / t / "train.jsonl")) for t in self.toy_world.tasks]
        if not self.data.eval:
            self.data.eval = [DatasetSpec(path=str(root / "data" / t / "heldout.jsonl")) for t in self.toy_world.tasks]
        return self


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested mapping; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    dotted, text = override.split("=", 1)
    keys = dotted.strip().split(".")
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, key, keys[: depth + 1])]
            continue
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict | list):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: depth + 1])} is not a section")
    value = yaml.safe_load(text) if text.strip() else None
    if isinstance(node, list):
        node[_list_index(node, keys[-1], keys)] = value
    else:
        node[keys[-1]] = value


def _list_index(node: list, key: str, path: list[str]) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"override {'.'.join(path)!r}: no item {key} (the list has {len(node)})")
    return int(key)


def load_config(recipe: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a recipe, apply overrides, validate; every error names its dotted key."""
    raw: dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {path} not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {path} must be a mapping of sections")
    for override in overrides:
        apply_override(raw, override)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, recipe)) from None


def format_validation_error(exc: ValidationError, recipe: str | Path | None) -> str:
    where = f" in {recipe}" if recipe else ""
    lines = [f"invalid config{where}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            allowed = _section_keys(err["loc"][:-1])
            message = "unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        if "input" in err and err["type"] != "extra_forbidden" and not isinstance(err["input"], dict):
            message += f" (got {err['input']!r})"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def _section_keys(loc: tuple) -> list[str]:
    """The keys a config section accepts, found by walking the models along `loc`."""
    model: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if _is_model(model) else None
        if field is None:
            return []
        model = _inner_model(field.annotation)
    return list(model.model_fields) if _is_model(model) else []


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _inner_model(tp: Any) -> Any:
    """`X`, `X | None`, `list[X]`, `dict[str, X]` -> X when X is a model."""
    if _is_model(tp):
        return tp
    for arg in get_args(tp):
        if _is_model(inner := _inner_model(arg)):
            return inner
    return None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
