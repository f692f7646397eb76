"""`preference`: a Bradley-Terry reward model, its scalar score for (prompt, response) mapped to [0, 1] by a sigmoid.

Runs inside a reward service (rewards/ray_serve.py on Ray Serve, or rewards/http_server.py standalone), never in the
router. Checkpoints:
- text-only: any HF `AutoModelForSequenceClassification` checkpoint with `num_labels=1`; images are ignored.
- multimodal: a Qwen2.5-VL checkpoint with `"architectures": ["Qwen2_5_VLForSequenceClassification"]` (the class
  below; transformers has none): the model sees the images. Its weights are those of a Qwen2.5-VL checkpoint as
  published (`model.*` the language model, `visual.*` the ViT) plus `score.weight`, the [1, hidden] head on the
  last non-pad token, as in transformers' Qwen2/Qwen3.5 `*ForSequenceClassification`. So a policy checkpoint loads
  as the backbone of a new reward model (the head starts random).

The prompt comes from the sample's meta: `meta["messages"]` (chat messages as in a data row, `{"type": "image"}`
parts filled from the sample's images in order) or `meta["prompt"]` (the user's text, images before it); without
either the model sees the images and the response alone. The response scored is the answer after the thinking.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForSequenceClassification, AutoProcessor, AutoTokenizer
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_layers import GenericForSequenceClassification
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPreTrainedModel

from morl.rewards.contract import open_image
from morl.rewards.sandbox import MAX_ERROR_CHARS, Outcome
from morl.rewards.types import RewardInput

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Qwen2_5_VLForSequenceClassification(GenericForSequenceClassification, Qwen2_5_VLPreTrainedModel):
    """Qwen2.5-VL with a scalar head on the last non-pad token: the multimodal reward-model format."""


# Read and write the published Qwen2.5-VL key layout, as Qwen2_5_VLForConditionalGeneration does.
register_checkpoint_conversion_mapping(
    Qwen2_5_VLForSequenceClassification.__name__,
    get_checkpoint_conversion_mapping("Qwen2VLForConditionalGeneration"),
    overwrite=True,
)


def load_reward_model(path: str, dtype: torch.dtype) -> tuple[torch.nn.Module, Any, bool]:
    """(model, processor or tokenizer, multimodal?) for a checkpoint directory; the model must have one output."""
    architectures = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    multimodal = Qwen2_5_VLForSequenceClassification.__name__ in architectures
    if multimodal:
        model = Qwen2_5_VLForSequenceClassification.from_pretrained(path, dtype=dtype)
        processor = AutoProcessor.from_pretrained(path)
        tokenizer = processor.tokenizer
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
        processor = tokenizer = AutoTokenizer.from_pretrained(path)
    if model.config.num_labels != 1:
        labels = model.config.num_labels
        raise ValueError(f"{path}: a Bradley-Terry reward model has one output (num_labels=1), not {labels}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # the head pools the last token that is not padding: padding as this tokenizer writes it
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"  # positions stay those of the unpadded sequence
    return model.eval(), processor, multimodal


class PreferenceScorer:
    """A reward model held in memory: `scorer(samples)` gives one (sigmoid(score), None) or (None, reason) each."""

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto", batch_size: int = 8):
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not auto or one of {sorted(DTYPES)}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        torch_dtype = DTYPES.get(dtype) or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        model, self.processor, self.multimodal = load_reward_model(model_path, torch_dtype)
        self.model = model.to(self.device)
        self.tokenizer = self.processor.tokenizer if self.multimodal else self.processor
        self.batch_size = batch_size
        self._lock = threading.Lock()  # one forward at a time: the HTTP servers call from several threads

    def __call__(self, samples: Sequence[RewardInput]) -> list[Outcome]:
        outcomes: list[Outcome] = [(None, None)] * len(samples)
        ready: list[tuple[int, Any, list[Image.Image]]] = []  # (sample index, text, its images)
        for i, sample in enumerate(samples):
            try:
                ready.append((i, *self._model_input(sample)))
            except (OSError, ValueError, TypeError) as e:  # this sample's data, not the model
                outcomes[i] = (None, f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS])
        for start in range(0, len(ready), self.batch_size):
            chunk = ready[start : start + self.batch_size]
            rewards = self._forward([text for _, text, _ in chunk], [im for _, _, ims in chunk for im in ims])
            for (i, _, _), reward in zip(chunk, rewards):
                outcomes[i] = (reward, None)
        return outcomes

    def _model_input(self, sample: RewardInput) -> tuple[Any, list[Image.Image]]:
        """The conversation as the model reads it (chat text, or a (prompt, response) text pair) and its images."""
        messages = prompt_messages(sample, self.multimodal)
        images = [open_image(ref) for ref in sample.images] if self.multimodal else []
        if self.tokenizer.chat_template is None:  # e.g. a DeBERTa reward model: it reads a text pair
            return ("\n".join(m["content"] for m in messages), sample.response), images
        conversation = [*messages, {"role": "assistant", "content": sample.response}]
        return self.processor.apply_chat_template(conversation, tokenize=False), images

    @torch.inference_mode()
    def _forward(self, texts: list[Any], images: list[Image.Image]) -> list[float]:
        if self.multimodal:
            batch = self.processor(
                text=texts, images=images or None, padding=True, return_tensors="pt", return_mm_token_type_ids=True
            )
        elif isinstance(texts[0], tuple):
            prompts, responses = zip(*texts)
            batch = self.tokenizer(list(prompts), list(responses), padding=True, return_tensors="pt")
        else:  # the chat template already wrote the special tokens
            batch = self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        with self._lock:
            logits = self.model(**batch.to(self.device)).logits
        return torch.sigmoid(logits[:, 0].float()).tolist()


def prompt_messages(sample: RewardInput, with_images: bool) -> list[dict[str, Any]]:
    """The chat turns before the response, from meta["messages"] or meta["prompt"].

    With images, one image part per image of the sample (meta["messages"] must have exactly as many); without,
    every message's content is its text alone, for a text-only model.
    """
    messages = sample.meta.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                     for m in messages):
            raise ValueError('meta["messages"] must be a list of {"role", "content"} messages')
        if not with_images:
            return [{"role": m["role"], "content": _text(m["content"])} for m in messages]
        parts = sum(_is_image(part) for m in messages if isinstance(m["content"], list) for part in m["content"])
        if parts != len(sample.images):
            raise ValueError(f'{parts} image part(s) in meta["messages"] but {len(sample.images)} image(s)')
        return messages
    prompt = sample.meta.get("prompt", "")
    if not isinstance(prompt, str):
        raise TypeError(f'meta["prompt"] must be a string, got {type(prompt).__name__}')
    if not with_images:
        return [{"role": "user", "content": prompt}] if prompt else []
    content = [{"type": "image"} for _ in sample.images] + ([{"type": "text", "text": prompt}] if prompt else [])
    return [{"role": "user", "content": content}] if content else []


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def _text(content: Any) -> str:
    """A message's text: image parts dropped."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
