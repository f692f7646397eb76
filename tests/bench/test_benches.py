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
    for mode in ("seamless", "synchronous"):
        seconds, waste, idle = lines[mode][1:4]
        assert float(seconds) > 0 and 0 <= float(waste.rstrip("%")) <= 100 and 0 <= float(idle.rstrip("%")) <= 100
    assert "same batches in both modes: yes" in out


def test_learner_bench_reports_throughput_and_mfu_against_a_measured_matmul(toy_world):
    numbers = report(bench("learner", toy_world, "--sequences", "2", "--prompt-tokens", "16",
                           "--response-tokens", "16", "--steps", "1"))
    assert numbers["device"] == "cpu" and numbers["ranks"] == "1"
    assert int(numbers["tokens_per_step"]) == 2 * (16 + 16)
    assert float(numbers["tokens_per_s"]) == pytest.approx(
        int(numbers["tokens_per_step"]) / float(numbers["seconds_per_step"]), rel=1e-2)
    assert float(numbers["matmul_tflops"]) > 0 and 0 <= float(numbers["mfu_vs_matmul"]) <= 1


def test_a_skipped_sync_into_vllm_is_stopped_by_the_mismatch_guard(toy_world):
    """`morl bench sync` with vLLM workers: real updates, a gap at numerics level after each sync, and a sync
    skipped on purpose that `learner.max_logprob_mismatch` stops."""
    numbers = report(bench("sync", toy_world, "rollout.engine=vllm", *SMALL, "learner.max_logprob_mismatch=1e-4",
                           "learner.lr=1e-3", "--rounds", "1"))
    assert float(numbers["mismatch_after_sync_max"]) < 1e-5
    assert float(numbers["mismatch_stale"]) > 1e-4
    assert numbers["stale_run_stopped"] == "True"


def test_a_broadcast_sync_reaches_every_worker(toy_world):
    """`morl bench sync` over the weight broadcast group (gloo on CPU) to two HF workers: each sync leaves both at
    the learner's weights (the gap at numerics level), a skipped one is stopped, and the bare broadcast is timed."""
    numbers = report(bench("sync", toy_world, *SMALL, "rollout.num_workers=2", "rollout.weight_transport=broadcast",
                           "learner.max_logprob_mismatch=1e-4", "learner.lr=1e-3", "--rounds", "1"))
    assert numbers["transport"] == "broadcast" and numbers["workers"] == "2"
    assert float(numbers["mismatch_after_sync_max"]) < 1e-5
    assert float(numbers["mismatch_stale"]) > 1e-4 and numbers["stale_run_stopped"] == "True"
    assert float(numbers["bare_seconds_per_gb"]) > 0 and float(numbers["sync_over_bare"]) > 0
