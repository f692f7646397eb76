"""Weight sync: size-bounded buckets, one call per bucket, exact copies, and the stale-weights guard."""

import math

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from morl.config import LearnerConfig, ModelConfig
from morl.learner.buckets import pack_bucket
from morl.learner.policy import PolicyLearner, deepspeed_memory_config
from morl.rollout.hf_engine import HFEngine
from morl.rollout.worker import RolloutWorker
from morl.run.weight_sync import (
    Bucket,
    StaleWeightsError,
    check_logprob_mismatch,
    plan_buckets,
    sync_sizes,
    sync_weights,
    weight_unit,
)


def test_buckets_are_consecutive_and_bounded():
    sizes = [("a", 4), ("b", 4), ("c", 10), ("d", 3), ("e", 3), ("f", 3)]
    assert plan_buckets(sizes, max_bytes=8) == [
        Bucket(("a", "b"), 8),
        Bucket(("c",), 10),  # larger than a bucket: travels alone
        Bucket(("d", "e"), 6),
        Bucket(("f",), 3),
    ]
    assert plan_buckets(sizes, max_bytes=100) == [Bucket(("a", "b", "c", "d", "e", "f"), 27)]
    assert plan_buckets([], max_bytes=8) == []
    with pytest.raises(ValueError, match="positive"):
        plan_buckets(sizes, max_bytes=0)


def test_a_transformer_block_never_spans_two_buckets():
    """vLLM reloads layer by layer; q/k/v of one block fuse into one layer there, so a block travels whole."""
    sizes = [
        ("model.embed_tokens.weight", 4),
        ("model.layers.0.self_attn.q_proj.weight", 4),
        ("model.layers.0.self_attn.k_proj.weight", 4),
        ("model.layers.0.mlp.up_proj.weight", 4),
        ("model.layers.1.self_attn.q_proj.weight", 4),
        ("model.layers.10.self_attn.q_proj.weight", 4),
        ("model.visual.blocks.0.attn.qkv.weight", 4),
        ("model.visual.blocks.0.mlp.fc1.weight", 4),
        ("model.norm.weight", 4),
    ]
    assert [b.names for b in plan_buckets(sizes, max_bytes=8)] == [
        ("model.embed_tokens.weight",),
        ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
         "model.layers.0.mlp.up_proj.weight"),  # 12 bytes > 8: the block travels alone, whole
        ("model.layers.1.self_attn.q_proj.weight", "model.layers.10.self_attn.q_proj.weight"),
        ("model.visual.blocks.0.attn.qkv.weight", "model.visual.blocks.0.mlp.fc1.weight"),
        ("model.norm.weight",),
    ]
    assert weight_unit("model.layers.10.self_attn.q_proj.weight") == "model.layers.10"
    assert weight_unit("model.visual.merger.mlp.0.weight") == "model.visual.merger.mlp.0"


def test_every_parameter_once_in_order():
    gen = torch.Generator().manual_seed(0)
    sizes = [(f"p{i}", int(s)) for i, s in enumerate(torch.randint(1, 50, (200,), generator=gen))]
    plan = plan_buckets(sizes, max_bytes=120)
    assert [n for b in plan for n in b.names] == [n for n, _ in sizes]
    assert all(b.nbytes <= 120 for b in plan)
    assert sum(b.nbytes for b in plan) == sum(s for _, s in sizes)
    # greedy: a bucket closes only when the next parameter would not fit
    lookup = dict(sizes)
    for this, after in zip(plan, plan[1:]):
        assert this.nbytes + lookup[after.names[0]] > 120


def test_pack_round_trips_names_shapes_and_values():
    named = [("w", torch.randn(3, 4)), ("b", torch.randn(4)), ("e", torch.arange(6.0).view(1, 2, 3))]
    bucket = pack_bucket(named, torch.float32)
    assert bucket.flat.numel() == 12 + 4 + 6
    out = bucket.tensors()
    assert [n for n, _ in out] == ["w", "b", "e"]
    for (_, original), (_, view) in zip(named, out):
        assert view.shape == original.shape and torch.equal(view, original)
        assert view.untyped_storage().data_ptr() == bucket.flat.untyped_storage().data_ptr()  # views, no copies
    half = pack_bucket(named, torch.bfloat16).tensors()
    assert all(torch.equal(v, o.to(torch.bfloat16)) for (_, v), (_, o) in zip(half, named))
    with pytest.raises(ValueError, match="empty"):
        pack_bucket([], torch.float32)


def test_sync_loads_every_parameter_one_call_per_bucket(toy_world):
    source = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft")
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))  # the "learner" has moved away from the checkpoint
    engine = HFEngine(str(toy_world / "sft"), None, "float32")
    worker = RolloutWorker(lambda: engine, threads=1)
    params = dict(source.named_parameters())
    sizes = [(n, p.numel() * 4) for n, p in params.items()]
    plan = plan_buckets(sizes, max_bytes=256 * 1024)
    fetched, delivered = [], []

    def fetch(bucket):
        fetched.append(bucket.names)
        return pack_bucket([(n, params[n].detach()) for n in bucket.names], torch.float32)

    def deliver(packed):
        delivered.append([n for n, _ in packed.tensors()])
        worker.load_weights(packed)

    stats = sync_weights(plan, fetch, deliver)
    assert 1 < len(plan) < len(params)  # several buckets, far fewer than tensors
    assert len(fetched) == len(delivered) == len(plan) == stats.buckets
    assert [tuple(d) for d in delivered] == [b.names for b in plan]
    assert stats.nbytes == sum(s for _, s in sizes) and stats.gb_per_s > 0
    assert set(stats.as_metrics()) == {
        "weight_sync/seconds",
        "weight_sync/gb",
        "weight_sync/gb_per_s",
        "weight_sync/buckets",
    }
    loaded = dict(engine.model.named_parameters())
    assert all(torch.equal(loaded[n], p) for n, p in params.items())


def test_engine_refuses_an_unknown_parameter(toy_world):
    engine = HFEngine(str(toy_world / "sft"), None, "float32")
    with pytest.raises(KeyError, match="lm_head.extra"):
        engine.load_weights([("lm_head.extra", torch.zeros(1))])


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_learner_buckets_are_its_gathered_weights(toy_world, zero_stage):
    cfg = LearnerConfig(zero_stage=zero_stage, freeze_vision_tower=True)
    learner = PolicyLearner(ModelConfig(path=str(toy_world / "sft")), cfg, 1.0, [], seed=0, threads=1)
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft")
    expected = dict(reference.named_parameters())
    sizes = learner.weight_sizes("float32")
    assert sizes == [(n, p.numel() * 4) for n, p in expected.items()]  # full sizes, also from ZeRO-3 shards
    assert learner.weight_sizes("bfloat16") == [(n, s // 2) for n, s in sizes]
    trainable = [n for n, _ in learner.weight_sizes("float32", trainable_only=True)]
    assert trainable == [n for n in expected if not n.startswith("model.visual.")]
    for bucket in plan_buckets(sizes, max_bytes=1 << 20):
        packed = learner.weight_bucket(list(bucket.names), "float32")
        assert packed.flat.device.type == "cpu"
        assert all(torch.equal(t, expected[n]) for n, t in packed.tensors())


def test_offload_options_reach_deepspeed():
    assert deepspeed_memory_config(LearnerConfig(zero_stage=2)) == {"zero_optimization": {"stage": 2}}
    both = deepspeed_memory_config(LearnerConfig(zero_stage=3, offload_optimizer=True, offload_params=True))
    assert both["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert both["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert both["zero_force_ds_cpu_optimizer"] is False


def test_mismatch_guard_stops_on_stale_weights():
    check_logprob_mismatch(0.01, threshold=0.05, step=3)  # fresh weights: a numerical gap passes
    check_logprob_mismatch(0.05, threshold=0.05, step=3)
    check_logprob_mismatch(7.0, threshold=None, step=3)  # guard off
    with pytest.raises(StaleWeightsError) as info:
        check_logprob_mismatch(0.8, threshold=0.05, step=12)
    message = str(info.value)
    assert "step 12" in message and "0.8" in message and "learner.max_logprob_mismatch=0.05" in message
    with pytest.raises(StaleWeightsError, match="nan"):
        check_logprob_mismatch(math.nan, threshold=0.05, step=1)


def test_guard_catches_a_sync_that_never_happened(toy_world):
    """The mismatch of a batch sampled by an engine still on old weights, scored by the moved learner."""
    from transformers import AutoProcessor

    from morl.data.encoding import PromptEncoder
    from morl.data.loading import load_dataset
    from morl.learner.logprobs import response_logprobs
    from morl.rollout.types import SamplingParams

    processor = AutoProcessor.from_pretrained(toy_world / "sft")
    row = load_dataset(toy_world / "data" / "counting" / "train.jsonl", known_tasks=None).rows[0]
    prompt = PromptEncoder(processor, 4096)(row)
    engine = HFEngine(str(toy_world / "sft"), None, "float32")
    learner = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft")

    def mismatch() -> float:
        (group,) = engine.generate([prompt], SamplingParams(n=4, max_new_tokens=8), seeds=[1])
        with torch.no_grad():
            scores = response_logprobs(learner, [prompt] * 4, [c.token_ids for c in group], banned_ids=engine.banned_ids)
        logprobs, mask = scores.logprobs, scores.mask
        rollout = torch.zeros_like(logprobs)
        for i, c in enumerate(group):
            rollout[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
        return (((logprobs - rollout).abs() * mask).sum() / mask.sum()).item()

    check_logprob_mismatch(mismatch(), threshold=0.01, step=1)  # same weights
    with torch.no_grad():
        learner.lm_head.weight.mul_(3.0)  # the learner updated; the engine did not receive it
    with pytest.raises(StaleWeightsError):
        check_logprob_mismatch(mismatch(), threshold=0.01, step=2)
    tied = "model.language_model.embed_tokens.weight"  # the lm_head shares it (tie_word_embeddings)
    engine.load_weights([(tied, dict(learner.named_parameters())[tied].detach())])
    check_logprob_mismatch(mismatch(), threshold=0.01, step=3)


class _Sizes:
    """A learner's `weight_sizes` answer: every tensor, or those training changes."""

    def __init__(self, sizes: list[tuple[str, int]], trained: set[str]):
        self.sizes, self.trained = sizes, trained

    def weight_sizes(self, dtype: str, trainable_only: bool = False) -> list[tuple[str, int]]:
        return [(n, s) for n, s in self.sizes if n in self.trained or not trainable_only]


def test_a_sync_sends_each_changed_layer_whole_and_nothing_else():
    """LoRA on q_proj and v_proj of layer 0: k_proj, the norms and the biases of layer 0 travel too (vLLM fuses q, k
    and v into one weight), layer 1 and the embedding do not; an engine that dropped its weights gets everything."""
    layer = [f"model.language_model.layers.{{}}.{m}" for m in (
        "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "mlp.up_proj.weight", "input_layernorm.weight")]
    sizes = [("model.language_model.embed_tokens.weight", 100)] + [(n.format(k), 10) for k in (0, 1) for n in layer]
    learner = _Sizes(sizes, {layer[0].format(0), layer[3].format(0)})
    assert sync_sizes(learner, "float32", keeps_weights=True) == [(n.format(0), 10) for n in layer]
    assert sync_sizes(learner, "float32", keeps_weights=False) == sizes
