"""Rollout with HF transformers `generate`: the CPU backend, and the reference for the others."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from morl.algorithm import token_logprobs
from morl.multimodal import EncodedPrompt, collate
from morl.rollout.types import Completion, SamplingParams

VISION_PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def vision_token_ids(tokenizer) -> list[int]:
    """Ids of the vision placeholder tokens present in the vocabulary: never sampled."""
    ids = tokenizer.convert_tokens_to_ids(list(VISION_PLACEHOLDERS))
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


class HFEngine:
    def __init__(self, model_path: str, processor_path: str | None, dtype: str, max_batch_sequences: int = 512):
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(processor_path or model_path)
        self.banned_ids = vision_token_ids(self.tokenizer)
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = self.tokenizer.pad_token_id
        self.max_batch_sequences = max_batch_sequences

    def generate(self, prompts: list[EncodedPrompt], sampling: SamplingParams) -> list[list[Completion]]:
        torch.manual_seed(sampling.seed)
        per_chunk = max(1, self.max_batch_sequences // sampling.n)
        flat: list[Completion] = []
        for start in range(0, len(prompts), per_chunk):
            expanded = [p for p in prompts[start : start + per_chunk] for _ in range(sampling.n)]
            flat.extend(self._generate_batch(expanded, sampling))
        return [flat[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]

    @torch.no_grad()
    def _generate_batch(self, prompts: list[EncodedPrompt], sampling: SamplingParams) -> list[Completion]:
        config = self.model.config
        batch = collate(
            [p.input_ids for p in prompts],
            prompts,
            pad_id=self.pad_id,
            image_token_id=config.image_token_id,
            video_token_id=config.video_token_id,
            left_pad=True,
        )
        sample_kwargs = (
            dict(do_sample=False)
            if sampling.greedy
            else dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        )
        out = self.model.generate(
            **batch.as_kwargs(),
            **sample_kwargs,
            max_new_tokens=sampling.max_new_tokens,
            suppress_tokens=self.banned_ids,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=self.pad_id,
        )
        new_tokens = out.sequences[:, batch.input_ids.shape[1] :]
        temperature = 1.0 if sampling.greedy else sampling.temperature
        logprobs = token_logprobs(torch.stack(out.logits, dim=1), new_tokens, temperature, self.banned_ids)
        return [self._completion(tokens.tolist(), lps.tolist()) for tokens, lps in zip(new_tokens, logprobs)]

    def _completion(self, tokens: list[int], logprobs: list[float]) -> Completion:
        stop_at = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
        if stop_at is None:
            return Completion(tokens, self.tokenizer.decode(tokens), logprobs, "length")
        text = self.tokenizer.decode(tokens[:stop_at])
        return Completion(tokens[: stop_at + 1], text, logprobs[: stop_at + 1], "stop")

    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                param.copy_(named_tensors[name])
