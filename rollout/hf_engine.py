"""Rollout with HF transformers `generate`: the CPU backend, and the reference for the others."""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, LogitsProcessor, Qwen2_5_VLForConditionalGeneration, StoppingCriteria

from morl.algo.core import token_logprobs
from morl.compat import use_reference_video_positions
from morl.data.encoding import collate, vision_token_ids
from morl.rollout.types import Completion, Continuation, Finished, SamplingParams, aborted_group, generate, group_size
from morl.types import EncodedPrompt


def sequence_seed(prompt_seed: int, sample: int) -> int:
    return zlib.crc32(f"{prompt_seed}:{sample}".encode())


class SeededSampler(LogitsProcessor):
    """Samples every sequence from its own generator (Gumbel-max), so a sample never depends on its batch.

    `generate` runs greedily over `logits / T + Gumbel noise`, which is an exact draw from the
    temperature / top-p distribution. Because each row consumes its own random stream, prompt i's
    samples are the same whether it is generated alone, in a chunk of 2, or with the whole batch:
    the scheduler can dispatch prompts in any grouping and the run stays reproducible.
    """

    NOISE_BLOCK_BYTES = 64 * 2**20
    """Uniform noise is drawn for several decoding steps at once, up to this much: one generator call per row and
    block instead of per row and step. A CPU generator draws the same stream either way, so samples do not change."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self._block = torch.empty((len(seeds), 0, 0))  # [rows, steps, vocab]
        self._used = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            logits = _top_p_filter(logits, self.top_p)
        noise = self._next_noise(logits.shape[-1])
        gumbel = -torch.log(-torch.log(noise.clamp(1e-20, 1.0 - 1e-7)))
        return logits + gumbel.to(logits.device)

    def _next_noise(self, vocab: int) -> torch.Tensor:
        """[rows, vocab] uniform noise of this decoding step, each row from its own generator."""
        if self._used == self._block.shape[1]:
            steps = max(1, self.NOISE_BLOCK_BYTES // (4 * vocab * len(self.generators)))
            self._block = torch.stack([torch.rand((steps, vocab), generator=g) for g in self.generators])
            self._used = 0
        self._used += 1
        return self._block[:, self._used - 1]


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p` (always at least the best one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class _StopWhen(StoppingCriteria):
    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


class _RowLimits(StoppingCriteria):
    """Ends each row at its own token budget (the batch runs to the largest): a finished row only pads after."""

    def __init__(self, start: int, limits: Sequence[int]):
        self.start = start  # the padded input's width: where the new tokens begin
        self.limits = torch.tensor(limits)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return (input_ids.shape[1] - self.start >= self.limits).to(input_ids.device)


@dataclass(frozen=True)
class _Row:
    """One sample of a static batch: its prompt, the response it carries on (empty when fresh), the seed of its
    sampler, and the most tokens it adds."""

    prompt: EncodedPrompt
    prefix: tuple[int, ...]
    seed: int
    max_new_tokens: int


@dataclass(frozen=True)
class _Queued:
    """A group waiting for a static batch, as `add` got it."""

    key: Hashable
    prompt: EncodedPrompt
    sampling: SamplingParams
    seed: int
    continuation: Continuation | None

    def rows(self) -> list[_Row]:
        """Its samples; a fresh one's seeds derive from the group's (`sequence_seed`), a continued one's are given."""
        c = self.continuation
        if c is None:
            n, limit = self.sampling.n, self.sampling.max_new_tokens
            return [_Row(self.prompt, (), sequence_seed(self.seed, j), limit) for j in range(n)]
        return [_Row(self.prompt, *sample) for sample in zip(c.prefixes, c.seeds, c.max_new_tokens)]


class HFEngine:
    """Static batches: when the last batch ends, the groups queued by then (up to `max_num_seqs` samples) run as the
    next one, to its slowest sample. (transformers' continuous batching, `generate_batch`, takes token ids only: no
    images, and no per-request sampler, so it cannot serve these prompts.)

    A continued sample runs on its prompt + prefix (left padding lines the rows up whatever their lengths) and stops
    at its own token budget; its sampler's generator is seeded with its own seed, so its tokens do not depend on its
    batch."""

    batches_continuously = False

    def __init__(self, model_path: str, processor_path: str | None, dtype: str, max_num_seqs: int = 512):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.model = use_reference_video_positions(model).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(processor_path or model_path)
        self.banned_ids = vision_token_ids(self.tokenizer)
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = self.tokenizer.pad_token_id
        self.max_num_seqs = max_num_seqs
        self._queue: list[_Queued] = []

    def add(self, key: Hashable, prompt: EncodedPrompt, sampling: SamplingParams, seed: int,
            continuation: Continuation | None = None) -> None:
        self._queue.append(_Queued(key, prompt, sampling, seed, continuation))

    def has_unfinished(self) -> bool:
        return bool(self._queue)

    def sequences_in_flight(self) -> int:
        return sum(group_size(item.sampling, item.continuation) for item in self._queue)

    def abort(self, keys: Iterable[Hashable]) -> list[Finished]:
        dropped = set(keys)
        aborted = [
            (item.key, aborted_group(group_size(item.sampling, item.continuation)))
            for item in self._queue
            if item.key in dropped
        ]
        self._queue = [item for item in self._queue if item.key not in dropped]
        return aborted

    def step(self, is_aborted: Callable[[Hashable], bool]) -> list[Finished]:
        """One static batch: the queued groups that share the first one's sampling settings, up to max_num_seqs
        samples (always at least one group), run to their end or until every one of them is aborted."""
        sampling = self._queue[0].sampling
        batch: list[_Queued] = []
        samples = 0
        for item in (item for item in self._queue if item.sampling == sampling):  # in the order they came
            size = group_size(item.sampling, item.continuation)
            if batch and samples + size > self.max_num_seqs:
                break
            batch.append(item)
            samples += size
        taken = {id(item) for item in batch}
        self._queue = [item for item in self._queue if id(item) not in taken]
        keys = [item.key for item in batch]
        groups = [item.rows() for item in batch]
        flat = self._generate_batch(
            [row for rows in groups for row in rows], sampling, lambda: all(is_aborted(key) for key in keys)
        )
        ends = list(itertools.accumulate(len(rows) for rows in groups))
        return [(key, flat[end - len(rows) : end]) for key, rows, end in zip(keys, groups, ends)]

    def generate(
        self,
        prompts: list[EncodedPrompt],
        sampling: SamplingParams,
        seeds: Sequence[int],
        should_stop: Callable[[], bool] | None = None,
        continuations: Sequence[Continuation | None] | None = None,
    ) -> list[list[Completion]]:
        """`sampling.n` completions per prompt (or its continuation's); prompt i's samples depend only on `seeds[i]`
        and the weights (rollout/types.py `generate`)."""
        return generate(self, prompts, sampling, seeds, should_stop, continuations)

    @torch.no_grad()
    def _generate_batch(
        self, rows: list[_Row], sampling: SamplingParams, should_stop: Callable[[], bool] | None
    ) -> list[Completion]:
        config = self.model.config
        batch = collate(
            [row.prompt.input_ids + list(row.prefix) for row in rows],
            [row.prompt for row in rows],
            pad_id=self.pad_id,
            image_token_id=config.image_token_id,
            video_token_id=config.video_token_id,
            left_pad=True,
        )
        seeds, limits = [row.seed for row in rows], [row.max_new_tokens for row in rows]
        processors = [] if sampling.greedy else [SeededSampler(seeds, sampling.temperature, sampling.top_p)]
        stopping: list[StoppingCriteria] = [_RowLimits(batch.input_ids.shape[1], limits)]
        if should_stop:
            stopping.append(_StopWhen(should_stop))
        out = self.model.generate(
            **batch.as_kwargs(),
            do_sample=False,
            logits_processor=processors,
            stopping_criteria=stopping,
            max_new_tokens=max(limits),
            min_new_tokens=sampling.min_new_tokens or None,
            suppress_tokens=self.banned_ids,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=self.pad_id,
        )
        new_tokens = out.sequences[:, batch.input_ids.shape[1] :]
        temperature = 1.0 if sampling.greedy else sampling.temperature
        logprobs = token_logprobs(torch.stack(out.logits, dim=1), new_tokens, temperature, self.banned_ids)
        return [
            self._completion(row, t[: row.max_new_tokens].tolist(), lp[: row.max_new_tokens].tolist())
            for row, t, lp in zip(rows, new_tokens, logprobs)
        ]

    def _completion(self, row: _Row, tokens: list[int], logprobs: list[float]) -> Completion:
        """The row's new tokens up to its stop token, or all of them: its budget spent ("length") or cut short by an
        abort; the text is the whole response's."""
        stop_at = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
        if stop_at is None:
            reason = "length" if len(tokens) == row.max_new_tokens else "abort"
            return Completion(tokens, self.tokenizer.decode([*row.prefix, *tokens]), logprobs, reason)
        text = self.tokenizer.decode([*row.prefix, *tokens[:stop_at]])
        return Completion(tokens[: stop_at + 1], text, logprobs[: stop_at + 1], "stop")

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise KeyError(f"the rollout model has no parameter {name!r}: learner and rollout models differ")
                params[name].copy_(tensor)
