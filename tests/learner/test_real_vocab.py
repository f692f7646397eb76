"""The learner at the real vocabulary: a 151,936-token lm_head and answers of thousands of tokens in bounded memory.

A Qwen2.5-VL of MiMo-VL-7B's vocabulary and head size (128), one narrow layer, built here (nothing downloaded), takes
real learner steps (DeepSpeed, gradient checkpointing) in a fresh process whose peak resident memory is read around
the measured step. Logits over every position, as the learner computed them before, would take about 2.3 GiB per
1,000 answer tokens at this vocabulary and grow with the answer; the chunked path holds one chunk.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from helpers import LEFT_BY_IN_PROCESS_TESTS

VOCAB = 151_936
HIDDEN = 128  # one head of MiMo-VL-7B's head size
CHUNK = 1024
GIB = 1024**3

STEP = """
import json, sys, torch
from pathlib import Path
from morl.config import LearnerConfig, ModelConfig
from morl.learner.policy import PolicyLearner
from morl.types import EncodedPrompt, TrainBatch

model_dir, answer_tokens, chunk, host_room = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = LearnerConfig(lr=1e-4, gradient_checkpointing=True, logprob_chunk_tokens=chunk)
learner = PolicyLearner(ModelConfig(path=model_dir), cfg, 1.0, [], seed=0, threads=2)
gen = torch.Generator().manual_seed(0)
prompt = EncodedPrompt("long", torch.randint(10, 400, (512,), generator=gen).tolist(), None, None)
answers = [torch.randint(10, 400, (answer_tokens,), generator=gen).tolist() for _ in range(2)]
batch = TrainBatch([prompt] * 2, answers, [[0.0] * answer_tokens] * 2, [1.0, -1.0], ["math"] * 2)

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

if host_room:  # the address space this process may still take: an allocation past it fails as on a full host
    import resource
    limit = status("VmSize") + host_room
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
learner.train_step(batch)  # the first step allocates Adam's moments: measure the second
Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident memory (VmHWM) to the current one
before = status("VmRSS")
metrics = learner.train_step(batch)
print(json.dumps({"before": before, "peak": status("VmHWM"), "entropy": metrics["entropy/math"],
                  "loss": metrics["loss"]}))
"""


@pytest.fixture(scope="module")
def real_vocab_model(toy_world, tmp_path_factory):
    """A Qwen2.5-VL with vocabulary 151,936, head dim 128, untied lm_head, one layer; the toy world's processor."""
    out = tmp_path_factory.mktemp("real_vocab")
    toy = Qwen2_5_VLConfig.from_pretrained(toy_world / "sft")
    text = dict(toy.text_config.to_dict(), layer_types=None, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=256,
                num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(toy.vision_config.to_dict(), out_hidden_size=HIDDEN)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                              **{k: getattr(toy, k) for k in ("image_token_id", "video_token_id",
                                                              "vision_start_token_id", "vision_end_token_id")})
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        shutil.copy(toy_world / "sft" / name, out / name)
    return out


def learner_step(model_dir, answer_tokens: int, chunk: int = CHUNK, host_room: int = 0):
    """One measured learner step in a fresh process (`host_room`: bytes of address space left to it, 0: no limit)."""
    args = [str(model_dir), str(answer_tokens), str(chunk), str(host_room)]
    # without the torch.distributed variables in-process learner tests leave: their port is taken
    env = {k: v for k, v in os.environ.items() if k not in LEFT_BY_IN_PROCESS_TESTS}
    return subprocess.run([sys.executable, "-c", STEP, *args], capture_output=True, text=True, timeout=600, env=env)


def step_memory(model_dir, answer_tokens: int) -> dict:
    result = learner_step(model_dir, answer_tokens)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_long_answer_at_the_real_vocabulary_costs_one_chunk_of_logits(real_vocab_model):
    short, long = step_memory(real_vocab_model, 1024), step_memory(real_vocab_model, 4096)
    chunk = CHUNK * VOCAB * 4  # one chunk's float32 logits
    for run in (short, long):
        assert run["loss"] == run["loss"] and 0 < run["entropy"] <= 12.0  # finite; at most log(151,936) nats
    # the step's memory beyond what the learner already held: the kept last chunk and one recomputed chunk with
    # their float32 copies, about six chunks in all, plus activations of a 128-wide layer; logits over 2 x 4,608
    # positions (the old path) alone would be 5.2 GiB per float32 copy
    beyond = long["peak"] - long["before"]
    assert beyond < 8 * chunk, f"{beyond / GIB:.2f} GiB beyond the weights and optimizer state"
    # four times the answer tokens (two sequences of 1,024 -> of 4,096): memory grows by activations, not logits
    grown = long["peak"] - long["before"] - (short["peak"] - short["before"])
    assert grown < chunk, f"{grown / GIB:.2f} GiB more for 6,144 more answer tokens"


@pytest.mark.slow
def test_a_micro_batch_that_does_not_fit_names_the_rank_its_size_and_the_keys_that_lower_it(real_vocab_model):
    # a chunk of 16,384 rows would hold 9.3 GiB of float32 logits; the process may take 2 GiB more than it holds
    # after start-up, room for the step's gradients and Adam's moments (0.5 GiB) but not for that chunk
    result = learner_step(real_vocab_model, 4096, chunk=16_384, host_room=2 * GIB)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "LearnerOutOfMemoryError:" in line]
    assert lines, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    line = lines[-1]
    assert "learner rank 0 ran out of host memory in a micro-batch of 9216 tokens (2 sequences, 8192 answer tokens)" in line
    for key in ("learner.max_tokens_per_micro_batch", "learner.logprob_chunk_tokens (now 16384)",
                "learner.offload_optimizer=true"):
        assert key in line
