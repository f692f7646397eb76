"""A LoRA run through the CLI, Ray actors, DeepSpeed and vLLM's CPU build: the engines sample with each step's
adapters (only the adapted weights travel, merged), checkpoints and final/ hold the merged model and the adapter in
peft's format, and `morl eval` takes the adapter as it takes the merged model."""

import json

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from helpers import OVERRIDES, REPO, morl, morl_train

pytestmark = pytest.mark.slow
LORA_RUN = ["rollout.engine=vllm", "learner.max_logprob_mismatch=1e-3", "trainer.save_every=1"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, toy_world):
    root = tmp_path_factory.mktemp("lora")
    (root / "world").symlink_to(toy_world)
    morl_train(root / "world", root / "run", *LORA_RUN, recipe="quickstart_lora.yaml")
    return root


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_engines_sample_with_each_steps_adapters_and_only_the_adapted_weights_travel(lora_run):
    steps = read_metrics(lora_run / "run")
    assert [m["step"] for m in steps] == [1, 2]
    # step 2 was sampled after step 1's sync: the engine's merged weights give the learner's log-probs
    assert all(m["logprob_mismatch"] < 1e-5 for m in steps)
    # every decoder layer has adapters (the default targets): its tensors travel whole (vLLM fuses q, k, v), nothing
    # else does: not the embedding, not the ViT
    sft = Qwen2_5_VLForConditionalGeneration.from_pretrained(lora_run / "world" / "sft")
    layers = [p for name, p in sft.named_parameters() if name.startswith("model.language_model.layers.")]
    assert all(m["weight_sync/gb"] == pytest.approx(sum(p.numel() * 4 for p in layers) / 1e9) for m in steps)


def test_checkpoints_and_final_hold_the_merged_model_and_its_peft_adapter(lora_run):
    from peft import PeftModel

    run = lora_run / "run"
    checkpoint = run / "checkpoints" / "step_000002"
    assert (checkpoint / "policy" / "adapter" / "adapter_config.json").is_file()
    engine_bytes = sum(f.stat().st_size for f in (checkpoint / "deepspeed").rglob("*") if f.is_file())
    policy_bytes = sum(f.stat().st_size for f in (checkpoint / "policy").glob("*.safetensors"))
    assert engine_bytes < policy_bytes / 2  # the adapters and their optimizer state, not the base weights
    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(run / "final")
    sft = Qwen2_5_VLForConditionalGeneration.from_pretrained(lora_run / "world" / "sft")
    unloaded = PeftModel.from_pretrained(sft, run / "final" / "adapter").merge_and_unload()
    theirs = dict(unloaded.named_parameters())
    assert all(torch.allclose(p, theirs[n], atol=1e-6) for n, p in merged.named_parameters())
    card = (run / "final" / "README.md").read_text()
    assert "LoRA rank 8, alpha 16" in card and "PeftModel.from_pretrained" in card


def test_morl_eval_takes_the_adapter_as_it_takes_the_merged_model(lora_run, tmp_path):
    recipe = ["--recipe", str(REPO / "recipes" / "quickstart_lora.yaml"), f"toy_world.root={lora_run / 'world'}",
              *OVERRIDES, "rollout.engine=vllm"]
    out = tmp_path / "adapter_eval.json"
    done = morl("eval", str(lora_run / "run" / "final" / "adapter"), *recipe, "-o", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads(out.read_text()) == json.loads((lora_run / "run" / "eval.json").read_text())
