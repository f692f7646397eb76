"""`math`: Math-Verify equivalence of the final answer with the gold one.

Math-Verify's own timeouts use SIGALRM, which fails off the main thread and turns a hang into a silent False. They
are switched off here: the sandbox's hard per-call timeout kills a hung call and reports it as an error instead.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from math_verify import parse, verify

from morl.rewards.parsing import last_boxed
from morl.rewards.registry import reward
from morl.rewards.types import RewardInput


class _DropTimeoutDisabledWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


@reward("math")
def math_answer(response: str, sample: RewardInput) -> float:
    """Math-Verify equivalence of the last \\boxed{} (else the last line) with label["answer"]; 1 or 0."""
    gold = _parse_gold(str(sample.label["answer"]))
    boxed = last_boxed(response)
    if boxed is not None:
        pred = parse("\\boxed{" + boxed + "}", parsing_timeout=None)
    else:
        lines = [line for line in response.splitlines() if line.strip()]
        pred = parse(lines[-1], parsing_timeout=None) if lines else []
    return float(bool(pred) and verify(list(gold), pred, timeout_seconds=None))


@lru_cache(maxsize=4096)
def _parse_gold(answer: str) -> tuple:
    """Gold answers repeat across a group's samples, so parse each once; an unparsable one is a data error."""
    text = answer if "\\boxed" in answer else "\\boxed{" + answer + "}"
    gold = parse(text, parsing_timeout=None)
    if not gold:
        raise ValueError(f"math-verify cannot parse the gold answer {answer!r}")
    return tuple(gold)
