"""`math`: Math-Verify equivalence of the final answer with the gold one.

Math-Verify's own timeouts use SIGALRM, which fails off the main thread and turns a hang into a silent False. They
are switched off here: the sandbox's hard per-call timeout kills a hung call and reports it as an error instead.

So a model answer must not be able to hang it: before parsing, an answer that is too long, too deeply nested or asks
for a computation is refused; after parsing (which leaves powers and factorials unevaluated), one that denotes a
huge number or multiplies out to many terms is refused. A refused answer scores 0, fast: it is the model's fault.
"""

from __future__ import annotations

import logging
import math
import re
from functools import lru_cache
from typing import Any

from math_verify import parse, verify
from sympy import Float, MatrixBase, Mul, Pow, Rational, factorial, factorial2

from morl.rewards.parsing import last_boxed
from morl.rewards.registry import reward
from morl.rewards.types import RewardInput

MAX_ANSWER_CHARS = 256  # math-verify's LaTeX parser costs up to ~2 ms a character
MAX_NESTING = 8  # brackets of any kind; each level of parentheses costs that parser ~50 ms
MAX_DIGITS = 10_000  # decimal digits of the largest number an answer may denote (2^{2008}: 605, 1000!: 2568)
MAX_TERMS = 64  # terms of the answer multiplied out, as sympy's simplify does ((x+1)^{999} would never finish)
# Math-verify evaluates these while parsing (\binom{99999}{49999} alone takes minutes), or sympy's doit() does with no
# bound (integrals, limits, sums): an answer is a value, not a computation to carry out.
_COMPUTES = re.compile(
    r"\\(?:[dt]?binom|choose|Gamma|gcd|lcm|det|operatorname|sum|prod|lim|int|iint|iiint|oint)(?![A-Za-z])"
)
_LOG10_2 = math.log10(2)


class _DropTimeoutDisabledWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


@reward("math", label_keys=("answer",))
def math_answer(response: str, sample: RewardInput) -> float:
    """Math-Verify equivalence of the last \\boxed{} (else the last line) with label["answer"]; 1 or 0."""
    gold = _parse_gold(str(sample.label["answer"]))
    boxed = last_boxed(response)
    answer = _last_line_tail(response) if boxed is None else boxed
    if _refused(answer):
        return 0.0
    pred = parse(answer if boxed is None else "\\boxed{" + boxed + "}", parsing_timeout=None)
    if not pred or any(_too_costly(expr) for expr in pred):
        return 0.0
    return float(verify(list(gold), pred, timeout_seconds=None))


@lru_cache(maxsize=4096)
def _parse_gold(answer: str) -> tuple:
    """Gold answers repeat across a group's samples, so parse each once; an unparsable one is a data error."""
    text = answer if "\\boxed" in answer else "\\boxed{" + answer + "}"
    gold = parse(text, parsing_timeout=None)
    if not gold:
        raise ValueError(f"math-verify cannot parse the gold answer {answer!r}")
    return tuple(gold)


def _last_line_tail(response: str) -> str:
    """The last non-blank line; of a longer one, its end from a word start: prose ends with its answer."""
    lines = [line for line in response.splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    if len(line) <= MAX_ANSWER_CHARS:
        return line
    tail = line[-MAX_ANSWER_CHARS:]
    if line[-MAX_ANSWER_CHARS - 1].isspace():
        return tail
    return tail[next((i for i, char in enumerate(tail) if char.isspace()), len(tail)) :]  # drop the cut word


def _refused(answer: str) -> bool:
    """Whether the text alone could make math-verify's parser run long or compute without bound."""
    return len(answer) > MAX_ANSWER_CHARS or _nesting(answer) > MAX_NESTING or bool(_COMPUTES.search(answer))


def _nesting(text: str) -> int:
    """Deepest bracket nesting, any kind of bracket closing any other (intervals such as [1, 2) mix them)."""
    depth = deepest = 0
    for char in text:
        if char in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")]}":
            depth = max(0, depth - 1)
    return deepest


def _too_costly(expr: Any) -> bool:
    """Whether verifying the parsed answer could mean computing a huge number or multiplying out many terms."""
    digits, terms = _size(expr)
    return digits > MAX_DIGITS or terms > MAX_TERMS


def _size(expr: Any) -> tuple[float, float]:
    """Upper bounds on (decimal digits of any number in `expr` once evaluated, its terms once multiplied out)."""
    if isinstance(expr, Rational):
        return max(1.0, max(abs(expr.p), expr.q).bit_length() * _LOG10_2), 1.0
    if isinstance(expr, Float):
        return max(1.0, math.log10(abs(float(expr)) or 1.0)), 1.0  # float() of a Float past 1e308 is inf
    parts = [_size(arg) for arg in (list(expr) if isinstance(expr, MatrixBase) else getattr(expr, "args", ()))]
    if not parts:
        return 1.0, 1.0  # a symbol or a constant such as pi
    if isinstance(expr, Pow):
        return _power_size(expr.exp, *parts[0], parts[1][0])
    if isinstance(expr, (factorial, factorial2)):
        n = _exp10(parts[0][0])
        return n * max(1.0, math.log10(n)), 1.0  # n! < n^n
    digits = sum(d for d, _ in parts)  # digits add under + - * / (every part counts at least 1)
    terms = math.prod(t for _, t in parts) if isinstance(expr, Mul) else sum(t for _, t in parts)
    return digits, terms


def _power_size(exp: Any, base_digits: float, base_terms: float, exp_digits: float) -> tuple[float, float]:
    """(digits, terms) of base^exp: digits scale by |exp|, and an integer power of a sum multiplies out."""
    if not isinstance(exp, Rational) or exp_digits >= 300:  # symbolic, or too large for a float
        return base_digits * _exp10(exp_digits), base_terms
    digits = base_digits * max(1.0, abs(exp.p) / exp.q)
    if exp.q != 1 or base_terms <= 1:
        return digits, base_terms
    n = abs(exp.p)
    if n > MAX_TERMS or base_terms > MAX_TERMS:  # a sum of 2+ terms to the n has at least n + 1 terms
        return digits, math.inf
    return digits, float(math.comb(n + int(base_terms) - 1, n))  # monomials of a base_terms-term sum to the n


def _exp10(digits: float) -> float:
    """10**digits, inf where a float would overflow: the largest value a number of that many digits can have."""
    return 10.0**digits if digits < 300 else math.inf
