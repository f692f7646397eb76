"""`morl eval MODEL_DIR --recipe RECIPE`: a recipe's held-out evaluation of any HF-format checkpoint.

MODEL_DIR may be a run's `final/`, a checkpoint's `policy/` (or the checkpoint directory itself), an SFT
directory, or a LoRA adapter in peft's format (a LoRA run's `final/adapter/`, or any adapter of the recipe's model),
merged onto the recipe's `model.path` for the evaluation. The result has eval.json's shape (`morl compare` reads either): the recipe's own model (`model.path`,
the SFT checkpoint) as "sft", MODEL_DIR as "policy". Both are decoded greedily by the recipe's rollout engine and
scored by its rewards, exactly as `morl train` does at the start and end of a run, so `morl eval RUN/final`
reproduces RUN/eval.json.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

from morl.checkpoint_layout import POLICY_DIR
from morl.config import RunConfig
from morl.learner.lora import adapter_base, is_adapter_dir, merged_model
from morl.run.build import build_run
from morl.run.evaluation import eval_report, eval_subset, evaluate
from morl.run.model_check import check_model_dir, checkpoint_identity
from morl.run.step import prompt_set


class EvalError(ValueError):
    """The recipe has nothing to evaluate on, an --sft-from file does not fit, or the output cannot be written."""


def resolve_model_dir(model_dir: Path) -> Path:
    """A checkpoint directory (`checkpoints/step_N`) means its policy; any other directory is taken as it is."""
    if not (model_dir / "config.json").is_file() and (model_dir / POLICY_DIR / "config.json").is_file():
        return model_dir / POLICY_DIR
    return model_dir


def evaluate_checkpoint(cfg: RunConfig, model_dir: Path, sft_from: Path | None = None) -> dict:
    """eval.json's content for `model_dir` against the recipe's SFT model (taken from `sft_from`, an earlier
    eval.json of the same held-out prompts, instead of evaluated again when given)."""
    if not cfg.data.eval:
        raise EvalError("data.eval lists no held-out dataset: the recipe has nothing to evaluate on")
    model_dir = resolve_model_dir(model_dir)
    with ExitStack() as merged:
        if is_adapter_dir(model_dir):
            check_adapter_base(model_dir, cfg.model.path)
            model_dir = merged.enter_context(
                merged_model(model_dir, cfg.model.path, cfg.model.processor_dir, cfg.model.dtype)
            )
        check_model_dir(str(model_dir), cfg.model.processor_dir, key="MODEL_DIR")
        return _evaluate(cfg, model_dir, sft_from)


def check_adapter_base(adapter_dir: Path, model_path: str) -> None:
    """Refuse an adapter trained on another model than the recipe's (when the model it names is on this host)."""
    base = adapter_base(adapter_dir)
    if base and Path(base).expanduser().is_dir() and not _same_dir(Path(base), model_path):
        if checkpoint_identity(base)["fingerprint"] != checkpoint_identity(model_path)["fingerprint"]:
            raise EvalError(
                f"MODEL_DIR {adapter_dir}: a LoRA adapter of {base}, not of the recipe's model.path {model_path}; "
                "evaluate it with a recipe whose model.path is its base model"
            )


def _evaluate(cfg: RunConfig, model_dir: Path, sft_from: Path | None) -> dict:
    parts = build_run(cfg, prompts=False, held_out=True, weights=str(model_dir))
    try:
        rows = eval_subset(parts.held_out, cfg.eval.max_prompts_per_task)
        sft_checkpoint = checkpoint_identity(cfg.model.path)
        sft = _earlier_sft(sft_from, prompt_set(rows), sft_checkpoint) if sft_from else None
        policy = evaluate(parts, rows)
        if sft is None and _same_dir(model_dir, cfg.model.path):
            sft = {**policy, "checkpoint": sft_checkpoint}
        elif sft is None:
            parts.restart_workers(cfg.model.path)
            sft = {**evaluate(parts, rows), "checkpoint": sft_checkpoint}
    finally:
        parts.close()
    return eval_report(sft, policy)


def _earlier_sft(path: Path, prompts: dict, checkpoint: dict) -> dict:
    """The "sft" result of an earlier eval.json, refused unless it was taken on the same held-out prompts, and of
    the recipe's SFT `checkpoint` when it records which (one that does not is kept without a checkpoint: `morl
    compare` then gives it an SFT column of its own)."""
    try:
        earlier = json.loads(path.read_text())
        sft = {"reward": earlier["sft"], "response_length": earlier["response_length"]["sft"]}
        recorded = earlier.get("sft_checkpoint")
        recorded_fingerprint = None if recorded is None else recorded["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvalError(f"--sft-from {path}: not an eval.json with an sft result ({type(exc).__name__}: {exc})")
    if earlier.get("prompts") != prompts:
        raise EvalError(
            f"--sft-from {path}: evaluated on other held-out prompts ({earlier.get('prompts')}) than this recipe's "
            f"({prompts}); drop --sft-from to evaluate the SFT model again"
        )
    if recorded is None:  # an eval.json from before checkpoints were recorded
        return {**sft, "prompts": prompts}
    if recorded_fingerprint != checkpoint["fingerprint"]:
        raise EvalError(
            f"--sft-from {path}: its SFT scores are of another checkpoint ({recorded.get('path')}) than the "
            f"recipe's model.path ({checkpoint['path']}); drop --sft-from to evaluate the SFT model again"
        )
    return {**sft, "prompts": prompts, "checkpoint": recorded}


def _same_dir(a: Path, b: str | None) -> bool:
    return b is not None and Path(b).expanduser().resolve() == a.expanduser().resolve()


def check_new_output(out: Path) -> None:
    """Refuse an output path that exists (never overwritten) or whose folder does not: before an evaluation runs."""
    if out.exists():
        raise EvalError(f"-o {out}: already exists; name a new file")
    if not out.parent.is_dir():
        raise EvalError(f"-o {out}: no such directory {out.parent}")


def write_report(report: dict, out: Path) -> None:
    """Write `out` whole (a temporary file renamed into place), checked new again (the evaluation took a while)."""
    check_new_output(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
