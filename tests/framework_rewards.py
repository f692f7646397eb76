"""Reward functions written the way TRL and verl users write them, for the adapter tests: our own code, in the shape
of TRL's shipped rewards (trl/rewards/, TRL 1.10) and verl's `default_compute_score` ones (verl 0.8): the same
arguments, read the same way, the same return forms. Workers import them as `framework_rewards:...`."""

import asyncio
import math
import re

from morl.rewards.parsing import last_boxed

# --- TRL: completions are lists of one assistant message, every column a list, None skips a sample ---


def trl_accuracy(completions, solution, log_extra=None, **kwargs):
    """Like TRL's `accuracy_reward`: the boxed answer anywhere in the whole completion against `solution`; None when
    the gold is empty (TRL: unparseable); reports the parsed answers through `log_extra` when given."""
    contents = [completion[0]["content"] for completion in completions]
    answers = [last_boxed(content) for content in contents]
    rewards = [None if not gold else float(answer == gold) for answer, gold in zip(answers, solution, strict=True)]
    if log_extra is not None:
        log_extra("answer_parsed", [answer or "[unparseable]" for answer in answers])
    return rewards


def trl_reasoning_accuracy(completions, solution, reasoning_delimiters=None, **kwargs):
    """Like TRL's `reasoning_accuracy_reward`: only the text after the reasoning's end counts; a completion whose
    reasoning never ends scores 0."""
    delimiters = reasoning_delimiters or ["</think>"]
    rewards = []
    for completion, gold in zip(completions, solution, strict=True):
        content = completion[0]["content"]
        delimiter = next((d for d in delimiters if d in content), None)
        rewards.append(0.0 if delimiter is None else float(last_boxed(content.split(delimiter)[-1]) == gold))
    return rewards


def trl_think_format(completions, **kwargs):
    """Like TRL's `think_format_reward`: 1 when the completion opens with `<think>` (only once) and closes it."""
    contents = [completion[0]["content"] for completion in completions]
    return [
        float(content.startswith("<think>") and content.count("<think>") == 1 and "</think>" in content)
        for content in contents
    ]


class SoftOverlong:
    """Like TRL's `get_soft_overlong_punishment(max_completion_len, soft_punish_cache)` (DAPO's Eq. 13): 0 up to
    max - cache tokens, then falling linearly to -1 at max, -1 past it."""

    def __init__(self, max_completion_len, soft_punish_cache):
        self.max_len, self.cache = max_completion_len, soft_punish_cache

    def __call__(self, completion_ids, **kwargs):
        free = self.max_len - self.cache
        return [0.0 if len(ids) <= free else (free - len(ids)) / self.cache if len(ids) <= self.max_len else -1.0
                for ids in completion_ids]


soft_overlong = SoftOverlong(max_completion_len=10, soft_punish_cache=4)


class CosineScaled:
    """Like TRL's `get_cosine_scaled_reward(max_len)`: correctness scaled by the completion's length in tokens on a
    cosine schedule, from 1.0 (correct, empty) to 0.5 (correct, max_len); wrong: from -1.0 to -0.5."""

    def __init__(self, max_len, wrong=(-1.0, -0.5), correct=(0.5, 1.0)):
        self.max_len, self.wrong, self.correct = max_len, wrong, correct

    def __call__(self, completions, solution, completion_ids, **kwargs):
        rewards = []
        for correct, ids in zip(trl_accuracy(completions, solution), completion_ids, strict=True):
            if correct is None:
                rewards.append(None)
                continue
            low, high = self.correct if correct else self.wrong[::-1]  # wrong: short ones are punished most
            cosine = math.cos(min(len(ids) / self.max_len, 1.0) * math.pi)
            rewards.append(low + 0.5 * (high - low) * (1.0 + cosine))
        return rewards


cosine_scaled = CosineScaled(max_len=100)


def trl_progress_length(completions, completion_ids, trainer_state, **kwargs):
    """A TRL reward shaped by training progress (`trainer_state`): the share of max_steps done, times the length in
    tokens over 10."""
    done = trainer_state.global_step / trainer_state.max_steps
    return [done * len(ids) / 10 for ids in completion_ids]


async def trl_async_accuracy(completions, solution, **kwargs):
    """An `async def` TRL reward (TRL awaits them): `trl_accuracy`, after yielding to the event loop."""
    await asyncio.sleep(0)
    return trl_accuracy(completions, solution)


# --- verl: compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict ---

_GSM8K_ANSWER = re.compile(r"#### (-?[0-9.,]+)")
_MINERVA_ANSWER = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_TAIL_CHARS = 300  # both verl scorers read only the last 300 characters of the response


def verl_gsm8k(data_source, solution_str, ground_truth, extra_info=None):
    """Like verl's gsm8k `compute_score` (strict): the last `#### <number>` in the response's last 300
    characters, commas dropped, equal to the ground truth: 1, else 0."""
    found = _GSM8K_ANSWER.findall(solution_str[-_TAIL_CHARS:])
    return 0.0 if not found else float(found[-1].replace(",", "") == ground_truth)


def verl_math_dapo(data_source, solution_str, ground_truth, extra_info=None):
    """Like verl's math_dapo `compute_score`: the last `Answer: ...` line of the response's last 300 characters
    (the rest of its line), normalised, against the ground truth; 1.0 or -1.0, as a dict with `acc` and `pred`."""
    found = _MINERVA_ANSWER.findall(solution_str[-_TAIL_CHARS:])
    pred = _normalise(found[-1]) if found else "[INVALID]"
    correct = pred == _normalise(ground_truth)
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}


def _normalise(answer):
    """The part of math_dapo's normalisation these tests need: the text after the last `=`, without spaces and `$`."""
    return answer.split("=")[-1].replace(" ", "").replace("$", "").strip()


def verl_batch_gsm8k(data_sources, solution_strs, ground_truths, extra_infos, **kwargs):
    """A verl `batch` reward manager function: lists in, one score per response out."""
    return [verl_gsm8k(*args) for args in zip(data_sources, solution_strs, ground_truths, extra_infos, strict=True)]


async def verl_async_gsm8k(data_source, solution_str, ground_truth, extra_info=None):
    """An `async def` verl compute_score (verl's reward loop awaits them)."""
    await asyncio.sleep(0)
    return verl_gsm8k(data_source, solution_str, ground_truth, extra_info)
