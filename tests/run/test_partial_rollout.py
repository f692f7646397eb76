"""Partial rollout (rollout.mode=partial): segments per policy version, carried groups, staleness, exact resume.

The scheduler runs for real: Ray rollout-worker actors, the reward router and sandbox, the prompt source. The engine
inside the workers is scripted, so that each response's length, tokens and log-probs are known in closed form: sample
j of a "long" prompt is LONG[j] tokens, of a "short" one SHORT[j], and the token at position i is 100 + i with
log-prob -0.01 (i + 1), however the response was cut into pieces. The real engines' continuations are tested in
tests/rollout; with the scheduler, in the last test here.
"""

import json
import sys
from pathlib import Path

import pytest
import ray

from morl.config import PartialConfig
from morl.data.loading import LoadedDataset
from morl.data.rows import Row
from morl.data.source import PromptSource
from morl.rollout.types import Completion, SamplingParams
from morl.run.collection import DISPATCH, RolloutScheduler
from morl.run.step import build_batch
from morl.types import EncodedPrompt

from helpers import morl_train, scripted_workers, toy_hf_rollout

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

G = 4
MAX_NEW = 12
LENGTHS = {"long": [2, 5, 8, 11], "short": [1, 2, 3, 4]}
ANSWERS = ["\\boxed{3}", "\\boxed{2}", "\\boxed{3}", "\\boxed{2}"]  # half right: every group has reward variance


def token(j: int, i: int) -> int:
    return 1000 * (j + 1) + i  # the sample shows in its tokens: a continued prefix names its sample


def logprob(i: int) -> float:
    return -0.01 * (i + 1)


def response(kind: str, j: int) -> tuple[list[int], list[float]]:
    """Sample j's whole scripted response: its tokens and their log-probs."""
    n = LENGTHS[kind][j]
    return [token(j, i) for i in range(n)], [logprob(i) for i in range(n)]


class SegmentedEngine:
    """Scripted: each group ends at the engine's next step, each sample having added tokens up to its scripted length
    or its limit for this call (the segment), from where its prefix ended."""

    max_num_seqs = 2 * G
    batches_continuously = True

    def __init__(self):
        self.running = {}  # key -> [(kind, sample, start, limit)]

    def add(self, key, prompt, sampling, seed, continuation=None):
        kind = prompt.row_id
        if continuation is None:
            work = [(kind, j, 0, sampling.max_new_tokens) for j in range(sampling.n)]
        else:
            work = [(kind, p[0] // 1000 - 1, len(p), limit)
                    for p, limit in zip(continuation.prefixes, continuation.max_new_tokens)]
        self.running[key] = work

    def has_unfinished(self):
        return bool(self.running)

    def sequences_in_flight(self):
        return sum(len(samples) for samples in self.running.values())

    def step(self, is_aborted):
        done, self.running = self.running, {}
        return [(key, [self._piece(*sample) for sample in samples]) for key, samples in done.items()]

    @staticmethod
    def _piece(kind, j, start, limit):
        tokens, logprobs = response(kind, j)
        end = min(len(tokens), start + limit)
        finished = end == len(tokens)
        return Completion(tokens[start:end], ANSWERS[j] if finished else "", logprobs[start:end],
                          "stop" if finished else "length")

    def abort(self, keys):
        held = [key for key in keys if key in self.running]
        return [(key, [Completion([], "", [], "abort") for _ in self.running.pop(key)]) for key in held]

    def load_weights(self, named_tensors):
        pass


def rows(kinds: list[str]) -> LoadedDataset:
    return LoadedDataset(Path("scripted.jsonl"), [
        Row(id=f"p{i}", task="counting", messages=[{"role": "user", "content": "how many?"}], images=[],
            label={"count": 3}, meta={"script": kind})
        for i, kind in enumerate(kinds)
    ])


@pytest.fixture(scope="module")
def pool(router):
    yield from scripted_workers(SegmentedEngine)


def make_scheduler(pool, router, kinds, partial, *, dynamic=False):
    source = PromptSource([rows(kinds)], [1.0], seed=0, easy_pool_alpha=0.0)
    encode = lambda row: EncodedPrompt(row.meta["script"], [1, 2], None, None)  # noqa: E731
    scheduler = RolloutScheduler(
        pool, router, encode, source, SamplingParams(n=G, max_new_tokens=MAX_NEW), dispatch=DISPATCH["partial"](),
        dynamic_sampling=dynamic, max_refill_rounds=0, run_seed=0, engine="hf", partial=partial,
    )
    return scheduler, source


def stream_order(n: int, kinds) -> list[str]:
    src = PromptSource([rows(kinds)], [1.0], seed=0, easy_pool_alpha=0.0)
    return [src.draw().row.id for _ in range(n)]


def long_first(n: int) -> tuple[list[str], list[str]]:
    """n prompts whose first in the stream is the long one, and the stream's order."""
    order = stream_order(n, ["short"] * n)  # the order depends on the count and the seed, not on the rows
    kinds = ["short"] * n
    kinds[int(order[0][1:])] = "long"
    return kinds, order


def snapshot(batch) -> list:
    """What a batch trains on, group by group: prompt, responses, log-probs, rewards and each piece's version."""
    return [(g.prompt.row.id, g.prompt.seq, [c.token_ids for c in g.completions], [c.logprobs for c in g.completions],
             g.rewards, g.pieces) for g in batch.groups]


def test_a_long_response_goes_on_under_each_new_version_and_keeps_every_token(pool, router):
    kinds, order = long_first(12)
    scheduler, _ = make_scheduler(pool, router, kinds, PartialConfig(segment_tokens=4, max_staleness=2, carry_groups=0))
    batches = [scheduler.collect(2) for _ in range(3)]
    # step 0 and 1: the long group is parked, then continued (one of its samples still unfinished); the batches fill
    # with short groups in dispatch order. Step 2 finishes it, first in dispatch order.
    assert [g.prompt.row.id for g in batches[0].groups] == order[1:3]
    assert [g.prompt.row.id for g in batches[1].groups] == order[3:5]
    long = batches[2].groups[0]
    assert (long.prompt.row.id, long.prompt.seq) == (order[0], 0)
    for j, completion in enumerate(long.completions):
        assert (completion.token_ids, completion.logprobs) == response("long", j)  # every token kept, in order
    # sample j of lengths 2, 5, 8, 11 in segments of 4: versions 0, 1, 2 sampled what each piece says
    assert long.pieces == [[(0, 2)], [(0, 4), (1, 1)], [(0, 4), (1, 4)], [(0, 4), (1, 4), (2, 3)]]
    assert long.rewards == [1.0, 0.0, 1.0, 0.0]
    assert [c.finish_reason for c in long.completions] == ["stop"] * 4
    assert batches[0].metrics["partial/carried_groups"] == 1 and batches[1].metrics["partial/continued_samples"] == 3
    # the update's batch: the tokens versions 0 and 1 sampled are stale at version 2; the histogram of the batch
    train, _ = build_batch(batches[2].groups, 1e-6, batches[2].version)
    assert batches[2].version == 2 and train.stale_tokens[:4] == [2, 5, 8, 8]
    short_tokens = sum(LENGTHS["short"])
    lags = {0: short_tokens + 3, 1: 1 + 4 + 4, 2: 2 + 4 + 4 + 4}
    total = sum(lags.values())
    for lag, tokens in lags.items():
        assert batches[2].metrics[f"partial/staleness_{lag}"] == pytest.approx(tokens / total)
    assert batches[2].metrics["partial/stale_token_share"] == pytest.approx(1 - lags[0] / total)


def test_a_response_that_would_lag_more_than_max_staleness_is_dropped_and_counted(pool, router):
    kinds, order = long_first(12)
    scheduler, _ = make_scheduler(pool, router, kinds, PartialConfig(segment_tokens=4, max_staleness=1, carry_groups=0))
    batches = [scheduler.collect(2) for _ in range(3)]
    assert batches[2].metrics["partial/dropped_stale_groups"] == 1  # version 0's tokens would be 2 versions old
    assert order[0] not in {g.prompt.row.id for b in batches for g in b.groups}
    assert batches[2].metrics["rollout/wasted_samples"] == G  # its samples are waste, counted when it leaves


def test_groups_dispatched_beyond_the_batch_run_their_segment_and_train_in_the_next_step(pool, router):
    kinds = ["short"] * 12
    order = stream_order(12, kinds)
    scheduler, source = make_scheduler(pool, router, kinds, PartialConfig(segment_tokens=4, carry_groups=3))
    first = scheduler.collect(2)
    assert [g.prompt.row.id for g in first.groups] == order[:2]
    assert [g.prompt.row.id for g in scheduler.carried] == order[2:5]  # the next three, whatever was in flight
    assert scheduler.settle() is not None  # their segments ran on after the batch was returned, and have now ended
    assert all(g.rewards is not None for g in scheduler.carried)  # complete: scored before new weights come
    assert first.metrics["rollout/sample_waste"] == 0.0  # nothing aborted: what ran beyond the batch goes on
    second = scheduler.collect(2)
    assert [g.prompt.row.id for g in second.groups] == order[2:4]
    assert second.metrics["partial/staleness_1"] == 1.0  # both sampled by version 0, trained at version 1
    assert [g.prompt.row.id for g in scheduler.carried] == [order[4], *order[5:8]]
    assert source.draws == 8  # prompts beyond the carried ones went back


def test_a_resumed_scheduler_continues_the_carried_responses_exactly(pool, router):
    kinds = ["long", "long"] + ["short"] * 10
    partial = PartialConfig(segment_tokens=4, max_staleness=2, carry_groups=2)
    scheduler, source = make_scheduler(pool, router, kinds, partial)
    scheduler.collect(2)
    saved = json.loads(json.dumps({"scheduler": scheduler.state_dict(), "source": source.state_dict()}))
    assert saved["scheduler"]["carried"]  # the checkpoint holds responses in flight
    went_on = [snapshot(scheduler.collect(2)) for _ in range(2)]
    resumed, resumed_source = make_scheduler(pool, router, kinds, partial)
    resumed_source.load_state_dict(saved["source"])
    resumed.load_state_dict(saved["scheduler"])
    assert [snapshot(resumed.collect(2)) for _ in range(2)] == went_on


PARTIAL_RUN = ["rollout.mode=partial", "algo.rollout_correction=tis", "eval.enabled=false", "trainer.save_every=2",
               "rollout.partial={segment_tokens: 4, max_staleness: 3, carry_groups: 2}"]


@pytest.mark.slow
def test_a_partial_run_resumed_with_responses_in_flight_trains_the_steps_of_one_not_interrupted(toy_world, tmp_path):
    """The CLI end to end with the HF engine: a 4-step run, and a second run resumed from its step-2 checkpoint,
    which holds unfinished responses, give the same steps 3 and 4."""
    morl_train(toy_world, tmp_path / "whole", *PARTIAL_RUN, "trainer.max_steps=4", "trainer.keep_last=2")
    checkpoint = tmp_path / "whole" / "checkpoints" / "step_000002"
    carried = json.loads((checkpoint / "trainer_state.json").read_text())["scheduler"]["carried"]
    assert any(group["unfinished"] for group in carried)  # responses in flight, with their tokens so far
    morl_train(toy_world, tmp_path / "resumed", *PARTIAL_RUN, "trainer.max_steps=4", "--resume", str(checkpoint))
    whole, resumed = (run_metrics(tmp_path / name) for name in ("whole", "resumed"))
    assert [m["step"] for m in resumed] == [3, 4]
    assert [learning_signal(m) for m in resumed] == [learning_signal(m) for m in whole[2:]]
    assert any(m["partial/stale_token_share"] > 0 for m in whole)  # the runs trained on carried tokens


def run_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def learning_signal(m: dict) -> dict:
    return {k: v for k, v in m.items() if k.startswith(("reward/", "loss", "grad_norm", "advantage/", "partial/"))}


def test_real_hf_workers_take_the_same_partial_batches_however_many_share_the_work(toy_world, router):
    """Real HF engines on the tiny world, segments of 4 tokens: one worker or two, the same groups in the same order,
    the same tokens, log-probs and versions, carried responses included."""
    runs = {}
    with toy_hf_rollout(toy_world, workers=2, max_num_seqs=G) as (data, encode, route, workers):
        for name, pool in (("two", workers), ("one", workers[:1])):
            source = PromptSource(data, [1.0, 1.0], seed=3, easy_pool_alpha=0.5)
            scheduler = RolloutScheduler(
                pool, route, encode, source, SamplingParams(n=G, max_new_tokens=12), dispatch=DISPATCH["partial"](),
                dynamic_sampling=False, max_refill_rounds=0, run_seed=5, engine="hf",
                partial=PartialConfig(segment_tokens=4, max_staleness=2, carry_groups=1),
            )
            runs[name] = [snapshot(scheduler.collect(2)) for _ in range(3)]
    assert runs["one"] == runs["two"]
    pieces = [pieces for batch in runs["two"] for *_, group_pieces in batch for pieces in group_pieces]
    assert any(len(p) > 1 for p in pieces)  # some responses went on across versions
