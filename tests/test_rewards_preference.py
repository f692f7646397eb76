"""The preference reward model in-process: tiny text-only and Qwen2.5-VL reward models built here (nothing
downloaded), scored against a forward written independently of the scorer, batched and one by one.

The model builders are shared with the service tests (test_rewards_service.py)."""

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForSequenceClassification,
    AutoProcessor,
    AutoTokenizer,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)

from morl.rewards.preference import PreferenceScorer, Qwen2_5_VLForSequenceClassification
from morl.rewards.types import RewardInput
from morl.toy.model import build_model, build_processor, build_tokenizer, save_checkpoint

sys.path.insert(0, str(Path(__file__).parent))

CORPUS = [
    "How many red squares are in the picture? There are three red squares.",
    "What colour is the circle? The circle is blue, I am quite sure.",
    "Describe the image: a small green triangle next to a large yellow box.",
] * 4
HEAD_STD = 0.3  # a score head wide enough that sigmoid(score) spreads over (0, 1) instead of sitting at 0.5


def build_text_rm(out: Path) -> Path:
    """A 2-layer Qwen2 sequence classifier (num_labels=1) with the toy tokenizer and its chat template."""
    tokenizer = build_tokenizer(CORPUS, vocab_size=320)
    config = Qwen2Config(
        vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=HEAD_STD)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_vl_rm(out: Path) -> Path:
    """The toy Qwen2.5-VL with a scalar head: the multimodal reward-model format."""
    tokenizer = build_tokenizer(CORPUS, vocab_size=320)
    config = build_model(tokenizer, seed=0).config
    config.num_labels = 1
    torch.manual_seed(0)
    model = Qwen2_5_VLForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=HEAD_STD)
    save_checkpoint(model, build_processor(tokenizer), out)
    return out


def write_image(path: Path, colour: tuple[int, int, int]) -> str:
    image = Image.new("RGB", (112, 112), (255, 255, 255))
    image.paste(Image.new("RGB", (48, 48), colour), (20, 30))
    image.save(path)
    return str(path)


def text_samples() -> list[RewardInput]:
    """Responses of different lengths, with the prompt given each way a sample can carry it."""
    return [
        RewardInput.from_text("<think>count</think>There are three red squares.", "caption", {},
                              meta={"prompt": "How many red squares are in the picture?"}),
        RewardInput.from_text("blue", "caption", {}, meta={"prompt": "What colour is the circle?"}),
        RewardInput.from_text("A small green triangle next to a large yellow box, I am quite sure.", "caption", {},
                              meta={"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe"}]}]}),
        RewardInput.from_text("The circle is blue.", "caption", {}),
        RewardInput.from_text("three", "caption", {}, meta={"prompt": "How many red squares are in the picture?"}),
    ]


def reference_text_rewards(path: Path, samples: list[RewardInput]) -> list[float]:
    """sigmoid(score) of each conversation, one at a time straight from transformers: no padding, no scorer code."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    rewards = []
    for sample in samples:
        prompt = _prompt_text(sample)
        turns = ([{"role": "user", "content": prompt}] if prompt else []) + [
            {"role": "assistant", "content": sample.response}
        ]
        text = tokenizer.apply_chat_template(turns, tokenize=False)
        with torch.no_grad():
            logit = model(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0]
        rewards.append(torch.sigmoid(logit).item())
    return rewards


def _prompt_text(sample: RewardInput) -> str | None:
    if "messages" in sample.meta:
        return "".join(p["text"] for m in sample.meta["messages"] for p in m["content"])
    return sample.meta.get("prompt")


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


def vl_samples(images):
    red, blue = images
    ask = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}
    return [
        RewardInput.from_text("red", "caption", {}, images=(red,), meta={"messages": [ask]}),
        RewardInput.from_text("red", "caption", {}, images=(blue,), meta={"messages": [ask]}),
        RewardInput.from_text("The square is blue, I am quite sure.", "caption", {}, images=(blue,),
                              meta={"prompt": "What colour is the square?"}),
        RewardInput.from_text("a square", "caption", {}, images=(red, blue)),
        RewardInput.from_text("no image at all", "caption", {}, meta={"prompt": "Say something."}),
    ]


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

