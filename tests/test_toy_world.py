"""The locally built quickstart world: cached, loadable, Qwen2.5-VL-shaped."""

import logging

from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from conftest import TINY_WORLD
from morl.config import ToyWorldConfig
from morl.toy.model import SPECIAL_TOKENS
from morl.toy.world import ensure_toy_world


def test_second_use_reuses_the_build(toy_world, caplog):
    stamp = (toy_world / "world.json").stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="morl.toy"):
        assert ensure_toy_world(ToyWorldConfig(root=str(toy_world), **TINY_WORLD)) == toy_world
    assert (toy_world / "world.json").stat().st_mtime_ns == stamp
    assert "building" not in caplog.text


def test_changed_config_rebuilds_and_says_so(tmp_path, caplog):
    cfg = ToyWorldConfig(root=str(tmp_path / "w"), train_per_task=2, eval_per_task=1, sft_steps=0)
    with caplog.at_level(logging.WARNING, logger="morl.toy"):
        ensure_toy_world(cfg)
        assert "building the toy world" in caplog.text
        caplog.clear()
        ensure_toy_world(cfg.model_copy(update={"seed": 1}))
        assert "building the toy world" in caplog.text


def test_sft_checkpoint_is_an_hf_qwen2_5_vl_directory(toy_world):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft")
    processor = AutoProcessor.from_pretrained(toy_world / "sft")
    tokenizer = processor.tokenizer
    assert all(tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id for t in SPECIAL_TOKENS)
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert type(processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert 1e5 < model.num_parameters() < 1e7
