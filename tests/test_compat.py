"""morl.compat's replacement of Qwen2.5-VL's rope index: images placed exactly as transformers places them, text
after a video one past the video's last time position (as Qwen's reference and vLLM), and a loud failure when
transformers changes the function it replaces."""

import pytest
import torch

from morl.compat import use_reference_video_positions
from morl.data.encoding import PromptEncoder, collate
from morl.toy.model import build_model, build_processor, build_tokenizer

from helpers import toy_video_rows, video_row


@pytest.fixture(scope="module")
def toy():
    tokenizer = build_tokenizer(["When is the red square on screen? How many shapes are in the image?"])
    return build_processor(tokenizer), tokenizer


def rope(model, prompts, tokenizer, left_pad):
    config = model.config
    batch = collate(
        [p.input_ids for p in prompts],
        prompts,
        pad_id=tokenizer.pad_token_id,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        left_pad=left_pad,
    )
    kwargs = batch.as_kwargs()
    kwargs.pop("pixel_values", None), kwargs.pop("pixel_values_videos", None)
    return model.model.get_rope_index(**kwargs), batch


def test_images_keep_transformers_positions_and_text_follows_a_video_in_time(toy, tmp_path):
    processor, tokenizer = toy
    stock = build_model(tokenizer, seed=0)
    del stock.model.get_rope_index  # back to transformers' own (build_model installs the reference one)
    image_row = video_row("img", [], images=[_image(tmp_path)])
    temporal_row = toy_video_rows(tmp_path, image_row)[0]
    prompts = [PromptEncoder(processor, 4096)(row) for row in (image_row, temporal_row)]
    ours = build_model(tokenizer, seed=0)
    for left_pad in (True, False):
        (mine, mine_delta), batch = rope(ours, prompts, tokenizer, left_pad)
        (theirs, theirs_delta), _ = rope(stock, prompts, tokenizer, left_pad)
        assert torch.equal(mine[:, 0], theirs[:, 0]) and torch.equal(mine_delta[0], theirs_delta[0])
        kept = batch.attention_mask[1].bool()
        row, theirs_row = mine[:, 1][:, kept], theirs[:, 1][:, kept]
        is_video = batch.input_ids[1][kept] == ours.config.video_token_id
        start = int(row[0, is_video][0])
        # 16 steps of 1 s at tokens_per_second = 4: time positions 0, 4, ..., 60 past the video's start
        assert sorted(set((row[0, is_video] - start).tolist())) == list(range(0, 64, 4))
        first_after = int(is_video.nonzero().max()) + 1
        assert row[:, first_after].tolist() == [start + 61] * 3  # one past the last time position
        assert theirs_row[:, first_after].tolist() == [start + 2] * 3  # transformers 5.19: past the spatial ones


def test_a_changed_signature_fails_loudly(toy, monkeypatch):
    _, tokenizer = toy
    model = build_model(tokenizer, seed=0)
    del model.model.get_rope_index
    monkeypatch.setattr(type(model.model), "get_rope_index", lambda self, input_ids, grid_thw=None: None)
    with pytest.raises(RuntimeError, match="changed Qwen2.5-VL's get_rope_index"):
        use_reference_video_positions(model)


def _image(folder) -> str:
    from PIL import Image

    path = folder / "image.png"
    Image.new("RGB", (112, 112), (200, 0, 0)).save(path)
    return str(path)
