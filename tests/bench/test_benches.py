"""The benches run on the tiny world and report coherent numbers (their speed is measured by running them, not here)."""

import re

import pytest

from helpers import REPO, TINY_WORLD, morl

pytestmark = pytest.mark.slow

SMALL = ["trainer.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=12"]


def bench(kind: str, toy_world, *args: str) -> str:
    done = morl("bench", kind, str(REPO / "recipes" / "quickstart.yaml"), f"toy_world.root={toy_world}",
                *(f"toy_world.{key}={value}" for key, value in TINY_WORLD.items()), *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def report(stdout: str) -> dict[str, str]:
    return {key: value.strip() for key, _, value in (line.partition(" ") for line in stdout.splitlines())}


def test_rollout_bench_compares_the_framework_with_the_bare_engine_and_the_modes_on_the_same_batches(toy_world):
    out = bench("rollout", toy_world, *SMALL, "--steps", "2", "--rounds", "1")
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    framework, bare = (float(re.search(rf"^{name} +([\d.]+) tokens/s$", out, re.M)[1]) for name in ("framework", "bare"))
    assert framework > 0 and bare > 0
    ratio = float(re.search(r"^framework / bare: ([\d.]+)$", out, re.M)[1])
    assert ratio == pytest.approx(framework / bare, rel=1e-2)
    for mode in ("seamless", "synchronous", "partial"):
        seconds, waste, idle = lines[mode][1:4]
        assert float(seconds) > 0 and 0 <= float(waste.rstrip("%")) <= 100 and 0 <= float(idle.rstrip("%")) <= 100
    assert "same batches in both modes: yes" in out
    assert re.search(r"^speedup \(synchronous / partial time\): [\d.]+x", out, re.M)


def table(stdout: str) -> dict[str, list[str]]:
    """`morl bench learner`'s rows: a key, then one value, or one per answer length."""
    return {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line.strip()}


def numbers(row: list[str]) -> list[float | None]:
    return [None if value == "-" else float(value) for value in row]


def test_learner_bench_sweeps_answer_lengths_against_the_bare_loop_with_memory_and_padding(toy_world):
    rows = table(bench("learner", toy_world, *SMALL, "--sequences", "2", "--prompt-tokens", "16",
                       "--response-tokens", "32,16", "--steps", "2"))
    assert rows["device"] == ["cpu"] and rows["ranks"] == ["1"] and rows["shape"] == ["recipe"]
    assert rows["response_tokens"] == ["16", "32"]  # ascending, one column each
    assert numbers(rows["tokens_per_step"]) == [2 * (16 + 16), 2 * (16 + 32)]
    for tokens, seconds, rate in zip(*(numbers(rows[key]) for key in ("tokens_per_step", "seconds_per_step",
                                                                       "tokens_per_s"))):
        assert rate == pytest.approx(tokens / seconds, rel=1e-2)
    assert float(rows["matmul_tflops"][0]) > 0 and all(0 <= m <= 1 for m in numbers(rows["mfu_vs_matmul"]))
    # memory of the one rank: the peak of the timed updates over what it held before them, against the model
    for before, peak, beyond in zip(*(numbers(rows[f"rank0_{key}_mib"]) for key in ("before", "peak", "beyond_weights"))):
        assert peak >= before > 0 and beyond == pytest.approx(peak - before, abs=0.2)
    assert all(m > 0 for m in numbers(rows["modelled_beyond_weights_mib"]))
    assert all(r > 0 for r in numbers(rows["beyond_over_modelled"]))
    # the bare loop fits at these lengths: it ran on the same batches, and the ratio is its time over the framework's
    bare, framework = numbers(rows["bare_seconds_per_step"]), numbers(rows["seconds_per_step"])
    assert all(b > 0 for b in bare) and rows["bare_skipped_need_mib"] == ["-", "-"]
    assert numbers(rows["framework_over_bare"]) == pytest.approx([b / f for b, f in zip(bare, framework)], rel=2e-2)
    assert all(peak >= before > 0 for before, peak in zip(numbers(rows["bare_before_mib"]), numbers(rows["bare_peak_mib"])))
    # one rollout batch of the recipe: 4 groups x 4; before packing padded to the longest, now none and one rank
    # needs no fillers
    assert rows["padding_sequences"] == ["16"] and int(rows["padding_tokens"][0]) > 16
    assert 0 < float(rows["padded_share_before"][0]) < 1
    assert float(rows["padded_share_after"][0]) == 0 and rows["filler_tokens_after"] == ["0"]


def test_a_real_vocabulary_shape_is_built_locally_and_its_memory_beyond_the_weights_stays_near_the_model(toy_world, tmp_path):
    """MiMo-VL-7B's vocabulary (151,936) and heads on two narrow layers, random weights, cached by shape: the update's
    memory beyond the weights is about one lm_head chunk and the activations, not [answer, vocabulary] logits."""
    args = ("--shape", "real-vocab-narrow", "--shape-cache", str(tmp_path), "--sequences", "1", "--prompt-tokens", "64",
            "--response-tokens", "512", "--steps", "1", "--no-bare", "--padding-batches", "0",
            "learner.gradient_checkpointing=true")
    rows = table(bench("learner", toy_world, *args))
    assert rows["vocab"] == ["151936"] and rows["heads"] == ["2/1"] and rows["hidden"] == ["256"]
    assert "bare_seconds_per_step" not in rows and "padded_share_before" not in rows
    assert 0.5 < float(rows["beyond_over_modelled"][0]) < 1.5
    (built,) = tmp_path.iterdir()
    assert built.name.startswith("real-vocab-narrow-") and (built / "model.safetensors").is_file()


def test_the_learner_bench_refuses_an_unknown_shape_and_answer_lengths_that_are_not_positive_integers():
    for option, value in (("--shape", "huge"), ("--response-tokens", "512,x"), ("--response-tokens", "0")):
        done = morl("bench", "learner", str(REPO / "recipes" / "quickstart.yaml"), option, value)
        assert done.returncode == 2 and option in done.stderr


LORA_ON_Q_AND_V = ["learner.lora.rank=4", "learner.lr=1e-2", "learner.lora.target_modules=[q_proj, v_proj]"]


@pytest.mark.parametrize("lora", [[], LORA_ON_Q_AND_V], ids=["full", "lora"])
def test_a_skipped_sync_into_vllm_is_stopped_by_the_mismatch_guard(toy_world, lora):
    """`morl bench sync` with vLLM workers: real updates, a gap at numerics level after each sync, and a sync
    skipped on purpose that `learner.max_logprob_mismatch` stops. With LoRA on q_proj and v_proj only, vLLM's fused
    qkv weight still gets k_proj (else it would hold uninitialised memory: a gap of about 1.4 per token)."""
    numbers = report(bench("sync", toy_world, "rollout.engine=vllm", *SMALL, "learner.max_logprob_mismatch=1e-4",
                           "learner.lr=1e-3", *lora, "--rounds", "1"))
    assert float(numbers["mismatch_after_sync_max"]) < 1e-5
    assert float(numbers["mismatch_stale"]) > 1e-4
    assert numbers["stale_run_stopped"] == "True"
    assert 0 < float(numbers["gb"]) < float(numbers["whole_model_gb"])  # what training changed, not the frozen ViT
    assert numbers["lora"] == str(bool(lora))


def test_a_broadcast_sync_reaches_every_worker(toy_world):
    """`morl bench sync` over the weight broadcast group (gloo on CPU) to two HF workers: each sync leaves both at
    the learner's weights (the gap at numerics level), a skipped one is stopped, and the bare broadcast is timed."""
    numbers = report(bench("sync", toy_world, *SMALL, "rollout.num_workers=2", "rollout.weight_transport=broadcast",
                           "learner.max_logprob_mismatch=1e-4", "learner.lr=1e-3", "--rounds", "1"))
    assert numbers["transport"] == "broadcast" and numbers["workers"] == "2"
    assert float(numbers["mismatch_after_sync_max"]) < 1e-5
    assert float(numbers["mismatch_stale"]) > 1e-4 and numbers["stale_run_stopped"] == "True"
    assert float(numbers["bare_seconds_per_gb"]) > 0 and float(numbers["sync_over_bare"]) > 0


def test_the_long_tail_workload_reports_each_engines_occupancy_and_the_tail(toy_world):
    out = bench("rollout", toy_world, "rollout.engine=vllm", "--workload", "long-tail", "--median-tokens", "2",
                "--max-tokens", "6", "--steps", "1", "--rounds", "1")
    assert re.search(r"^long-tail answer lengths: median 2, .* longest 6 tokens", out, re.M)
    assert "64 prompts x 16 samples" in out and "1 batches of 64 groups x 16" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    for mode in ("seamless", "synchronous"):
        occupancy, before_tail, full_until = (float(v.rstrip("%")) for v in lines[mode][4:7])
        assert 0 < occupancy <= 100 and 0 < before_tail <= 100 and 0 < full_until <= 100
    assert "same batches in both modes: yes" in out


def test_occupancy_is_the_time_weighted_share_of_the_engine_in_use_and_the_tail_is_where_it_stops_being_full():
    from morl.bench.rollout import occupancy

    # a window of 10 s: 4 s full (8 of 8), 2 s idle, 2 s at half (4 of 8), 2 s idle
    timeline = [(100.0, 104.0, 8, 8), (106.0, 108.0, 4, 0)]
    o = occupancy(timeline, start=100.0, end=110.0, capacity=8)
    assert o["mean"] == pytest.approx((4 * 1.0 + 2 * 0.5) / 10)
    assert o["full_until"] == pytest.approx(0.4)  # last full step ended 4 s into the window
    assert o["mean_before_tail"] == pytest.approx(1.0)
    # steps outside the window do not count; more in flight than max_num_seqs counts as full, not more
    o = occupancy([(90.0, 95.0, 8, 8), (100.0, 105.0, 16, 8)], start=100.0, end=110.0, capacity=8)
    assert o["mean"] == pytest.approx(0.5) and o["full_until"] == pytest.approx(0.5)
