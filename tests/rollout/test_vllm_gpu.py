"""What only a GPU has: bf16 vLLM kernels, sleep mode, the CUDA IPC weight transport (marker `gpu`).

The engine's CPU-runnable behaviour (seeds, the placeholder ban, weight reload, abort) runs on every CI
commit in tests/rollout/test_vllm_engine.py with vLLM's CPU build. Skipped without CUDA. On the GPU machine,
.ci/gpu_check.sh runs them (docs/vllm.md#gpu-check):
    python -m pytest -q -m gpu tests/rollout/test_vllm_gpu.py
NOT RUN YET: no GPU machine was available when these were written.
"""

import multiprocessing as mp

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from transformers import (  # noqa: E402
    AutoConfig,
    AutoProcessor,
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

from morl.data.encoding import PromptEncoder  # noqa: E402
from morl.data.loading import load_dataset
from morl.data.rows import Row
from morl.learner.buckets import SharedBuckets, pack_bucket  # noqa: E402
from morl.rollout.types import SamplingParams  # noqa: E402
from morl.run.weight_sync import plan_buckets  # noqa: E402

from helpers import learner_logprob_gap  # noqa: E402

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def model_dir(toy_world, tmp_path_factory):
    """The toy world's tokenizer and processor, with a random Qwen2.5-VL whose head sizes vLLM's kernels take
    (text 2 heads of 128, vision 16 of 80) and a sharp lm_head, so that temperature visibly changes log-probs."""
    toy = AutoConfig.from_pretrained(toy_world / "sft")
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=toy.text_config.vocab_size,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [16, 24, 24]},
            tie_word_embeddings=False,
            bos_token_id=toy.text_config.bos_token_id,
            eos_token_id=toy.text_config.eos_token_id,
            pad_token_id=toy.text_config.pad_token_id,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=1280,
            intermediate_size=1024,
            num_heads=16,
            out_hidden_size=256,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[0],
        ),
        image_token_id=toy.image_token_id,
        video_token_id=toy.video_token_id,
        vision_start_token_id=toy.vision_start_token_id,
        vision_end_token_id=toy.vision_end_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.generation_config = GenerationConfig.from_pretrained(toy_world / "sft")
    out = tmp_path_factory.mktemp("vllm-model")
    model.to(torch.bfloat16).save_pretrained(out)
    AutoProcessor.from_pretrained(toy_world / "sft").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def engine(model_dir):
    from morl.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(
        str(model_dir),
        None,
        "bfloat16",
        max_prompt_tokens=1024,
        max_new_tokens=32,
        gpu_memory_utilization=0.3,
        max_images_per_prompt=2,
        enable_sleep_mode=True,
        seed=0,
    )


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()


@pytest.fixture(scope="module")
def prompts(toy_world, model_dir):
    processor = AutoProcessor.from_pretrained(model_dir)
    rows = load_dataset(toy_world / "data" / "counting" / "train.jsonl", known_tasks=None).rows[:3]
    pair = Row(
        id="pair",
        task="choice",
        label={"answer": "A"},
        images=[rows[0].images[0], rows[1].images[0]],
        messages=[
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which has more shapes?"}],
            }
        ],
    )
    encode = PromptEncoder(processor, 1024)
    return [encode(row) for row in [*rows, pair]], processor


def state_buckets(model, max_bytes=1 << 20):
    params = dict(model.named_parameters())
    plan = plan_buckets([(n, p.numel() * 2) for n, p in params.items()], max_bytes)
    return [pack_bucket([(n, params[n].detach()) for n in b.names], torch.bfloat16) for b in plan]


def test_groups_and_logprobs_match_the_learners(engine, hf_model, prompts):
    encoded, processor = prompts
    groups = engine.generate(
        encoded, SamplingParams(n=4, temperature=TEMPERATURE, max_new_tokens=16), seeds=[1, 2, 3, 4]
    )
    assert len(groups) == len(encoded) and all(len(g) == 4 for g in groups)  # the two-image prompt included
    flat = [c for g in groups for c in g]
    assert all(len(c.logprobs) == len(c.token_ids) > 0 and c.finish_reason in ("stop", "length") for c in flat)
    assert len({tuple(c.token_ids) for c in groups[0]}) > 1  # G different samples, not one repeated
    gap = learner_logprob_gap(hf_model, processor, engine, encoded, groups, TEMPERATURE)
    assert gap < 0.05, gap  # bf16 numerics; a temperature or ban mismatch is far larger


def test_sleep_level_2_then_reload_from_buckets(engine, hf_model, prompts):
    encoded, _ = prompts
    greedy = SamplingParams(n=1, max_new_tokens=12, greedy=True)
    before = engine.generate(encoded, greedy, seeds=[0] * len(encoded))
    engine.sleep(2)
    engine.wake_up(["weights"])
    buckets = state_buckets(hf_model)
    assert len(buckets) > 1
    for bucket in buckets:
        engine.load_weights(bucket.tensors())
    engine.wake_up(["kv_cache"])
    after = engine.generate(encoded, greedy, seeds=[0] * len(encoded))
    assert [g[0].token_ids for g in after] == [g[0].token_ids for g in before]


def _read_shared(bucket, out):
    torch.cuda.init()
    out.put([(n, t.float().sum().item()) for n, t in bucket.tensors()])


def test_cuda_ipc_bucket_reaches_another_process():
    named = [("a", torch.arange(6.0, device="cuda").view(2, 3)), ("b", torch.ones(4, device="cuda"))]
    bucket = pack_bucket(named, torch.bfloat16)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_read_shared, args=(SharedBuckets().share(bucket), out))
    child.start()
    result = out.get(timeout=120)
    child.join(timeout=60)
    assert result == [("a", 15.0), ("b", 4.0)]
