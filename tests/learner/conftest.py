"""The learner tests' shared batch: two toy prompts (math, choice), three HF samples each, hand-set advantages."""

import pytest
from transformers import AutoProcessor

from morl.data.encoding import PromptEncoder, vision_token_ids
from morl.data.loading import load_dataset
from morl.rollout.hf_engine import HFEngine
from morl.rollout.types import SamplingParams
from morl.types import TrainBatch


@pytest.fixture(scope="module")
def batch(toy_world):
    """(TrainBatch of 6 sequences sampled by the SFT model, the vision ids never sampled); a module that needs
    another batch defines its own `batch`."""
    processor = AutoProcessor.from_pretrained(toy_world / "sft")
    rows = [load_dataset(toy_world / "data" / t / "train.jsonl", known_tasks=None).rows[0] for t in ("math", "choice")]
    prompts = [PromptEncoder(processor, 4096)(row) for row in rows]
    groups = HFEngine(str(toy_world / "sft"), None, "float32").generate(
        prompts, SamplingParams(n=3, max_new_tokens=8), seeds=[0, 1]
    )
    advantages = [1.0, -0.5, -0.5, 0.8, 0.0, -0.8]
    flat = [c for g in groups for c in g]
    return TrainBatch(
        [p for p in prompts for _ in range(3)], [c.token_ids for c in flat], [c.logprobs for c in flat], advantages
    ), vision_token_ids(processor.tokenizer)
