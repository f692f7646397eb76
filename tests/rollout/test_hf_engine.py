"""The HF rollout engine on a tiny real Qwen2.5-VL: groups, log-probs, stop handling, vision tokens."""

import dataclasses

import pytest
import torch
from transformers import AutoProcessor

from morl.algo.core import token_logprobs
from morl.data.encoding import PromptEncoder, PromptTooLongError, vision_token_ids
from morl.data.loading import load_dataset
from morl.learner.logprobs import response_logprobs
from morl.rollout.hf_engine import HFEngine, SeededSampler
from morl.rollout.types import SamplingParams

from helpers import carry_on, check_continued, forward_logprobs, toy_video_rows


@pytest.fixture(scope="module")
def world(toy_world):
    processor = AutoProcessor.from_pretrained(toy_world / "sft")
    rows = load_dataset(toy_world / "data" / "counting" / "train.jsonl", known_tasks=None).rows[:3]
    prompts = [PromptEncoder(processor, 4096)(row) for row in rows]
    return processor, rows, prompts, HFEngine(str(toy_world / "sft"), None, "float32")


def test_groups_and_logprobs_match_a_teacher_forced_forward(world):
    processor, _, prompts, engine = world
    groups = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=10), seeds=[3, 4, 5])
    assert len(groups) == 3 and all(len(g) == 4 for g in groups)
    flat = [c for g in groups for c in g]
    for c in flat:
        assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
        assert c.finish_reason == ("stop" if c.token_ids[-1] in engine.stop_ids else "length")
    assert max_gap(engine, processor, prompts, groups) < 1e-3


def max_gap(engine, processor, prompts, groups) -> float:
    """The largest |rollout - teacher-forced| log-prob over the groups' response tokens (the engine's own weights)."""
    flat = [c for g in groups for c in g]
    with torch.no_grad():
        scores = response_logprobs(
            engine.model,
            [p for p, g in zip(prompts, groups) for _ in g],
            [c.token_ids for c in flat],
            banned_ids=engine.banned_ids,
        )
    logprobs, mask = scores.logprobs, scores.mask
    rollout = torch.zeros_like(logprobs)
    for i, c in enumerate(flat):
        rollout[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    return ((logprobs - rollout).abs() * mask).max().item()


def tokens(groups):
    return [[c.token_ids for c in g] for g in groups]


def test_a_prompts_samples_depend_on_its_seed_not_on_its_batch(world):
    _, _, prompts, engine = world
    sampling = SamplingParams(n=3, max_new_tokens=8)
    together = tokens(engine.generate(prompts, sampling, seeds=[7, 8, 9]))
    alone = [tokens(engine.generate([p], sampling, seeds=[s]))[0] for p, s in zip(prompts, [7, 8, 9])]
    reordered = tokens(engine.generate(prompts[::-1], sampling, seeds=[9, 8, 7]))[::-1]
    assert together == alone == reordered
    assert tokens(engine.generate(prompts, sampling, seeds=[1, 2, 3])) != together


def test_seeded_sampler_draws_from_the_softmax():
    """Gumbel-max per row: token frequencies match softmax(logits / T), top-p cuts the tail."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    counts = torch.zeros(4)
    sampler = SeededSampler([11], temperature=1.0, top_p=1.0)
    for _ in range(4000):
        counts[sampler(None, logits).argmax()] += 1
    assert torch.allclose(counts / 4000, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    top_p = SeededSampler([11], temperature=1.0, top_p=0.7)
    picked = {top_p(None, logits).argmax().item() for _ in range(500)}
    assert picked == {0, 1}


def test_should_stop_ends_the_call_early(world):
    _, _, prompts, engine = world
    calls = []
    groups = engine.generate(
        prompts, SamplingParams(n=2, max_new_tokens=30), seeds=[0, 1, 2], should_stop=lambda: calls.append(1) or len(calls) > 3
    )
    unfinished = [c for g in groups for c in g if c.finish_reason != "stop"]
    assert unfinished and all(c.finish_reason == "abort" and len(c.token_ids) < 30 for c in unfinished)


def test_vision_placeholders_are_never_sampled(world):
    processor, _, prompts, engine = world
    banned = vision_token_ids(processor.tokenizer)
    assert len(banned) == 4
    head = engine.model.get_output_embeddings().weight
    saved = head.data.clone()
    try:
        with torch.no_grad():
            # make <|image_pad|> the most likely next token by far (its input embedding is unused:
            # image positions take the vision features)
            head[processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")] = 50 * head.abs().max()
        groups = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=6), seeds=[1, 2, 3])
    finally:
        head.data.copy_(saved)
    assert not {t for g in groups for c in g for t in c.token_ids} & set(banned)


def test_banned_tokens_have_zero_probability():
    logits = torch.zeros((1, 1, 5))
    assert token_logprobs(logits, torch.tensor([[2]]), banned_ids=[2]).item() == float("-inf")


def test_long_multimodal_prompt_is_refused(world):
    processor, rows, _, _ = world
    with pytest.raises(PromptTooLongError, match=rows[0].id):
        PromptEncoder(processor, max_prompt_tokens=20)(rows[0])


def test_video_prompts_sample_and_score_like_image_prompts(world, tmp_path):
    """Temporal grounding, video counting and an image + video prompt: log-probs match the learner's forward
    (with the same `second_per_grid_ts`), and <|video_pad|> is never sampled even when it is the likeliest."""
    processor, rows, _, engine = world
    prompts = [PromptEncoder(processor, 4096)(row) for row in toy_video_rows(tmp_path, rows[0])]
    assert [p.second_per_grid_ts.tolist() for p in prompts] == [[1.0]] * 3
    assert prompts[2].pixel_values is not None and prompts[2].pixel_values_videos is not None
    groups = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=10), seeds=[1, 2, 3])
    assert max_gap(engine, processor, prompts, groups) < 1e-3
    # the time positions do reach the model: with the source fps in place of the sampled one, other log-probs
    dropped_fps = [dataclasses.replace(p, second_per_grid_ts=torch.tensor([2 / 24])) for p in prompts]
    assert max_gap(engine, processor, dropped_fps, groups) > 1e-3
    head = engine.model.get_output_embeddings().weight
    saved = head.data.clone()
    video_pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    try:
        with torch.no_grad():
            head[video_pad] = 50 * head.abs().max()
        groups = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=6), seeds=[1, 2, 3])
    finally:
        head.data.copy_(saved)
    assert video_pad not in {t for g in groups for c in g for t in c.token_ids}


# --- continuing partial responses (partial rollout) -------------------------------------------------------------

CONTINUED_TEMPERATURE = 0.7


def unfinished(engine, prompts, seeds, tokens: int = 3):
    """Groups of 4 samples cut at `tokens` tokens, kept per prompt: the samples still unfinished ("length")."""
    sampling = SamplingParams(n=4, temperature=CONTINUED_TEMPERATURE, max_new_tokens=tokens)
    groups = [[c for c in g if c.finish_reason == "length"] for g in engine.generate(prompts, sampling, seeds)]
    assert all(len(g) >= 2 for g in groups)  # the toy model rarely stops within 3 tokens
    return groups


def continued(engine, prompts, continuations):
    sampling = SamplingParams(n=99, temperature=CONTINUED_TEMPERATURE)  # n and max_new_tokens are the continuation's
    return engine.generate(prompts, sampling, seeds=[0] * len(prompts), continuations=continuations)


def budgets(group, first: int = 9) -> list[int]:
    return [first - 3 * (j % 3) for j in range(len(group))]  # 9, 6, 3, 9, ...: rows cut at their own limits


def test_a_continued_response_scores_like_one_sampled_whole(world):
    """Image prompts sampled 3 tokens, then each sample carried on from its first 3 or 2 tokens with its own seed and
    budget (one static batch of left-padded rows of different lengths and limits): the new tokens' log-probs equal a
    forward of prompt + the whole response at their positions, and so do the prefixes' recorded ones."""
    _, _, prompts, engine = world
    groups = unfinished(engine, prompts, seeds=[3, 4, 5])
    kept = [[3 - j % 2 for j in range(len(g))] for g in groups]
    continuations = [carry_on(g, [40 + j for j in range(len(g))], budgets(g), k) for g, k in zip(groups, kept)]
    results = continued(engine, prompts, continuations)
    whole = [r for c, out in zip(continuations, results) for r in check_continued(engine, c, out)]
    recorded = [[*s.logprobs[:k], *c.logprobs] for g, ks, out in zip(groups, kept, results)
                for s, k, c in zip(g, ks, out)]
    scored = forward_logprobs(engine.model, [p for p, g in zip(prompts, groups) for _ in g], whole,
                              CONTINUED_TEMPERATURE, engine.banned_ids)
    assert max(abs(a - b) for r, s in zip(recorded, scored) for a, b in zip(r, s, strict=True)) < 1e-3
    assert any(c.finish_reason == "length" and len(c.token_ids) < 9 for out in results for c in out)


def test_a_continued_samples_tokens_depend_on_its_seed_and_prefix_not_its_batch(world):
    _, _, prompts, engine = world
    groups = unfinished(engine, prompts, seeds=[6, 7, 8])
    continuations = [carry_on(g, [70 + j for j in range(len(g))], budgets(g)) for g in groups]
    together = tokens(continued(engine, prompts, continuations))
    alone = [tokens(continued(engine, [p], [c]))[0] for p, c in zip(prompts, continuations)]
    fresh = SamplingParams(n=2, temperature=CONTINUED_TEMPERATURE, max_new_tokens=5)
    beside_fresh = tokens(engine.generate([prompts[1], prompts[0]], fresh, seeds=[1, 2],
                                          continuations=[None, continuations[0]]))[1]
    assert together == alone and beside_fresh == together[0]
    reseeded = [carry_on(g, [90 + j for j in range(len(g))], budgets(g)) for g in groups]
    assert tokens(continued(engine, prompts, reseeded)) != together


def test_a_response_continued_across_a_weight_sync_scores_like_each_version(world):
    """3 tokens under v0, perturbed weights v1 loaded, the rest under v1: the first recorded log-probs equal a forward
    of v0, the rest a forward of v1 (and differ from v0's)."""
    _, _, prompts, engine = world
    groups = unfinished(engine, prompts[:2], seeds=[11, 12])
    v0 = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    v1 = {n: t + torch.randn(t.shape, generator=gen) * 0.05 for n, t in v0.items()}
    continuations = [carry_on(g, [20 + j for j in range(len(g))], [8] * len(g)) for g in groups]
    try:
        engine.load_weights(v1.items())
        results = continued(engine, prompts[:2], continuations)
        whole = [r for c, out in zip(continuations, results) for r in check_continued(engine, c, out)]
        repeated = [p for p, g in zip(prompts, groups) for _ in g]
        under_v1 = forward_logprobs(engine.model, repeated, whole, CONTINUED_TEMPERATURE, engine.banned_ids)
    finally:
        engine.load_weights(v0.items())
    under_v0 = forward_logprobs(engine.model, repeated, whole, CONTINUED_TEMPERATURE, engine.banned_ids)
    prefixes = [s.logprobs for g in groups for s in g]
    new = [c.logprobs for out in results for c in out]

    def gap(recorded, scored, cut):
        return max(abs(a - b) for r, s in zip(recorded, scored) for a, b in zip(r, cut(s), strict=True))

    assert gap(prefixes, under_v0, lambda s: s[:3]) < 1e-3
    assert gap(new, under_v1, lambda s: s[3:]) < 1e-3
    assert gap(new, under_v0, lambda s: s[3:]) > 1e-2  # v1 measurably differs: the check above could fail


def test_the_worker_loop_passes_continuations_through(world):
    """Through the worker's loop (rollout/engine_loop.py), a continued group beside a fresh one: each comes back
    under its key, the continued one as the engine continues it directly; a queued continued group aborts whole."""
    from morl.rollout.engine_loop import EngineLoop

    _, _, prompts, engine = world
    (group,) = unfinished(engine, prompts[:1], seeds=[13])
    continuation = carry_on(group, [60 + j for j in range(len(group))], [5] * len(group))
    loop = EngineLoop(lambda: engine)
    sampling = SamplingParams(n=2, temperature=CONTINUED_TEMPERATURE, max_new_tokens=4)
    loop.submit(prompts[:2], [sampling] * 2, [0, 1], ["carried", "fresh"], [continuation, None])
    groups: dict = {}
    while len(groups) < 2:
        groups.update(loop.take_finished(timeout=60).groups)
    assert tokens([groups["carried"]]) == tokens(continued(engine, prompts[:1], [continuation]))
    assert len(groups["fresh"]) == 2 and all(len(c.token_ids) <= 4 for c in groups["fresh"])
    engine.add("queued", prompts[0], sampling, 0, continuation)
    assert engine.sequences_in_flight() == len(group)
    ((key, aborted),) = engine.abort(["queued"])
    assert [c.finish_reason for c in aborted] == ["abort"] * len(group) and not engine.has_unfinished()
