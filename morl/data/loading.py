"""Loading JSONL/Parquet data files: every row checked up front (schema, task type, images and videos, sizes).

A bad row fails in seconds with ``file:line: what is wrong`` instead of hours into a run.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image
from pydantic import ValidationError

from morl.data.budget import VisionBudget
from morl.data.config import DEFAULT_MAX_IMAGE_PIXELS, DatasetSpec, OnBadRow, VideoSettings
from morl.data.headers import HeaderProblem, HeaderResult, ImageHeader, read_header, read_headers
from morl.data.rows import DataError, Row
from morl.data.video import VideoError, VideoHeader
from morl.data.video import read_header as read_video_header
from morl.types import ImageRef, VideoRef

log = logging.getLogger("morl.data")

MAX_SKIP_REASONS = 5


@dataclass
class LoadedDataset:
    """The good rows of one file, where each came from, and how many bad ones were skipped (the first few reasons)."""

    path: Path
    rows: list[Row]
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # each row's line (JSONL) or row index (Parquet); default 1, 2, ...
    shown: str = ""  # the path as the recipe wrote it (default: `path`)
    parquet: bool = False

    def __post_init__(self) -> None:
        self.lines = self.lines or list(range(1, len(self.rows) + 1))
        self.shown = self.shown or str(self.path)

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, index: int) -> str:
        """``file:line`` (or ``file:row n``) of row `index`, as the loader's errors name it."""
        return _place(self.shown, self.parquet, self.lines[index])


def _place(shown: str, parquet: bool, line: int) -> str:
    return f"{shown}:{'row ' if parquet else ''}{line}"


_Written = tuple[list[ImageRef], list[VideoRef]]  # a row's images and videos as its data file names them


class _BadRow(Exception):
    """What is wrong with one row; the loader adds where it is."""


@dataclass
class _Media:
    """What the loader read of the run's media files: image headers, and video headers or what is wrong."""

    images: dict[str, HeaderResult]
    videos: dict[str, VideoHeader | str | None]  # None: no such file; str: why it cannot be read


def load_dataset(
    path: str | Path,
    *,
    known_tasks: Collection[str] | None,
    on_bad_row: OnBadRow = "error",
    check_images: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_media: Mapping[str, int] | None = None,
    label_keys: Mapping[str, Mapping[str, str]] | None = None,
    budget: VisionBudget | None = None,
    video: VideoSettings = VideoSettings(),
    header_cache: Path | None = None,
) -> LoadedDataset:
    """Load and check a ``.jsonl`` or ``.parquet`` file of rows.

    Relative paths resolve against the working directory; relative image and video paths against the data file's
    folder (they may lead out of it). A bad row raises ``DataError`` naming the first bad row in file order, or with
    ``on_bad_row="skip"`` is counted and logged once per file.

    Images are checked by their headers alone (morl/data/headers.py: read in parallel, cached under `header_cache`
    by size and mtime): a file that is missing or not an image, or over ``max_image_pixels`` (width x height), is a
    bad row, as are a video whose container cannot be read and a bad ``meta.video`` override. ``check_images=False``
    opens no image or video file (paths are still made absolute). ``max_media`` ({"image": n, "video": m},
    `rollout.max_<kind>s_per_prompt`) makes a row with more images or videos than that a bad row, at load time rather
    than in a rollout worker. ``label_keys`` ({task: {label key: the reward that reads it}}) makes a row whose label
    lacks one a bad row. ``budget``: a row whose images and videos (sampled by `video` and the row's ``meta.video``)
    alone cost more tokens than ``budget.max_prompt_tokens`` is a bad row.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    shown = str(path)
    file = Path(path).expanduser().absolute()
    if not file.is_file():
        raise DataError(f"{shown}: data file not found (resolved {file})")
    records: Iterator[tuple[int, Any]]
    decode: Callable[[Any], Any]
    if file.suffix == ".jsonl":
        records, decode = _jsonl_records(file), _decode_json_line
    elif file.suffix == ".parquet":
        records, decode = _parquet_records(file, shown), _decode_parquet_record
    else:
        raise DataError(f"{shown}: unsupported data file type {file.suffix!r} (use .jsonl or .parquet)")

    dataset = LoadedDataset(path=file, rows=[], shown=shown, parquet=file.suffix == ".parquet")
    folder = str(file.parent)
    parsed: list[tuple[int, Row | str, _Written]] = []  # (line, row or what is wrong, its media as written)
    for line, raw in records:
        try:
            row = _check_row(decode(raw), known_tasks)
            _check_media_count(row, max_media or {})
            _check_label_keys(row, (label_keys or {}).get(row.task, {}))
            parsed.append((line, row, _make_media_absolute(row, folder)))
        except _BadRow as bad:
            parsed.append((line, str(bad), ([], [])))
    good = [row for _, row, _ in parsed if isinstance(row, Row)]
    media = _read_media(good, video, header_cache, file) if check_images else None

    first_seen: dict[str, str] = {}
    for line, row, written in parsed:
        where = _place(shown, dataset.parquet, line)
        try:
            if isinstance(row, str):
                raise _BadRow(row)
            if media is not None:
                _check_media(row, written, media, max_image_pixels, budget, video)
            if row.id in first_seen:
                raise _BadRow(f"duplicate id {row.id!r} (first at {first_seen[row.id]})")
        except _BadRow as bad:
            reason = f"{where}: {bad}"
            if on_bad_row == "error":
                raise DataError(reason) from None
            dataset.skipped += 1
            if len(dataset.skip_reasons) < MAX_SKIP_REASONS:
                dataset.skip_reasons.append(reason)
            continue
        first_seen[row.id] = where
        dataset.rows.append(row)
        dataset.lines.append(line)
    if dataset.skipped:
        log.warning("skipped %d bad rows of %s (first: %s)", dataset.skipped, shown, dataset.skip_reasons[0])
    return dataset


def _jsonl_records(file: Path) -> Iterator[tuple[int, str]]:
    with file.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, line


def _parquet_records(file: Path, shown: str) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        records = pq.read_table(file).to_pylist()
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{shown}: cannot read Parquet file: {e}") from None
    for index, record in enumerate(records):
        yield index, record


def _decode_json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadRow(f"invalid JSON: {e.msg} (column {e.colno})") from None


def _decode_parquet_record(record: dict[str, Any]) -> dict[str, Any]:
    """Turn one Parquet record into the JSONL row shape.

    ``messages``/``label``/``meta`` may be JSON strings or nested structs. Arrow structs give every row every
    field of the column, absent ones as null, so null struct fields are dropped. Images may be paths, bytes,
    or Hugging Face ``{"bytes", "path"}`` structs.
    """
    out = dict(record)
    for key in ("messages", "label", "meta"):
        value = out.get(key)
        if isinstance(value, str):
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError as e:
                raise _BadRow(f"{key}: invalid JSON: {e.msg} (column {e.colno})") from None
        elif value is None and key == "meta":
            out.pop(key, None)
        else:
            out[key] = _drop_null_fields(value)
    if isinstance(out.get("images"), list):
        out["images"] = [_hf_image(ref) if isinstance(ref, dict) else ref for ref in out["images"]]
    return out


def _drop_null_fields(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_null_fields(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_null_fields(v) for v in value]
    return value


def _hf_image(ref: dict[str, Any]) -> Any:
    return ref.get("bytes") if ref.get("bytes") is not None else ref.get("path")


def _check_row(obj: Any, known_tasks: Collection[str] | None) -> Row:
    """The row's schema, task and video settings (no file opened)."""
    if not isinstance(obj, dict):
        raise _BadRow(f"expected a JSON object, got {type(obj).__name__}")
    try:
        row = Row.model_validate(obj)
    except ValidationError as e:
        raise _BadRow(_describe(e)) from None
    if known_tasks is not None and row.task not in known_tasks:
        raise _BadRow(f"unknown task {row.task!r} (known: {', '.join(sorted(known_tasks))})")
    try:
        if "video" in row.meta:  # a settings object per row otherwise: a tenth of the load at 10^5 rows
            VideoSettings().for_row(row.meta)
    except (ValidationError, ValueError) as e:
        raise _BadRow(f"meta.video: {_describe(e) if isinstance(e, ValidationError) else e}") from None
    return row


def _make_media_absolute(row: Row, base: str) -> _Written:
    """Make the row's image and video paths absolute (`base`: the data file's folder); returns them as written.

    A lexical join, not `Path.resolve()`: that costs an lstat per path component, a third of the load at 10^5 images.
    """

    def absolute(ref: str) -> str:
        return os.path.abspath(os.path.join(base, ref))

    written = (row.images, row.videos)
    row.images = [ref if isinstance(ref, bytes) else absolute(ref) for ref in row.images]
    row.videos = [[absolute(f) for f in ref] if isinstance(ref, list) else absolute(ref) for ref in row.videos]
    return written


def _check_media_count(row: Row, max_media: Mapping[str, int]) -> None:
    for kind, refs in (("image", row.images), ("video", row.videos)):
        if kind in max_media and len(refs) > max_media[kind]:
            raise _BadRow(
                f"{len(refs)} {kind}s in one prompt, more than rollout.max_{kind}s_per_prompt={max_media[kind]} "
                "(raise it to take such rows; the vllm engine reserves memory for that many)"
            )


def _check_label_keys(row: Row, readers: Mapping[str, str]) -> None:
    missing = [key for key in readers if key not in row.label]
    if missing:
        read = ", ".join(f"{key!r} (read by reward {readers[key]!r})" for key in missing)
        have = ", ".join(map(repr, row.label)) or "none"
        raise _BadRow(f"task {row.task!r}: label has no {read}; its keys: {have}")


def _read_media(rows: list[Row], video: VideoSettings, header_cache: Path | None, data_file: Path) -> _Media:
    """The headers of every image and video file the rows name, each read once (images in parallel, cached)."""
    images = {ref for row in rows for ref in row.images if isinstance(ref, str)}
    images |= {frame for row in rows for ref in row.videos if isinstance(ref, list) for frame in ref}
    videos: dict[str, VideoHeader | str | None] = {}
    for ref in {ref for row in rows for ref in row.videos if isinstance(ref, str)}:
        try:
            videos[ref] = read_video_header(ref, frames_fps=video.fps) if Path(ref).is_file() else None
        except VideoError as e:
            videos[ref] = str(e)
    return _Media(read_headers(images, header_cache, data_file), videos)


def _check_media(
    row: Row, written: _Written, media: _Media, max_pixels: int, budget: VisionBudget | None, video: VideoSettings
) -> None:
    """Each image and video of the row readable (by its header) and within `max_pixels`, and their tokens within the
    budget; the first problem raises _BadRow naming the file as `written` (the row as its data file has it)."""
    tokens = 0
    for index, (ref, as_written) in enumerate(zip(row.images, written[0])):
        header = _image_header(ref, as_written, index, media, max_pixels)
        if budget:
            tokens += _tokens(budget.image_tokens, header.width, header.height, what=_image_name(as_written, index))
    settings = video.for_row(row.meta)
    for ref, as_written in zip(row.videos, written[1]):
        if isinstance(ref, list):
            first, *rest = [_image_header(f, w, i, media, max_pixels) for i, (f, w) in enumerate(zip(ref, as_written))]
            header = VideoHeader(len(ref), settings.fps, first.width, first.height)
            what = f"video {as_written[0]!r} (+{len(ref) - 1} frames)"
        else:
            header, what = media.videos[ref], f"video {as_written!r}"
            if header is None:
                raise _BadRow(f"{what} not found (resolved {ref})")
            if isinstance(header, str):
                raise _BadRow(header)
            if header.width * header.height > max_pixels:
                raise _BadRow(
                    f"{what} has frames of {header.width} x {header.height}, over data.max_image_pixels={max_pixels:,}"
                )
        if budget:
            tokens += _tokens(budget.video_tokens, header, settings, what=what)
    if budget and tokens > budget.max_prompt_tokens:
        raise _BadRow(
            f"its images and videos alone are {tokens:,} tokens (by their sizes and the processor's resize rules), "
            f"over rollout.max_prompt_tokens={budget.max_prompt_tokens:,}; multimodal prompts are never truncated"
        )


def _image_name(as_written: ImageRef, index: int) -> str:
    return f"image {index} ({len(as_written)} bytes)" if isinstance(as_written, bytes) else f"image {as_written!r}"


def _image_header(ref: ImageRef, as_written: ImageRef, index: int, media: _Media, max_pixels: int) -> ImageHeader:
    """The header of one image (an absolute path or bytes), or _BadRow saying what is wrong with it."""
    if isinstance(ref, bytes):
        what = _image_name(ref, index)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below says it
            header = read_header(ref)
    else:
        what, header = f"{_image_name(as_written, index)} (resolved {ref})", media.images[ref]
    too_big = f"{what} is over data.max_image_pixels={max_pixels:,}"
    if isinstance(header, HeaderProblem):
        if header.kind == "missing":
            raise _BadRow(f"{_image_name(as_written, index)} not found (resolved {ref})")
        if header.kind == "too big":
            raise _BadRow(f"{too_big}: {header.detail}")
        raise _BadRow(f"{what} is not a readable image: {header.detail}")
    if header.width * header.height > max_pixels:
        raise _BadRow(f"{too_big}: {header.width} x {header.height} = {header.width * header.height:,} pixels")
    return header


def _tokens(count: Callable[..., int], *args: Any, what: str) -> int:
    try:
        return count(*args)
    except VideoError as e:  # a shape or a budget the processor refuses
        raise _BadRow(f"{what}: {e}") from None


def _describe(error: ValidationError) -> str:
    """A pydantic error in one line: ``missing field 'task'; messages.0.role: Input should be ...``."""
    errors = error.errors(include_url=False)
    # The `str | list` content union reports both branches and labels them in the location; when the input is
    # not a string, the string branch's complaint is noise, and the labels are no field of the row.
    errors = [e for e in errors if not (e["type"] == "string_type" and e["loc"][-1:] == ("str",))] or errors
    parts = []
    for e in errors[:3]:
        loc = ".".join(str(x) for x in e["loc"] if x != "str" and "[" not in str(x))
        if e["type"] == "missing":
            parts.append(f"missing field {loc!r}")
        elif e["type"] == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
        else:
            msg = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]
            parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)



def load_datasets(
    specs: Sequence[DatasetSpec],
    *,
    known_tasks: Collection[str] | None,
    on_bad_row: OnBadRow,
    **checks: Any,
) -> list[LoadedDataset]:
    """Load each spec's file, in order, with `load_dataset`'s `checks` (weights stay with the specs, for
    ``MixtureSampler``).

    A file with no usable row is a ``DataError``: a mixture cannot draw from it, an evaluation has nothing to score.
    """
    datasets = []
    for spec in specs:
        dataset = load_dataset(spec.path, known_tasks=known_tasks, on_bad_row=on_bad_row, **checks)
        if not dataset.rows:
            why = (
                f"all {dataset.skipped} rows are bad and were skipped (data.on_bad_row=skip; first: "
                f"{dataset.skip_reasons[0]})"
                if dataset.skipped
                else "the file has no rows"
            )
            raise DataError(f"{spec.path}: no rows to use: {why}")
        datasets.append(dataset)
    return datasets
