"""The TRL and verl adapters, in-process: rewards written in the shape of each framework's own score here what they
score there. Each expected value follows from the framework's documented semantics (TRL 1.10's GRPOTrainer and
trl/rewards, verl 0.8's reward managers and verl/utils/reward_score), stated per case."""

import pytest

from morl.rewards.adapters import finite_score, from_trl, from_verl, resolve, to_score
from morl.rewards.types import RewardInput, TrainingProgress

FW = "framework_rewards"


def trl(fn_name, text, label=None, **kwargs):
    """The raw score (finite, not yet clamped) of the TRL reward `fn_name` on `text`."""
    sample = RewardInput.from_text(text, "math", label or {}, **kwargs)
    return finite_score(resolve(f"{FW}:{fn_name}", "trl")(sample.response, sample))


def verl(fn_name, text, ground_truth, **kwargs):
    sample = RewardInput.from_text(text, "math", {"ground_truth": ground_truth}, **kwargs)
    return resolve(f"{FW}:{fn_name}", "verl")(sample.response, sample)


@pytest.mark.parametrize(
    ("text", "solution", "score"),
    [
        # TRL scores the whole completion: an answer boxed inside the thinking counts (before: the thinking was cut)
        (r"<think>18 + 24 is \boxed{42}.</think> That is my answer.", "42", 1.0),
        (r"<think>maybe \boxed{41}</think> no: \boxed{42}", "42", 1.0),  # the last boxed answer
        (r"<think>hmm</think> \boxed{41}", "42", 0.0),
    ],
)
def test_trl_accuracy_reads_the_whole_completion_as_a_message(text, solution, score):
    assert trl("trl_accuracy", text, {"solution": solution}) == score


def test_trl_accuracy_skipping_a_sample_is_an_error_and_log_extra_lands_in_the_output(capsys):
    assert trl("trl_accuracy", r"\boxed{42}", {"solution": "42"}) == 1.0
    assert "log_extra answer_parsed: ['42']" in capsys.readouterr().out  # the sandbox keeps it in the output log
    with pytest.raises(ValueError, match="TRL reward returned None"):  # TRL: None skips; our routes already chose
        trl("trl_accuracy", r"\boxed{42}", {"solution": ""})


@pytest.mark.parametrize(
    ("text", "score"),
    [
        (r"<think>it is \boxed{42}</think> \boxed{41}", 0.0),  # only the answer after </think> counts
        (r"<think>first \boxed{41}</think> \boxed{42}", 1.0),  # ... so an answer corrected after it scores
        (r"<think>it is \boxed{42} and the thinking never ends", 0.0),  # unfinished reasoning scores 0
    ],
)
def test_trl_reasoning_accuracy_sees_the_thinking_and_splits_it_off_itself(text, score):
    assert trl("trl_reasoning_accuracy", text, {"solution": "42"}) == score


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("<think>\nreasoning\n</think>\nthe answer", 1.0),  # could never score 1 on the text after </think>
        ("the answer, no thinking", 0.0),
        ("<think>reasoning that never closes", 0.0),
        ("<think>a</think><think>b</think> answer", 0.0),  # a second <think>
    ],
)
def test_trl_think_format(text, score):
    assert trl("trl_think_format", text) == score


@pytest.mark.parametrize(
    ("num_tokens", "raw"),
    [(6, 0.0), (8, -0.5), (10, -1.0), (12, -1.0)],  # max 10, cache 4: (10 - 4 - 8) / 4 = -0.5 at 8 tokens
)
def test_trl_soft_overlong_punishment_counts_the_completion_ids(num_tokens, raw):
    score = trl("soft_overlong", "x" * num_tokens, token_ids=tuple(range(num_tokens)))
    assert score == raw and to_score(score) == 0.0  # negative: clamped to 0 (the router counts it)


def test_a_trl_reward_needing_token_ids_fails_on_text_alone():
    with pytest.raises(TypeError):  # `morl rewards score` rows without token_ids: an error, never a silent length 0
        trl("soft_overlong", "some text")


@pytest.mark.parametrize(
    ("answer", "num_tokens", "score"),
    [
        ("42", 50, 0.75),  # TRL's documented example: half of max_len, correct 0.75, wrong -0.75
        ("41", 50, -0.75),
        ("42", 0, 1.0),  # correct: 1.0 at length 0 down to 0.5 at max_len and beyond
        ("42", 100, 0.5),
        ("42", 150, 0.5),
        ("41", 100, -0.5),  # wrong: -1.0 when short, -0.5 at max_len
    ],
)
def test_trl_cosine_scaled_reward_scales_by_the_completion_length(answer, num_tokens, score):
    text = rf"<think>so</think> \boxed{{{answer}}}"
    assert trl("cosine_scaled", text, {"solution": "42"}, token_ids=(7,) * num_tokens) == pytest.approx(score)


def test_an_async_trl_reward_is_awaited():
    assert trl("trl_async_accuracy", r"<think>\boxed{42}</think>", {"solution": "42"}) == 1.0
    assert trl("trl_async_accuracy", r"\boxed{41}", {"solution": "42"}) == 0.0


def test_the_trl_adapter_passes_what_grpo_trainer_passes():
    seen = {}

    def probe(**kwargs):
        seen.update(kwargs)
        return [0.5]

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    sample = RewardInput.from_text(
        "<think>count</think>3", "counting", {"solution": "3"}, images=("/d/a.png",), videos=(("/d/f0.png",),),
        meta={"messages": messages, "source": "s"}, token_ids=(11, 12, 13),
    )
    assert from_trl(probe)(sample.response, sample) == 0.5
    assert seen.keys() == {
        "prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
        "solution", "task", "label", "images", "videos", "meta",
    }
    assert seen["prompts"] == [messages]
    assert seen["completions"] == [[{"role": "assistant", "content": "<think>count</think>3"}]]
    assert seen["completion_ids"] == [[11, 12, 13]]
    assert seen["solution"] == ["3"] and seen["task"] == ["counting"] and seen["label"] == [{"solution": "3"}]
    assert seen["images"] == [["/d/a.png"]] and seen["videos"] == [[["/d/f0.png"]]]
    assert seen["meta"] == [sample.meta] and seen["trainer_state"] is None  # outside a training rollout
    seen["log_metric"]("my/metric", 0.25)  # callable as TRL's: name and value


def test_a_trl_reward_shaped_by_training_progress_reads_trainer_state():
    progress = TrainingProgress(global_step=3, max_steps=4)
    assert trl("trl_progress_length", "x", token_ids=(1,) * 8, progress=progress) == pytest.approx(0.75 * 0.8)
    with pytest.raises(AttributeError):  # outside training there is no trainer_state: an error, not a guess
        trl("trl_progress_length", "x", token_ids=(1,) * 8)


def test_a_label_key_named_like_a_trl_keyword_is_refused():
    sample = RewardInput.from_text("x", "math", {"completions": "y"})
    with pytest.raises(ValueError, match=r"label key\(s\) \['completions'\] clash"):
        resolve(f"{FW}:trl_think_format", "trl")(sample.response, sample)


@pytest.mark.parametrize(
    ("text", "ground_truth", "score"),
    [
        # verl scores the whole decoded response: `#### 42` inside the thinking counts (before: 0)
        ("<think>18 + 24 = 42, so #### 42</think>The answer is 42.", "42", 1.0),
        ("<think>#### 41</think>No wait: #### 42", "42", 1.0),  # the last match
        ("#### 1,000", "1000", 1.0),  # commas dropped
        ("#### 42" + " and more text" * 30, "42", 0.0),  # only the last 300 characters are read
        ("<think>41?</think>42", "42", 0.0),  # strict: no `####`, no score
    ],
)
def test_verl_gsm8k_reads_the_whole_response(text, ground_truth, score):
    assert verl("verl_gsm8k", text, ground_truth) == score
    assert verl("verl_batch_gsm8k", text, ground_truth) == score  # the batch manager's form: lists of one
    assert verl("verl_async_gsm8k", text, ground_truth) == score  # async def: awaited


@pytest.mark.parametrize(
    ("text", "score"),
    [
        # math_dapo takes the last `Answer:` and the rest of its line: on one line with the thinking's answer, the
        # correction after </think> is read as "41</think>Answer: 42", wrong: -1 (before, on the text after
        # </think> alone, it scored 1)
        ("<think>Answer: 41</think>Answer: 42", -1.0),
        ("<think>Answer: 41</think>\nAnswer: 42", 1.0),  # corrected on a line of its own: 1
        ("<think>thinking</think>\nAnswer: 41", -1.0),
    ],
)
def test_verl_math_dapo_scores_minus_one_for_wrong_and_keeps_its_dict(text, score):
    out = verl("verl_math_dapo", text, "42")
    assert out["score"] == score and out["acc"] == (score == 1.0)
    assert to_score(out) == max(score, 0.0)  # -1 clamped to 0, counted by the router


def test_the_verl_adapter_passes_what_the_naive_reward_manager_passes():
    seen = {}

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        seen.update(data_source=data_source, solution_str=solution_str, ground_truth=ground_truth, extra=extra_info)
        return 1.0

    meta = {"data_source": "openai/gsm8k", "split": "train"}
    sample = RewardInput.from_text("<think>t</think>#### 3", "math", {"ground_truth": "3", "answer": "x"}, meta=meta)
    assert from_verl(compute_score)(sample.response, sample) == 1.0
    assert seen == {
        "data_source": "openai/gsm8k", "solution_str": "<think>t</think>#### 3", "ground_truth": "3",
        "extra": {**meta, "num_turns": 2, "rollout_reward_scores": {}},
    }
    assert sample.meta == meta  # verl adds its keys to a copy

    plain = RewardInput.from_text("B", "choice", {"answer": "B"})
    from_verl(compute_score)(plain.response, plain)
    assert (seen["data_source"], seen["ground_truth"]) == ("choice", "B")  # the task; label["answer"]


def test_a_verl_batch_reward_returning_the_wrong_count_is_an_error():
    def batch(data_sources, solution_strs, ground_truths, extra_infos):
        return [1.0, 1.0]

    sample = RewardInput.from_text("x", "math", {"answer": "x"})
    with pytest.raises(ValueError, match="returned 2 scores for 1 response"):
        from_verl(batch)(sample.response, sample)


def test_an_async_morl_reward_is_awaited():
    sample = RewardInput.from_text("x", "math", {})
    assert resolve("reward_fixtures:async_half")(sample.response, sample) == 0.5
