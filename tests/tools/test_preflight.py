"""Memory preflight: closed-form parameter counts and memory, verdicts and the changes it suggests; the GPU recipes."""

import json

import pytest
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from typer.testing import CliRunner

from morl.cli import app
from morl.config import ConfigError, LoraConfig, load_config
from morl.rollout.engines import VLLMKind
from morl.tools.preflight import (
    GIB,
    Hardware,
    ModelShape,
    PreflightError,
    estimate,
    kv_cache_lines,
    lora_params,
    report,
    suggestions,
    with_overrides,
)

from helpers import REPO

RECIPES = REPO / "recipes"
VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "in_chans": 3,
}
# Qwen2.5-VL-7B-Instruct's config.json (the Hub's layout: text fields at the top level)
QWEN25VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
    "max_position_embeddings": 128000,
    "vision_config": {**VISION, "out_hidden_size": 3584},
}
MIMO_VL_7B = {**QWEN25VL_7B, "vocab_size": 151936}  # XiaomiMiMo/MiMo-VL-7B-SFT: Qwen2.5-VL-7B's shape, its vocabulary
QWEN25VL_3B = {
    **QWEN25VL_7B,
    "vocab_size": 151936,
    "hidden_size": 2048,
    "num_hidden_layers": 36,
    "intermediate_size": 11008,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
    "vision_config": {**VISION, "out_hidden_size": 2048},
}
P7 = 8_292_166_656  # Qwen2.5-VL-7B: 7,615,616,512 language + 676,550,144 vision ("8.29B" on its model card)
T7 = 7_615_616_512  # trained with a frozen ViT


def checkpoint(tmp_path, config) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_is_the_models(tied):
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=tied,
        ),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=128),
        tie_word_embeddings=tied,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    nested = json.loads(config.to_json_string())  # transformers 5 layout: text under text_config
    flat = {**{k: v for k, v in nested.items() if k != "text_config"}, **nested["text_config"]}  # the Hub's layout
    for layout in (nested, flat):
        shape = ModelShape.from_config(layout)
        assert shape.params == sum(p.numel() for p in model.parameters())
        assert shape.vision_params == sum(p.numel() for p in model.model.visual.parameters())


def test_published_7b_count():
    shape = ModelShape.from_config(QWEN25VL_7B)
    assert (shape.text_params, shape.vision_params, shape.params) == (T7, P7 - T7, P7)


def test_missing_field_names_the_file_and_field(tmp_path):
    broken = {k: v for k, v in QWEN25VL_7B.items() if k != "intermediate_size"}
    with pytest.raises(PreflightError, match=r"config.json: no intermediate_size"):
        ModelShape.from_checkpoint(checkpoint(tmp_path, broken))
    with pytest.raises(PreflightError, match="model.path: no config.json"):
        ModelShape.from_checkpoint(tmp_path / "nowhere")


def one_gpu_7b(tmp_path, **learner):
    return load_config(
        RECIPES / "qwen25vl_3b_1gpu.yaml",
        [
            f"model.path={checkpoint(tmp_path, QWEN25VL_7B)}",
            "rollout.gpu_memory_utilization=0.5",
            "learner.micro_batch_size=2",
            "learner.max_tokens_per_micro_batch=null",  # two whole sequences packed
            *(f"learner.{k}={json.dumps(v)}" for k, v in learner.items()),
        ],
    )


def test_7b_on_one_80gb_gpu_fits_with_zero3_and_offload(tmp_path):
    cfg = one_gpu_7b(tmp_path, zero_stage=3, offload_optimizer=True, offload_params=True)
    est = estimate(cfg, ModelShape.from_config(QWEN25VL_7B), Hardware(1, 80, 512))
    assert est.fits, [(b.where, b.used / GIB) for b in est.budgets]
    budgets = {b.where: b for b in est.budgets}
    update = budgets["shared GPU, update"].parts
    assert update["learner optimizer states"] == 0
    assert update["learner gradients"] == 2 * 500_000_000  # one bf16 reduce bucket stays on the GPU
    assert update["learner weights"] == 2 * (152064 * 3584 + 2 * 233_057_792)  # embedding + two live layers
    tokens = 2 * (2048 + 4096)
    assert update["logits (one lm_head chunk)"] == 1024 * 152064 * (2 + 8)
    assert update["answer hidden states"] == 2 * (2 * 4096) * 3584 * 2
    assert update["activations"] == tokens * (28 * 2 * 3584 + 2 * (7 * 3584 + 3 * 512 + 4 * 18944))
    assert "attention mask (packed sequences)" not in update  # sdpa runs each packed sequence by itself
    host = budgets["host"].parts
    assert host["offloaded gradients and optimizer states"] == 16 * T7  # fp32 grads, master, m, v
    assert host["offloaded parameters"] == 2 * P7
    assert est.kv_cache_tokens == (40 * GIB - 2 * P7 - VLLMKind.PROFILE) // (2 * 28 * 512 * 2)


def test_7b_on_one_80gb_gpu_does_not_fit_without_offload(tmp_path):
    cfg = one_gpu_7b(tmp_path, zero_stage=3)
    shape, hw = ModelShape.from_config(QWEN25VL_7B), Hardware(1, 80, 512)
    est = estimate(cfg, shape, hw)
    assert not est.fits
    update = {b.where: b for b in est.budgets}["shared GPU, update"].parts
    assert update["learner optimizer states"] == 12 * T7  # 85 GiB alone: more than the GPU
    assert update["learner weights"] == 2 * P7
    fixes = suggestions(cfg, shape, hw)
    assert "learner.offload_optimizer=true" in fixes
    assert all(estimate(with_overrides(cfg, _parse(f)), shape, hw).fits for f in fixes)


def _parse(overrides: str) -> dict:
    return {k: json.loads(v) for k, v in (item.split("=") for item in overrides.split())}


def test_zero_shards_over_the_learner_gpus(tmp_path):
    cfg = load_config(RECIPES / "mimo_vl_7b_morl_8gpu.yaml", [f"model.path={checkpoint(tmp_path, QWEN25VL_7B)}"])
    shape = ModelShape.from_config(QWEN25VL_7B)
    est = estimate(cfg, shape, Hardware(8, 80, 1024))
    assert est.learner_gpus == 4 and est.fits  # 8 GPUs - 4 vLLM workers
    learner = {b.where: b for b in est.budgets}["learner GPU, update"].parts
    assert learner["learner optimizer states"] == 12 * T7 // 4
    assert learner["learner gradients"] == 2 * T7 // 4
    assert learner["learner weights"] == 2 * P7 // 4
    crowded = estimate(with_overrides(cfg, {"rollout.num_workers": 8}), shape, Hardware(8, 80, 1024))
    assert not crowded.fits and "learner.num_ranks = 4 need 12 GPUs, of 8" in crowded.problems[0]


def test_the_learner_takes_num_ranks_gpus_and_spare_gpus_are_suggested(tmp_path):
    cfg = load_config(
        RECIPES / "mimo_vl_7b_morl_8gpu.yaml",
        [f"model.path={checkpoint(tmp_path, QWEN25VL_7B)}", "learner.num_ranks=1"],
    )
    shape, hw = ModelShape.from_config(QWEN25VL_7B), Hardware(8, 80, 1024)
    est = estimate(cfg, shape, hw)
    assert est.learner_gpus == 1 and not est.fits  # 85 GiB of Adam states on one GPU
    assert {b.where: b for b in est.budgets}["learner GPU, update"].parts["learner optimizer states"] == 12 * T7
    assert "learner.num_ranks=4" in suggestions(cfg, shape, hw)  # the 3 GPUs the 4 vLLM workers leave


def test_recipes_need_a_model_path_and_say_so():
    for recipe in ("qwen25vl_3b_1gpu.yaml", "mimo_vl_7b_morl_8gpu.yaml", "qwen25vl_7b_lora_1gpu.yaml"):
        with pytest.raises(ConfigError, match=r"model.path is required: .*model.path=/path/to/checkpoint"):
            load_config(RECIPES / recipe)
        cfg = load_config(RECIPES / recipe, ["model.path=/ckpt"])
        assert cfg.rollout.engine == "vllm" and cfg.model.dtype == "bfloat16"
    mimo = load_config(RECIPES / "mimo_vl_7b_morl_8gpu.yaml", ["model.path=/ckpt"])
    assert set(mimo.rewards.routes) >= {"math", "choice", "grounding", "point", "counting", "temporal"}


def test_3b_recipe_fits_one_gpu_and_a_small_gpu_gets_a_fix(tmp_path):
    cfg = load_config(RECIPES / "qwen25vl_3b_1gpu.yaml", [f"model.path={checkpoint(tmp_path, QWEN25VL_3B)}"])
    lines, fits = report(cfg, Hardware(1, 80, 128))
    assert fits and any(line.startswith("shared GPU, rollout") and line.endswith("ok") for line in lines)
    lines, fits = report(cfg, Hardware(1, 24, 128))
    assert not fits
    fix = lines[lines.index("the recipe does not fit; it does with (each checked by estimating again):") + 1]
    shape = ModelShape.from_config(QWEN25VL_3B)
    assert estimate(with_overrides(cfg, _parse(fix)), shape, Hardware(1, 24, 128)).fits


def test_cli_refuses_what_does_not_fit(tmp_path):
    path = checkpoint(tmp_path, QWEN25VL_3B)
    recipe = str(RECIPES / "qwen25vl_3b_1gpu.yaml")
    ok = CliRunner().invoke(app, ["preflight", recipe, f"model.path={path}", "--gpus", "1", "--host-mem-gib", "128"])
    assert ok.exit_code == 0, ok.output
    assert "3.75 B parameters" in ok.output
    over = CliRunner().invoke(
        app,
        [
            "preflight",
            recipe,
            f"model.path={path}",
            "learner.micro_batch_size=64",
            "learner.max_tokens_per_micro_batch=null",
            "--gpus",
            "1",
            "--host-mem-gib",
            "128",
        ],
    )
    assert over.exit_code == 2
    assert "DOES NOT FIT" in over.output and "learner.max_tokens_per_micro_batch=6144" in over.output


@pytest.mark.parametrize(
    "override, words",
    [
        ("rollout.colocate=true", "rollout.colocate=True needs rollout.engine=vllm"),
        ("rollout.tensor_parallel_size=2", "rollout.tensor_parallel_size=2 needs rollout.engine=vllm"),
        ("learner.offload_params=true", "learner.offload_params needs learner.zero_stage=3"),
        ("rollout.gpu_memory_utilization=1.5", "rollout.gpu_memory_utilization"),
        ("rollout.sleep_level=3", "rollout.sleep_level"),
        ("learner.num_ranks=0", "learner.num_ranks"),
    ],
)
def test_gpu_options_are_validated_by_name(override, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config(None, ["model.path=/ckpt", override])


def test_colocated_vllm_is_one_worker_on_a_one_rank_learners_gpu():
    colocated = ["model.path=/ckpt", "rollout.engine=vllm", "rollout.colocate=true"]
    assert load_config(None, colocated).learner.num_ranks == 1
    with pytest.raises(ConfigError, match=r"rollout\.colocate=true needs learner\.num_ranks=1 \(got 2\)"):
        load_config(None, [*colocated, "learner.num_ranks=2"])
    for override, got in (("rollout.num_workers=2", "2 and 1"), ("rollout.tensor_parallel_size=2", "1 and 2")):
        with pytest.raises(ConfigError, match=rf"one vLLM worker on the learner's GPU: .* must be 1 \(got {got}\)"):
            load_config(None, [*colocated, override])
    with pytest.raises(ConfigError, match=r"rollout\.weight_transport=broadcast cannot go with rollout\.colocate"):
        load_config(None, [*colocated, "rollout.weight_transport=broadcast"])


def mimo_8gpu(tmp_path, *overrides):
    return load_config(
        RECIPES / "mimo_vl_7b_morl_8gpu.yaml", [f"model.path={checkpoint(tmp_path, MIMO_VL_7B)}", *overrides]
    )


def learner_update(cfg, hw=Hardware(8, 80, 1024)) -> dict[str, int]:
    est = estimate(cfg, ModelShape.from_config(MIMO_VL_7B), hw)
    return {b.where: b for b in est.budgets}["learner GPU, update"].parts


def test_logits_are_one_chunk_whatever_the_answer_length_or_micro_batch(tmp_path):
    chunk = 1024 * 151936 * (2 + 8)  # bf16 logits and two float32 copies at once (the fused loss works in place)
    for answer in (2048, 8192, 32768):
        for sequences in (1, 4):
            cfg = mimo_8gpu(
                tmp_path, f"rollout.max_new_tokens={answer}", f"learner.micro_batch_size={sequences}",
                "learner.max_tokens_per_micro_batch=null",
            )
            update = learner_update(cfg)
            assert update["logits (one lm_head chunk)"] == chunk
            assert update["answer hidden states"] == 2 * sequences * answer * 3584 * 2
    short = mimo_8gpu(tmp_path, "rollout.max_new_tokens=512", "learner.micro_batch_size=1")
    assert learner_update(short)["logits (one lm_head chunk)"] == 512 * 151936 * 10  # shorter than a chunk
    smaller = mimo_8gpu(tmp_path, "learner.logprob_chunk_tokens=256")
    assert learner_update(smaller)["logits (one lm_head chunk)"] == chunk // 4


def test_a_budget_below_the_longest_sequence_leaves_that_sequence_alone(tmp_path):
    overrides = ("rollout.max_prompt_tokens=8192", "rollout.max_new_tokens=32768")
    budgeted = mimo_8gpu(tmp_path, *overrides, "learner.max_tokens_per_micro_batch=4096", "learner.micro_batch_size=8")
    alone = mimo_8gpu(tmp_path, *overrides, "learner.max_tokens_per_micro_batch=null", "learner.micro_batch_size=1")
    longest = 8192 + 32768
    per_token = 28 * 2 * 3584 + 2 * (7 * 3584 + 3 * 512 + 4 * 18944)  # checkpointed: layer inputs + one layer
    assert learner_update(budgeted)["activations"] == learner_update(alone)["activations"] == longest * per_token
    lines, _ = report(budgeted, Hardware(8, 80, 1024))
    assert any(f"up to {longest:,} tokens" in line and "runs alone" in line for line in lines)


def test_only_eager_attention_holds_a_mask_and_scores(tmp_path):
    packed = ("rollout.max_new_tokens=32768", "learner.max_tokens_per_micro_batch=16384", "learner.micro_batch_size=8")
    k = 16384
    for impl in ("sdpa", "flash_attention_2"):  # each packed sequence by itself, or by boundaries
        update = learner_update(mimo_8gpu(tmp_path, *packed, f"learner.attn_implementation={impl}"))
        assert not update.get("attention mask (packed sequences)") and not update.get("attention scores (eager)")
    eager = learner_update(mimo_8gpu(tmp_path, *packed, "learner.attn_implementation=eager"))
    longest = 8192 + 32768
    assert eager["attention mask (packed sequences)"] == k * k * 2
    assert eager["attention scores (eager)"] == 28 * longest**2 * (4 + 2 * 2)


def test_a_refusal_at_32k_names_changes_that_then_fit(tmp_path):
    shape, hw = ModelShape.from_config(MIMO_VL_7B), Hardware(8, 80, 1024)
    for overrides in (
        ("learner.gradient_checkpointing=false", "learner.micro_batch_size=1"),
        ("learner.gradient_checkpointing=false", "learner.micro_batch_size=4",
         "learner.max_tokens_per_micro_batch=null"),
        ("learner.logprob_chunk_tokens=65536", "learner.max_tokens_per_micro_batch=null", "learner.micro_batch_size=8"),
    ):
        cfg = mimo_8gpu(tmp_path, "rollout.max_new_tokens=32768", *overrides)
        assert not estimate(cfg, shape, hw).fits
        fixes = suggestions(cfg, shape, hw)
        assert fixes and all(estimate(with_overrides(cfg, _parse(f)), shape, hw).fits for f in fixes), fixes
    unchecked = mimo_8gpu(tmp_path, "rollout.max_new_tokens=32768", "learner.gradient_checkpointing=false")
    alone = suggestions(unchecked, shape, hw)
    assert "learner.gradient_checkpointing=true" in alone


def test_the_longest_answer_that_fits_is_suggested(tmp_path):
    shape = ModelShape.from_config(MIMO_VL_7B)
    for overrides, hw in (
        # without checkpointing the 8K prompt alone leaves no room on 80 GB beside the float32 lm_head gradient
        (("learner.gradient_checkpointing=false", "learner.micro_batch_size=1"), Hardware(8, 96, 1024)),
        ((), Hardware(8, 48, 1024)),  # the recipe's token budget of one longest sequence, on smaller GPUs
    ):
        cfg = mimo_8gpu(tmp_path, "rollout.max_new_tokens=32768", *overrides)
        (shorter,) = [_parse(f) for f in suggestions(cfg, shape, hw) if "max_new_tokens" in f]
        answer = shorter["rollout.max_new_tokens"]
        assert answer < 32768 and estimate(with_overrides(cfg, shorter), shape, hw).fits
        longer = {**shorter, "rollout.max_new_tokens": answer + (1024 if answer >= 1024 else 1)}
        if "learner.max_tokens_per_micro_batch" in shorter:  # the budget shortened with the answers
            assert shorter["learner.max_tokens_per_micro_batch"] == cfg.rollout.max_prompt_tokens + answer
            longer["learner.max_tokens_per_micro_batch"] = cfg.rollout.max_prompt_tokens + answer + 1024
        assert not estimate(with_overrides(cfg, longer), shape, hw).fits


def test_host_memory_is_not_judged_by_this_machine_without_the_flag(tmp_path, monkeypatch):
    import morl.tools.preflight as preflight

    monkeypatch.setattr(preflight, "host_memory_gib", lambda: 8.0)  # a laptop
    args = ["preflight", str(RECIPES / "mimo_vl_7b_morl_8gpu.yaml"), f"model.path={checkpoint(tmp_path, MIMO_VL_7B)}"]
    unsaid = CliRunner().invoke(app, [*args, "--gpus", "8"])
    assert unsaid.exit_code == 0, unsaid.output
    assert "not checked" in unsaid.output and "DOES NOT FIT" not in unsaid.output
    short = CliRunner().invoke(app, [*args, "--gpus", "8", "--host-mem-gib", "64"])
    assert short.exit_code == 2 and "host: " in short.output and "DOES NOT FIT" in short.output
    recipe = tmp_path / "cpu.yaml"
    recipe.write_text(f"model: {{path: {tmp_path}}}\nlearner: {{micro_batch_size: 1}}\n")
    cpu = CliRunner().invoke(app, ["preflight", str(recipe), "--gpus", "0"])
    assert "8 GiB (this machine's" in cpu.output and cpu.exit_code == 2  # a 7B CPU run: judged by this machine


def test_sequences_longer_than_the_model_takes_are_refused(tmp_path):
    shape, hw = ModelShape.from_config(MIMO_VL_7B), Hardware(8, 80, 1024)
    est = estimate(mimo_8gpu(tmp_path, "rollout.max_new_tokens=120000"), shape, hw)
    assert not est.fits
    assert "max_position_embeddings = 128000" in est.problems[0] and "at most 119808" in est.problems[0]


def test_the_8gpu_recipe_fits_long_answers(tmp_path):
    cfg = mimo_8gpu(tmp_path)
    rc, lc = cfg.rollout, cfg.learner
    longest = rc.max_prompt_tokens + rc.max_new_tokens
    assert rc.max_new_tokens >= 32768 and longest <= MIMO_VL_7B["max_position_embeddings"]
    assert lc.max_tokens_per_micro_batch >= longest  # no sequence runs alone past the budget
    est = estimate(cfg, ModelShape.from_config(MIMO_VL_7B), Hardware(8, 80, 1024))
    assert est.fits and est.kv_cache_tokens >= longest
    path = checkpoint(tmp_path, MIMO_VL_7B)
    recipe = str(RECIPES / "mimo_vl_7b_morl_8gpu.yaml")
    run = CliRunner().invoke(app, ["preflight", recipe, f"model.path={path}", "--gpus", "8"])
    assert run.exit_code == 0, run.output


def test_the_kv_cache_is_shared_by_max_num_seqs_running_sequences_and_a_short_share_is_said(tmp_path):
    hw = Hardware(8, 80, 1024)
    default = estimate(mimo_8gpu(tmp_path), ModelShape.from_config(MIMO_VL_7B), hw)
    assert default.pool.max_num_seqs == 1024  # vLLM's own default on an 80 GB GPU
    longest = 8192 + 32768
    lines = kv_cache_lines(default.pool, longest)
    share = default.pool.kv_cache_tokens // 1024
    assert f"{share:,} tokens of KV cache each" in lines[1] and share < longest
    assert "preempts" in lines[2] and "rollout.max_num_seqs" in lines[2]
    few = estimate(mimo_8gpu(tmp_path, "rollout.max_num_seqs=16"), ModelShape.from_config(MIMO_VL_7B), hw)
    assert few.pool.max_num_seqs == 16 and few.kv_cache_tokens == default.kv_cache_tokens
    assert len(kv_cache_lines(few.pool, longest)) == 2  # 16 full-length sequences fit: nothing to say
    assert VLLMKind.default_max_num_seqs(48 * GIB) == 256  # below 70 GB vLLM defaults to 256


# Qwen2.5-VL-7B's decoder layer, (in, out) per Linear: q and o 3584 x 3584, k and v 3584 -> 4 x 128, the MLP 18944
LAYER_IN_PLUS_OUT = 2 * (3584 + 3584) + 2 * (3584 + 512) + 2 * (3584 + 18944) + (18944 + 3584)
LAYER_IN_TIMES_OUT = 2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944
A7 = 28 * 16 * LAYER_IN_PLUS_OUT  # rank-16 adapters on every Linear of the 28 layers: 40,370,176
P_MIMO, T_MIMO = P7 - 2 * 128 * 3584, T7 - 2 * 128 * 3584  # 128 fewer vocabulary rows in embedding and lm_head


def test_lora_adapters_are_rank_times_in_plus_out_of_each_adapted_linear():
    shape = ModelShape.from_config(MIMO_VL_7B)
    assert lora_params(shape, LoraConfig(rank=16)) == A7 == 40_370_176
    assert lora_params(shape, LoraConfig(rank=8, target_modules=["q_proj", "v_proj"])) == 28 * 8 * (7168 + 4096)
    with pytest.raises(PreflightError, match=r"learner\.lora\.target_modules: qkv is none of .*q_proj"):
        lora_params(shape, LoraConfig(target_modules=["q_proj", "qkv"]))


def test_lora_count_is_peft_s_on_the_language_model():
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2,
        ),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=128),
    )
    shape = ModelShape.from_config(json.loads(config.to_json_string()))
    for names in (list(LoraConfig().target_modules), ["k_proj", "down_proj"]):
        # by its path: the ViT's blocks have a gate_proj, up_proj and down_proj too
        only_the_language_model = rf"model\.language_model\.layers\.\d+\..*\.({'|'.join(names)})"
        model = get_peft_model(
            Qwen2_5_VLForConditionalGeneration(config), PeftLoraConfig(r=4, target_modules=only_the_language_model)
        )
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trained == lora_params(shape, LoraConfig(rank=4, target_modules=names))


def lora_7b(tmp_path, *overrides):
    path = checkpoint(tmp_path, MIMO_VL_7B)
    return load_config(RECIPES / "qwen25vl_7b_lora_1gpu.yaml", [f"model.path={path}", *overrides])


def shared_gpu(cfg, hw=Hardware(1, 80, 128)):
    est = estimate(cfg, ModelShape.from_config(MIMO_VL_7B), hw)
    return est, {b.where: b for b in est.budgets}


def test_lora_trains_the_adapters_only_beside_one_frozen_copy_of_the_model(tmp_path):
    cfg = lora_7b(tmp_path)
    est, budgets = shared_gpu(cfg)
    update = budgets["shared GPU, update"].parts
    assert update["learner weights"] == 2 * (P_MIMO + A7)  # the base once in bfloat16, no master copy
    assert update["learner gradients"] == 2 * A7
    assert update["learner optimizer states"] == 12 * A7  # fp32 master, Adam m and v: 0.45 GiB
    unsaid = ["rollout.engine=vllm", "rollout.colocate=true", f"model.path={checkpoint(tmp_path, MIMO_VL_7B)}"]
    assert "vision activations" in shared_gpu(load_config(None, unsaid))[1]["shared GPU, update"].parts
    lora_unsaid = shared_gpu(load_config(None, [*unsaid, "learner.lora={}"]))[1]["shared GPU, update"].parts
    assert "vision activations" not in lora_unsaid  # LoRA freezes the ViT, freeze_vision_tower said or not
    tokens = 2048 + 8192
    per_layer = 2 * (7 * 3584 + 3 * 512 + 4 * 18944) + 7 * 2 * 16  # plus each adapter's rank-16 intermediate
    assert update["activations"] == tokens * (28 * 2 * 3584 + per_layer)
    dropout = shared_gpu(lora_7b(tmp_path, 'learner.lora={"rank": 16, "dropout": 0.05}'))[1]["shared GPU, update"]
    dropped = (6 * 3584 + 18944) * (2 + 1)  # each adapted Linear's dropped input in bf16 and dropout's mask
    assert dropout.parts["activations"] == tokens * (28 * 2 * 3584 + per_layer + dropped)

    full = shared_gpu(lora_7b(tmp_path, "learner.lora=null"))[1]["shared GPU, update"]
    assert full.parts["learner optimizer states"] == 12 * T_MIMO
    assert est.fits and not full.fits
    assert budgets["shared GPU, update"].used < full.used / 3  # 28.5 GiB against 131 GiB

    offloaded = shared_gpu(lora_7b(tmp_path, "learner.offload_optimizer=true"))[1]["host"].parts
    assert offloaded["offloaded gradients and optimizer states"] == 16 * A7


def test_a_lora_sync_sends_the_adapted_layers_whole_with_their_linears_merged(tmp_path):
    def sync_line(*overrides):
        lines, _ = report(lora_7b(tmp_path, *overrides), Hardware(1, 80, 128))
        (line,) = [line for line in lines if line.startswith("weight sync: ")]
        return line

    # whole decoder layers: the Linears, their biases (q, k, v: 3584 + 2 x 512) and two norms (2 x 3584)
    layers = 28 * (LAYER_IN_TIMES_OUT + 3584 + 2 * 512 + 2 * 3584)
    assert f"{layers / 1e9:.2f} B parameters, {2 * layers / GIB:.2f} GiB per sync" in sync_line()
    assert "the 28 decoder layers whole, their q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in sync_line()
    # adapters on attention only still change every layer, which travels whole (vLLM fuses q, k, v and gate, up)
    attention_only = sync_line('learner.lora={"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}')
    assert f"{layers / 1e9:.2f} B parameters" in attention_only and "their q_proj, k_proj, v_proj, o_proj merged" in attention_only
    assert "whole model" in sync_line("rollout.sleep_level=2")  # vLLM discarded every weight
    assert f"{T_MIMO / 1e9:.2f} B parameters" in sync_line("learner.lora=null")  # the language model


def test_the_7b_lora_recipe_fits_one_80_or_48_gb_gpu(tmp_path):
    path = checkpoint(tmp_path, MIMO_VL_7B)
    recipe = str(RECIPES / "qwen25vl_7b_lora_1gpu.yaml")
    for gib in ("80", "48"):
        run = CliRunner().invoke(
            app,
            ["preflight", recipe, f"model.path={path}", "--gpus", "1", "--gpu-mem-gib", gib, "--host-mem-gib", "64"],
        )
        assert run.exit_code == 0, run.output
        assert "40,370,176 LoRA adapter parameters trained" in run.output
    est, _ = shared_gpu(lora_7b(tmp_path), Hardware(1, 48, 64))
    assert est.kv_cache_tokens >= 8 * (2048 + 8192)  # room for several longest sequences at once
    assert not shared_gpu(lora_7b(tmp_path), Hardware(1, 40, 64))[0].fits
