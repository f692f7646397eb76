"""The router and its sandbox, with real worker processes: weighting, order, adapters, failures that are ours
(raise, hang, crash: reward None, counted, pool keeps working) versus malformed answers (0, no error), and scores
outside [0, 1] (clamped, counted, warned once; infinities are errors)."""

import logging
import re
import threading
import time

import pytest

from morl.rewards.config import RewardsConfig
from morl.rewards.router import RewardErrorRateExceeded, RewardRouter, UnknownTaskError
from morl.rewards.types import RewardInput

FX = "reward_fixtures"
FW = "framework_rewards"
AS_RETURNED = "reward_output_fixtures:as_returned"
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def router():
    cfg = RewardsConfig(
        modules=[FX],
        num_workers=2,
        timeout_s=TIMEOUT_S,
        routes={
            "mixed": [{"fn": "counting", "weight": 3}, {"fn": "fixture_half", "weight": 1}],
            "raw": [{"fn": f"{FX}:raw_score"}],
            "boom": [{"fn": "counting"}, {"fn": "fixture_boom"}],
            "sleep": [{"fn": f"{FX}:sleep_forever"}],
            "die": [{"fn": f"{FX}:die"}],
            "trl": [{"fn": f"{FX}:trl_exact", "adapter": "trl"}],
            "verl": [{"fn": f"{FX}:verl_exact", "adapter": "verl"}],
            "trl_media": [{"fn": f"{FX}:trl_media", "adapter": "trl"}],
            "returned": [{"fn": AS_RETURNED}],
            "trl_math": [
                {"fn": f"{FW}:trl_accuracy", "adapter": "trl"}, {"fn": f"{FW}:trl_think_format", "adapter": "trl"}
            ],
            "trl_async": [{"fn": f"{FW}:trl_async_accuracy", "adapter": "trl"}],
            "trl_overlong": [{"fn": f"{FW}:soft_overlong", "adapter": "trl"}],
            "dapo": [{"fn": f"{FW}:verl_math_dapo", "adapter": "verl"}],
            "verl_async": [{"fn": f"{FW}:verl_async_gsm8k", "adapter": "verl"}],
            "morl_async": [{"fn": f"{FX}:async_half"}],
        },
    )
    with RewardRouter(cfg) as r:
        yield r


def sample(task, text, label=None, **kwargs):
    return RewardInput.from_text(text, task, label or {}, **kwargs)


def counting_batch(n):
    return [sample("counting", rf"\boxed{{{i % 5}}}", {"count": i % 3}) for i in range(n)]


def assert_counting_ok(results, n):
    assert [r.reward for r in results] == [float(i % 5 == i % 3) for i in range(n)]
    assert all(r.error is None for r in results)


def test_weighted_mean_of_components_in_input_order(router):
    results = router.score([sample("mixed", r"\boxed{2}", {"count": 2}), sample("mixed", "7", {"count": 2})])
    assert [r.reward for r in results] == [(3 * 1 + 0.5) / 4, (3 * 0 + 0.5) / 4]
    assert results[0].components == {"counting": 1.0, "fixture_half": 0.5}
    assert all(r.error is None for r in results)


def test_scores_are_clamped_and_non_numbers_are_errors(router):
    before = router.out_of_range_counts()[f"{FX}:raw_score"]
    results = router.score([sample("raw", t) for t in ("1.7", "-3", "{0.25}", "none")])
    assert [r.reward for r in results[:3]] == [1.0, 0.0, 0.25]
    assert results[0].components == {f"{FX}:raw_score": 1.0}
    assert results[3].reward is None and "expected a number" in results[3].error
    assert router.out_of_range_counts()[f"{FX}:raw_score"] == before + 2


def test_out_of_range_scores_are_counted_and_warned_once_per_reward(router, caplog):
    before = router.out_of_range_counts()[AS_RETURNED]
    with caplog.at_level(logging.WARNING, logger="morl.rewards.router"):
        results = router.score([sample("returned", t) for t in ("2.5", "-1", "0.5", "1", "0", "True", "False")])
        assert [(r.reward, r.error) for r in results] == [(1.0, None), (0.0, None), (0.5, None), (1.0, None),
                                                          (0.0, None), (1.0, None), (0.0, None)]
        assert router.out_of_range_counts()[AS_RETURNED] == before + 2  # bools are 0 and 1: in range
        router.score([sample("returned", "7")])
    assert router.out_of_range_counts()[AS_RETURNED] == before + 3 and router.error_counts()[AS_RETURNED] == 0
    warned = [r.getMessage() for r in caplog.records if "outside [0, 1]" in r.getMessage()]
    assert len(warned) == 1
    assert re.fullmatch(
        rf"reward '{AS_RETURNED}' returned (2\.5|-1\.0), outside \[0, 1\]: clamped to (1\.0|0\.0); later ones are "
        rf"only counted \(reward/{AS_RETURNED}/out_of_range\)", warned[0]
    )


def test_infinities_and_nan_are_errors_not_clamped(router):
    before = router.out_of_range_counts()[AS_RETURNED]
    results = router.score([sample("returned", t) for t in ("inf", "-inf", "nan")])
    assert [(r.reward, r.error) for r in results] == [
        (None, f"{AS_RETURNED}: ValueError: reward returned {value}") for value in ("inf", "-inf", "nan")
    ]
    assert router.out_of_range_counts()[AS_RETURNED] == before


def test_a_service_score_out_of_range_is_counted_and_inf_is_an_error():
    from morl.rewards.http_server import make_server

    server = make_server(lambda samples: [(float(s.response), None) for s in samples], port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cfg = RewardsConfig(
        num_workers=1,
        services={"svc": {"kind": "http", "url": f"http://127.0.0.1:{server.server_port}/score"}},
        routes={"svc": [{"fn": "svc"}]},
    )
    try:
        with RewardRouter(cfg) as router:
            results = router.score([sample("svc", t) for t in ("1.5", "0.25", "inf")])
            assert [(r.reward, r.error) for r in results[:2]] == [(1.0, None), (0.25, None)]
            assert results[2].reward is None and results[2].error == "svc: service: reward returned inf"
            assert router.out_of_range_counts() == {**dict.fromkeys(router.error_counts(), 0), "svc": 1}
            assert router.error_counts()["svc"] == 1
    finally:
        server.shutdown()
        server.server_close()


def test_counts_survive_a_checkpoint_round_trip(router):
    router.score([sample("returned", "-2"), sample("boom", r"\boxed{1}", {"count": 1})])
    state = router.state_dict()
    cfg = RewardsConfig(modules=[FX], num_workers=1, routes=router.cfg.routes)
    with RewardRouter(cfg) as resumed:
        resumed.load_state_dict(state)
        assert resumed.out_of_range_counts() == router.out_of_range_counts()
        assert resumed.error_counts() == router.error_counts()
        resumed.score([sample("returned", "3")])
        assert resumed.out_of_range_counts()[AS_RETURNED] == router.out_of_range_counts()[AS_RETURNED] + 1
        old = {key: value for key, value in state.items() if key != "out_of_range"}  # a checkpoint from before
        resumed.load_state_dict(old)
        assert set(resumed.out_of_range_counts().values()) == {0}
        assert resumed.error_counts() == router.error_counts()


def test_malformed_answers_score_zero_without_error(router):
    garbage = ["", "}{][", r"\boxed{", "[" * 3000, '```json\n[{"bbox_2d": [7', "<think>\\boxed{1}</think>"]
    labels = {"math": {"answer": "1"}, "grounding": {"boxes": [[0, 0, 5, 5]]}, "point": {"boxes": [[0, 0, 5, 5]]},
              "counting": {"count": 1}, "temporal": {"segment": [1, 2]}, "choice": {"answer": "A"}}
    samples = [sample(task, text, label) for task, label in labels.items() for text in garbage]
    assert [(r.reward, r.error) for r in router.score(samples)] == [(0.0, None)] * len(samples)


def test_a_raising_reward_gives_none_and_is_counted(router):
    before = router.error_counts()["fixture_boom"]
    (result,) = router.score([sample("boom", r"\boxed{1}", {"count": 1})])
    assert result.reward is None
    assert result.error == "fixture_boom: RuntimeError: reward exploded"
    assert result.components == {"counting": 1.0, "fixture_boom": None}
    assert router.error_counts()["fixture_boom"] == before + 1
    assert router.error_counts()["counting"] == 0


def test_a_hung_reward_is_killed_and_the_pool_keeps_working(router):
    start = time.monotonic()
    results = router.score([sample("sleep", "zzz"), *counting_batch(40), sample("sleep", "zzz")])
    assert time.monotonic() - start < 10 * TIMEOUT_S
    for hung in (results[0], results[-1]):
        assert hung.reward is None and hung.error == f"{FX}:sleep_forever: TimeoutError after {TIMEOUT_S}s"
    assert_counting_ok(results[1:-1], 40)  # calls queued behind the hung one were re-run elsewhere
    assert_counting_ok(router.score(counting_batch(20)), 20)


def test_a_pathological_math_answer_scores_zero_without_error(router):
    hostile = [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{100000!}", "1" * 8000]  # once past the timeout, now refused
    results = router.score([*(sample("math", text, {"answer": "3"}) for text in hostile),
                            sample("math", r"\boxed{3}", {"answer": "3"})])
    assert [(r.reward, r.error) for r in results] == [(0.0, None)] * 3 + [(1.0, None)]


def test_a_crashing_worker_is_replaced(router):
    result, *rest = router.score([sample("die", "x"), *counting_batch(10)])
    assert result.reward is None and "worker died (exit code 3)" in result.error
    assert_counting_ok(rest, 10)


def test_adapters_end_to_end(router):
    results = router.score([
        sample("trl", "42", {"solution": "42"}), sample("trl", "41", {"solution": "42"}),
        sample("verl", "B", {"answer": "B"}), sample("verl", "C", {"answer": "B"}),
    ])
    assert [r.reward for r in results] == [1.0, 0.0, 1.0, 0.0]


def test_trl_and_verl_rewards_score_in_the_sandbox_what_they_score_in_their_frameworks(router):
    dapo = f"{FW}:verl_math_dapo"
    before = router.out_of_range_counts()
    results = router.score([
        # TRL: the whole completion, as a message: the boxed answer in the thinking counts, the format scores 1
        sample("trl_math", r"<think>it is \boxed{42}</think> done", {"solution": "42"}),
        sample("trl_async", r"<think>\boxed{42}</think>", {"solution": "42"}),  # async def: awaited in the worker
        sample("trl_overlong", "x", token_ids=tuple(range(8))),  # 8 of 10 tokens: -0.5, clamped and counted
        # verl's math_dapo: -1 for the answer corrected after </think> on the thinking's line, clamped and counted
        sample("dapo", "<think>Answer: 41</think>Answer: 42", {"ground_truth": "42"}),
        sample("dapo", "<think>Answer: 41</think>\nAnswer: 42", {"ground_truth": "42"}),
        sample("verl_async", "<think>so #### 42</think>The answer is 42.", {"ground_truth": "42"}),
        sample("morl_async", "x"),
    ])
    assert [(r.reward, r.error) for r in results] == [
        (1.0, None), (1.0, None), (0.0, None), (0.0, None), (1.0, None), (1.0, None), (0.5, None)
    ]
    assert results[0].components == {f"{FW}:trl_accuracy": 1.0, f"{FW}:trl_think_format": 1.0}
    after = router.out_of_range_counts()
    assert after[f"{FW}:soft_overlong"] == before[f"{FW}:soft_overlong"] + 1 and after[dapo] == before[dapo] + 1


def test_the_trl_adapter_passes_images_and_videos_as_columns(router):
    media = {"images": ("/d/a.png",), "videos": ("/d/v.mp4", ("/d/f0.png", "/d/f1.png"))}
    expected = ["/d/a.png", "/d/v.mp4", ["/d/f0.png", "/d/f1.png"]]  # a video's frames: a list, as in a dataset
    results = router.score([
        sample("trl_media", "x", {"media": expected}, **media),
        sample("trl_media", "x", {"media": expected[:2]}, **media),
    ])
    assert [(r.reward, r.error) for r in results] == [(1.0, None), (0.0, None)]


def test_long_responses_larger_than_a_pipe_buffer(router):
    thinking = "<think>" + "let me think. " * 20_000 + "</think>"  # ~280 kB per sample, far past a pipe's buffer
    samples = [sample("counting", thinking + rf"\boxed{{{i % 5}}}", {"count": i % 3}) for i in range(40)]
    assert_counting_ok(router.score(samples), 40)


def test_submit_returns_futures_as_responses_finish(router):
    futures = [router.submit(s) for s in counting_batch(12)]
    assert_counting_ok([f.result(timeout=30) for f in futures], 12)


def test_unknown_task_names_the_task_and_the_routes(router):
    with pytest.raises(UnknownTaskError, match=r"no reward route for task 'ocr' \(routed tasks: boom, .*\)"):
        router.score([*counting_batch(2), sample("ocr", "x")])
    with pytest.raises(UnknownTaskError):
        router.submit(sample("ocr", "x"))


def test_error_rate_over_the_window_stops_the_run():
    cfg = RewardsConfig(
        modules=[FX], num_workers=1, max_error_rate=0.25, error_window=8,
        routes={"boom": [{"fn": "fixture_boom"}], "ok": [{"fn": "fixture_half"}]},
    )
    with RewardRouter(cfg) as router:
        router.score([sample("boom", "x")] * 2 + [sample("ok", "x")] * 5)
        router.check_error_rate()  # 2 failures allowed in a window of 8
        router.score([sample("boom", "x")])
        with pytest.raises(RewardErrorRateExceeded, match=r"3 of the last 8 .*fixture_boom"):
            router.check_error_rate()
        router.score([sample("ok", "x")] * 8)  # the failures leave the window
        router.check_error_rate()


def test_closed_router_refuses_work():
    with RewardRouter(RewardsConfig(num_workers=1)) as router:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        router.score(counting_batch(1))


def test_reward_errors_are_logged_once_per_distinct_error_with_their_count(router, caplog):
    router.log_errors("earlier tests")  # what the module's earlier tests left unlogged
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="morl.rewards.router"):
        router.score([sample("boom", r"\boxed{1}", {}) for _ in range(8)]  # counting reads label["count"]
                     + [sample("boom", r"\boxed{1}", {"count": 1}) for _ in range(4)])
        assert caplog.records == []  # nothing per sample
        router.log_errors("step 3")
        router.log_errors("step 4")  # nothing new: nothing logged
    assert [r.getMessage() for r in caplog.records] == [
        "step 3: reward failed on 8 samples: counting: KeyError: 'count'; fixture_boom: RuntimeError: reward exploded",
        "step 3: reward failed on 4 samples: fixture_boom: RuntimeError: reward exploded",
    ]


def test_many_distinct_reward_errors_are_summed_past_the_first_few(router, caplog):
    router.log_errors("earlier tests")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="morl.rewards.router"):
        router.score([sample("counting", "1", {"count": f"x{i}"}) for i in range(8)])  # 8 different ValueErrors
        router.log_errors("step 5")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6
    assert all(line.startswith("step 5: reward failed on 1 sample: counting: ValueError") for line in lines[:5])
    assert lines[5] == "step 5: 3 more distinct reward errors on 3 samples"
