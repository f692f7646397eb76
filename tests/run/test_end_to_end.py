"""Two real MORL steps through the CLI, Ray actors and DeepSpeed on CPU, on a tiny toy world."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from morl.run.model_check import checkpoint_identity

from helpers import OVERRIDES, REPO, TINY_WORLD, VIDEO_WORLD_TASKS, morl, morl_train

pytestmark = pytest.mark.slow
TWO_WORKERS = ["rollout.num_workers=2"]  # the quickstart's: prompts dispatched over several rollout actors


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toy_world):
    root = tmp_path_factory.mktemp("e2e")
    (root / "world").symlink_to(toy_world)
    first = morl_train(root / "world", root / "run1", *TWO_WORKERS)
    morl_train(root / "world", root / "run2", *TWO_WORKERS)
    return root, first


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_contents(runs):
    root, first = runs
    run = root / "run1"
    assert (run / "config.yaml").is_file()
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        for key in ("reward/mean", "loss", "grad_norm", "logprob_mismatch", "time/rollout", "time/update",
                    "advantage/std", "response_length/mean"):
            assert key in m, key
        assert 0.0 <= m["reward/mean"] <= 1.0
        # same weights and numerics on both sides of the sync
        assert m["logprob_mismatch"] < 1e-3
    tasks = {k.split("/")[1] for k in metrics[0] if k.startswith("pass_rate/")}
    assert tasks <= {"counting", "grounding", "math", "choice"} and tasks
    assert sum(v for k, v in metrics[0].items() if k.startswith("prompts/")) == 4


def test_final_policy_loads_and_differs_from_sft(runs):
    root, _ = runs
    learned = [m for m in read_metrics(root / "run1") if m["advantage/abs_mean"] > 0]
    assert learned, "no group had reward variance: the toy world gave the update nothing to learn from"
    final = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "run1" / "final")
    sft = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "world" / "sft")
    AutoProcessor.from_pretrained(root / "run1" / "final")
    changed = [
        name for (name, a), (_, b) in zip(final.named_parameters(), sft.named_parameters()) if not torch.equal(a, b)
    ]
    assert changed, "two updates left every weight unchanged"


def test_eval_json(runs):
    root, first = runs
    results = json.loads((root / "run1" / "eval.json").read_text())
    assert set(results) == {"sft", "policy", "response_length", "prompts", "sft_checkpoint"}
    assert results["sft_checkpoint"] == checkpoint_identity(str(root / "world" / "sft"))  # what `morl compare` matches
    assert results["prompts"]["count"] == 16  # 4 held-out prompts per task
    for scores in (results["sft"], results["policy"]):
        assert {"counting", "grounding", "math", "choice", "mean"} <= set(scores)
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    # mean greedy response length in tokens, per task (max_new_tokens=12)
    assert set(results["response_length"]) == {"sft", "policy"}
    for lengths in results["response_length"].values():
        assert set(lengths) == set(results["sft"])
        assert all(1.0 <= v <= 12.0 for v in lengths.values())
    assert "held-out reward" in first.stdout


def test_morl_eval_of_final_reproduces_the_runs_eval_json(runs, tmp_path):
    """`morl eval RUN/final --recipe R`: the recipe's SFT model and the final policy, decoded and scored as the run
    did at its start and end; `morl compare` reads its output beside the run's."""
    root, _ = runs
    recipe = ["--recipe", str(REPO / "recipes" / "quickstart.yaml"), f"toy_world.root={root / 'world'}", *OVERRIDES]
    out = tmp_path / "final_eval.json"
    done = morl("eval", str(root / "run1" / "final"), *recipe, "-o", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads(out.read_text()) == json.loads((root / "run1" / "eval.json").read_text())
    assert "held-out reward" in done.stdout and "delta" in done.stdout

    # a checkpoint directory means its policy, evaluated against the SFT result of the run's eval.json
    reused = tmp_path / "step2_eval.json"
    checkpoint = root / "run1" / "checkpoints" / "step_000002"
    done = morl("eval", str(checkpoint), *recipe, "--sft-from", str(root / "run1" / "eval.json"), "-o", str(reused))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads(reused.read_text()) == json.loads(out.read_text())  # step 2 is the last: final/ is its policy

    compared = morl("compare", str(root / "run1"), str(out))
    assert compared.returncode == 0, compared.stderr
    assert str(out) in compared.stdout

    again = morl("eval", str(root / "run1" / "final"), *recipe, "-o", str(out))
    assert again.returncode == 2 and "final_eval.json: already exists" in again.stderr
    nowhere = morl("eval", str(tmp_path / "nowhere"), *recipe)
    assert nowhere.returncode == 2 and "MODEL_DIR" in nowhere.stderr and "nowhere: no such directory" in nowhere.stderr


def test_final_and_checkpoint_policies_carry_a_model_card(runs):
    root, _ = runs
    results = json.loads((root / "run1" / "eval.json").read_text())
    final_card = (root / "run1" / "final" / "README.md").read_text()
    assert f"| base model (SFT) | `{root / 'world' / 'sft'}` |" in final_card
    assert "| steps trained | 2 |" in final_card and "| algorithm | morl |" in final_card
    sft, policy = results["sft"]["counting"], results["policy"]["counting"]
    assert f"| counting | {sft:.3f} | {policy:.3f} | {policy - sft:+.3f} |" in final_card
    assert (root / "run1" / "final" / "morl_config.yaml").read_text() == (root / "run1" / "config.yaml").read_text()

    checkpoint_card = (root / "run1" / "checkpoints" / "step_000002" / "policy" / "README.md").read_text()
    assert "| steps trained | 2 |" in checkpoint_card
    assert f"| counting | {sft:.3f} |" in checkpoint_card and "was not evaluated during the run" in checkpoint_card


def test_morl_plot_of_two_runs(runs, tmp_path):
    root, _ = runs
    done = morl("plot", str(root / "run1"), str(root / "run2"), "-o", str(tmp_path / "plots"))
    assert done.returncode == 0, done.stderr[-3000:]
    written = {p.name for p in (tmp_path / "plots").iterdir()}
    # the quickstart trains on one data file per task: four files, so the per-file panel is drawn too
    assert written == {"reward.png", "pass_rate.png", "response_length.png", "entropy.png", "advantages.png",
                       "sample_waste.png", "step_time.png", "eval.png", "data_files.png"}


def test_grpo_ablation_runs_and_compares(runs):
    # the same world trained one step with vanilla GRPO (2 mini-batches, KL to the frozen SFT model), then
    # `morl compare` puts its held-out results beside the MORL run's
    root, _ = runs
    morl_train(root / "world", root / "grpo", "algo.name=grpo", "algo.mini_batches=2", "algo.kl_coef=0.05",
               "trainer.max_steps=1")
    (metrics,) = read_metrics(root / "grpo")
    assert metrics["optimizer_steps"] == 2
    assert metrics["kl"] >= 0.0 and 0.0 <= metrics["clip_fraction"] <= 1.0
    assert read_metrics(root / "run1")[0]["optimizer_steps"] == 1
    done = subprocess.run([sys.executable, "-m", "morl.cli", "compare", str(root / "run1"), str(root / "grpo")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"})
    assert done.returncode == 0, done.stderr
    assert "held-out reward" in done.stdout and "response length" in done.stdout
    grpo = json.loads((root / "grpo" / "eval.json").read_text())
    assert f"{grpo['policy']['mean']:.3f} ({grpo['policy']['mean'] - grpo['sft']['mean']:+.3f})" in done.stdout


def test_two_learner_ranks_log_the_one_rank_run(runs):
    # the same run with its learner split over 2 ZeRO-3 ranks (gloo): the same update each step, weights gathered
    # from both ranks' shards for the rollout workers, and so the same rollouts and rewards
    root, _ = runs
    morl_train(root / "world", root / "two_ranks", *TWO_WORKERS, "learner.num_ranks=2", "learner.zero_stage=3",
               "eval.enabled=false")
    one, two = read_metrics(root / "run1"), read_metrics(root / "two_ranks")
    assert [m["step"] for m in two] == [1, 2]
    for a, b in zip(one, two):
        assert b["reward/mean"] == a["reward/mean"] and b["train_tokens"] == a["train_tokens"]
        for key in ("loss", "grad_norm", "logprob_mismatch"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert (root / "two_ranks" / "final" / "config.json").is_file()


def test_same_seed_same_metrics(runs):
    root, _ = runs
    keys = lambda m: {k: v for k, v in m.items() if k.startswith(("reward/", "loss", "grad_norm", "advantage/"))}
    assert [keys(m) for m in read_metrics(root / "run1")] == [keys(m) for m in read_metrics(root / "run2")]


@pytest.fixture(scope="module")
def video_world(tmp_path_factory):
    from morl.toy.config import ToyWorldConfig
    from morl.toy.world import ensure_toy_world

    root = tmp_path_factory.mktemp("video") / "world"
    ensure_toy_world(ToyWorldConfig(root=str(root), tasks=VIDEO_WORLD_TASKS, **TINY_WORLD))
    return root


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_two_steps_on_images_and_videos(tmp_path, video_world, engine):
    """quickstart_video's mix (four image tasks, temporal grounding, video counting): videos sampled, scored by
    the temporal reward, learnt from and evaluated, with rollout and learner log-probs equal to numerics. Under
    vLLM (its CPU build) two engines in the Ray rollout actors: each step's weights synced into both."""
    done = morl_train(
        video_world,
        tmp_path / "run",
        f"rollout.engine={engine}",
        *(TWO_WORKERS if engine == "vllm" else []),
        "trainer.prompts_per_step=6",
        "rewards.routes.temporal=[{fn: temporal}]",
        "rewards.routes.video_counting=[{fn: fixture_length}]",
        recipe="quickstart_video.yaml",
    )
    steps = read_metrics(tmp_path / "run")
    assert [m["step"] for m in steps] == [1, 2]
    # step 2 trains on samples drawn after step 1's sync: under vLLM its gap says both engines sampled the new weights
    assert all(m["logprob_mismatch"] < (1e-5 if engine == "vllm" else 1e-3) for m in steps)
    assert all(m["weight_sync/buckets"] >= 1 and m["loss"] == m["loss"] for m in steps)
    seen = {k.split("/")[1] for m in steps for k in m if k.startswith("prompts/")}
    assert {"temporal", "video_counting"} & seen, seen
    held_out = json.loads((tmp_path / "run" / "eval.json").read_text())["policy"]
    assert held_out.keys() >= {"temporal", "video_counting", "counting"} and 0 <= held_out["temporal"] <= 1
    assert "Traceback" not in done.stderr
