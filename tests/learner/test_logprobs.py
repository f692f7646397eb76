"""The learner's forward: packed sequences and chunked lm_head give what one full forward per sequence gives."""

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from morl.algo.core import entropy, sampling_log_softmax, token_logprobs
from morl.compat import PACKED_SDPA, attention_implementation, packed_attention, use_reference_video_positions
from morl.data.encoding import PromptEncoder, collate, vision_token_ids
from morl.data.loading import load_dataset
from morl.data.rows import Row
from morl.learner.logprobs import response_logprobs, response_loss
from morl.learner.packing import filler_sequence
from morl.learner.shares import IMAGES, VIDEOS

from helpers import toy_video_rows

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def world(toy_world, tmp_path_factory):
    """The SFT model, and prompts of every kind: text-only, one image, a video, an image and a video."""
    processor = AutoProcessor.from_pretrained(toy_world / "sft")
    model = use_reference_video_positions(Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft"))
    encode = PromptEncoder(processor, 4096)
    text = Row(id="text", task="math", messages=[{"role": "user", "content": "2 + 3?"}], images=[], label={})
    image = load_dataset(toy_world / "data" / "counting" / "train.jsonl", known_tasks=None).rows[0]
    videos = toy_video_rows(tmp_path_factory.mktemp("videos"), image)
    prompts = [encode(row).without_frames() for row in [text, image, videos[0], videos[2]]]
    assert prompts[0].image_grid_thw is None and prompts[0].video_grid_thw is None
    assert prompts[1].pixel_values is not None and prompts[2].pixel_values_videos is not None
    assert prompts[3].pixel_values is not None and prompts[3].pixel_values_videos is not None
    gen = torch.Generator().manual_seed(0)
    responses = [torch.randint(100, 300, (n,), generator=gen).tolist() for n in (7, 1, 12, 5)]
    return model.eval(), vision_token_ids(processor.tokenizer), prompts, responses


def reference(model, prompt, response, banned):
    """Today's path, one sequence at a time: the full logits of prompt + response, sliced at the answer."""
    batch = collate(
        [prompt.input_ids + response],
        [prompt],
        pad_id=0,
        image_token_id=model.config.image_token_id,
        video_token_id=model.config.video_token_id,
        left_pad=False,
    )
    logits = model(**batch.as_kwargs(), use_cache=False).logits[0, len(prompt.input_ids) - 1 : -1]
    log_probs = sampling_log_softmax(logits, TEMPERATURE, banned)
    return token_logprobs(logits, torch.tensor(response), TEMPERATURE, banned), entropy(log_probs)


@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
def test_packed_chunked_scores_equal_one_full_forward_per_sequence(world, chunk_tokens):
    model, banned, prompts, responses = world
    with torch.no_grad():
        scores = response_logprobs(
            model, prompts, responses, temperature=TEMPERATURE, banned_ids=banned, chunk_tokens=chunk_tokens
        )
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            logprobs, entropies = reference(model, prompt, response, banned)
            n = len(response)
            assert (scores.logprobs[row, :n] - logprobs).abs().max().item() < 1e-5
            assert (scores.entropy[row, :n] - entropies).abs().max().item() < 1e-5
            assert scores.mask[row].tolist() == [1.0] * n + [0.0] * (scores.mask.shape[1] - n)
            assert not scores.logprobs[row, n:].any()


def test_the_learners_sdpa_runs_each_packed_sequence_alone_as_the_block_mask_does(toy_world, world):
    model, banned, prompts, responses = world  # `model` runs plain sdpa: a dense block-diagonal mask
    packed = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft", attn_implementation=packed_attention("sdpa"))
    packed = use_reference_video_positions(packed).eval()
    assert attention_implementation(packed) == PACKED_SDPA
    with torch.no_grad():
        masked = response_logprobs(model, prompts, responses, banned_ids=banned)
        split = response_logprobs(packed, prompts, responses, banned_ids=banned)
    assert (split.logprobs - masked.logprobs).abs().max().item() < 1e-5
    assert (split.entropy - masked.entropy).abs().max().item() < 1e-5


def test_eager_attention_packs_with_an_additive_mask_as_sdpa_does(toy_world, world):
    model, banned, prompts, responses = world
    eager = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft", attn_implementation="eager")
    eager = use_reference_video_positions(eager).eval()
    with torch.no_grad():
        sdpa_scores = response_logprobs(model, prompts, responses, banned_ids=banned)
        eager_scores = response_logprobs(eager, prompts, responses, banned_ids=banned)
    assert (eager_scores.logprobs - sdpa_scores.logprobs).abs().max().item() < 1e-5


@dataclass
class WeightedLogprobs:
    """The loss sum_t w_t log pi_t, one weight per answer token."""

    weights: torch.Tensor

    @property
    def tokens(self) -> int:
        return len(self.weights)

    def terms(self, logprobs, rows):
        return self.weights[rows] * logprobs

    def dropped(self, logprobs):
        return None


def test_the_packed_gradient_is_the_sum_of_the_sequences_gradients(world):
    model, banned, prompts, responses = world
    weights = torch.tensor([1.0, -2.0, 0.5, 1.5])
    model.zero_grad()
    for w, prompt, response in zip(weights, prompts, responses):
        (w * reference(model, prompt, response, banned)[0].sum()).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    per_token = weights.repeat_interleave(torch.tensor([len(r) for r in responses]))
    loss, _ = response_loss(
        model, prompts, responses, WeightedLogprobs(per_token), temperature=TEMPERATURE, banned_ids=banned, chunk_tokens=3
    )
    loss.backward()
    assert ".visual." in " ".join(expected)  # the vision tower's weights get their gradient through the packed row
    for name, grad in expected.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-5), name


def test_fillers_are_cut_to_one_vision_block_and_run_it(world):
    model, banned, prompts, _ = world
    config = model.config
    image_and_video = prompts[3]
    for kind, placeholder in ((IMAGES, config.image_token_id), (VIDEOS, config.video_token_id)):
        cut, answer = filler_sequence(image_and_video, kind, config)
        assert cut.input_ids[-1] == placeholder and len(answer) == 1
        assert len(cut.input_ids) < len(image_and_video.input_ids)
        # the images (and videos) whose placeholders the cut holds, with their pixels: the vision tower runs on them
        images = cut.input_ids.count(config.image_token_id) * 4  # one token per 2 x 2 merged patches
        assert (0 if cut.pixel_values is None else len(cut.pixel_values)) == images
        videos = cut.input_ids.count(config.video_token_id) * 4
        assert (0 if cut.pixel_values_videos is None else len(cut.pixel_values_videos)) == videos
        assert (kind == IMAGES) == (cut.pixel_values_videos is None)
        with torch.no_grad():
            scores = response_logprobs(model, [cut], [answer], banned_ids=banned)
        assert scores.mask.sum() == 1 and torch.isfinite(scores.logprobs).all()
    text, answer = filler_sequence(prompts[0], 0, config)
    assert text.input_ids == answer == prompts[0].input_ids[:1]


def test_every_input_goes_to_the_models_device(toy_world, world):
    # a model on the meta device meets CPU tensors with an error: the inputs must follow the model, not stay where
    # the driver built them (on GPUs: the first micro-batch would stop with a device mismatch)
    _, banned, prompts, responses = world
    config = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft").config
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    text = [prompts[0], prompts[0]]  # text only: the vision tower reads its grid sizes as numbers, which meta lacks
    with torch.no_grad():
        scores = response_logprobs(model, text, responses[:2], banned_ids=banned)
    assert scores.logprobs.device.type == scores.entropy.device.type == scores.mask.device.type == "meta"
    assert tuple(scores.logprobs.shape) == (2, max(len(r) for r in responses[:2]))


def test_a_bfloat16_model_gets_float32_log_probs_and_entropies(toy_world, world):
    model, banned, prompts, responses = world
    bf16 = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft", dtype=torch.bfloat16)
    bf16 = use_reference_video_positions(bf16).eval()
    with torch.no_grad():
        exact = response_logprobs(model, prompts, responses, banned_ids=banned)
        low = response_logprobs(bf16, prompts, responses, banned_ids=banned, chunk_tokens=4)
    assert low.logprobs.dtype == low.entropy.dtype == torch.float32
    # bf16 weights move the logits by ~1e-2; a bf16 log-softmax would lose far more (its sums round at 3 digits)
    assert ((low.logprobs - exact.logprobs).abs() * exact.mask).max().item() < 0.1
    assert ((low.entropy - exact.entropy).abs() * exact.mask).max().item() < 0.1
