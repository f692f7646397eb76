"""`choice`: multiple-choice letter or short-answer exact match."""

from __future__ import annotations

import re

from morl.rewards.parsing import last_boxed
from morl.rewards.registry import reward
from morl.rewards.types import RewardInput

_TEXT = re.compile(r"\\text\{([^{}]*)\}")
# Each run of spaces is matched by one quantifier only ("is" and ":" take their own trailing spaces), so a long run
# cannot be split between two of them: linear time on any text.
_IS = r"\s*(?:is\s*)?(?:[:：]\s*)?"
_PREFIX = re.compile(rf"^(?:the\s+)?(?:final\s+)?(?:correct\s+)?(?:answer|option|choice){_IS}", re.I)
_OPTION_START = re.compile(r"^\(?([A-Z])[.):]\s")
_ANSWER_IS = re.compile(rf"(?i:answer|option|choice){_IS}\(?\**([A-Z])\b")


@reward("choice", label_keys=("answer",))
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
