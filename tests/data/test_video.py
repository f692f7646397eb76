"""Videos from data file to model inputs: decoding (mp4, webm, avi, frame lists), frame sampling at the set fps,
the frame and token budgets, the grid and `second_per_grid_ts` Qwen2.5-VL's time positions come from, and bad
videos named by file and line."""

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from morl.config import RunConfig
from morl.data.config import DatasetSpec, VideoSettings
from morl.data.encoding import PromptEncoder, PromptTooLongError, with_pixels
from morl.data.loading import load_dataset
from morl.data.rows import DataError, Row
from morl.data.source import load_run_datasets
from morl.data.video import FrameGeometry, VideoError, load_video, plan, read_header
from morl.toy.model import build_processor, build_tokenizer

from helpers import video_row, write_video

GEOMETRY = FrameGeometry(factor=28, min_pixels=56 * 56, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def processor():
    return build_processor(build_tokenizer(["When is the square on screen? Count the flashes."]))


def frame_numbers(video) -> list[int]:
    """The source frame each sampled frame shows (write_video paints frame k's number in its red and green)."""
    return [round(f[..., 0].mean() / 4) + 64 * round(f[..., 1].mean() / 4) for f in video.frames]


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".avi"])
def test_containers_decode_to_the_frames_at_the_sampled_times(tmp_path, suffix):
    path = write_video(tmp_path / f"v{suffix}", seconds=6, fps=10)
    header = read_header(path, frames_fps=1.0)
    assert (header.frames, header.fps, header.width, header.height) == (60, 10.0, 56, 56)
    video = load_video(path, VideoSettings(fps=2), GEOMETRY)
    # 12 frames, one in the middle of each half second: source frames 2, 7, 12, ...
    assert video.indices == list(range(2, 60, 5))
    assert frame_numbers(video) == video.indices
    assert video.frames.shape == (12, 56, 56, 3) and video.frames.dtype == np.uint8
    assert video.sampled_fps == pytest.approx(2.0)


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".avi"])
def test_a_long_video_sampled_sparsely_seeks_to_the_same_frames_a_full_pass_gives(tmp_path, suffix):
    path = write_video(tmp_path / f"long{suffix}", seconds=100, fps=25, size=28)  # 2,500 frames
    video = load_video(path, VideoSettings(fps=2, max_frames=8), GEOMETRY)  # 12.5 s apart: each reached by a seek
    assert video.indices == [156, 468, 781, 1093, 1406, 1718, 2031, 2343]
    assert frame_numbers(video) == video.indices
    dense = load_video(path, VideoSettings(fps=2, max_frames=256), GEOMETRY)  # 0.5 s apart: decoded in order
    assert frame_numbers(dense) == dense.indices and len(dense.indices) == 200


def test_max_frames_samples_sparser_and_keeps_whole_temporal_patches(tmp_path):
    path = write_video(tmp_path / "v.mp4", seconds=6, fps=10)
    video = load_video(path, VideoSettings(fps=2, max_frames=5), GEOMETRY)
    assert len(video.indices) == 4  # 5 rounded down to whole pairs of frames
    assert video.sampled_fps == pytest.approx(4 / 6)
    assert frame_numbers(video) == video.indices == [7, 22, 37, 52]


def test_a_video_shorter_than_one_step_still_gives_one_pair(tmp_path):
    path = write_video(tmp_path / "v.mp4", seconds=1, fps=2)
    assert load_video(path, VideoSettings(fps=0.5), GEOMETRY).indices == [0, 1]


def test_the_token_budget_shrinks_frames_then_drops_them():
    from morl.data.video import VideoHeader

    header = VideoHeader(frames=80, fps=10.0, width=224, height=112)
    settings = VideoSettings(fps=2, max_tokens=10_000)
    big = FrameGeometry(factor=28, min_pixels=56 * 56, max_pixels=224 * 224)
    assert plan(header, settings, big)[1:] == (112, 224)  # 8 steps x 32 tokens: under budget, kept
    # 64 tokens for 8 steps: 8 per frame pair, so 56 x 112 (2 x 4 merged tokens)
    indices, height, width = plan(header, VideoSettings(fps=2, max_tokens=64), big)
    assert (len(indices), height, width) == (16, 56, 112)
    # 16 tokens: 2 a step would be 28 x 56, under the processor's smallest area, which it scales up to 56 x 84
    # (6 tokens); that fits only 2 steps, so 4 frames
    indices, height, width = plan(header, VideoSettings(fps=2, max_tokens=16), big)
    assert (len(indices), height, width) == (4, 56, 84)
    with pytest.raises(VideoError, match="max_tokens=3 is below one step"):
        plan(header, VideoSettings(fps=2, max_tokens=3), big)


def test_second_per_grid_ts_and_grid_for_a_known_video(tmp_path, processor):
    """12 s at 24 fps sampled at 2 fps: 24 frames, 12 temporal steps of 2 frames = 1 s each.

    Dropping the sampled fps (lmms-eval #1260) would give 2 / 24 = 0.083 s per step; a max_frames cap
    must change it too (16 frames over 12 s: 2 / (16 / 12) = 1.5 s)."""
    path = write_video(tmp_path / "v.mp4", seconds=12, fps=24)
    row = video_row("v", [path])
    prompt = PromptEncoder(processor, 4096)(row)
    assert prompt.video_grid_thw.tolist() == [[12, 4, 4]]  # steps, then 14-px patches down and across
    assert prompt.second_per_grid_ts.tolist() == [pytest.approx(1.0)]
    assert prompt.pixel_values_videos.shape == (12 * 4 * 4, 3 * 2 * 14 * 14)
    video_pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert prompt.input_ids.count(video_pad) == 12 * 4  # 12 steps x 4 x 4 patches / 2 x 2 merge
    capped = PromptEncoder(processor, 4096, VideoSettings(max_frames=16))(row)
    assert capped.second_per_grid_ts.tolist() == [pytest.approx(1.5)]
    per_row = PromptEncoder(processor, 4096)(video_row("v", [path], meta={"video": {"fps": 1}}))
    assert per_row.video_grid_thw.tolist() == [[6, 4, 4]] and per_row.second_per_grid_ts.tolist() == [2.0]


def test_images_and_videos_mix_in_one_prompt(tmp_path, processor):
    video = write_video(tmp_path / "v.mp4", seconds=2, fps=4)
    frames = [str(tmp_path / f"f{i}.png") for i in range(4)]
    for i, f in enumerate(frames):
        Image.new("RGB", (56, 56), (4 * i, 0, 0)).save(f)
    image = str(tmp_path / "i.png")
    Image.new("RGB", (112, 112), (0, 200, 0)).save(image)
    row = video_row("mix", [video, frames], images=[image])
    prompt = PromptEncoder(processor, 4096)(row)
    assert prompt.image_grid_thw.tolist() == [[1, 8, 8]]
    # the file at 2 fps: 4 frames; the frame list is taken at data.video.fps: 4 frames, 2 steps of 1 s
    assert prompt.video_grid_thw.tolist() == [[2, 4, 4], [2, 4, 4]]
    assert prompt.second_per_grid_ts.tolist() == [1.0, 1.0]
    assert [v.indices for v in prompt.videos] == [[1, 3, 5, 7], [0, 1, 2, 3]]
    ids = processor.tokenizer.convert_tokens_to_ids
    assert prompt.input_ids.count(ids("<|image_pad|>")) == 16 and prompt.input_ids.count(ids("<|video_pad|>")) == 16
    # the frames only travel where an engine preprocesses them: the same pixels without them, for HF and the learner
    bare = PromptEncoder(processor, 4096, keep_frames=False)(row)
    assert bare.videos == () and prompt.without_frames().videos == ()
    assert torch.equal(bare.pixel_values_videos, prompt.pixel_values_videos) and bare.input_ids == prompt.input_ids
    # an engine that preprocesses media: the driver keeps ids, grids, refs and frames; the learner's pixels are the same
    light = PromptEncoder(processor, 4096, keep_pixels=False)(row)
    assert light.pixel_values is None and light.pixel_values_videos is None and light.without_frames() is light
    learner = with_pixels(light, processor)
    assert torch.equal(learner.pixel_values, prompt.pixel_values) and learner.videos == ()
    assert torch.equal(learner.pixel_values_videos, prompt.pixel_values_videos)
    assert torch.equal(learner.image_grid_thw, prompt.image_grid_thw) and learner.input_ids == prompt.input_ids
    assert with_pixels(prompt, processor) is prompt


def test_pixels_computed_again_from_changed_media_are_refused(tmp_path, processor):
    image = tmp_path / "i.png"
    Image.new("RGB", (112, 112), (0, 200, 0)).save(image)
    light = PromptEncoder(processor, 4096, keep_pixels=False)(video_row("img", [], images=[str(image)]))
    Image.new("RGB", (224, 56), (0, 200, 0)).save(image)  # replaced while the prompt was in flight: another shape
    with pytest.raises(DataError, match=r"row 'img': its media changed since the driver encoded it \(image_grid_thw"):
        with_pixels(light, processor)


def test_a_video_over_max_prompt_tokens_is_refused_not_truncated(tmp_path, processor):
    row = video_row("long", [write_video(tmp_path / "v.mp4", seconds=30, fps=2)])
    with pytest.raises(PromptTooLongError, match=r"'long'.*images and videos.*max_prompt_tokens=50"):
        PromptEncoder(processor, 50)(row)


# --- data files: paths, bad videos, overrides --------------------------------------------------------------------


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def row_dict(i: int, videos: list, **meta) -> dict:
    return video_row(f"r{i}", videos, meta=meta).model_dump(exclude_none=True)


def test_video_paths_resolve_against_the_data_file(tmp_path):
    (tmp_path / "clips").mkdir()
    write_video(tmp_path / "clips" / "a.mp4", seconds=2, fps=4)
    Image.new("RGB", (56, 56)).save(tmp_path / "clips" / "f0.png")
    data = write_rows(tmp_path / "train.jsonl", [row_dict(0, ["clips/a.mp4"]), row_dict(1, [["clips/f0.png"]])])
    rows = load_dataset(data, known_tasks=None).rows
    assert rows[0].videos == [str(tmp_path / "clips" / "a.mp4")]
    assert rows[1].videos == [[str(tmp_path / "clips" / "f0.png")]]


def test_missing_corrupt_and_misdeclared_videos_are_named_by_file_and_line(tmp_path):
    good = write_video(tmp_path / "good.mp4", seconds=2, fps=4)
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    cases = {
        "missing.mp4": r"train.jsonl:2: video 'missing.mp4' not found",
        "corrupt.mp4": r"train.jsonl:2: video .*corrupt.mp4.* is not a readable video",
    }
    for name, message in cases.items():
        data = write_rows(tmp_path / "train.jsonl", [row_dict(0, [good]), row_dict(1, [name])])
        with pytest.raises(DataError, match=message):
            load_dataset(data, known_tasks=None)
    extra_part = row_dict(2, [good])
    extra_part["messages"][-1]["content"].append({"type": "video"})
    bad_override = row_dict(3, [good], video={"fps": 0})
    unknown_override = row_dict(4, [good], video={"frames": 3})
    for row, message in [
        (extra_part, r":1: 2 video part\(s\) in messages but 1 video\(s\)"),
        (bad_override, r":1: meta.video: fps: Input should be greater than 0"),
        (unknown_override, r":1: meta.video: unknown field 'frames'"),
    ]:
        with pytest.raises(DataError, match=message):
            load_dataset(write_rows(tmp_path / "bad.jsonl", [row]), known_tasks=None)
    skipped = load_dataset(
        write_rows(tmp_path / "mixed.jsonl", [row_dict(0, [good]), row_dict(1, ["missing.mp4"])]),
        known_tasks=None,
        on_bad_row="skip",
    )
    assert [r.id for r in skipped.rows] == ["r0"] and skipped.skipped == 1


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_both_engines_refuse_more_videos_or_images_than_the_recipe_allows_at_load_time(tmp_path, engine):
    good = write_video(tmp_path / "good.mp4", seconds=2, fps=4)
    data = write_rows(tmp_path / "train.jsonl", [row_dict(0, [good]), row_dict(1, [good, good])])
    recipe = {
        "model": {"path": str(tmp_path)},  # never opened: only the data is loaded
        "data": {"train": [{"path": str(data)}]},
        "rewards": {"routes": {"temporal": [{"fn": "temporal"}]}},
    }
    one_video = {"engine": engine, "max_videos_per_prompt": 1}
    refused = rf"^{data}:2: 2 videos in one prompt, more than rollout.max_videos_per_prompt=1 \(raise it"
    with pytest.raises(DataError, match=refused):
        load_run_datasets(RunConfig.model_validate({**recipe, "rollout": one_video}), [DatasetSpec(path=str(data))])
    two = load_run_datasets(RunConfig.model_validate({**recipe, "rollout": {**one_video, "max_videos_per_prompt": 2}}),
                            [DatasetSpec(path=str(data))])
    assert [len(r.videos) for r in two[0].rows] == [1, 2]
    frames = [f"f{i}.png" for i in range(2)]
    for frame in frames:
        Image.new("RGB", (8, 8)).save(tmp_path / frame)
    two_images = {**row_dict(2, []), "id": "r2", "images": frames, "videos": [],
                  "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]}
    images = write_rows(tmp_path / "images.jsonl", [two_images])
    with pytest.raises(DataError, match=rf"^{images}:1: 2 images in one prompt, more than "
                                        r"rollout.max_images_per_prompt=1"):
        load_run_datasets(RunConfig.model_validate({**recipe, "rollout": {"engine": engine}}),
                          [DatasetSpec(path=str(images))])


def test_a_video_that_breaks_while_decoding_names_its_row(tmp_path, processor):
    path = write_video(tmp_path / "v.mp4", seconds=4, fps=8)
    row = load_dataset(write_rows(tmp_path / "t.jsonl", [row_dict(0, ["v.mp4"])]), known_tasks=None).rows[0]
    Path(path).write_bytes(Path(path).read_bytes()[:200])  # cut after the load's header check
    with pytest.raises(VideoError, match=r"row 'r0': video .*v.mp4"):
        PromptEncoder(processor, 4096)(row)


def test_a_row_needs_one_video_per_video_part():
    with pytest.raises(ValueError, match=r"1 video part\(s\) in messages but 0 video\(s\)"):
        Row.model_validate({**row_dict(0, ["x.mp4"]), "videos": []})
    with pytest.raises(ValueError, match="at least one frame"):
        Row.model_validate({**row_dict(0, ["x.mp4"]), "videos": [[]]})


def test_pyav_writes_what_write_video_promises(tmp_path):
    """The fixture itself: frame k of a written video has red level 4k (to within the YUV round trip's 1 or 2), so
    indices can be read back."""
    path = write_video(tmp_path / "v.mp4", seconds=1, fps=8)
    with av.open(path) as container:
        reds = [int(f.to_ndarray(format="rgb24")[..., 0].mean()) for f in container.decode(video=0)]
    assert [round(r / 4) for r in reds] == list(range(8))
    assert max(abs(r - 4 * k) for k, r in enumerate(reds)) <= 1
