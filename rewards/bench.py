"""`morl bench rewards`: router throughput against a bare single-process loop over the same reward functions.

Both run in the same process on the same synthetic mix of math / grounding / counting responses (groups of 8
responses per prompt, as in training), so the ratios are comparable on any machine. Each round scores a fresh set
with every contender in turn (nobody profits from caches another pass filled), and the best round of each counts,
which keeps the ratios steady on a machine shared with other work.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

from morl.rewards.adapters import resolve, to_score
from morl.rewards.config import RewardsConfig
from morl.rewards.router import RewardRouter
from morl.rewards.types import RewardInput

GROUP = 8


def bench_rewards(n: int = 3000, workers: int = 2, rounds: int = 3, seed: int = 0) -> dict[str, float | int]:
    """Samples per second of the bare loop and of the router with `workers` and with 1 worker, and their ratios."""
    cfg = RewardsConfig(num_workers=workers)
    with RewardRouter(cfg) as router, RewardRouter(cfg.model_copy(update={"num_workers": 1})) as router_1:
        contenders: dict[str, Callable[[list[RewardInput]], list[float | None]]] = {
            "bare": lambda samples: bare_score(samples, cfg),
            "router": lambda samples: [r.reward for r in router.score(samples)],
            "router_1worker": lambda samples: [r.reward for r in router_1.score(samples)],
        }
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
            together = zip(rewards["router"], rewards["router_1worker"], rewards["bare"])
            mismatches += sum(r != b or r1 != b for r, r1, b in together)
    report: dict[str, float | int] = {"n": n, "rounds": rounds, "workers": workers, "cpus": os.cpu_count() or 0}
    report["load_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine skews the ratios
    report["parallel_capacity"] = round(parallel_capacity(workers), 2)  # the ceiling for "speedup" right now
    report.update({f"{name}_per_s": round(rate, 1) for name, rate in best.items()})
    report["speedup"] = round(best["router"] / best["bare"], 3)
    report["speedup_1worker"] = round(best["router_1worker"] / best["bare"], 3)
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
