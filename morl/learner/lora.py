"""LoRA adapters on the policy's language model (peft), and the policy's tensors as everyone outside the learner sees
them: in the HF model's names, each adapted weight merged with its adapter.

The adapters are injected in place (`peft.inject_adapter_in_model`), so the learner's model stays a Qwen2.5-VL model
(`model.model`, `lm_head` and `config` where the forward code looks for them) with a LoRA layer around each adapted
Linear. The rollout engines, checkpoints' `policy/` and `final/` get the merged weights W + (alpha / r) B A, so they
load as any HF model; `adapter/` beside them holds the adapter in peft's own format, for `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from morl.config import ConfigError, LoraConfig

ADAPTER_DIR = "adapter"  # beside the merged model in a checkpoint's policy/ and in final/
ADAPTER_NAME = "default"  # peft's name for a model's one adapter
VISION = r".*\.visual\..*"  # the ViT and its merger: never adapted (vLLM takes no LoRA for them)
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before each module name


def language_model_linears(model: torch.nn.Module) -> set[str]:
    """The last name parts of the Linear modules of the language model's decoder layers: what `target_modules` may
    name (not the ViT, nor lm_head, whose adapters neither vLLM nor `morl preflight` take)."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".language_model.layers." in f".{name}"}


def check_targets(model: torch.nn.Module, cfg: LoraConfig, where: str) -> None:
    """Refuse a `learner.lora.target_modules` name that matches no Linear of `model`'s language model."""
    linears = language_model_linears(model)
    missing = [name for name in cfg.target_modules if name not in linears]
    if missing:
        raise ConfigError(
            f"learner.lora.target_modules: {', '.join(missing)} matches no Linear module of the language model's "
            f"decoder layers in {where} (the ViT, merger and lm_head are never adapted); theirs are: "
            f"{', '.join(sorted(linears))}"
        )


def check_targets_before_start(model_path: str, cfg: LoraConfig) -> None:
    """`check_targets` on the model's architecture built on the meta device from its config.json: no weight is read,
    so the driver refuses a bad target before any actor starts."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    check_targets(model, cfg, model_path)


def peft_config(cfg: LoraConfig, base_model: str | None = None):
    """peft's LoraConfig for `cfg`: the named Linears of the language model, the ViT excluded."""
    import peft

    return peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        exclude_modules=VISION,
        base_model_name_or_path=base_model,
    )


def add_adapters(model: torch.nn.Module, cfg: LoraConfig, base_model: str) -> list[torch.nn.Parameter]:
    """Inject `cfg`'s adapters into `model` in place and freeze every other weight; the adapters' parameters.

    peft starts each B at zero, so the model computes exactly the SFT model's function until the first step.
    """
    import peft

    check_targets(model, cfg, base_model)
    model.requires_grad_(False)
    peft.inject_adapter_in_model(peft_config(cfg, base_model), model, adapter_name=ADAPTER_NAME)
    adapters = [p for name, p in model.named_parameters() if ".lora_" in name]
    for p in adapters:
        p.requires_grad_(True)
    return adapters


def adapted_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{module name: LoRA layer} of the adapted Linears (none on a model without adapters)."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@dataclass(frozen=True)
class PolicyTensor:
    """One tensor of the policy under its HF name, computed from the learner's parameters."""

    params: tuple[torch.nn.Parameter, ...]  # what a ZeRO-3 gather must bring in before `value` runs
    value: Callable[[], torch.Tensor]
    trained: bool  # training changes it: a trainable weight, or one merged with an adapter


def policy_tensors(model: torch.nn.Module) -> dict[str, PolicyTensor]:
    """Every tensor of the HF model `model` stands for, in its parameters' order, under the HF names.

    Without adapters, each parameter as it is. With them, an adapted Linear's `base_layer.weight` is merged with its
    adapter (W + scaling B A, computed afresh: the learner's weights are never changed), its bias is the base one,
    and the adapters' own parameters are not HF tensors at all.
    """
    layers = adapted_layers(model)
    tensors: dict[str, PolicyTensor] = {}
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if ".lora_" in name:
            continue
        if owner.endswith(".base_layer") and (layer_name := owner.removesuffix(".base_layer")) in layers:
            layer = layers[layer_name]
            hf_name = f"{layer_name}.{leaf}"
            if leaf == "weight":
                lora = (layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight)
                tensors[hf_name] = PolicyTensor((p, *lora), _merged(p, layer), True)
            else:
                tensors[hf_name] = PolicyTensor((p,), p.detach, False)
            continue
        tensors[name] = PolicyTensor((p,), p.detach, p.requires_grad)
    return tensors


def _merged(weight: torch.nn.Parameter, layer) -> Callable[[], torch.Tensor]:
    return lambda: weight.detach() + layer.get_delta_weight(ADAPTER_NAME).detach()


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """`model` computes the base (SFT) model's function inside: the frozen reference GRPO's KL term needs, without a
    second copy of the weights."""
    layers = list(adapted_layers(model).values())
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def save_adapter(model: torch.nn.Module, cfg: LoraConfig, base_model: str, out_dir: Path) -> None:
    """The adapter in peft's format (adapter_config.json, adapter_model.safetensors): `PeftModel.from_pretrained(sft,
    out_dir)` loads it onto the SFT model. The caller has gathered ZeRO-3 shards."""
    import peft
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = peft.get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    save_file({PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()},
              str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config(cfg, base_model).save_pretrained(str(out_dir))


def is_adapter_dir(path: str | Path) -> bool:
    """True for a directory holding a peft adapter (and no model of its own)."""
    path = Path(path)
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def adapter_base(path: str | Path) -> str | None:
    """The base model an adapter directory names (peft's base_model_name_or_path)."""
    return json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")


@contextmanager
def merged_model(adapter_dir: Path, base_dir: str, processor_dir: str, dtype: str) -> Iterator[Path]:
    """A temporary HF directory (in the system's temporary folder, removed on exit) holding `base_dir`'s model with
    the adapter of `adapter_dir` merged, and the processor: what an engine that takes whole models loads.

    The merge runs on this host in `dtype`: a 7B model needs about 16 GB of memory and as much temporary disk."""
    from peft import PeftModel
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    out = Path(tempfile.mkdtemp(prefix="morl-merged-"))
    try:
        base = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, dtype=getattr(torch, dtype))
        PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().save_pretrained(out)
        AutoProcessor.from_pretrained(processor_dir).save_pretrained(out)
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)
