"""Loading JSONL/Parquet data files: every row checked up front (schema, task type, images and videos, sizes).

A bad row fails in seconds with ``file:line: what is wrong`` instead of hours into a run.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image
from pydantic import ValidationError

from morl.data.config import DEFAULT_MAX_IMAGE_PIXELS, DatasetSpec, OnBadRow, VideoSettings
from morl.data.rows import DataError, Row
from morl.data.video import VideoError, read_header
from morl.types import ImageRef, VideoRef

log = logging.getLogger("morl.data")

MAX_SKIP_REASONS = 5


@dataclass
class LoadedDataset:
    """The good rows of one file, and how many bad ones were skipped (with the first few reasons)."""

    path: Path
    rows: list[Row]
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)


class _BadRow(Exception):
    """What is wrong with one row; the loader adds where it is."""


def load_dataset(
    path: str | Path,
    *,
    known_tasks: Collection[str] | None,
    on_bad_row: OnBadRow = "error",
    check_images: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_media: Mapping[str, int] | None = None,
    label_keys: Mapping[str, Mapping[str, str]] | None = None,
) -> LoadedDataset:
    """Load and check a ``.jsonl`` or ``.parquet`` file of rows.

    Relative paths resolve against the working directory; relative image and video paths against the data file's
    folder (they may lead out of it). A bad row raises ``DataError``, or with ``on_bad_row="skip"`` is counted and
    logged once per file. An image or video frame over ``max_image_pixels`` (width x height, read from its header)
    is a bad row, as are a video whose container cannot be read and a bad ``meta.video`` override.
    ``check_images=False`` skips opening image and video files (paths are still made absolute; sizes are not
    checked). ``max_media`` ({"image": n, "video": m}, `rollout.max_<kind>s_per_prompt`) makes a row with more
    images or videos than that a bad row, at load time rather than in a rollout worker.
    ``label_keys`` ({task: {label key: the reward that reads it}}) makes a row whose label lacks one a bad row.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    shown = str(path)
    file = Path(path).expanduser().absolute()
    if not file.is_file():
        raise DataError(f"{shown}: data file not found (resolved {file})")
    records: Iterator[tuple[str, Any]]
    decode: Callable[[Any], Any]
    if file.suffix == ".jsonl":
        records, decode = _jsonl_records(file, shown), _decode_json_line
    elif file.suffix == ".parquet":
        records, decode = _parquet_records(file, shown), _decode_parquet_record
    else:
        raise DataError(f"{shown}: unsupported data file type {file.suffix!r} (use .jsonl or .parquet)")

    dataset = LoadedDataset(path=file, rows=[])
    first_seen: dict[str, str] = {}
    verified: set[str] = set()
    for where, raw in records:
        try:
            row = _check_row(decode(raw), file.parent, known_tasks, check_images, max_image_pixels, verified)
            _check_media_count(row, max_media or {})
            _check_label_keys(row, (label_keys or {}).get(row.task, {}))
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
    if dataset.skipped:
        log.warning("skipped %d bad rows of %s (first: %s)", dataset.skipped, shown, dataset.skip_reasons[0])
    return dataset


def _jsonl_records(file: Path, shown: str) -> Iterator[tuple[str, str]]:
    with file.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield f"{shown}:{number}", line


def _parquet_records(file: Path, shown: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        records = pq.read_table(file).to_pylist()
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{shown}: cannot read Parquet file: {e}") from None
    for index, record in enumerate(records):
        yield f"{shown}:row {index}", record


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


def _check_row(
    obj: Any,
    base: Path,
    known_tasks: Collection[str] | None,
    check_images: bool,
    max_pixels: int,
    verified: set[str],
) -> Row:
    if not isinstance(obj, dict):
        raise _BadRow(f"expected a JSON object, got {type(obj).__name__}")
    try:
        row = Row.model_validate(obj)
    except ValidationError as e:
        raise _BadRow(_describe(e)) from None
    if known_tasks is not None and row.task not in known_tasks:
        raise _BadRow(f"unknown task {row.task!r} (known: {', '.join(sorted(known_tasks))})")
    try:
        VideoSettings().for_row(row.meta)
    except (ValidationError, ValueError) as e:
        raise _BadRow(f"meta.video: {_describe(e) if isinstance(e, ValidationError) else e}") from None
    images = enumerate(row.images)
    row.images = [_resolve_image(i, ref, base, check_images, max_pixels, verified) for i, ref in images]
    row.videos = [_resolve_video(ref, base, check_images, max_pixels, verified) for ref in row.videos]
    return row


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


def _resolve_video(ref: VideoRef, base: Path, check: bool, max_pixels: int, verified: set[str]) -> VideoRef:
    """Make a video file's path (or each of its frames' paths) absolute and, if asked, read its header."""
    if isinstance(ref, list):
        return [_resolve_image(i, frame, base, check, max_pixels, verified) for i, frame in enumerate(ref)]
    resolved = str((base / ref).resolve())
    if check and resolved not in verified:
        if not Path(resolved).is_file():
            raise _BadRow(f"video {ref!r} not found (resolved {resolved})")
        try:
            header = read_header(resolved, frames_fps=1.0)
        except VideoError as e:
            raise _BadRow(str(e)) from None
        if header.width * header.height > max_pixels:
            raise _BadRow(
                f"video {ref!r} has frames of {header.width} x {header.height}, over "
                f"data.max_image_pixels={max_pixels:,}"
            )
        verified.add(resolved)
    return resolved


def _resolve_image(
    index: int, ref: ImageRef, base: Path, check: bool, max_pixels: int, verified: set[str]
) -> ImageRef:
    """Make a path absolute and, if asked, check that it (or the bytes) decodes and is at most `max_pixels`;
    ``verified`` caches good paths."""
    if isinstance(ref, bytes):
        if check:
            _verify(io.BytesIO(ref), f"image {index} ({len(ref)} bytes)", max_pixels)
        return ref
    resolved = str((base / ref).resolve())
    if check and resolved not in verified:
        if not Path(resolved).is_file():
            raise _BadRow(f"image {ref!r} not found (resolved {resolved})")
        _verify(resolved, f"image {ref!r} (resolved {resolved})", max_pixels)
        verified.add(resolved)
    return resolved


def _verify(source: str | io.BytesIO, what: str, max_pixels: int) -> None:
    """Check the size in the header, then the file, without decoding the pixels."""
    too_big = f"{what} is over data.max_image_pixels={max_pixels:,}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check says it, per row
            with Image.open(source) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise _BadRow(f"{too_big}: {width} x {height} = {width * height:,} pixels")
                image.verify()
    except _BadRow:
        raise
    except Image.DecompressionBombError as e:  # past PIL's own hard limit, which stops it before the size is known
        raise _BadRow(f"{too_big}: {e}") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for corrupt files
        raise _BadRow(f"{what} is not a readable image: {e}") from None


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
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_media: Mapping[str, int] | None = None,
    label_keys: Mapping[str, Mapping[str, str]] | None = None,
) -> list[LoadedDataset]:
    """Load each spec's file, in order (weights stay with the specs, for ``MixtureSampler``).

    A file with no usable row is a ``DataError``: a mixture cannot draw from it, an evaluation has nothing to score.
    """
    datasets = []
    for spec in specs:
        dataset = load_dataset(
            spec.path,
            known_tasks=known_tasks,
            on_bad_row=on_bad_row,
            max_image_pixels=max_image_pixels,
            max_media=max_media,
            label_keys=label_keys,
        )
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
