"""`morl bench rewards`: router throughput against a bare single-process loop over the same reward functions, and
the time each built-in reward takes on hostile inputs.

Both run in the same process on the same synthetic mix of math / grounding / counting responses (groups of 8
responses per prompt, as in training), so the ratios are comparable on any machine. Each round scores a fresh set
with every contender in turn (nobody profits from caches another pass filled), and the best round of each counts,
which keeps the ratios steady on a machine shared with other work.

Hostile inputs are model text built to stall a parser (long runs of digits or spaces, power towers, deep nesting,
huge JSON, absurd coordinates, ...). Each must get its score (0 for garbage) within HOSTILE_BUDGET_MS: a reward
that hits the sandbox timeout instead is counted as an error and can stop the run.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import math_verify.parser
import ray

from morl.ray_setup import start_ray
from morl.rewards.adapters import resolve, to_score
from morl.rewards.config import RewardsConfig
from morl.rewards.registry import get_reward
from morl.rewards.router import RewardRouter
from morl.rewards.types import RewardInput

GROUP = 8
HOSTILE_BUDGET_MS = 50.0


def bench_rewards(
    n: int = 3000, workers: int = 2, rounds: int = 3, seed: int = 0, hosts: int = 0
) -> dict[str, float | int]:
    """Samples per second of the bare loop and of the router with `workers` and with 1 worker, and their ratios;
    with `hosts`, also of the router on that many reward hosts of `workers` each (rewards.hosts: Ray actors, here
    on a private Ray instance of this machine), against the driver's own pool of `workers`."""
    cfg = RewardsConfig(num_workers=workers)
    with contextlib.ExitStack() as stack:
        router = stack.enter_context(RewardRouter(cfg))
        router_1 = stack.enter_context(RewardRouter(cfg.model_copy(update={"num_workers": 1})))
        contenders: dict[str, Callable[[list[RewardInput]], list[float | None]]] = {
            "bare": lambda samples: bare_score(samples, cfg),
            "router": lambda samples: [r.reward for r in router.score(samples)],
            "router_1worker": lambda samples: [r.reward for r in router_1.score(samples)],
        }
        if hosts:
            if start_ray(num_cpus=hosts * workers):
                stack.callback(ray.shutdown)
            hosted = stack.enter_context(RewardRouter(cfg.model_copy(update={"hosts": hosts})))
            contenders["router_on_hosts"] = lambda samples: [r.reward for r in hosted.score(samples)]
        for score in contenders.values():  # warm up on a set no timed round uses
            score(mixed_samples(GROUP * 30, seed - 1))
        best = dict.fromkeys(contenders, 0.0)
        mismatches = 0
        for round_ in range(rounds):
            samples = mixed_samples(n, seed + round_)
            rewards = {}
            for name, score in contenders.items():
                start = time.perf_counter()
                rewards[name] = score(samples)
                best[name] = max(best[name], n / (time.perf_counter() - start))
            routed = [rewards[name] for name in contenders if name != "bare"]
            mismatches += sum(any(r != b for r in scored) for b, *scored in zip(rewards["bare"], *routed))
    report: dict[str, float | int] = {"n": n, "rounds": rounds, "workers": workers, "cpus": os.cpu_count() or 0}
    report["load_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine skews the ratios
    report["parallel_capacity"] = round(parallel_capacity(workers), 2)  # the ceiling for "speedup" right now
    report.update({f"{name}_per_s": round(rate, 1) for name, rate in best.items()})
    report["speedup"] = round(best["router"] / best["bare"], 3)
    report["speedup_1worker"] = round(best["router_1worker"] / best["bare"], 3)
    if hosts:  # what sending the samples to Ray actors costs, against the same sandboxes on the driver
        report["hosts"] = hosts
        report["hosts_vs_router"] = round(best["router_on_hosts"] / best["router"], 3)
    report["mismatches"] = mismatches
    return report


def parallel_capacity(workers: int, loops: int = 3_000_000) -> float:
    """Cores' worth of throughput `workers` busy processes get right now: `workers` on an idle machine, less on a
    shared one. Independent processes with no IPC, so no router can scale past it."""
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(_spin, [1000] * workers))  # start the processes
        start = time.perf_counter()
        pool.submit(_spin, loops).result()
        alone = time.perf_counter() - start
        start = time.perf_counter()
        list(pool.map(_spin, [loops] * workers))
        return workers * alone / (time.perf_counter() - start)


def _spin(loops: int) -> int:
    total = 0
    for i in range(loops):
        total += i
    return total


def bare_score(samples: Sequence[RewardInput], cfg: RewardsConfig) -> list[float]:
    """The baseline: call each route's functions in this process, no sandbox, no timeout."""
    rewards = []
    for sample in samples:
        specs = cfg.routes[sample.task]
        scores = [to_score(resolve(spec.fn, spec.adapter)(sample.response, sample)) for spec in specs]
        rewards.append(sum(s.weight * x for s, x in zip(specs, scores)) / sum(s.weight for s in specs))
    return rewards


def mixed_samples(n: int, seed: int = 0) -> list[RewardInput]:
    """A deterministic mix of right, wrong and malformed responses, one third per task, in groups of GROUP."""
    rng = random.Random(seed)
    makers = (_math, _grounding, _counting)
    samples: list[RewardInput] = []
    while len(samples) < n:
        make = makers[len(samples) // GROUP % len(makers)]
        samples.extend(make(rng, rng.random()) for _ in range(GROUP))
    return samples[:n]


def _math(rng: random.Random, problem: float) -> RewardInput:
    num, den = int(problem * 10**6) % 9973 + 1, int(problem * 10**8) % 997 + 2  # a fresh fraction per group
    right = [f"\\frac{{{num}}}{{{den}}}", f"{num}/{den}", f"{num / den:.6f}", f"\\dfrac{{{2 * num}}}{{{2 * den}}}"]
    answer = rng.choice(right + [f"{num + 1}/{den}", f"\\sqrt{{{num}}}", f"{num}"])
    tail = rng.choice([f"So the answer is $\\boxed{{{answer}}}$.", f"The result:\n{answer}", "I am not sure."])
    return RewardInput.from_text(f"<think>compute {num} over {den}</think>{tail}", "math", {"answer": f"{num}/{den}"})


def _grounding(rng: random.Random, problem: float) -> RewardInput:
    gold = [[x, y, x + 40 + 100 * problem, y + 30 + 80 * problem] for x, y in ((20, 30), (200, 150))][
        : 1 + int(problem * 2)
    ]
    pred = [{"bbox_2d": [round(v + rng.uniform(-15, 15)) for v in box], "label": "shape"} for box in gold]
    text = rng.choice([f"```json\n{json.dumps(pred)}\n```", json.dumps(pred[:1]), "no box"])
    return RewardInput.from_text(f"<think>look</think>{text}", "grounding", {"boxes": gold})


def _counting(rng: random.Random, problem: float) -> RewardInput:
    count = int(problem * 10)
    guess = count + rng.choice([0, 0, 1, -1])
    text = rng.choice([f"There are \\boxed{{{guess}}} shapes.", f"I count {guess}.", "many"])
    return RewardInput.from_text(f"<think>count</think>{text}", "counting", {"count": count})


@dataclass(frozen=True)
class Hostile:
    """A response built to stall a built-in reward, and the score it must get all the same."""

    name: str
    task: str
    text: str
    label: dict[str, Any]
    score: float = 0.0


def hostile_inputs() -> list[Hostile]:
    """The worst inputs found for each built-in parser; the tests score every one of them too."""
    box = {"boxes": [[0, 0, 10, 10]]}
    nested = "{" * 100000 + "1" + "}" * 100000
    binomials = "".join(f"({a}+{b})" for a, b in zip("acgkmoqsuwy", "bdhlnprtvxz"))
    return [
        Hostile("temporal: 8k digits", "temporal", "1" * 8000, {"segment": [1, 2]}),
        Hostile("temporal: 4k 'd:' pairs", "temporal", "1:" * 4000, {"segment": [1, 2]}),
        Hostile("temporal: digit, 8k spaces, x", "temporal", "1" + " " * 8000 + "x", {"segment": [1, 2]}),
        Hostile("temporal: 400-digit times", "temporal", f"[{'9' * 400}, {'9' * 401}]", {"segment": [1, 2]}),
        Hostile("temporal: 10k segments", "temporal", "[0:01, 0:02] " * 10000, {"segment": [1, 2]}, 1.0),
        Hostile("choice: 8k spaces", "choice", " " * 8000, {"answer": "B"}),
        Hostile("choice: 'answer' + 8k spaces", "choice", "answer" + " " * 8000, {"answer": "B"}),
        Hostile("choice: 'The answer is' + 8k spaces", "choice", "The answer is" + " " * 8000 + "!", {"answer": "B"}),
        Hostile("choice: 'answer' + 8k asterisks", "choice", "answer " + "*" * 8000, {"answer": "B"}),
        Hostile("choice: 20k unclosed \\text{", "choice", "\\text{" * 20000, {"answer": "red"}),
        Hostile("choice: 5k 'the answer is B'", "choice", "the answer is B " * 5000, {"answer": "B"}, 1.0),
        Hostile("math: power tower", "math", "\\boxed{9^{9^{9^{9}}}}", {"answer": "1"}),
        Hostile("math: plain power tower", "math", "2**9**9**9", {"answer": "1"}),
        Hostile("math: power of powers", "math", "\\boxed{((2^{99})^{99})^{99}}", {"answer": "1"}),
        Hostile("math: 240-digit exponent", "math", "\\boxed{2^{" + "9" * 240 + "}}", {"answer": "1"}),
        Hostile("math: 100000!", "math", "\\boxed{100000!}", {"answer": "1"}),
        Hostile("math: (10^{10})!", "math", "\\boxed{(10^{10})!}", {"answer": "1"}),
        Hostile("math: binomial", "math", "\\boxed{\\binom{99999}{49999}}", {"answer": "1"}),
        Hostile("math: Gamma", "math", "\\boxed{\\Gamma(99999)}", {"answer": "1"}),
        Hostile("math: gcd of a tower", "math", "\\boxed{\\gcd(10^{10^{10}}, 2)}", {"answer": "2"}),
        Hostile("math: integral", "math", "\\boxed{\\int e^{x^2}\\sin(x^3) dx}", {"answer": "1"}),
        Hostile("math: (x+1)^{999}", "math", "\\boxed{(x+1)^{999}}", {"answer": "1"}),
        Hostile("math: 11 binomials multiplied", "math", f"\\boxed{{{binomials}}}", {"answer": "1"}),
        Hostile("math: 100k nested braces", "math", "\\boxed{" + nested + "}", {"answer": "1"}),
        Hostile("math: 30 nested parentheses", "math", "\\boxed{" + "(" * 30 + "2" + ")" * 30 + "}", {"answer": "2"}),
        Hostile("math: 200k unclosed \\boxed{", "math", "\\boxed{" * 200000, {"answer": "1"}),
        Hostile("math: 10k-char answer", "math", "\\boxed{" + "1+" * 5000 + "1}", {"answer": "5001"}),
        Hostile("math: 100k-digit last line", "math", "1" * 100000, {"answer": "1"}),
        Hostile("math: 50k </think>", "math", "</think>" * 50000 + "\\boxed{2}", {"answer": "2"}, 1.0),
        Hostile("math: 50k \\boxed{}", "math", "\\boxed{1} " * 50000, {"answer": "1"}, 1.0),
        Hostile("counting: 100k digits", "counting", "1" * 100000, {"count": 3}),
        Hostile("counting: 50k unclosed \\boxed{", "counting", "\\boxed{" * 50000, {"count": 3}),
        Hostile("grounding: coordinates near 1e308", "grounding", "[1e308, 1e308, 1.7e308, 1.7e308]", box),
        Hostile("grounding: -1.7e308 to 1.7e308", "grounding", "[-1.7e308, -1.7e308, 1.7e308, 1.7e308]", box),
        Hostile("grounding: 400-digit coordinate", "grounding", f"[0, 0, {'9' * 400}, 10]", box),
        Hostile("grounding: 1e400 coordinate", "grounding", "[0, 0, 1e400, 10]", box),
        Hostile("grounding: 20k boxes of JSON", "grounding", json.dumps([{"bbox_2d": [0, 0, 10, 10]}] * 20000), box),
        Hostile("grounding: 10k bare boxes", "grounding", "[0, 0, 10, 10] " * 10000, box),
        Hostile("grounding: 200k-number list", "grounding", json.dumps(list(range(200000))), box),
        Hostile("grounding: 100k nested brackets", "grounding", "[" * 100000 + "]" * 100000, box),
        Hostile("grounding: 200k unclosed brackets", "grounding", "[" * 200000, box),
        Hostile("grounding: 50k nested bbox_2d", "grounding", '{"bbox_2d": ' * 50000, box),
        Hostile("point: near 1e308", "point", "[1e308, 1.7e308]", box),
        Hostile("point: 8k-digit (x, y)", "point", f"(1, {'1' * 8000})", box),
        Hostile("point: '(' + 8k digits", "point", "(" + "1" * 8000, box),
    ]


def bench_hostile(repeats: int = 3) -> list[dict[str, Any]]:
    """Per hostile input: its score, the score it must get, and the best of `repeats` times to score it, in ms."""
    rows = []
    for case in hostile_inputs():
        best, score = float("inf"), None
        for _ in range(repeats):
            _clear_parse_caches()
            start = time.perf_counter()
            sample = RewardInput.from_text(case.text, case.task, case.label)
            score = to_score(get_reward(case.task)(sample.response, sample))
            best = min(best, time.perf_counter() - start)
        rows.append({"input": case.name, "chars": len(case.text), "score": score, "expected": case.score,
                     "ms": round(1000 * best, 2)})
    return rows


def _clear_parse_caches() -> None:
    """Empty math-verify's parse caches, so a repeat pays what a first call pays."""
    for value in vars(math_verify.parser).values():
        if hasattr(value, "cache_clear"):
            value.cache_clear()
