"""The model card (README.md) beside a saved policy: what it was trained from, how, for how many steps, and its
held-out table, so a checkpoint copied away from its run directory still says what it is."""

from __future__ import annotations

from pathlib import Path

from morl.config import RunConfig, dump_config
from morl.learner.lora import ADAPTER_DIR

CARD = "README.md"
RECIPE_COPY = "morl_config.yaml"  # the run's resolved config, beside the card


def write_model_card(
    policy_dir: Path, cfg: RunConfig, step: int, held_out: dict[str, dict[str, float]] | None
) -> None:
    """Write `policy_dir/README.md` and `policy_dir/morl_config.yaml`.

    `held_out`: eval.json's reward tables by model ("sft", "policy"); a checkpoint's holds the SFT one only (the
    policy is evaluated at the end of a run, or later with `morl eval`); None when evaluation is off.
    """
    (policy_dir / RECIPE_COPY).write_text(dump_config(cfg))
    (policy_dir / CARD).write_text(model_card(cfg, step, held_out))


def model_card(cfg: RunConfig, step: int, held_out: dict[str, dict[str, float]] | None) -> str:
    """The card's text: Hugging Face front matter, the training settings, the held-out table, how to load it."""
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [morl, reinforcement-learning, vision-language]",
        "---",
        "",
        f"# {cfg.algo.name.upper()} policy after step {step} of {cfg.trainer.max_steps}",
        "",
        "Post-trained with morl (Mixed On-policy RL for vision-language models). `morl_config.yaml` beside this "
        "card is the run's whole resolved recipe.",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| base model (SFT) | `{cfg.model.path}` |",
        f"| algorithm | {cfg.algo.name} |",
        f"| steps trained | {step} |",
        f"| prompts per step x responses per prompt | {cfg.trainer.prompts_per_step} x {cfg.rollout.group_size} |",
        f"| learning rate | {cfg.learner.lr:g} ({cfg.learner.lr_decay}) |",
        f"| weights trained | {_trained(cfg)} |",
        f"| train data | {_datasets(cfg)} |",
        f"| rewards | {_routes(cfg, held_out)} |",
        "",
        *_held_out_table(held_out),
        "## Use",
        "",
        "```python",
        "from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration",
        "",
        'model = Qwen2_5_VLForConditionalGeneration.from_pretrained("path/to/this/directory")',
        'processor = AutoProcessor.from_pretrained("path/to/this/directory")',
        "```",
        "",
        *_adapter_use(cfg),
        "Evaluate it on the recipe's held-out set: `morl eval path/to/this/directory --recipe morl_config.yaml`.",
        "",
    ]
    return "\n".join(lines)


def _trained(cfg: RunConfig) -> str:
    lora = cfg.learner.lora
    if lora is None:
        return "all but the ViT and merger" if cfg.learner.freeze_vision_tower else "all"
    return (f"LoRA rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, on the language model's "
            f"{', '.join(lora.target_modules)} (merged into this model; the adapter alone is in `{ADAPTER_DIR}/`)")


def _adapter_use(cfg: RunConfig) -> list[str]:
    if cfg.learner.lora is None:
        return []
    return [
        f"The LoRA adapter alone, on the SFT model (`{cfg.model.path}`):",
        "",
        "```python",
        "from peft import PeftModel",
        "",
        'sft = Qwen2_5_VLForConditionalGeneration.from_pretrained("path/to/the/sft/model")',
        f'model = PeftModel.from_pretrained(sft, "path/to/this/directory/{ADAPTER_DIR}")',
        "```",
        "",
    ]


def _datasets(cfg: RunConfig) -> str:
    if not cfg.data.train:
        return "none listed"
    return ", ".join(f"`{spec.path}` (weight {spec.weight:g})" for spec in cfg.data.train)


def _routes(cfg: RunConfig, held_out: dict[str, dict[str, float]] | None) -> str:
    """Each task's reward functions, for the tasks the run evaluated (every route when it did not)."""
    tasks = [t for t in next(iter(held_out.values())) if t != "mean"] if held_out else list(cfg.rewards.routes)
    routes = cfg.rewards.routes
    return ", ".join(f"{task}: {' + '.join(spec.fn for spec in routes[task])}" for task in tasks if task in routes)


def _held_out_table(held_out: dict[str, dict[str, float]] | None) -> list[str]:
    if not held_out:
        return ["## Held-out reward", "", "Not evaluated (`eval.enabled` was off).", ""]
    models = list(held_out)
    both = models == ["sft", "policy"]
    header = ["task", *models, *(["delta"] if both else [])]
    lines = ["## Held-out reward (greedy decoding)", "", "| " + " | ".join(header) + " |",
             "|" + " --- |" * len(header)]
    for task in held_out[models[0]]:
        values = [held_out[m][task] for m in models]
        cells = [f"{v:.3f}" for v in values] + ([f"{values[1] - values[0]:+.3f}"] if both else [])
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    if "policy" not in held_out:
        lines += ["", "This checkpoint's policy was not evaluated during the run: `morl eval` scores it."]
    return [*lines, ""]
