"""The rollout scheduler: refill, give-up, FIFO early termination, abort, and seamless == synchronous batches.

The scheduler runs here for real: real Ray rollout-worker actors, the real reward router and sandbox,
the real prompt source. Only the engine inside the workers is scripted (each prompt's responses and
generation time are fixed), so group order, variance and timing are under the test's control. The
HF engine itself is tested in test_rollout.py, and with the scheduler in the last test here.
"""

import itertools
import sys
import time
from pathlib import Path

import pytest
import ray

from morl.data.loading import LoadedDataset
from morl.data.rows import Row
from morl.data.source import PromptSource
from morl.rewards.config import RewardsConfig
from morl.rewards.router import RewardRouter
from morl.rewards.types import TrainingProgress
from morl.rollout.types import Completion, SamplingParams
from morl.run.collection import DISPATCH, RolloutAbandoned, RolloutScheduler
from morl.types import EncodedPrompt

from helpers import scripted_workers, toy_hf_rollout

# Ray workers cannot import this test module: ship the scripted engine to them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

G = 4
RIGHT, WRONG = "\\boxed{3}", "\\boxed{2}"
MIXED = [RIGHT, WRONG, WRONG, RIGHT]


class ScriptedEngine:
    """Ends each prompt's group with its scripted responses once its scripted delay has passed; runs any number at
    once. The script travels in the encoded prompt's id ("kind:delay"), so one pair of workers serves every test."""

    max_num_seqs = 2 * G
    batches_continuously = True

    def __init__(self):
        self.running = {}  # key -> (deadline, responses)

    def add(self, key, prompt, sampling, seed, continuation=None):
        kind, delay = prompt.row_id.split(":")
        self.running[key] = (time.perf_counter() + float(delay), RESPONSES[kind])

    def has_unfinished(self):
        return bool(self.running)

    def sequences_in_flight(self):
        return G * len(self.running)

    def step(self, is_aborted):
        time.sleep(0.005)
        now = time.perf_counter()
        done = [key for key, (deadline, _) in self.running.items() if deadline <= now]
        return [(key, self._group(self.running.pop(key)[1], "stop")) for key in done]

    def abort(self, keys):
        held = [key for key in keys if key in self.running]
        return [(key, self._group(self.running.pop(key)[1], "abort")) for key in held]

    @staticmethod
    def _group(responses, reason):
        return [Completion([7] * (3 + j), text, [-0.5] * (3 + j), reason) for j, text in enumerate(responses)]

    def load_weights(self, named_tensors):
        pass


RESPONSES = {"mixed": MIXED, "easy": [RIGHT] * G, "hard": [WRONG] * G}


def rows(kinds: list[str], delays: list[float] | None = None) -> LoadedDataset:
    delays = delays or [0.01] * len(kinds)
    return LoadedDataset(Path("scripted.jsonl"), [
        Row(id=f"p{i}", task="counting", messages=[{"role": "user", "content": "how many?"}], images=[],
            label={"count": 3}, meta={"script": f"{kind}:{delay}"})
        for i, (kind, delay) in enumerate(zip(kinds, delays))
    ])


@pytest.fixture(scope="module")
def pool(router):
    yield from scripted_workers(ScriptedEngine, record_timeline=True)


def make_scheduler(pool, router, kinds, delays=None, *, mode="seamless", refill=4, dynamic=True):
    # one dataset with weight 1 and alpha 0: draws follow the epoch permutation; the test reads the order back
    source = PromptSource([rows(kinds, delays)], [1.0], seed=0, easy_pool_alpha=0.0)
    encode = lambda row: EncodedPrompt(row.meta["script"], [1, 2], None, None)  # noqa: E731
    scheduler = RolloutScheduler(
        pool, router, encode, source, SamplingParams(n=G),
        dispatch=DISPATCH[mode](), dynamic_sampling=dynamic, max_refill_rounds=refill, run_seed=0, engine="hf",
    )
    return scheduler, source


def stream_order(n: int, kinds) -> list[str]:
    src = PromptSource([rows(kinds)], [1.0], seed=0, easy_pool_alpha=0.0)
    return [src.draw().row.id for _ in range(n)]


@pytest.mark.parametrize("mode", ["seamless", "synchronous"])
def test_zero_variance_groups_are_dropped_and_the_batch_refilled(pool, router, mode):
    kinds = ["mixed", "easy", "hard"] * 6
    scheduler, source = make_scheduler(pool, router, kinds, mode=mode)
    batch = scheduler.collect(4)
    assert len(batch.groups) == 4
    assert all(not g.zero_variance and not g.errored for g in batch.groups)
    order = stream_order(len(kinds), kinds)
    mixed_in_order = [i for i in order if kinds[int(i[1:])] == "mixed"]
    assert [g.prompt.row.id for g in batch.groups] == mixed_in_order[:4]  # the first four valid, by dispatch
    assert batch.metrics["groups/dropped_zero_variance"] == len(batch.decided) - 4
    assert batch.metrics["rollout/refill_rounds"] >= 1
    # everything dispatched after the last group taken went back to the source: the next draw is the next prompt
    assert source.draw().row.id == order[len(batch.decided)]


def test_easy_groups_go_to_the_easy_pool(pool, router):
    kinds = ["easy", "mixed", "mixed", "hard"] * 3
    scheduler, source = make_scheduler(pool, router, kinds)
    batch = scheduler.collect(3)
    easy = {g.prompt.key for g in batch.decided if g.all_correct}
    assert easy and set(source.easy_pool) == easy


def test_gives_up_after_max_refill_rounds_and_trains_on_what_it_has(pool, router, caplog):
    kinds = ["mixed"] + ["hard"] * 30
    order = stream_order(31, kinds)
    scheduler, _ = make_scheduler(pool, router, kinds, refill=2)
    with caplog.at_level("WARNING", logger="morl.rollout"):
        batch = scheduler.collect(4)
    assert batch.metrics["rollout/prompts_dispatched"] == 4 * (1 + 2)  # the budget, not one prompt more
    assert batch.metrics["rollout/gave_up"] == 1.0
    valid_in_budget = [i for i in order[:12] if i == "p0"]
    assert len(batch.groups) == len(valid_in_budget)
    assert "max_refill_rounds" in caplog.text


def test_fifo_waits_for_an_early_slow_group_and_aborts_the_rest(pool, router):
    # the first prompt of the stream is slow; later ones are fast. The batch must still be the first two
    # dispatched (never the first two to finish), and calls still running at the end are aborted.
    kinds = ["mixed"] * 12
    order = stream_order(12, kinds)
    delays = [0.05] * 12
    delays[int(order[0][1:])] = 1.5
    delays[int(order[3][1:])] = 30.0  # would hold the test for 30 s if it were not aborted
    scheduler, _ = make_scheduler(pool, router, kinds, delays)
    start = time.perf_counter()
    batch = scheduler.collect(2)
    assert [g.prompt.row.id for g in batch.groups] == order[:2]
    assert time.perf_counter() - start < 20  # the 30 s call was aborted
    assert batch.metrics["rollout/sample_waste"] >= 0.0


def test_a_stop_request_abandons_the_batch_and_aborts_the_calls_in_flight(pool, router):
    kinds = ["mixed"] * 8
    scheduler, source = make_scheduler(pool, router, kinds, [30.0] * 8)  # no call would end by itself for 30 s
    polls = itertools.count()
    with pytest.raises(RolloutAbandoned):
        scheduler.collect(4, should_stop=lambda: next(polls) >= 2)  # asked after the calls were dispatched
    # the workers were told to abort: the next batch runs on them at once, not after the abandoned calls
    fresh, _ = make_scheduler(pool, router, ["mixed"] * 4)
    ready, _ = ray.wait([w.generate.remote([], [], []) for w in pool], num_returns=2, timeout=20)
    assert len(ready) == 2
    assert len(fresh.collect(2).groups) == 2


def test_each_engine_is_kept_at_its_fill_target_and_never_beyond(pool, router):
    """Scripted engines that run 2 groups at once: the driver keeps 3 groups on each (the engine's room and one
    group waiting), refilling as groups end, until the batch needs no more prompts."""
    kinds = ["mixed"] * 16
    scheduler, _ = make_scheduler(pool, router, kinds, [0.3] * 16, dynamic=False)
    assert scheduler.fill_targets == [3 * G, 3 * G]
    batch = scheduler.collect(12)
    assert len(batch.groups) == 12
    for timeline in batch.timelines:
        in_flight = [n for _, _, ran, left in timeline for n in (ran, left)]
        assert max(in_flight) == 3 * G  # filled to the target, never past it
        refills = sum(a < 3 * G == b for a, b in zip([0, *in_flight], in_flight))
        assert refills >= 2  # filled again once its first groups ended
    assert 0.0 < batch.metrics["rollout/occupancy"] <= 1.0


def test_a_row_the_encoder_refuses_is_dropped_for_good_and_the_batch_still_fills(pool, router):
    from morl.data.rows import DataError

    source = PromptSource([rows(["mixed"] * 6)], [1.0], seed=0, easy_pool_alpha=0.0, on_bad_row="skip")
    bad = stream_order(6, ["mixed"] * 6)[1]  # the second prompt drawn

    def encode(row):
        if row.id == bad:
            raise DataError(f"row {row.id!r}: prompt is 9999 tokens, over rollout.max_prompt_tokens=2048")
        return EncodedPrompt(row.meta["script"], [1, 2], None, None)

    scheduler = RolloutScheduler(pool, router, encode, source, SamplingParams(n=G), dispatch=DISPATCH["seamless"](),
                                 dynamic_sampling=False, max_refill_rounds=0, run_seed=0, engine="hf")
    batch = scheduler.collect(4)
    assert len(batch.groups) == 4 and bad not in {g.prompt.row.id for g in batch.groups}
    assert batch.metrics["data/dropped_rows"] == 1.0
    state = source.state_dict()
    again = PromptSource([rows(["mixed"] * 6)], [1.0], seed=0, easy_pool_alpha=0.0, on_bad_row="skip")
    again.load_state_dict(state)
    assert bad not in {again.draw().row.id for _ in range(12)}  # never drawn again, resume included


def test_without_dynamic_sampling_zero_variance_groups_stay(pool, router):
    kinds = ["easy", "mixed", "hard", "mixed"]
    scheduler, _ = make_scheduler(pool, router, kinds, dynamic=False)
    batch = scheduler.collect(4)
    assert len(batch.groups) == 4 and batch.metrics["rollout/prompts_dispatched"] == 4


def test_seamless_and_synchronous_train_on_the_same_batches(toy_world):
    """Real HF workers on the tiny world: both modes take the same prompts and the same samples."""
    batches = {}
    with toy_hf_rollout(toy_world, workers=2, max_num_seqs=G) as (data, encode, route, pool):
        for mode in ("seamless", "synchronous"):
            src = PromptSource(data, [1.0, 1.0], seed=3, easy_pool_alpha=0.5)
            scheduler = RolloutScheduler(
                pool, route, encode, src, SamplingParams(n=G, max_new_tokens=12), dispatch=DISPATCH[mode](),
                dynamic_sampling=False, max_refill_rounds=0, run_seed=5, engine="hf",
            )
            batches[mode] = [scheduler.collect(3) for _ in range(2)]
    seamless, synchronous = ([[(g.prompt.row.id, [c.token_ids for c in g.completions], g.rewards) for g in b.groups]
                              for b in batches[m]] for m in ("seamless", "synchronous"))
    assert seamless == synchronous
    assert len(seamless[0]) == 3


def test_reward_functions_see_the_steps_progress_and_each_responses_token_ids(pool):
    routes = {"counting": [{"fn": "framework_rewards:trl_progress_length", "adapter": "trl"}]}
    progress_router = RewardRouter(RewardsConfig(routes=routes, num_workers=1))
    try:
        scheduler, _ = make_scheduler(pool, progress_router, ["mixed"] * 2, dynamic=False)
        batch = scheduler.collect(1, progress=TrainingProgress(global_step=3, max_steps=4))
    finally:
        progress_router.close()
    # the scripted responses are 3, 4, 5 and 6 tokens long; 3 of 4 steps done
    assert batch.groups[0].rewards == pytest.approx([0.75 * n / 10 for n in (3, 4, 5, 6)])
