"""Two DeepSpeed ranks (Ray actors, gloo on CPU) take the one-rank step: same weights, same metrics.

The batch has an odd number of sequences of different lengths, one of them text-only, so the ranks' shares
differ in size and the micro-batch plan needs fillers of both kinds (a rank with nothing left to run, and a
rank without an image where the other runs the vision tower). References are one-rank learners in-process.
"""

import errno
import math

import psutil
import pytest
import ray
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from morl.config import AlgoConfig, LearnerConfig, ModelConfig, RunConfig
from morl.data.encoding import PromptEncoder, vision_token_ids
from morl.data.loading import load_dataset
from morl.data.rows import Row
from morl.learner.group import LearnerGroup
from morl.learner.policy import NonFiniteLossError, PolicyLearner
from morl.learner.shares import rank_micro_batches, vision_kind
from morl.ray_setup import init_ray
from morl.run.weight_sync import plan_buckets
from morl.types import TrainBatch

from helpers import gathered_weights, is_loopback, listeners, small_tmpfs

pytestmark = pytest.mark.slow
LR = 1e-2
MICRO_BATCH = 1


@pytest.fixture(scope="module")
def batch(toy_world):
    processor = AutoProcessor.from_pretrained(toy_world / "sft")
    encode = PromptEncoder(processor, 4096)
    tasks = ("math", "choice", "counting", "grounding")
    prompts = [encode(load_dataset(toy_world / "data" / t / "train.jsonl", known_tasks=None).rows[0]) for t in tasks]
    text_only = Row(id="text-only", task="math", messages=[{"role": "user", "content": "What is 2 + 3?"}],
                    images=[], label={"answer": "5"})
    prompts.insert(2, encode(text_only))
    special = set(processor.tokenizer.added_tokens_decoder)
    plain = [i for i in range(100, 400) if i not in special]
    lengths = [3, 11, 90, 2, 8]  # the text-only answer longest: it lands in the short share, beside images
    responses = [plain[7 * k : 7 * k + n] for k, n in enumerate(lengths)]
    rollout_logprobs = [[-1.5] * n for n in lengths]  # far from the learner's: the mismatch metric is not ~0
    return TrainBatch(prompts, responses, rollout_logprobs, [1.0, -0.6, 0.4, -1.2, 0.3]), vision_token_ids(
        processor.tokenizer
    )


def config(toy_world, zero_stage: int, ranks: int, algo: AlgoConfig | None = None) -> RunConfig:
    learner = LearnerConfig(lr=LR, micro_batch_size=MICRO_BATCH, zero_stage=zero_stage, num_ranks=ranks)
    return RunConfig(model=ModelConfig(path=str(toy_world / "sft")), learner=learner, algo=algo or AlgoConfig())


def one_rank(cfg: RunConfig, banned) -> PolicyLearner:
    return PolicyLearner(cfg.model, cfg.learner, 1.0, banned, seed=0, threads=1, algo=cfg.algo)


def group_weights(group: LearnerGroup) -> dict[str, torch.Tensor]:
    """Every parameter, gathered bucket by bucket as the weight sync does."""
    plan = plan_buckets(group.weight_sizes("float32"), max_bytes=256 * 1024)
    return {name: t for b in plan for name, t in ray.get(group.weight_bucket(list(b.names), "float32")).tensors()}


def assert_same_update(weights, reference, start, share=1e-3):
    """The two steps differ by a small share of the step itself.

    Adam's first step moves each weight by about lr * sign(grad); where a gradient is ~0, summing it in another
    order (over ranks) may flip its sign, so whole updates are compared rather than single weights.
    """
    assert weights.keys() == reference.keys()
    assert all(weights[k].shape == reference[k].shape for k in reference)
    difference = math.sqrt(sum(((weights[k] - reference[k]) ** 2).sum().item() for k in reference))
    update = math.sqrt(sum(((reference[k] - start[k]) ** 2).sum().item() for k in reference))
    assert update > 0 and difference < share * update, (difference, update)


def assert_same_metrics(metrics, reference):
    assert metrics.keys() == reference.keys()
    for key, value in reference.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.fixture(scope="module")
def cluster(toy_world):
    init_ray(config(toy_world, 2, 2))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def start(toy_world):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft")
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def two_ranks(request, toy_world, batch, cluster, tmp_path_factory):
    """A 2-rank group through its life: weights, a step, an HF save, a checkpoint, its round trip; and a reference."""
    train_batch, banned = batch
    stage = request.param
    reference = one_rank(config(toy_world, stage, 1), banned)
    seen = {"reference_metrics": reference.train_step(train_batch), "reference": gathered_weights(reference)}
    out = tmp_path_factory.mktemp(f"zero{stage}")
    group = LearnerGroup(config(toy_world, stage, 2), banned)
    try:
        seen["before"] = group_weights(group)
        seen["listening"] = {(proc.name(), ip, port) for proc, sockets in listeners(psutil.Process()).items()
                             for ip, port in sockets if proc.name() == "ray::PolicyLearner"}
        seen["metrics"] = group.train_step(train_batch)
        seen["after"] = group_weights(group)
        group.save_hf(str(out / "final"))
        group.save_checkpoint(str(out / "ckpt"))
        seen["second"] = group.train_step(train_batch), group_weights(group)
        group.load_checkpoint(str(out / "ckpt"))
        seen["second_again"] = group.train_step(train_batch), group_weights(group)
        nan_first = [math.nan, *train_batch.advantages[1:]]  # on one rank only: both must stop, neither wait
        with pytest.raises(NonFiniteLossError, match="update was skipped"):
            group.train_step(TrainBatch(train_batch.prompts, train_batch.responses, train_batch.rollout_logprobs,
                                        nan_first))
        seen["after_nan"] = group_weights(group)
        # last: a rank that failed its save has left the others in the save's collectives (a run stops here)
        with small_tmpfs(out / "full_disk", size_kib=256) as disk, pytest.raises(OSError) as full:
            group.save_checkpoint(str(disk / "ckpt"))
        seen["disk_full"] = full.value
    finally:
        group.close()
    return out, seen


def test_the_batch_needs_both_kinds_of_filler(batch):
    train_batch, _ = batch
    tokens = [len(p.input_ids) + len(r) for p, r in zip(train_batch.prompts, train_batch.responses)]
    images = [vision_kind(p.pixel_values is not None, False) for p in train_batch.prompts]
    plans = [rank_micro_batches(range(5), tokens, images, ranks=2, rank=r, size=MICRO_BATCH) for r in (0, 1)]
    fillers = [m for plan in plans for m in plan if m.fillers]
    assert any(not m.rows for m in fillers), "no rank ran out of sequences: the test would not exercise padding"
    assert any(m.rows for m in fillers), "no text-only row met an image: the test would not exercise the vision filler"


def test_two_ranks_take_the_one_rank_step(two_ranks, start):
    _, seen = two_ranks
    assert_same_metrics(seen["metrics"], seen["reference_metrics"])
    assert seen["metrics"]["logprob_mismatch"] > 0.1  # a sum over both ranks' tokens, not ~0 by construction
    assert seen["metrics"]["train_tokens"] == 114 and seen["metrics"]["train_sequences"] == 5
    assert_same_update(seen["after"], seen["reference"], start)


def test_buckets_hold_full_tensors_gathered_from_every_rank(two_ranks, start):
    _, seen = two_ranks
    before = seen["before"]
    assert before.keys() == start.keys()
    assert all(torch.equal(before[k], start[k]) for k in start)  # full shapes and values, under ZeRO-3 too


def test_saved_policy_is_the_full_model(two_ranks):
    out, seen = two_ranks
    saved = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "final")
    assert all(torch.equal(p, seen["after"][n]) for n, p in saved.named_parameters())
    AutoProcessor.from_pretrained(out / "final")


def test_checkpoint_round_trip_on_two_ranks(two_ranks):
    out, seen = two_ranks
    (metrics, weights), (again, weights_again) = seen["second"], seen["second_again"]
    assert again == metrics
    assert all(torch.equal(weights_again[k], weights[k]) for k in weights)
    assert any(not torch.equal(weights[k], seen["after"][k]) for k in weights)  # the second step did move them
    assert len(list((out / "ckpt" / "deepspeed" / "state").glob("*optim_states.pt"))) == 2  # one shard per rank


def test_the_ranks_rendezvous_listens_on_loopback_only(two_ranks):
    _, seen = two_ranks
    assert seen["listening"]  # rank 0's torch.distributed store (and gloo's pairs) were found
    assert all(is_loopback(ip) for _, ip, _ in seen["listening"]), seen["listening"]


def test_a_full_disk_under_a_save_raises_the_ranks_os_error(two_ranks):
    _, seen = two_ranks
    error = seen["disk_full"]
    assert error.errno == errno.ENOSPC and not isinstance(error, ray.exceptions.RayTaskError)


def test_a_non_finite_loss_on_one_rank_stops_both_and_keeps_the_weights(two_ranks):
    _, seen = two_ranks
    _, weights = seen["second_again"]
    assert all(torch.equal(seen["after_nan"][k], weights[k]) for k in weights)


def test_grpo_on_two_zero3_ranks_takes_the_one_rank_steps(toy_world, batch, cluster, start):
    # 2 mini-batches x 2 epochs, KL to the frozen SFT model: old and reference log-probs on each rank's share
    train_batch, banned = batch
    algo = AlgoConfig(name="grpo", mini_batches=2, update_epochs=2, kl_coef=0.1)
    reference = one_rank(config(toy_world, 3, 1, algo), banned)
    expected = reference.train_step(train_batch)
    group = LearnerGroup(config(toy_world, 3, 2, algo), banned)
    try:
        metrics = group.train_step(train_batch)
        weights = group_weights(group)
    finally:
        group.close()
    assert metrics["optimizer_steps"] == 4 and expected["kl"] > 0 and expected["clip_fraction"] > 0
    assert_same_metrics(metrics, expected)
    assert_same_update(weights, gathered_weights(reference), start, share=1e-2)
