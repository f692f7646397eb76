"""The preference reward model in-process: tiny text-only and Qwen2.5-VL reward models built here (nothing
downloaded), scored against a forward written independently of the scorer, batched and one by one.

The reward-model builders live in tests/helpers.py: the service tests use them too."""

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForSequenceClassification,
    AutoProcessor,
    AutoTokenizer,
)

from morl.rewards.preference import PreferenceScorer, Qwen2_5_VLForSequenceClassification
from morl.rewards.types import RewardInput
from morl.toy.model import build_model, build_processor, build_tokenizer, save_checkpoint

from helpers import CORPUS, build_text_rm, build_vl_rm, reference_text_rewards, text_samples, vl_samples, write_image


@pytest.fixture(scope="module")
def text_rm(tmp_path_factory):
    return build_text_rm(tmp_path_factory.mktemp("text_rm"))


@pytest.fixture(scope="module")
def vl_rm(tmp_path_factory):
    return build_vl_rm(tmp_path_factory.mktemp("vl_rm"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return [write_image(folder / f"{name}.png", colour)
            for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220)))]


def test_text_rm_scores_are_the_sigmoid_of_the_model_score(text_rm):
    samples = text_samples()
    outcomes = PreferenceScorer(str(text_rm), batch_size=8)(samples)
    expected = reference_text_rewards(text_rm, samples)
    assert [error for _, error in outcomes] == [None] * len(samples)
    assert [reward for reward, _ in outcomes] == pytest.approx(expected, abs=1e-5)
    assert max(expected) - min(expected) > 0.05  # the numbers differ per sample, so the match means something


def test_text_rm_batched_equals_one_by_one(text_rm):
    samples = text_samples() * 2
    batched = PreferenceScorer(str(text_rm), batch_size=4)(samples)
    one_by_one = PreferenceScorer(str(text_rm), batch_size=1)(samples)
    assert [r for r, _ in batched] == pytest.approx([r for r, _ in one_by_one], abs=1e-5)


def test_a_text_only_rm_ignores_images(text_rm, images):
    scorer = PreferenceScorer(str(text_rm))
    with_image = RewardInput.from_text("red", "caption", {}, images=(images[0],), meta={"prompt": "Colour?"})
    without = RewardInput.from_text("red", "caption", {}, meta={"prompt": "Colour?"})
    (a, error), (b, _) = scorer([with_image, without])
    assert error is None and a == pytest.approx(b, abs=1e-6)


def test_vl_rm_sees_the_images_and_matches_its_own_head(vl_rm, images):
    samples = vl_samples(images)
    scorer = PreferenceScorer(str(vl_rm), batch_size=8)
    outcomes = scorer(samples)
    assert [error for _, error in outcomes] == [None] * len(samples)
    rewards = [reward for reward, _ in outcomes]
    assert abs(rewards[0] - rewards[1]) > 1e-4  # the same answer about a different image scores differently

    # reference: the backbone's last hidden state at the last token, through the score head, for one sample
    model = Qwen2_5_VLForSequenceClassification.from_pretrained(vl_rm).eval()
    processor = AutoProcessor.from_pretrained(vl_rm)
    turns = [*samples[0].meta["messages"], {"role": "assistant", "content": "red"}]
    enc = processor(text=[processor.apply_chat_template(turns, tokenize=False)],
                    images=[Image.open(images[0]).convert("RGB")], return_tensors="pt", return_mm_token_type_ids=True)
    with torch.no_grad():
        hidden = model.model(**enc).last_hidden_state[0, -1]
        expected = torch.sigmoid(hidden @ model.score.weight[0]).item()
    assert rewards[0] == pytest.approx(expected, abs=1e-5)


def test_vl_rm_batched_equals_one_by_one(vl_rm, images):
    samples = vl_samples(images)
    batched = PreferenceScorer(str(vl_rm), batch_size=8)(samples)
    one_by_one = PreferenceScorer(str(vl_rm), batch_size=1)(samples)
    assert [r for r, _ in batched] == pytest.approx([r for r, _ in one_by_one], abs=1e-5)


def test_a_bad_sample_fails_alone(vl_rm, images):
    ask_two = {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which?"}]}
    samples = [
        RewardInput.from_text("red", "caption", {}, images=(images[0],), meta={"messages": [ask_two]}),
        RewardInput.from_text("red", "caption", {}, images=("/no/such/image.png",)),
        RewardInput.from_text("red", "caption", {}, meta={"prompt": ["not", "text"]}),
        RewardInput.from_text("red", "caption", {}, images=(images[0],)),
    ]
    outcomes = PreferenceScorer(str(vl_rm))(samples)
    assert outcomes[0] == (None, "ValueError: 2 image part(s) in meta[\"messages\"] but 1 image(s)")
    assert outcomes[1][0] is None and "No such file" in outcomes[1][1]
    assert outcomes[2] == (None, 'TypeError: meta["prompt"] must be a string, got list')
    assert outcomes[3][1] is None and 0 < outcomes[3][0] < 1


def test_a_policy_checkpoint_initialises_the_vl_rm_backbone(tmp_path):
    """`model.*` keys are those of Qwen2_5_VLForConditionalGeneration: an RM can start from the policy."""
    tokenizer = build_tokenizer(CORPUS, vocab_size=320)
    policy = build_model(tokenizer, seed=1)
    save_checkpoint(policy, build_processor(tokenizer), tmp_path)
    rm = Qwen2_5_VLForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    for name, weight in policy.model.state_dict().items():
        assert torch.equal(rm.model.state_dict()[name], weight), name
    assert rm.score.weight.shape == (1, policy.config.text_config.hidden_size)


def test_a_checkpoint_with_more_than_one_output_is_refused(tmp_path, text_rm):
    model = AutoModelForSequenceClassification.from_pretrained(text_rm, num_labels=2, ignore_mismatched_sizes=True)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(text_rm).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"num_labels=1\), not 2"):
        PreferenceScorer(str(tmp_path))

