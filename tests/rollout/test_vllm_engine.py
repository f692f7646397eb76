"""The vLLM engine on CPU, for real (vLLM's CPU build): requests, samples, seeds, log-probs, weight loads, abort.

What only a GPU has (sleep mode, CUDA IPC, bf16 kernels) is tests/rollout/test_vllm_gpu.py, marker `gpu`.
"""

import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from morl.compat import use_reference_video_positions
from morl.config import ModelConfig, RolloutConfig
from morl.data.encoding import PromptEncoder, PromptTooLongError, vision_token_ids
from morl.data.loading import load_dataset
from morl.data.rows import Row, open_image
from morl.learner.buckets import pack_bucket
from morl.rollout.fleet import engine_prompts
from morl.rollout.hf_engine import HFEngine
from morl.rollout.types import SamplingParams
from morl.rollout.vllm_engine import (
    PLACEHOLDERS,
    VLLMEngine,
    check_expanded_prompt,
    collapse_placeholder_runs,
    placeholder_bad_words,
    stop_token_ids,
    vllm_engine_factory,
    vllm_prompt,
)
from morl.run.weight_sync import plan_buckets
from morl.types import EncodedPrompt

from helpers import carry_on, check_continued, forward_logprobs, learner_logprob_gap, toy_video_rows

TEMPERATURE = 0.5
MAX_PROMPT_TOKENS = 512


@pytest.fixture(scope="module")
def world(toy_world):
    processor = AutoProcessor.from_pretrained(toy_world / "sft")
    rows = load_dataset(toy_world / "data" / "counting" / "train.jsonl", known_tasks=None).rows[:3]
    return processor, rows


def two_image_row(rows: list[Row]) -> Row:
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which has more shapes?"}]
    return Row(
        id="pair",
        task="choice",
        messages=[{"role": "user", "content": content}],
        images=[rows[0].images[0], rows[1].images[0]],
        label={"answer": "A"},
    )


def placeholders(processor) -> dict[str, int]:
    return {m: processor.tokenizer.convert_tokens_to_ids(t) for m, t in PLACEHOLDERS.items()}


def limits(images: int, videos: int = 0) -> dict[str, int]:
    return {"image": images, "video": videos}


def test_collapse_restores_the_template_placeholders(world):
    processor, rows = world
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for row in [*rows, two_image_row(rows)]:
        prompt = PromptEncoder(processor, 4096)(row)
        collapsed = collapse_placeholder_runs(prompt.input_ids, image_pad)
        text = processor.apply_chat_template(
            [m.model_dump(exclude_none=True) for m in row.messages], add_generation_prompt=True, tokenize=False
        )
        # exactly the tokens of the chat text before the processor expanded each image
        assert collapsed == processor.tokenizer(text)["input_ids"]
        assert collapsed.count(image_pad) == len(row.images)
        assert prompt.input_ids.count(image_pad) > len(row.images)


def test_collapse_on_plain_lists():
    assert collapse_placeholder_runs([1, 9, 9, 9, 2, 9, 9, 3], 9) == [1, 9, 2, 9, 3]
    assert collapse_placeholder_runs([9, 9, 1], 9) == [9, 1]
    assert collapse_placeholder_runs([1, 2, 3], 9) == [1, 2, 3]


def test_request_carries_every_image_in_order(world):
    processor, rows = world
    row = two_image_row(rows)
    prompt = PromptEncoder(processor, 4096)(row)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    request = vllm_prompt(prompt, placeholders(processor), max_prompt_tokens=4096, limits=limits(2))
    assert request["prompt_token_ids"] == collapse_placeholder_runs(prompt.input_ids, image_pad)
    images = request["multi_modal_data"]["image"]
    assert [im.tobytes() for im in images] == [open_image(ref).tobytes() for ref in row.images]
    text_only = EncodedPrompt("t", [1, 2, 3], None, None)
    assert vllm_prompt(text_only, placeholders(processor), max_prompt_tokens=10, limits=limits(0)) == {
        "prompt_token_ids": [1, 2, 3]
    }


def test_requests_that_vllm_must_not_get_are_refused(world):
    processor, rows = world
    ids = placeholders(processor)
    prompt = PromptEncoder(processor, 4096)(rows[0])
    with pytest.raises(PromptTooLongError, match=rf"{rows[0].id}.*rollout.max_prompt_tokens=20"):
        vllm_prompt(prompt, ids, max_prompt_tokens=20, limits=limits(1))
    pair = PromptEncoder(processor, 4096)(two_image_row(rows))
    with pytest.raises(ValueError, match="rollout.max_images_per_prompt=1"):
        vllm_prompt(pair, ids, max_prompt_tokens=4096, limits=limits(1))
    without_refs = EncodedPrompt(prompt.row_id, prompt.input_ids, prompt.pixel_values, prompt.image_grid_thw)
    with pytest.raises(ValueError, match=r"1 image placeholder.*0 image\(s\)"):
        vllm_prompt(without_refs, ids, max_prompt_tokens=4096, limits=limits(1))


def test_expanded_prompt_must_match_the_encoder(world):
    processor, rows = world
    prompt = PromptEncoder(processor, 4096)(rows[0])
    check_expanded_prompt(prompt, list(prompt.input_ids))
    with pytest.raises(RuntimeError, match="same processor"):
        check_expanded_prompt(prompt, prompt.input_ids[:-3])  # e.g. vLLM resized the image to fewer patches


def test_placeholders_become_exact_bad_words(world):
    processor, _ = world
    tokenizer = processor.tokenizer
    banned = vision_token_ids(tokenizer)
    words = placeholder_bad_words(tokenizer, banned)
    assert words == ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    assert [tokenizer.encode(w, add_special_tokens=False) for w in words] == [[i] for i in banned]
    with pytest.raises(ValueError, match="could not ban it exactly"):
        # a byte-level token's surface form ("Ġ", the space) does not encode back to its own id
        placeholder_bad_words(tokenizer, [tokenizer.convert_tokens_to_ids("Ġ")])


def test_stop_ids_are_the_hf_engines(toy_world):
    engine = HFEngine(str(toy_world / "sft"), None, "float32")
    assert stop_token_ids(str(toy_world / "sft"), engine.tokenizer) == sorted(engine.stop_ids)


def test_factory_takes_the_recipe_settings():
    rollout = RolloutConfig(
        engine="vllm",
        gpu_memory_utilization=0.4,
        colocate=True,
        max_images_per_prompt=3,
        max_prompt_tokens=1000,
        max_new_tokens=24,
        max_num_seqs=48,
    )
    make = vllm_engine_factory("/ckpt", ModelConfig(path="/ckpt", dtype="bfloat16"), rollout, seed=5)
    assert make.args == ("/ckpt", None, "bfloat16")
    assert make.keywords == dict(
        max_prompt_tokens=1000,
        max_new_tokens=24,
        tensor_parallel_size=1,
        gpu_memory_utilization=0.4,
        max_images_per_prompt=3,
        max_videos_per_prompt=0,
        enable_sleep_mode=True,
        enforce_eager=None,
        cpu_kv_cache_gib=1,
        max_num_seqs=48,
        seed=5,
    )
    apart = RolloutConfig(engine="vllm", tensor_parallel_size=2)
    apart = vllm_engine_factory("/ckpt", ModelConfig(path="/ckpt"), apart, seed=0)
    assert (apart.keywords["tensor_parallel_size"], apart.keywords["enable_sleep_mode"]) == (2, False)


# ---------------------------------------------------------------------------------------------- the real engine


@pytest.fixture(scope="module")
def engine(toy_world):
    return VLLMEngine(
        str(toy_world / "sft"),
        None,
        "float32",
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        max_new_tokens=48,
        max_images_per_prompt=2,
        max_videos_per_prompt=1,
        seed=0,
    )


@pytest.fixture(scope="module")
def hf_model(toy_world):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft", dtype=torch.float32)
    return use_reference_video_positions(model).eval()  # as the learner and the HF engine load it


@pytest.fixture(scope="module")
def prompts(toy_world):
    """32 prompts, eight of each task (the quickstart's batch), then one two-image prompt."""
    processor = AutoProcessor.from_pretrained(toy_world / "sft")
    rows = [
        row
        for task in ("counting", "grounding", "math", "choice")
        for row in load_dataset(toy_world / "data" / task / "train.jsonl", known_tasks=None).rows[:8]
    ]
    encode = PromptEncoder(processor, MAX_PROMPT_TOKENS)
    return [encode(row) for row in [*rows, two_image_row(rows)]], processor


def gap(hf_model, processor, engine, prompts, groups) -> float:
    return learner_logprob_gap(hf_model, processor, engine, prompts, groups, TEMPERATURE)


def load_in_buckets(engine, named: dict[str, torch.Tensor], max_bytes: int = 64 * 1024) -> int:
    """The sync's own path: bucket plan, packed flat buffers, one engine load per bucket; the bucket count."""
    plan = plan_buckets([(n, t.numel() * 4) for n, t in named.items()], max_bytes)
    for bucket in plan:
        engine.load_weights(pack_bucket([(n, named[n]) for n in bucket.names], torch.float32).tensors())
    return len(plan)


def sft_weights(hf_model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in hf_model.named_parameters()}


def restore(hf_model, engine, original: dict[str, torch.Tensor]) -> None:
    """Both sides back to the SFT weights, for the tests after this one (the engine is the module's)."""
    with torch.no_grad():
        for n, p in hf_model.named_parameters():
            p.copy_(original[n])
    load_in_buckets(engine, original)


def test_groups_and_logprobs_match_the_learners(engine, hf_model, prompts):
    encoded, processor = prompts
    chosen = [*encoded[:32:8], encoded[-1]]  # one prompt of each task and the two-image prompt
    sent = engine_prompts(chosen, "vllm")  # as the scheduler sends them: no pixels, vLLM reads the images
    assert all(p.pixel_values is None and p.image_grid_thw is not None for p in sent)
    sampling = SamplingParams(n=4, temperature=TEMPERATURE, max_new_tokens=24)
    groups = engine.generate(sent, sampling, seeds=[1, 2, 3, 4, 5])
    assert len(groups) == len(chosen) and all(len(g) == 4 for g in groups)
    flat = [c for g in groups for c in g]
    assert all(len(c.logprobs) == len(c.token_ids) > 0 and c.finish_reason in ("stop", "length") for c in flat)
    assert all(c.token_ids[-1] in engine.stop_ids for c in flat if c.finish_reason == "stop")
    assert len({tuple(c.token_ids) for c in groups[0]}) > 1  # G different samples, not one repeated
    # fp32 on both sides: numerics only; a temperature, ban or image mismatch is orders of magnitude larger
    assert gap(hf_model, processor, engine, chosen, groups) < 1e-5


def test_video_prompts_match_the_learners(engine, hf_model, world, tmp_path):
    """Temporal grounding, video counting and image + video: vLLM's processor expands the driver's sampled frames
    to the driver's ids (checked in generate), and its log-probs match the learner's forward with the same
    `second_per_grid_ts`."""
    processor, rows = world
    video_prompts = [PromptEncoder(processor, MAX_PROMPT_TOKENS)(row) for row in toy_video_rows(tmp_path, rows[0])]
    request = vllm_prompt(video_prompts[2], placeholders(processor), max_prompt_tokens=4096, limits=limits(1, 1))
    (frames, metadata), = request["multi_modal_data"]["video"]
    assert frames is video_prompts[2].videos[0].frames and not metadata["do_sample_frames"]
    assert len(request["multi_modal_data"]["image"]) == 1
    with pytest.raises(ValueError, match="rollout.max_videos_per_prompt=0"):
        vllm_prompt(video_prompts[0], placeholders(processor), max_prompt_tokens=4096, limits=limits(1, 0))
    sampling = SamplingParams(n=4, temperature=TEMPERATURE, max_new_tokens=24)
    sent = engine_prompts(video_prompts, "vllm")  # the sampled frames without the processed pixels
    assert all(p.pixel_values_videos is None and p.videos for p in sent)
    groups = engine.generate(sent, sampling, seeds=[1, 2, 3])
    assert all(len(g) == 4 and all(c.token_ids for c in g) for g in groups)
    video_pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert video_pad not in {t for g in groups for c in g for t in c.token_ids}
    assert gap(hf_model, processor, engine, video_prompts, groups) < 1e-5


def test_same_seed_same_samples_at_quickstart_batch_sizes(engine, prompts):
    """32 prompts x 8 samples x 48 tokens at once, then in calls of 4 in reverse order: the same samples."""
    encoded, _ = prompts
    batch, seeds = encoded[:32], [1000 + i for i in range(32)]
    sampling = SamplingParams(n=8, temperature=TEMPERATURE, max_new_tokens=48)
    whole = engine.generate(batch, sampling, seeds)
    pieces: list = []
    for start in reversed(range(0, 32, 4)):
        pieces[:0] = engine.generate(batch[start : start + 4], sampling, seeds[start : start + 4])
    tokens = lambda groups: [[c.token_ids for c in g] for g in groups]  # noqa: E731
    assert tokens(pieces) == tokens(whole)
    other_seeds = engine.generate(batch[:4], sampling, [7 + i for i in range(4)])
    assert tokens(other_seeds) != tokens(whole[:4])


def test_over_long_prompt_is_refused_and_the_engine_goes_on(engine, prompts):
    encoded, _ = prompts
    first = encoded[0]
    pad = first.input_ids[-1]
    too_long = EncodedPrompt("long-row", first.input_ids + [pad] * MAX_PROMPT_TOKENS, first.pixel_values,
                             first.image_grid_thw, first.image_refs)
    with pytest.raises(PromptTooLongError, match="long-row"):
        engine.generate([first, too_long], SamplingParams(n=2, max_new_tokens=4), seeds=[0, 1])
    again = engine.generate([first], SamplingParams(n=2, max_new_tokens=4), seeds=[0])
    assert all(c.finish_reason in ("stop", "length") and c.token_ids for c in again[0])


def test_weight_update_changes_samples_and_logprobs_follow(engine, hf_model, prompts):
    encoded, processor = prompts
    chosen, seeds = encoded[:16:4], [11, 12, 13, 14]
    sampling = SamplingParams(n=4, temperature=TEMPERATURE, max_new_tokens=24)
    before = engine.generate(chosen, sampling, seeds)
    original = sft_weights(hf_model)
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():  # every tensor moves, the tied embedding / lm_head too
            for p in hf_model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        assert load_in_buckets(engine, sft_weights(hf_model)) > 1
        after = engine.generate(chosen, sampling, seeds)
        assert [c.token_ids for g in after for c in g] != [c.token_ids for g in before for c in g]
        # sampled by the new weights: at numerics level against the updated learner, far off the old one
        assert gap(hf_model, processor, engine, chosen, after) < 1e-5
    finally:
        restore(hf_model, engine, original)
    # the update's samples scored by the old weights: the gap a stale sync leaves, which the guard catches
    assert gap(hf_model, processor, engine, chosen, after) > 1e-2
    restored = engine.generate(chosen, sampling, seeds)
    assert [c.token_ids for g in restored for c in g] == [c.token_ids for g in before for c in g]


def test_placeholders_are_never_sampled_even_when_the_weights_favour_them(engine, hf_model, prompts):
    """Weights whose top token is <|image_pad|> go through the sync path; the ban must hold, the log-probs match."""
    encoded, processor = prompts
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    embed = hf_model.get_input_embeddings().weight  # tied: the lm_head's rows too
    original = sft_weights(hf_model)
    chosen = encoded[:32:4]
    try:
        with torch.no_grad():
            out = hf_model(**_batch_of_one(chosen[0], hf_model), output_hidden_states=True)
            direction = out.hidden_states[-1][0, -1]
            embed[pad] = direction / direction.norm() * 20 * embed.norm(dim=-1).max()
            logits = hf_model(**_batch_of_one(chosen[1], hf_model)).logits[0, -1]
        assert logits.argmax().item() == pad  # without the ban this token would be sampled
        load_in_buckets(engine, sft_weights(hf_model))
        groups = engine.generate(chosen, SamplingParams(n=4, temperature=TEMPERATURE, max_new_tokens=12),
                                 seeds=list(range(len(chosen))))
        tokens = {t for g in groups for c in g for t in c.token_ids}
        assert tokens and not tokens & set(engine.banned_ids)
        assert gap(hf_model, processor, engine, chosen, groups) < 1e-4
    finally:
        restore(hf_model, engine, original)


def _batch_of_one(prompt: EncodedPrompt, model) -> dict:
    from morl.data.encoding import collate

    batch = collate([prompt.input_ids], [prompt], pad_id=0, image_token_id=model.config.image_token_id,
                    video_token_id=model.config.video_token_id, left_pad=False)
    return batch.as_kwargs()


def test_abort_then_a_second_generate_completes(engine, prompts):
    encoded, _ = prompts
    sampling = SamplingParams(n=8, temperature=TEMPERATURE, max_new_tokens=48)
    polls = []
    aborted = engine.generate(encoded[:16], sampling, list(range(16)), should_stop=lambda: polls.append(1) or len(polls) > 3)
    assert any(c.finish_reason == "abort" for g in aborted for c in g)
    assert all(c.token_ids == [] for g in aborted for c in g if c.finish_reason == "abort")
    fresh = engine.generate(encoded[:4], sampling, list(range(4)))
    assert all(c.finish_reason in ("stop", "length") for g in fresh for c in g)
    # nothing of the aborted call leaks into the next: the same samples as a call of those prompts alone
    assert [[c.token_ids for c in g] for g in fresh] == [
        [c.token_ids for c in g] for g in engine.generate(encoded[:4], sampling, list(range(4)))
    ]


def test_a_group_leaves_the_moment_it_ends_and_an_abort_frees_its_room_at_once(engine, prompts):
    """Stepped as the worker's loop steps it: a short group comes back while a long one still runs, and aborting the
    long one empties the engine before the next step."""
    encoded, _ = prompts
    short = SamplingParams(n=4, temperature=TEMPERATURE, max_new_tokens=2)
    long = SamplingParams(n=4, temperature=TEMPERATURE, max_new_tokens=48)
    engine.add("long", encoded[0], long, 1)
    engine.add("short", encoded[1], short, 2)
    assert engine.sequences_in_flight() == 8
    finished = []
    while not finished:
        finished = engine.step(lambda key: False)
    assert [key for key, _ in finished] == ["short"]
    assert all(len(c.token_ids) <= 2 for c in finished[0][1])
    assert engine.has_unfinished() and engine.sequences_in_flight() == 4  # the long group runs on
    ((key, group),) = engine.abort(["long", "never-added"])
    assert key == "long" and [c.finish_reason for c in group] == ["abort"] * 4
    assert not engine.has_unfinished() and engine.sequences_in_flight() == 0
    # the short group's samples are the ones it draws alone: a neighbour never changes a prompt's samples
    (alone,) = engine.generate([encoded[1]], short, seeds=[2])
    assert [c.token_ids for c in alone] == [c.token_ids for c in finished[0][1]]


def test_the_loop_hands_a_refused_prompt_back_as_its_error_and_runs_the_rest(engine, prompts):
    """Through the worker's loop (rollout/engine_loop.py): an over-long prompt reaches the driver as its own error,
    naming the row; the group beside it still ends; a call on the engine runs between steps, on the loop's thread."""
    import threading

    from morl.rollout.engine_loop import EngineLoop

    encoded, _ = prompts
    first = encoded[0]
    too_long = EncodedPrompt("long-row", first.input_ids + [first.input_ids[-1]] * MAX_PROMPT_TOKENS,
                             first.pixel_values, first.image_grid_thw, first.image_refs)
    loop = EngineLoop(lambda: engine)
    sampling = SamplingParams(n=2, temperature=TEMPERATURE, max_new_tokens=4)
    loop.submit([first, too_long], [sampling] * 2, [0, 1], ["ok", "long"])
    with pytest.raises(PromptTooLongError, match="long-row"):
        loop.take_finished(timeout=60)
    report = loop.take_finished(timeout=60)
    assert [key for key, _ in report.groups] == ["ok"] and report.busy_seconds > 0
    assert loop.call(lambda e: (e.sequences_in_flight(), threading.current_thread().name)) == (0, "engine-loop")
    with pytest.raises(KeyError):  # a failing call raises in its caller; the loop goes on
        loop.call(lambda e: {}["missing"])
    assert loop.generate([first], [sampling], [0])[0][0].token_ids == report.groups[0][1][0].token_ids
    with pytest.raises(PromptTooLongError, match="long-row"):  # evaluation's blocking call raises it too
        loop.generate([first, too_long], [sampling] * 2, [0, 1])


# ------------------------------------------------------------------------------ continuing partial responses


def unfinished(engine, prompts, seeds, tokens: int = 3):
    """Groups of 4 samples cut at `tokens` tokens, kept per prompt: the samples still unfinished ("length")."""
    sampling = SamplingParams(n=4, temperature=TEMPERATURE, max_new_tokens=tokens)
    groups = [[c for c in g if c.finish_reason == "length"] for g in engine.generate(prompts, sampling, seeds)]
    assert all(groups)
    return groups


def continued(engine, prompts, continuations):
    sampling = SamplingParams(n=99, temperature=TEMPERATURE)  # n and max_new_tokens are the continuations'
    return engine.generate(prompts, sampling, seeds=[0] * len(prompts), continuations=continuations)


def mean_gap(recorded: list[list[float]], scored: list[list[float]]) -> float:
    pairs = [(a, b) for r, s in zip(recorded, scored) for a, b in zip(r, s, strict=True)]
    return sum(abs(a - b) for a, b in pairs) / len(pairs)


def test_a_continued_response_scores_like_one_sampled_whole(engine, hf_model, prompts):
    """One prompt of each task and the two-image prompt sampled 3 tokens, then each sample carried on from its first
    3 or 2 tokens, each its own request with its seed and budget: the new tokens' log-probs equal the learner's
    forward of prompt + whole response at their positions; a sample's tokens are the same alone; abort drops all of
    a continued group's requests."""
    encoded, _ = prompts
    chosen = engine_prompts([*encoded[:32:8], encoded[-1]], "vllm")
    groups = unfinished(engine, chosen, seeds=[1, 2, 3, 4, 5])
    kept = [[3 - j % 2 for j in range(len(g))] for g in groups]
    continuations = [
        carry_on(g, [50 + j for j in range(len(g))], [10 - 4 * (j % 2) for j in range(len(g))], k)
        for g, k in zip(groups, kept)
    ]
    results = continued(engine, chosen, continuations)
    whole = [r for c, out in zip(continuations, results) for r in check_continued(engine, c, out)]
    repeated = [p for p, g in zip([*encoded[:32:8], encoded[-1]], groups) for _ in g]
    scored = forward_logprobs(hf_model, repeated, whole, TEMPERATURE, engine.banned_ids)
    new = [c.logprobs for out in results for c in out]
    cuts = [k for ks in kept for k in ks]
    assert mean_gap(new, [s[k:] for s, k in zip(scored, cuts)]) < 1e-5
    assert any(c.finish_reason == "length" and len(c.token_ids) == 6 for out in results for c in out)
    alone = continued(engine, chosen[-1:], continuations[-1:])[0]
    assert [c.token_ids for c in alone] == [c.token_ids for c in results[-1]]  # nothing beside it changes it
    engine.add("carried", chosen[0], SamplingParams(n=1, temperature=TEMPERATURE), 0, continuations[0])
    assert engine.sequences_in_flight() == len(groups[0])
    engine.step(lambda key: False)
    ((key, group),) = engine.abort(["carried"])
    assert key == "carried" and [c.finish_reason for c in group] == ["abort"] * len(groups[0])
    assert not engine.has_unfinished() and engine.sequences_in_flight() == 0


def test_a_response_continued_across_a_weight_sync_scores_like_each_version(engine, hf_model, prompts):
    """3 tokens under v0, perturbed weights v1 synced in buckets, the rest under v1: the first recorded log-probs
    equal the learner's forward of v0, the rest its forward of v1 (and differ from v0's)."""
    encoded, _ = prompts
    chosen = [encoded[0], encoded[-1]]  # a counting prompt and the two-image prompt
    groups = unfinished(engine, engine_prompts(chosen, "vllm"), seeds=[21, 22])
    continuations = [carry_on(g, [30 + j for j in range(len(g))], [8] * len(g)) for g in groups]
    repeated = [p for p, g in zip(chosen, groups) for _ in g]
    original = sft_weights(hf_model)
    gen = torch.Generator().manual_seed(1)
    try:
        with torch.no_grad():
            for p in hf_model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        load_in_buckets(engine, sft_weights(hf_model))
        results = continued(engine, engine_prompts(chosen, "vllm"), continuations)
        whole = [r for c, out in zip(continuations, results) for r in check_continued(engine, c, out)]
        under_v1 = forward_logprobs(hf_model, repeated, whole, TEMPERATURE, engine.banned_ids)
    finally:
        restore(hf_model, engine, original)
    under_v0 = forward_logprobs(hf_model, repeated, whole, TEMPERATURE, engine.banned_ids)
    prefixes = [s.logprobs for g in groups for s in g]
    new = [c.logprobs for out in results for c in out]
    assert mean_gap(prefixes, [s[:3] for s in under_v0]) < 1e-5
    assert mean_gap(new, [s[3:] for s in under_v1]) < 1e-5
    assert mean_gap(new, [s[3:] for s in under_v0]) > 1e-2  # v1 measurably differs: the check above could fail
