"""Data room: row checks name file and line, Parquet shapes, skip mode, and the mixture sampler."""

from __future__ import annotations

import io
import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from morl.data.config import DEFAULT_MAX_IMAGE_PIXELS, PIL_HARD_LIMIT_PIXELS, DataConfig, DatasetSpec
from morl.data.loading import LoadedDataset, load_dataset, load_datasets
from morl.data.mixture import MixtureSampler
from morl.data.rows import DataError, Row, open_image

TASKS = {"counting", "grounding"}


def draw_rows(sampler: MixtureSampler, n: int) -> list[Row]:
    """The sampler's next `n` rows."""
    return [sampler.row(sampler.next_key()) for _ in range(n)]


def counts_by_task(rows) -> dict[str, int]:
    return dict(sorted(Counter(row.task for row in rows).items()))


def png_bytes(color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="PNG")
    return buf.getvalue()


def make_row(i: int, images: list[Any] | None = None, task: str = "counting") -> dict[str, Any]:
    images = ["img/0.png"] if images is None else images
    content: list[dict[str, Any]] = [{"type": "image"} for _ in images] + [{"type": "text", "text": f"How many? {i}"}]
    return {
        "id": f"r{i}",
        "task": task,
        "messages": [{"role": "system", "content": "Think first."}, {"role": "user", "content": content}],
        "images": images,
        "label": {"answer": str(i)},
        "meta": {"source": "test"},
    }


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows may be dicts (dumped) or raw strings (written as is, for bad JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "0.png").write_bytes(png_bytes("red"))
    (tmp_path / "img" / "1.png").write_bytes(png_bytes("blue"))
    return tmp_path


# --- loading good rows --------------------------------------------------------------------------------------


def test_good_rows_load_with_absolute_image_paths(data_dir: Path) -> None:
    rows = [make_row(0), make_row(1, ["img/0.png", "img/1.png"], task="grounding"), make_row(2, [])]
    ds = load_dataset(write_jsonl(data_dir / "train.jsonl", rows), known_tasks=TASKS)
    assert [r.id for r in ds.rows] == ["r0", "r1", "r2"] and ds.skipped == 0
    assert ds.rows[1].images == [str(data_dir / "img" / "0.png"), str(data_dir / "img" / "1.png")]
    assert all(Path(p).is_absolute() and Path(p).is_file() for r in ds.rows for p in r.images)
    assert open_image(ds.rows[1].images[1]).getpixel((0, 0)) == (0, 0, 255)
    assert ds.rows[0].meta == {"source": "test"} and ds.rows[0].label == {"answer": "0"}


def test_absolute_image_path_and_unchecked_tasks(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("data") / "train.jsonl"
    absolute = str(data_dir / "img" / "1.png")
    ds = load_dataset(write_jsonl(elsewhere, [make_row(0, [absolute], task="ocr")]), known_tasks=None)
    assert ds.rows[0].images == [absolute]


def test_video_parts_and_default_meta(data_dir: Path) -> None:
    row = make_row(0, [])
    row["messages"][-1]["content"].append({"type": "video"})
    row["videos"] = [["img/0.png", "img/1.png"]]  # a video given as its frames
    del row["meta"]
    ds = load_dataset(write_jsonl(data_dir / "v.jsonl", [row]), known_tasks=TASKS)
    assert ds.rows[0].meta == {}
    assert ds.rows[0].videos == [[str(data_dir / "img" / "0.png"), str(data_dir / "img" / "1.png")]]


# --- errors name file and line ------------------------------------------------------------------------------


def _missing_task(row: dict[str, Any]) -> None:
    del row["task"]


def _image_count_mismatch(row: dict[str, Any]) -> None:
    row["images"].append("img/1.png")


def _assistant_last(row: dict[str, Any]) -> None:
    row["messages"].append({"role": "assistant", "content": "4"})


def _wrong_type(row: dict[str, Any]) -> None:
    row["label"] = "4"


def _bad_part(row: dict[str, Any]) -> None:
    row["messages"][-1]["content"].append({"type": "audio"})


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (_missing_task, "missing field 'task'"),
        (_image_count_mismatch, "1 image part(s) in messages but 2 image(s)"),
        (_assistant_last, "last message must be a user turn"),
        (_wrong_type, "label: Input should be a valid dictionary"),
        (_bad_part, "messages.1.content.2.type: Input should be 'text', 'image' or 'video'"),
    ],
)
def test_malformed_row_names_file_and_line(data_dir: Path, spoil: Any, expected: str) -> None:
    bad = make_row(2)
    spoil(bad)
    path = write_jsonl(data_dir / "train.jsonl", [make_row(0), make_row(1), bad])
    with pytest.raises(DataError) as err:
        load_dataset(path, known_tasks=TASKS)
    assert str(err.value).startswith(f"{path}:3: ") and expected in str(err.value)


def test_bad_json_names_line(data_dir: Path) -> None:
    path = write_jsonl(data_dir / "train.jsonl", [make_row(0), "", '{"id": "r1", '])
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON"):
        load_dataset(path, known_tasks=TASKS)


def test_unknown_task(data_dir: Path) -> None:
    path = write_jsonl(data_dir / "train.jsonl", [make_row(0, task="ocr")])
    with pytest.raises(DataError, match=rf"^{path}:1: unknown task 'ocr' \(known: counting, grounding\)"):
        load_dataset(path, known_tasks=TASKS)


def test_missing_image_names_path_as_written_and_resolved(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_jsonl(data_dir / "data" / "train.jsonl", [make_row(0, ["../img/0.png"]), make_row(1, ["img/3.png"])])
    monkeypatch.chdir(data_dir)
    resolved = data_dir / "data" / "img" / "3.png"
    with pytest.raises(DataError) as err:
        load_dataset("data/train.jsonl", known_tasks=TASKS)
    assert str(err.value) == f"data/train.jsonl:2: image 'img/3.png' not found (resolved {resolved})"


def test_corrupt_image(data_dir: Path) -> None:
    (data_dir / "img" / "bad.png").write_bytes(b"not a png at all")
    path = write_jsonl(data_dir / "train.jsonl", [make_row(0, ["img/bad.png"])])
    with pytest.raises(DataError, match=rf"^{path}:1: image 'img/bad.png' .* is not a readable image"):
        load_dataset(path, known_tasks=TASKS)
    unchecked = load_dataset(path, known_tasks=TASKS, check_images=False)
    assert unchecked.rows[0].images == [str(data_dir / "img" / "bad.png")]


def test_duplicate_id(data_dir: Path) -> None:
    path = write_jsonl(data_dir / "train.jsonl", [make_row(0), make_row(1), make_row(0)])
    with pytest.raises(DataError, match=rf"^{path}:3: duplicate id 'r0' \(first at {path}:1\)"):
        load_dataset(path, known_tasks=TASKS)


def test_missing_file_and_unsupported_type(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        load_dataset(tmp_path / "nope.jsonl", known_tasks=None)
    (tmp_path / "rows.csv").write_text("id\n")
    with pytest.raises(DataError, match="unsupported data file type '.csv'"):
        load_dataset(tmp_path / "rows.csv", known_tasks=None)


def test_skip_mode_counts_and_keeps_good_rows(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (data_dir / "img" / "bad.png").write_bytes(b"garbage")
    rows = [make_row(0), "{oops", make_row(2, task="ocr"), make_row(3), make_row(4, ["img/bad.png"]), make_row(3)]
    path = write_jsonl(data_dir / "train.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="morl.data"):
        ds = load_dataset(path, known_tasks=TASKS, on_bad_row="skip")
    assert [r.id for r in ds.rows] == ["r0", "r3"]
    assert ds.skipped == 4 and len(ds.skip_reasons) == 4
    assert [reason.split(": ")[0] for reason in ds.skip_reasons] == [f"{path}:{n}" for n in (2, 3, 5, 6)]
    warnings = [r.getMessage() for r in caplog.records if r.name == "morl.data"]
    assert warnings == [f"skipped 4 bad rows of {path} (first: {ds.skip_reasons[0]})"]


# --- parquet ------------------------------------------------------------------------------------------------


def test_parquet_nested_columns(data_dir: Path) -> None:
    rows = [make_row(0), make_row(1, ["img/0.png", "img/1.png"], task="grounding")]
    # Arrow unions the label fields: row 0 gets bbox_2d=null, row 1 answer=null; the nulls must not come back.
    rows[1]["label"] = {"bbox_2d": [1, 2, 3, 4]}
    for r in rows:
        r["messages"] = r["messages"][1:]  # content must have one Arrow type: a list of structs everywhere
    path = data_dir / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    ds = load_dataset(path, known_tasks=TASKS)
    assert [r.label for r in ds.rows] == [{"answer": "0"}, {"bbox_2d": [1, 2, 3, 4]}]
    assert ds.rows[1].images == [str(data_dir / "img" / "0.png"), str(data_dir / "img" / "1.png")]
    assert ds.rows[1].model_dump(exclude_none=True)["messages"] == rows[1]["messages"]


def readme_example_row() -> dict[str, Any]:
    """The image row the README's "Data format" section shows, as it is written there."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```json\n")[1:]]
    (example,) = [b for b in blocks if '"counting-train-00017"' in b]
    return json.loads(example)


@pytest.mark.parametrize("writer", ["pandas", "pyarrow"])
def test_the_readmes_example_row_writes_to_parquet_and_loads_as_its_jsonl(tmp_path: Path, writer: str) -> None:
    import pandas as pd

    row = readme_example_row()
    (tmp_path / "images").mkdir()
    (tmp_path / row["images"][0]).write_bytes(png_bytes())
    # a second row as the README's Parquet forms allow: meta given (null in the first row), a plain-text turn as
    # a list of one text part, a label of other keys (Arrow unions them, nulls the missing ones)
    other = {**row, "id": "counting-train-00018", "label": {"count": 5, "note": "dense"}, "meta": {"source": "web"},
             "messages": [{"role": "system", "content": [{"type": "text", "text": "Think first."}]}, *row["messages"]]}
    path = tmp_path / "train.parquet"
    if writer == "pandas":
        pd.DataFrame([row, other]).to_parquet(path)
    else:  # from_pylist takes its columns from the first row: a null meta keeps the column
        pq.write_table(pa.Table.from_pylist([{**row, "meta": None}, other]), path)
    rows = [row, other]
    jsonl = load_dataset(write_jsonl(tmp_path / "train.jsonl", rows), known_tasks={"counting"})
    parquet = load_dataset(path, known_tasks={"counting"})
    assert [r.model_dump() for r in parquet.rows] == [r.model_dump() for r in jsonl.rows]
    assert parquet.rows[0].meta == {} and parquet.rows[1].meta == {"source": "web"}
    assert parquet.rows[0].label == {"count": 3} and parquet.rows[0].images == [str(tmp_path / row["images"][0])]


def test_an_empty_meta_goes_as_a_json_string_column(data_dir: Path) -> None:
    """Parquet cannot hold `"meta": {}` as a struct; a JSON-string column holds it (and any other shape)."""
    rows = [{**make_row(0), "meta": {}}, {**make_row(1), "label": {"count": 2}, "meta": {"video": {"fps": 1}}}]
    with pytest.raises(pa.ArrowNotImplementedError, match="struct type 'meta' with no child field"):
        pq.write_table(pa.Table.from_pylist([{"id": "r0", "meta": {}}]), data_dir / "nested.parquet")
    table = [{**r, **{k: json.dumps(r[k]) for k in ("messages", "label", "meta")}} for r in rows]
    pq.write_table(pa.Table.from_pylist(table), data_dir / "train.parquet")
    ds = load_dataset(data_dir / "train.parquet", known_tasks=TASKS)
    assert [r.meta for r in ds.rows] == [{}, {"video": {"fps": 1}}] and ds.rows[1].label == {"count": 2}


def test_parquet_json_string_columns_and_row_index(data_dir: Path) -> None:
    rows = [make_row(0), make_row(1), make_row(2, ["img/9.png"])]
    table = [{**r, **{k: json.dumps(r[k]) for k in ("messages", "label", "meta")}} for r in rows]
    path = data_dir / "train.parquet"
    pq.write_table(pa.Table.from_pylist(table), path)
    with pytest.raises(DataError, match=rf"^{path}:row 2: image 'img/9.png' not found"):
        load_dataset(path, known_tasks=TASKS)
    ds = load_dataset(path, known_tasks=TASKS, on_bad_row="skip")
    assert [r.messages[0].content for r in ds.rows] == ["Think first."] * 2 and ds.skipped == 1


def test_parquet_image_bytes_stay_in_memory(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    out = tmp_path_factory.mktemp("pq")
    rows = [make_row(0, [png_bytes("blue")]), make_row(1, [png_bytes("red")]), make_row(2, [b"garbage"])]
    for r in rows:
        r["messages"] = json.dumps(r["messages"])
    pq.write_table(pa.Table.from_pylist(rows), out / "train.parquet")
    ds = load_dataset(out / "train.parquet", known_tasks=TASKS, on_bad_row="skip")
    assert [r.id for r in ds.rows] == ["r0", "r1"] and "image 0 (7 bytes) is not a readable image" in ds.skip_reasons[0]
    assert isinstance(ds.rows[0].images[0], bytes)
    assert open_image(ds.rows[0].images[0]).getpixel((0, 0)) == (0, 0, 255)
    assert sorted(p.name for p in out.iterdir()) == ["train.parquet"]  # nothing written next to the data


def test_parquet_hugging_face_image_structs(data_dir: Path) -> None:
    structs = [{"bytes": png_bytes("red"), "path": None}, {"bytes": None, "path": "img/1.png"}]
    rows = [make_row(0, [structs[0]]), make_row(1, [structs[1]])]
    for r in rows:
        r["messages"] = json.dumps(r["messages"])
    path = data_dir / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    ds = load_dataset(path, known_tasks=TASKS)
    assert isinstance(ds.rows[0].images[0], bytes) and ds.rows[1].images == [str(data_dir / "img" / "1.png")]


# --- image size cap -----------------------------------------------------------------------------------------


def blank_png(path: Path, width: int, height: int) -> Path:
    """A real PNG of width x height one-bit pixels, all black: huge in pixels, small on disk."""
    Image.new("1", (width, height)).save(path)
    return path


def test_an_image_over_the_cap_names_file_line_image_and_size(data_dir: Path, recwarn: pytest.WarningsRecorder) -> None:
    huge = blank_png(data_dir / "img" / "huge.png", 10_000, 10_000)
    path = write_jsonl(data_dir / "train.jsonl", [make_row(0), make_row(1, ["img/huge.png"])])
    with pytest.raises(DataError) as error:
        load_dataset(path, known_tasks=TASKS)
    assert str(error.value) == (
        f"{path}:2: image 'img/huge.png' (resolved {huge}) is over data.max_image_pixels=89,478,485: "
        "10000 x 10000 = 100,000,000 pixels"
    )
    ds = load_dataset(path, known_tasks=TASKS, on_bad_row="skip")
    assert [r.id for r in ds.rows] == ["r0"] and ds.skipped == 1 and "10000 x 10000" in ds.skip_reasons[0]
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]  # the error says it


def test_the_cap_is_inclusive_and_configurable(data_dir: Path) -> None:
    path = write_jsonl(data_dir / "train.jsonl", [make_row(0)])  # an 8 x 6 image: 48 pixels
    assert len(load_dataset(path, known_tasks=TASKS, max_image_pixels=48)) == 1
    with pytest.raises(DataError, match=r":1: image 'img/0.png' .* over data.max_image_pixels=47: 8 x 6 = 48 pixels"):
        load_dataset(path, known_tasks=TASKS, max_image_pixels=47)


def test_the_size_is_read_from_the_header_before_the_pixels(data_dir: Path) -> None:
    full = blank_png(data_dir / "img" / "full.png", 10_000, 10_000).read_bytes()
    (data_dir / "img" / "cut.png").write_bytes(full[:200])  # the header, then the pixel data cut short
    path = write_jsonl(data_dir / "train.jsonl", [make_row(0, ["img/cut.png"])])
    with pytest.raises(DataError, match="over data.max_image_pixels=89,478,485: 10000 x 10000"):
        load_dataset(path, known_tasks=TASKS)
    assert len(load_dataset(path, known_tasks=TASKS, max_image_pixels=10**8)) == 1  # the body is not read here


def test_an_image_past_pils_own_limit_is_the_same_bad_row(data_dir: Path) -> None:
    blank_png(data_dir / "img" / "bomb.png", 20_000, 10_000)  # PIL refuses to open it, whatever the cap
    path = write_jsonl(data_dir / "train.jsonl", [make_row(0, ["img/bomb.png"]), make_row(1)])
    ds = load_dataset(path, known_tasks=TASKS, on_bad_row="skip", max_image_pixels=PIL_HARD_LIMIT_PIXELS)
    assert [r.id for r in ds.rows] == ["r1"]
    assert f"over data.max_image_pixels={PIL_HARD_LIMIT_PIXELS:,}: Image size (200000000 pixels)" in ds.skip_reasons[0]


def test_image_bytes_over_the_cap(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buf, format="PNG")
    rows = [make_row(0, [buf.getvalue()]), make_row(1, [png_bytes()])]
    for r in rows:
        r["messages"] = json.dumps(r["messages"])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    ds = load_dataset(tmp_path / "train.parquet", known_tasks=TASKS, on_bad_row="skip", max_image_pixels=100)
    assert [r.id for r in ds.rows] == ["r1"]
    assert ds.skip_reasons == [
        f"{tmp_path / 'train.parquet'}:row 0: image 0 ({len(buf.getvalue())} bytes) is over "
        "data.max_image_pixels=100: 20 x 20 = 400 pixels"
    ]


def test_image_paths_may_lead_outside_the_data_folder(data_dir: Path) -> None:
    path = write_jsonl(data_dir / "sub" / "train.jsonl", [make_row(0, ["../img/0.png"])])
    assert load_dataset(path, known_tasks=TASKS).rows[0].images == [str(data_dir / "img" / "0.png")]


# --- config -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0.0, -1.0, math.inf, math.nan])
def test_dataset_spec_rejects_bad_weight(weight: float) -> None:
    with pytest.raises(ValidationError, match="weight"):
        DatasetSpec(path="a.jsonl", weight=weight)


def test_data_config_forbids_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="shuffle"):
        DataConfig.model_validate({"train": [{"path": "a.jsonl"}], "shuffle": True})
    with pytest.raises(ValidationError, match="on_bad_row"):
        DataConfig(on_bad_row="warn")  # type: ignore[arg-type]


@pytest.mark.parametrize("pixels", [0, PIL_HARD_LIMIT_PIXELS + 1])
def test_max_image_pixels_bounds(pixels: int) -> None:
    assert DataConfig().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValidationError, match="max_image_pixels"):
        DataConfig(max_image_pixels=pixels)


def test_load_datasets_refuses_a_file_without_rows(data_dir: Path) -> None:
    good = write_jsonl(data_dir / "good.jsonl", [make_row(0)])
    empty = write_jsonl(data_dir / "empty.jsonl", ["", "  "])  # blank lines are no rows
    bad = write_jsonl(data_dir / "bad.jsonl", [make_row(0, ["img/9.png"]), "{"])
    specs = [DatasetSpec(path=str(p)) for p in (good, empty)]
    with pytest.raises(DataError, match=rf"^{empty}: no rows to use: the file has no rows$"):
        load_datasets(specs, known_tasks=TASKS, on_bad_row="error")
    with pytest.raises(DataError) as error:
        load_datasets([DatasetSpec(path=str(bad))], known_tasks=TASKS, on_bad_row="skip")
    assert str(error.value).startswith(
        f"{bad}: no rows to use: all 2 rows are bad and were skipped (data.on_bad_row=skip; first: {bad}:1: image"
    )


def test_load_datasets_resolves_home_and_cwd(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_jsonl(data_dir / "a.jsonl", [make_row(0)])
    write_jsonl(data_dir / "b.jsonl", [make_row(1, ["img/1.png"])])
    monkeypatch.setenv("HOME", str(data_dir))
    monkeypatch.chdir(data_dir / "img")
    cfg = DataConfig.model_validate({"train": [{"path": "~/a.jsonl", "weight": 3}, {"path": "../b.jsonl"}]})
    a, b = load_datasets(cfg.train, known_tasks=TASKS, on_bad_row=cfg.on_bad_row)
    assert a.path == data_dir / "a.jsonl" and b.rows[0].images == [str(data_dir / "img" / "1.png")]


# --- mixture sampler ----------------------------------------------------------------------------------------


def dataset(name: str, n: int, task: str = "counting") -> LoadedDataset:
    rows = [Row.model_validate({**make_row(i, [], task), "id": f"{name}{i}"}) for i in range(n)]
    return LoadedDataset(path=Path(f"{name}.jsonl"), rows=rows)


def test_weights_mix_by_proportion() -> None:
    sampler = MixtureSampler([dataset("a", 10), dataset("b", 7, "grounding")], [3.0, 1.0], seed=0)
    n = 4000
    counts = counts_by_task(draw_rows(sampler, n))
    # Binomial(n, 0.75): sd = sqrt(0.75 * 0.25 / n) ~ 0.0068; 5 sd leaves a false-failure chance below 1e-6.
    tolerance = 5 * math.sqrt(0.75 * 0.25 / n)
    assert abs(counts["counting"] / n - 0.75) < tolerance
    assert counts == {"counting": counts["counting"], "grounding": n - counts["counting"]}


def test_each_epoch_covers_every_row_once() -> None:
    a, b = dataset("a", 7), dataset("b", 5)
    drawn = [r.id for r in draw_rows(MixtureSampler([a, b], [1.0, 1.0], seed=1), 200)]
    for ds in (a, b):
        ids = {r.id for r in ds.rows}
        walk = [i for i in drawn if i in ids]
        epochs = [walk[k : k + len(ids)] for k in range(0, len(walk) - len(ids) + 1, len(ids))]
        assert len(epochs) >= 5 and all(sorted(e) == sorted(ids) for e in epochs)
        assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs


def test_same_seed_same_draws_other_seed_differs() -> None:
    def draws(seed: int) -> list[str]:
        return [r.id for r in draw_rows(MixtureSampler([dataset("a", 9), dataset("b", 4)], [2.0, 1.0], seed), 50)]

    assert draws(3) == draws(3) and draws(3) != draws(4)


@pytest.mark.parametrize(("k", "m"), [(0, 30), (5, 17), (13, 40)])
def test_state_round_trip_continues_exactly(k: int, m: int) -> None:
    def fresh() -> MixtureSampler:
        return MixtureSampler([dataset("a", 6), dataset("b", 3)], [1.0, 2.0], seed=7)

    sampler = fresh()
    draw_rows(sampler, k)
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = [r.id for r in draw_rows(sampler, m)]
    restored = fresh()
    draw_rows(restored, 3)  # its own progress is overwritten by the restore
    restored.load_state_dict(state)
    assert [r.id for r in draw_rows(restored, m)] == expected


def test_state_for_other_datasets_is_refused() -> None:
    state = MixtureSampler([dataset("a", 6)], [1.0], seed=0).state_dict()
    with pytest.raises(ValueError, match="dataset sizes"):
        MixtureSampler([dataset("a", 5)], [1.0], seed=0).load_state_dict(state)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, 0.0], r"weights\[1\] = 0.0"),
        ([-2.0, 1.0], r"weights\[0\] = -2.0"),
        ([1.0, math.inf], r"weights\[1\] = inf"),
        ([math.nan, 1.0], r"weights\[0\] = nan"),
        ([1.0], "1 weights for 2 datasets"),
    ],
)
def test_bad_weights(weights: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MixtureSampler([dataset("a", 2), dataset("b", 2)], weights, seed=0)


def test_empty_dataset_is_refused() -> None:
    with pytest.raises(ValueError, match=r"datasets\[1\] \(b.jsonl\) has no rows"):
        MixtureSampler([dataset("a", 2), dataset("b", 0)], [1.0, 1.0], seed=0)
