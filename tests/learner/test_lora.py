"""LoRA on the DeepSpeed learner (CPU): only the adapters train, everyone outside sees merged HF weights, the
adapter saves in peft's format, the reference is the policy with its adapters off, and a resume is exact."""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from morl.config import AlgoConfig, ConfigError, LearnerConfig, LoraConfig, ModelConfig
from morl.learner.logprobs import response_logprobs
from morl.learner.lora import ADAPTER_DIR
from morl.learner.policy import PolicyLearner

from helpers import gathered_weights

LORA = LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])


def lora_learner(toy_world, banned, zero_stage=2, lora=LORA, algo=AlgoConfig(), max_steps=1):
    cfg = LearnerConfig(lr=1e-2, micro_batch_size=6, zero_stage=zero_stage, lora=lora)
    return PolicyLearner(ModelConfig(path=str(toy_world / "sft")), cfg, 1.0, banned, seed=0, threads=1, algo=algo,
                         max_steps=max_steps)


def hf_tensors(policy) -> dict[str, torch.Tensor]:
    """The policy's tensors as the rollout engines get them (HF names, adapters merged), through the weight sync."""
    names = [name for name, _ in policy.weight_sizes("float32")]
    bucket = policy.weight_bucket(names, "float32")
    return {name: t.clone() for name, t in bucket.tensors()}


def sft_weights(toy_world) -> dict[str, torch.Tensor]:
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft")
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_only_the_adapters_train_and_the_sync_sends_the_adapted_weights_merged(toy_world, batch, zero_stage):
    train_batch, banned = batch
    policy = lora_learner(toy_world, banned, zero_stage)
    sft = sft_weights(toy_world)
    before = hf_tensors(policy)
    assert before.keys() == sft.keys() and all(torch.equal(before[n], sft[n]) for n in sft)  # B starts at zero
    metrics = policy.train_step(train_batch)
    assert metrics["logprob_mismatch"] < 1e-4  # sampled by the SFT model: the untrained policy is exactly it
    after = hf_tensors(policy)
    adapted = {n for n in sft if n.startswith("model.language_model.layers.") and
               n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))}
    assert {n for n in sft if not torch.equal(after[n], sft[n])} == adapted
    # what a sync to an engine that kept its weights sends: the adapted weights only
    assert {n for n, _ in policy.weight_sizes("float32", trainable_only=True)} == adapted
    # the base weights under the adapters never move
    raw = gathered_weights(policy)
    base = {n.replace(".base_layer", ""): w for n, w in raw.items() if ".lora_" not in n}
    assert all(torch.equal(base[n], sft[n]) for n in sft)
    # the merged weight is the HF model's: a forward of it gives the learner's log-probs
    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft")
    merged.load_state_dict(after, strict=False)
    ours = policy.frozen_logprobs(policy.engine, train_batch, [range(len(train_batch))])
    theirs = response_logprobs(merged, train_batch.prompts, train_batch.responses, banned_ids=banned)
    for i, lp in enumerate(ours):
        assert torch.allclose(lp, theirs.logprobs[i, : len(lp)], atol=1e-5)


def test_the_saved_policy_is_the_merged_model_with_its_peft_adapter_beside_it(toy_world, batch, tmp_path):
    from peft import PeftModel

    train_batch, banned = batch
    policy = lora_learner(toy_world, banned)
    policy.train_step(train_batch)
    policy.save_hf(str(tmp_path / "final"))
    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "final")
    expected = hf_tensors(policy)
    assert all(torch.equal(p, expected[n]) for n, p in merged.named_parameters())
    adapter = tmp_path / "final" / ADAPTER_DIR
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    with_adapter = PeftModel.from_pretrained(Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft"),
                                             adapter)
    ids = torch.tensor([train_batch.prompts[0].input_ids[:20]])
    with torch.no_grad():
        assert torch.allclose(with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)


def test_a_resume_continues_exactly_from_a_checkpoint_of_the_adapters(toy_world, batch, tmp_path):
    train_batch, banned = batch
    straight = lora_learner(toy_world, banned, max_steps=4)
    for _ in range(4):
        straight.train_step(train_batch)
    first = lora_learner(toy_world, banned, max_steps=4)
    for _ in range(2):
        first.train_step(train_batch)
    first.save_checkpoint(str(tmp_path / "ckpt"))
    resumed = lora_learner(toy_world, banned, max_steps=4)
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    for _ in range(2):
        resumed.train_step(train_batch)
    a, b = gathered_weights(straight), gathered_weights(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    # the engine state holds the adapters and their optimizer, not the frozen base weights
    engine_bytes = sum(f.stat().st_size for f in (tmp_path / "ckpt" / "deepspeed").rglob("*") if f.is_file())
    model_bytes = sum(w.numel() * 4 for w in sft_weights(toy_world).values())
    assert engine_bytes < model_bytes / 2


def test_the_reference_is_the_policy_with_its_adapters_off(toy_world, batch):
    train_batch, banned = batch
    grpo = lora_learner(toy_world, banned, algo=AlgoConfig(name="grpo", kl_coef=0.1))
    assert grpo.reference is None  # no second copy of the weights
    grpo.train_step(train_batch)
    slices = [range(len(train_batch))]
    reference = grpo.reference_logprobs(train_batch, slices)
    policy = grpo.frozen_logprobs(grpo.engine, train_batch, slices)
    sft = response_logprobs(Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft"),
                            train_batch.prompts, train_batch.responses, banned_ids=banned)
    for i, lp in enumerate(reference):
        assert torch.allclose(lp, sft.logprobs[i, : len(lp)], atol=1e-5)
    assert any(not torch.allclose(r, p, atol=1e-4) for r, p in zip(reference, policy))  # the adapters are back on


@pytest.mark.parametrize("target, why", [("q_prj", "q_prj matches no Linear"), ("qkv", "qkv matches no Linear"),
                                         ("lm_head", "lm_head matches no Linear")])
def test_a_target_outside_the_language_model_is_refused_naming_it(toy_world, batch, target, why):
    _, banned = batch
    with pytest.raises(ConfigError, match=why):
        lora_learner(toy_world, banned, lora=LoraConfig(target_modules=["q_proj", target]))
