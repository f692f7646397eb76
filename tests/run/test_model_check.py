"""model.path / model.processor_path: a Qwen2.5-VL-compatible HF directory passes, anything else is one error
that says what the directory holds."""

import json
import shutil

import pytest
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from morl.config import ConfigError, load_config
from morl.run.build import prepare_model
from morl.run.model_check import ModelDirError, check_model_dir, max_positions


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
