"""A tiny Qwen2.5-VL built locally: tokenizer, processor and model, nothing downloaded.

Everything here behaves like the real Qwen2.5-VL stack (same special tokens, same chat
template shape, the real `Qwen2VLImageProcessor`, the real
`Qwen2_5_VLForConditionalGeneration`), only small enough to train on a laptop CPU.
The same builder makes the larger language models `morl bench learner` measures (`BENCH_SHAPES`: MiMo-VL-7B's
vocabulary and attention heads at a width a CPU can step), around any processor, cached by shape.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from morl.compat import use_reference_video_positions
from morl.toy import BUILD_VERSION
from morl.toy.tasks import IMAGE_SIZE, MERGE, PATCH, VIDEO_SIZE

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
]

# Same structure as Qwen2.5-VL's template: a default system turn, vision placeholders where
# the content has an image or video part, and the assistant header on add_generation_prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# The template's own words appear in every prompt: the tokenizer learns them as often as the corpus has lines.
TEMPLATE_WORDS = "system\nYou are a helpful assistant.\nuser\nassistant\n"


def build_tokenizer(corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus` and the chat template, digits split one per token as in Qwen2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus + [TEMPLATE_WORDS] * len(corpus), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLProcessor:
    """The real Qwen2.5-VL processor around the toy tokenizer; pixel budget fixed to one toy image (or video)."""
    pixels = IMAGE_SIZE * IMAGE_SIZE  # one toy image, a multiple of CELL on each side: kept as it is
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=PATCH, merge_size=MERGE)
    # toy videos (VIDEO_SIZE on a side) kept as they are; larger ones may keep up to one toy image's pixels a frame
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=VIDEO_SIZE * VIDEO_SIZE, max_pixels=pixels, patch_size=PATCH, merge_size=MERGE
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


@dataclass(frozen=True)
class TextShape:
    """The language model's sizes (head dim = hidden / heads); `vocab` None: the tokenizer's, rounded up to 64."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool
    vocab: int | None = None
    max_positions: int = 4096

    @property
    def mrope_section(self) -> list[int]:
        """Qwen2.5-VL's split of half a head's rotary dims into time, height, width ([16, 24, 24] at head dim 128)."""
        half = self.hidden // self.heads // 2
        time = half // 4
        return [time, (half - time) // 2, (half - time) // 2]


TOY_TEXT = TextShape(hidden=128, intermediate=384, layers=4, heads=4, kv_heads=2, tied=True)
# MiMo-VL-7B's vocabulary, head dim 128 and untied lm_head, with 7 query heads per kv head (real-vocab) or 2
# (narrow): lm_head and its log-softmax at their real cost per answer token, two narrow layers around them.
BENCH_SHAPES = {
    "real-vocab": TextShape(896, 1536, 2, 7, 1, tied=False, vocab=151_936, max_positions=128_000),
    "real-vocab-narrow": TextShape(256, 512, 2, 2, 1, tied=False, vocab=151_936, max_positions=128_000),
}


def build_model(
    tokenizer: PreTrainedTokenizerFast, seed: int, shape: TextShape = TOY_TEXT
) -> Qwen2_5_VLForConditionalGeneration:
    """A Qwen2.5-VL of `shape` (the toy's: ~1.1M parameters, 4 text layers of width 128) with a 2-block ViT of
    width 64."""
    vocab = shape.vocab or (len(tokenizer) + 63) // 64 * 64
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            max_position_embeddings=shape.max_positions,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": shape.mrope_section},
            tie_word_embeddings=shape.tied,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=shape.hidden,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=shape.tied,
    )
    torch.manual_seed(seed)
    model = use_reference_video_positions(Qwen2_5_VLForConditionalGeneration(config))
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


def shape_checkpoint(name: str, processor_dir: str, cache: Path) -> Path:
    """The checkpoint of `BENCH_SHAPES[name]` around the processor of `processor_dir`, random weights (a bench
    measures time and memory, not answers): built once into `cache/<name>-<key>`, the key covering the shape, the
    tokenizer's special ids and the build version, and reused after."""
    shape = BENCH_SHAPES[name]
    processor = AutoProcessor.from_pretrained(processor_dir)
    ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    key = json.dumps([BUILD_VERSION, asdict(shape), ids], sort_keys=True)
    target = cache.expanduser() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    building = target.with_name(f".{target.name}.building-{os.getpid()}")
    try:
        save_checkpoint(build_model(processor.tokenizer, seed=0, shape=shape), processor, building)
        os.rename(building, target)  # whole or absent: a killed build leaves only its temporary folder
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def save_checkpoint(model, processor: Qwen2_5_VLProcessor, out_dir: Path) -> None:
    """Write an HF-format checkpoint directory: model, tokenizer, processor, chat template."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
