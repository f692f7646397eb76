"""Splitting a rollout batch over learner ranks: balanced, complete, and every rank in step with the others."""

import random

import pytest

from morl.learner.shares import IMAGES, VIDEOS, Filler, MicroBatch, balanced_shares, rank_micro_batches


def test_shares_balance_tokens_longest_first():
    tokens = [50, 10, 40, 30, 20]
    # 50 -> rank 0; 40 -> rank 1; 30 -> rank 1 (40 < 50); 20 -> rank 0 (50 < 70); 10 -> rank 0 (a tie: the lower)
    assert balanced_shares(tokens, 2) == [[0, 1, 4], [2, 3]]
    assert balanced_shares(tokens, 1) == [[0, 1, 2, 3, 4]]  # one rank: the batch as it is
    assert balanced_shares([5, 5], 3) == [[0], [1], []]  # more ranks than sequences: some get none


def plans(tokens, images, indices, ranks, size, budget=None):
    return [
        rank_micro_batches(indices, tokens, images, ranks=ranks, rank=r, size=size, budget=budget) for r in range(ranks)
    ]


def test_one_rank_runs_text_first_then_images_without_fillers():
    tokens, images = [3, 9, 4, 7, 1], [True, False, True, True, False]
    (plan,) = plans(tokens, images, range(5), ranks=1, size=2)
    # within a kind, longest first into the first micro-batch with room: 3 (7) and 2 (4), then 0 (3)
    assert plan == [MicroBatch((1, 4)), MicroBatch((2, 3)), MicroBatch((0,))]


def test_a_token_budget_packs_first_fit_longest_first_and_a_longer_sequence_runs_alone():
    tokens, kinds = [30, 70, 50, 20, 150, 45, 5], [0] * 7
    (plan,) = plans(tokens, kinds, range(7), ranks=1, size=64, budget=100)
    # 150 alone (over the budget); 70 + 30 = 100; 50 + 45 + 5 = 100; 20 left
    assert plan == [MicroBatch((4,)), MicroBatch((0, 1)), MicroBatch((2, 5, 6)), MicroBatch((3,))]
    (plan,) = plans(tokens, kinds, range(7), ranks=1, size=2, budget=100)  # the sequence count limits too
    assert all(len(m.rows) <= 2 for m in plan) and sorted(i for m in plan for i in m.rows) == list(range(7))


def test_a_short_rank_and_a_rank_without_images_get_fillers():
    tokens = [30, 10, 20, 5, 25]
    images = [True, True, False, True, True]
    rank0, rank1 = plans(tokens, images, range(5), ranks=2, size=1)
    # shares: [0, 1, 3] (30 + 10 + 5) and [2, 4] (20 + 25), text-only first
    assert [m.rows for m in rank0] == [(0,), (1,), (3,)]
    assert [m.rows for m in rank1] == [(), (2,), (4,)]  # the short share starts late, so it ends with the others
    # nothing to run yet, and rank 0 runs an image: the first image of the cheapest sequence with one
    assert rank1[0].fillers == (Filler(3, IMAGES),)
    assert rank1[1].fillers == (Filler(3, IMAGES),)  # sequence 2 has no image while rank 0 runs one
    assert rank1[0].payload_rows == (3,) and rank1[1].payload_rows == (2, 3)
    assert all(not m.fillers for m in (*rank0, rank1[2]))


def test_images_and_videos_run_the_same_vision_calls_on_every_rank():
    # rank 0 gets [0] (an image and a video: two vision calls), rank 1 gets [1] (a video only)
    tokens, kinds = [40, 30, 5, 6], [IMAGES | VIDEOS, VIDEOS, IMAGES, VIDEOS]
    rank0, rank1 = plans(tokens, kinds, [0, 1], ranks=2, size=1)
    assert rank0 == [MicroBatch((0,))]
    assert rank1 == [MicroBatch((1,), (Filler(0, IMAGES),))]  # the only sequence with images
    # neither kind-3 row in the step: a rank with nothing left needs one filler per kind
    rank0, rank1 = plans([40, 5, 6], [IMAGES, IMAGES, VIDEOS], [0, 1, 2], ranks=2, size=2)
    assert [m.rows for m in rank0] == [(0,)] and [m.rows for m in rank1] == [(1, 2)]
    assert rank0[0].fillers == (Filler(2, VIDEOS),)


def vision_calls(m: MicroBatch, kinds) -> set[int]:
    """The vision kinds a micro-batch runs: its rows', and each filler's own (a cut adds no kind outside the
    micro-batch's, checked below)."""
    return {k for k in (IMAGES, VIDEOS) for kind in [*(kinds[i] for i in m.rows), *(f.kind for f in m.fillers)] if kind & k}


@pytest.mark.parametrize("seed", range(30))
def test_every_sequence_counts_once_and_ranks_stay_in_step(seed):
    rng = random.Random(seed)
    n, ranks, size = rng.randint(1, 13), rng.randint(1, 4), rng.randint(1, 3)
    budget = rng.choice([None, rng.randint(10, 80)])
    tokens = [rng.randint(1, 50) for _ in range(n)]
    images = [rng.choice([0, IMAGES, VIDEOS, IMAGES | VIDEOS]) if rng.random() < 0.6 else 0 for _ in range(n)]
    indices = sorted(rng.sample(range(n), rng.randint(1, n)))  # a GRPO mini-batch is a part of the batch
    per_rank = plans(tokens, images, indices, ranks, size, budget)
    counted = sorted(i for plan in per_rank for m in plan for i in m.rows)
    assert counted == indices
    assert len({len(plan) for plan in per_rank}) == 1  # the same number of passes on every rank
    last = [vision_calls(plan[-1], images) for plan in per_rank]
    assert all(last) == any(images[i] for i in indices)  # the vision tower runs last whenever it runs
    for slot in zip(*per_rank):
        calls = [vision_calls(m, images) for m in slot]
        assert all(c == calls[0] for c in calls)  # the same vision calls (images, videos) on every rank
        assert all(m.payload_rows and len(m.rows) <= size for m in slot)
        assert all(budget is None or len(m.rows) == 1 or sum(tokens[i] for i in m.rows) <= budget for m in slot)
        for m in slot:
            assert {f.row for f in m.fillers} <= set(indices)
            # a filler's source has its kind and nothing the micro-batch does not run
            assert all(images[f.row] & f.kind == f.kind and images[f.row] & ~sum(calls[0]) == 0 for f in m.fillers)
    loads = [sum(tokens[i] for m in plan for i in m.rows) for plan in per_rank]
    assert max(loads) - min(loads) <= max(tokens[i] for i in indices)  # balanced up to one sequence


def test_each_rank_is_sent_the_sequences_its_plan_reads_and_plans_from_shapes_alone():
    from morl.config import LearnerConfig
    from morl.learner.shares import rank_plan, rank_rows
    from morl.types import EncodedPrompt, SequenceShape, TrainBatch

    rng = random.Random(0)
    n, ranks = 12, 3
    shapes = [SequenceShape(rng.randint(5, 40), rng.randint(1, 30), rng.random() < 0.3) for _ in range(n)]
    batch = TrainBatch(
        [EncodedPrompt(f"p{i}", [1] * s.prompt_tokens, None, None) for i, s in enumerate(shapes)],
        [[2] * s.response_tokens for s in shapes],
        [[0.0] * s.response_tokens for s in shapes],
        [0.0] * n,
        ["t"] * n,
        shapes,
    )
    cfg = LearnerConfig(micro_batch_size=4, max_tokens_per_micro_batch=60)
    slices = [range(0, 6), range(6, 12)]  # two GRPO mini-batches
    sent = [rank_rows(batch, slices, cfg, ranks=ranks, rank=r) for r in range(ranks)]
    assert all(len(rows) < n for rows in sent)  # nobody deserialises the whole batch
    for r, rows in enumerate(sent):
        share = batch.only(rows)
        assert len(share) == n and share.shapes == shapes
        assert [i for i, p in enumerate(share.prompts) if p is not None] == sorted(rows)
        for part in slices:  # the rank's own plan, from the shapes it got, reads only what it was sent
            plan = rank_plan(share, part, cfg, ranks=ranks, rank=r)
            assert plan == rank_plan(batch, part, cfg, ranks=ranks, rank=r)
            assert {i for m in plan for i in m.payload_rows} <= rows
