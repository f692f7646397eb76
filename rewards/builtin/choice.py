"""`choice`: multiple-choice letter or short-answer exact match."""

from __future__ import annotations

import re

from morl.rewards.parsing import last_boxed
from morl.rewards.registry import reward
from morl.rewards.types import RewardInput

_TEXT = re.compile(r"\\text\{([^{}]*)\}")
_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is\s*)?[:：]?\s*", re.I)
_OPTION_START = re.compile(r"^\(?([A-Z])[.):]\s")
_ANSWER_IS = re.compile(r"(?i:answer|option|choice)\s*(?:is\s*)?[:：]?\s*\(?\**([A-Z])\b")


@reward("choice")
def choice(response: str, sample: RewardInput) -> float:
    """Option letter (B, B., (B), \\boxed{B}, "The answer is B") or short answer equal to label["answer"]; 1 or 0."""
    gold = _clean(str(sample.label["answer"]))
    boxed = last_boxed(response)
    text = response if boxed is None else boxed
    if len(gold) == 1 and gold.isalpha():
        return float(_letter(text) == gold.upper())
    return float(_clean(text).casefold() == gold.casefold())


def _clean(text: str) -> str:
    """Strip LaTeX \\text{}, an "answer is" prefix, surrounding brackets/emphasis, end punctuation and extra spaces."""
    text = _PREFIX.sub("", _TEXT.sub(r"\1", text).strip())
    return " ".join(text.strip("*()[]. :").split())


def _letter(text: str) -> str | None:
    cleaned = _clean(text)
    if len(cleaned) == 1 and cleaned.isalpha():
        return cleaned.upper()
    if match := _OPTION_START.match(cleaned):
        return match.group(1)
    said = _ANSWER_IS.findall(text)
    return said[-1] if said else None
