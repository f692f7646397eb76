"""model.path / model.processor_path: a Qwen2.5-VL-compatible HF directory passes, anything else is one error
that says what the directory holds."""

import json
import shutil

import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from morl.config import ConfigError, load_config
from morl.run.build import prepare_model
from morl.run.model_check import (
    ModelDirError,
    check_model_dir,
    checkpoint_identity,
    dtype_notice,
    max_positions,
    stored_dtypes,
)


@pytest.fixture(scope="module")
def split_sft(toy_world, tmp_path_factory):
    """The toy SFT checkpoint saved as users often have it: model and processor by separate save_pretrained calls."""
    root = tmp_path_factory.mktemp("split")
    Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft").save_pretrained(root / "model")
    AutoProcessor.from_pretrained(toy_world / "sft").save_pretrained(root / "processor")
    return root / "model", root / "processor"


def test_the_toy_sft_checkpoint_passes(toy_world):
    check_model_dir(str(toy_world / "sft"))


def test_a_separate_processor_dir_is_named_in_processor_path(split_sft):
    model_dir, processor_dir = split_sft
    with pytest.raises(ModelDirError) as err:
        check_model_dir(str(model_dir))
    text = str(err.value)
    assert text.startswith(f"model.path {model_dir} is not an HF-format Qwen2.5-VL-compatible model directory")
    assert "no tokenizer" in text and "no image processor" in text and "no chat template" in text
    assert "config.json" in text.split("Found:")[1] and "model.processor_path" in text
    check_model_dir(str(model_dir), str(processor_dir))


def test_another_architecture_is_named(split_sft, tmp_path):
    model_dir, _ = split_sft
    llama = tmp_path / "llama"
    shutil.copytree(model_dir, llama)
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelDirError, match=r"model_type 'llama' \(architectures \['LlamaForCausalLM'\]\), "
                                            r"not 'qwen2_5_vl'"):
        check_model_dir(str(llama), str(model_dir))


def test_missing_weights_and_shards_are_named(split_sft, tmp_path):
    model_dir, processor_dir = split_sft
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(model_dir / "config.json", bare)
    with pytest.raises(ModelDirError, match=r"no weights .*Found: config.json$"):
        check_model_dir(str(bare), str(processor_dir))
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (bare / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    (bare / shards["a"]).write_bytes(b"")
    with pytest.raises(ModelDirError, match="lists weight shards that are missing: model-00002-of-00002.safetensors"):
        check_model_dir(str(bare), str(processor_dir))


def test_missing_directories_and_templates(split_sft, tmp_path):
    model_dir, processor_dir = split_sft
    with pytest.raises(ModelDirError, match=f"model.path {tmp_path / 'nowhere'}: no such directory"):
        check_model_dir(str(tmp_path / "nowhere"))
    no_template = tmp_path / "no_template"
    shutil.copytree(processor_dir, no_template)
    (no_template / "chat_template.jinja").unlink()
    with pytest.raises(ModelDirError, match=r"model.processor_path .*: no chat template"):
        check_model_dir(str(model_dir), str(no_template))


def test_prompts_and_responses_longer_than_the_models_positions_are_refused_before_any_actor(split_sft, tmp_path):
    model, processor = split_sft
    assert max_positions(model) == 4096  # the toy's text model; a config that does not say gives None
    base = [f"model.path={model}", f"model.processor_path={processor}", "rollout.max_new_tokens=96"]
    prepare_model(load_config(None, [*base, "rollout.max_prompt_tokens=4000"]))  # 4096 positions: fits
    with pytest.raises(ConfigError, match=r"rollout\.max_prompt_tokens \+ rollout\.max_new_tokens = 4097 is longer "
                                          r"than the model takes: max_position_embeddings 4096 in .*config\.json"):
        prepare_model(load_config(None, [*base, "rollout.max_prompt_tokens=4001"]))
    unsaid = shutil.copytree(model, tmp_path / "model")
    config = json.loads((unsaid / "config.json").read_text())
    del config["text_config"]["max_position_embeddings"]
    (unsaid / "config.json").write_text(json.dumps(config))
    assert max_positions(unsaid) is None
    base[0] = f"model.path={unsaid}"
    prepare_model(load_config(None, [*base, "rollout.max_prompt_tokens=4001"]))  # nothing to check against


def test_the_start_line_names_the_training_dtype_and_a_checkpoint_stored_in_another(split_sft, tmp_path):
    model_dir, _ = split_sft  # saved by plain transformers in float32
    assert stored_dtypes(model_dir) == ["float32"]
    assert dtype_notice(str(model_dir), "float32") == (
        f"training in float32 (model.dtype), the dtype of the weights in {model_dir}"
    )
    bf16 = tmp_path / "bf16"
    Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(
        bf16, max_shard_size="2MB"  # sharded, as real checkpoints are: every shard's header is read
    )
    assert (bf16 / "model.safetensors.index.json").is_file()
    assert stored_dtypes(bf16) == ["bfloat16"]
    notice = dtype_notice(str(bf16), "float32")
    assert notice == (f"training in float32 (model.dtype): the weights in {bf16} are stored in bfloat16 and are cast "
                      "to float32 on load; set model.dtype to train in the checkpoint's own dtype")
    for shard in bf16.glob("*.safetensors"):
        shard.write_bytes(b"")  # unreadable headers: config.json's dtype is the fallback
    assert stored_dtypes(bf16) == ["bfloat16"]
    config = json.loads((bf16 / "config.json").read_text())
    for key in ("torch_dtype", "dtype"):
        config.pop(key, None)
    (bf16 / "config.json").write_text(json.dumps(config))
    assert dtype_notice(str(bf16), "bfloat16").endswith(f"the dtype of the weights in {bf16} is not recorded")


def test_a_checkpoints_identity_follows_its_content_not_its_path(split_sft, tmp_path):
    model_dir, _ = split_sft
    original = checkpoint_identity(str(model_dir))
    assert original["path"] == str(model_dir.resolve()) and len(original["fingerprint"]) == 16
    copy = checkpoint_identity(str(shutil.copytree(model_dir, tmp_path / "copy")))
    assert copy["fingerprint"] == original["fingerprint"] and copy["path"] != original["path"]
    tuned = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir)
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.add_(1e-3 * torch.randn_like(parameter))  # what any fine-tune does to its weights
    tuned.save_pretrained(tmp_path / "tuned")
    assert checkpoint_identity(str(tmp_path / "tuned"))["fingerprint"] != original["fingerprint"]
