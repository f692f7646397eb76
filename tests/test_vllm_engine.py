"""The vLLM engine's request building, on CPU: what it sends vLLM is checked without vLLM itself.

The engine proper (sampling, log-probs, weight loading, sleep) is tests/test_vllm_gpu.py, marker `gpu`.
"""

import pytest
from transformers import AutoProcessor

from morl.config import ModelConfig, RolloutConfig
from morl.data import Row, load_dataset, open_image
from morl.multimodal import EncodedPrompt, PromptEncoder, PromptTooLongError
from morl.rollout.hf_engine import HFEngine, vision_token_ids
from morl.rollout.vllm_engine import (
    check_expanded_prompt,
    collapse_placeholder_runs,
    placeholder_bad_words,
    stop_token_ids,
    vllm_engine_factory,
    vllm_prompt,
)


@pytest.fixture(scope="module")
def world(toy_world):
    processor = AutoProcessor.from_pretrained(toy_world / "sft")
    rows = load_dataset(toy_world / "data" / "counting" / "train.jsonl", known_tasks=None).rows[:3]
    return processor, rows


def two_image_row(rows: list[Row]) -> Row:
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which has more shapes?"}]
    return Row(
        id="pair",
        task="choice",
        messages=[{"role": "user", "content": content}],
        images=[rows[0].images[0], rows[1].images[0]],
        label={"answer": "A"},
    )


def test_collapse_restores_the_template_placeholders(world):
    processor, rows = world
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for row in [*rows, two_image_row(rows)]:
        prompt = PromptEncoder(processor, 4096)(row)
        collapsed = collapse_placeholder_runs(prompt.input_ids, image_pad)
        text = processor.apply_chat_template(
            [m.model_dump(exclude_none=True) for m in row.messages], add_generation_prompt=True, tokenize=False
        )
        # exactly the tokens of the chat text before the processor expanded each image
        assert collapsed == processor.tokenizer(text)["input_ids"]
        assert collapsed.count(image_pad) == len(row.images)
        assert prompt.input_ids.count(image_pad) > len(row.images)


def test_collapse_on_plain_lists():
    assert collapse_placeholder_runs([1, 9, 9, 9, 2, 9, 9, 3], 9) == [1, 9, 2, 9, 3]
    assert collapse_placeholder_runs([9, 9, 1], 9) == [9, 1]
    assert collapse_placeholder_runs([1, 2, 3], 9) == [1, 2, 3]


def test_request_carries_every_image_in_order(world):
    processor, rows = world
    row = two_image_row(rows)
    prompt = PromptEncoder(processor, 4096)(row)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    request = vllm_prompt(prompt, image_pad, max_prompt_tokens=4096, max_images=2)
    assert request["prompt_token_ids"] == collapse_placeholder_runs(prompt.input_ids, image_pad)
    images = request["multi_modal_data"]["image"]
    assert [im.tobytes() for im in images] == [open_image(ref).tobytes() for ref in row.images]
    text_only = EncodedPrompt("t", [1, 2, 3], None, None)
    assert vllm_prompt(text_only, image_pad, max_prompt_tokens=10, max_images=0) == {"prompt_token_ids": [1, 2, 3]}


def test_requests_that_vllm_must_not_get_are_refused(world):
    processor, rows = world
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    prompt = PromptEncoder(processor, 4096)(rows[0])
    with pytest.raises(PromptTooLongError, match=rf"{rows[0].id}.*rollout.max_prompt_tokens=20"):
        vllm_prompt(prompt, image_pad, max_prompt_tokens=20, max_images=1)
    pair = PromptEncoder(processor, 4096)(two_image_row(rows))
    with pytest.raises(ValueError, match="rollout.max_images_per_prompt=1"):
        vllm_prompt(pair, image_pad, max_prompt_tokens=4096, max_images=1)
    without_refs = EncodedPrompt(prompt.row_id, prompt.input_ids, prompt.pixel_values, prompt.image_grid_thw)
    with pytest.raises(ValueError, match="1 image placeholder.*0 image reference"):
        vllm_prompt(without_refs, image_pad, max_prompt_tokens=4096, max_images=1)


def test_expanded_prompt_must_match_the_encoder(world):
    processor, rows = world
    prompt = PromptEncoder(processor, 4096)(rows[0])
    check_expanded_prompt(prompt, list(prompt.input_ids))
    with pytest.raises(RuntimeError, match="same processor"):
        check_expanded_prompt(prompt, prompt.input_ids[:-3])  # e.g. vLLM resized the image to fewer patches


def test_placeholders_become_exact_bad_words(world):
    processor, _ = world
    tokenizer = processor.tokenizer
    banned = vision_token_ids(tokenizer)
    words = placeholder_bad_words(tokenizer, banned)
    assert words == ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    assert [tokenizer.encode(w, add_special_tokens=False) for w in words] == [[i] for i in banned]
    with pytest.raises(ValueError, match="could not ban it exactly"):
        # a byte-level token's surface form ("Ġ", the space) does not encode back to its own id
        placeholder_bad_words(tokenizer, [tokenizer.convert_tokens_to_ids("Ġ")])


def test_stop_ids_are_the_hf_engines(toy_world):
    engine = HFEngine(str(toy_world / "sft"), None, "float32")
    assert stop_token_ids(str(toy_world / "sft"), engine.tokenizer) == sorted(engine.stop_ids)


def test_factory_takes_the_recipe_settings():
    rollout = RolloutConfig(
        engine="vllm",
        tensor_parallel_size=2,
        gpu_memory_utilization=0.4,
        colocate=True,
        max_images_per_prompt=3,
        max_prompt_tokens=1000,
        max_new_tokens=24,
    )
    make = vllm_engine_factory("/ckpt", ModelConfig(path="/ckpt", dtype="bfloat16"), rollout, seed=5)
    assert make.args == ("/ckpt", None, "bfloat16")
    assert make.keywords == dict(
        max_prompt_tokens=1000,
        max_new_tokens=24,
        tensor_parallel_size=2,
        gpu_memory_utilization=0.4,
        max_images_per_prompt=3,
        enable_sleep_mode=True,
        seed=5,
    )
