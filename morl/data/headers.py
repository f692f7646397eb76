"""Image headers (size, format) read without decoding any pixel: in parallel threads, cached by file size and mtime.

Why headers only: `Image.open` parses the header and stops, where `verify()` or a decode reads every byte (hours for
10^6 images). What a header cannot show, a body cut short, the encoder finds when the prompt is drawn, and the row is
then a bad row (`PromptSource.draw_encoded`): it costs one prompt, not the run.
Why threads: reading a header is a file open and a small read, which on network storage or a cold disk waits far
longer than it computes; threads overlap those waits. (On a warm local disk PIL's parsing holds the GIL and threads
gain little; the cache is what makes a restart fast there.)
Why a cache: a resume or a second run re-reads nothing that did not change, at one `stat` per image. It is one JSON
file per data file under `data.header_cache`, keyed by image path and valid while the file's (size, mtime) are those
the header was read at; the newest `CACHE_FILES_KEPT` data files' caches are kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import warnings
from collections.abc import Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

log = logging.getLogger("morl.data")

READ_THREADS = 16  # header reads in flight: I/O waits, not CPU, bound them
CHUNK = 256  # paths per thread task: one future per image would cost more than a cached lookup
CACHE_FILES_KEPT = 256
CACHE_VERSION = 1


@dataclass(frozen=True)
class ImageHeader:
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class HeaderProblem:
    """Why an image has no usable header: not a file, past PIL's own size limit, or not an image PIL reads."""

    kind: Literal["missing", "too big", "unreadable"]
    detail: str = ""


HeaderResult = ImageHeader | HeaderProblem


def read_header(source: str | bytes) -> HeaderResult:
    """One image's header (a path or the encoded file's bytes); PIL's decompression-bomb warning is the caller's."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return ImageHeader(*image.size, image.format or "")
    except Image.DecompressionBombError as e:  # past PIL's hard limit, which stops it before the size is known
        return HeaderProblem("too big", str(e))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for what it cannot read
        return HeaderProblem("unreadable", str(e) or type(e).__name__)


def read_headers(paths: Collection[str], cache_dir: Path | None, data_file: Path) -> dict[str, HeaderResult]:
    """The header of each image path (absolute), read in parallel; `cache_dir` (None: no cache) holds what
    `data_file`'s images' headers were, so unchanged images are not opened again."""
    cache_file = None if cache_dir is None else _cache_file(cache_dir, data_file)
    cached = _load_cache(cache_file) if cache_file else {}
    paths = list(paths)
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    results: dict[str, HeaderResult] = {}
    fresh: dict[str, list] = {}
    with warnings.catch_warnings():  # filters are process-wide, so this covers the threads too
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the loader's size check says it, per row
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for chunk in pool.map(lambda chunk: [_header_of(p, cached.get(p)) for p in chunk], chunks):
                for path, result, entry in chunk:
                    results[path] = result
                    if entry is not None:
                        fresh[path] = entry
    if cache_file is not None and fresh != cached:
        _save_cache(cache_file, data_file, fresh)
    return results


def _header_of(path: str, entry: list | None) -> tuple[str, HeaderResult, list | None]:
    """(path, header or problem, cache entry [size, mtime_ns, width, height, format] for a good header)."""
    try:
        st = os.stat(path)
    except OSError:
        return path, HeaderProblem("missing"), None
    if not stat.S_ISREG(st.st_mode):
        return path, HeaderProblem("missing"), None
    if entry is not None and entry[:2] == [st.st_size, st.st_mtime_ns]:
        return path, ImageHeader(*entry[2:]), entry
    header = read_header(path)
    if isinstance(header, HeaderProblem):
        return path, header, None
    return path, header, [st.st_size, st.st_mtime_ns, header.width, header.height, header.format]


def _cache_file(cache_dir: Path, data_file: Path) -> Path:
    return cache_dir.expanduser() / f"images-{hashlib.sha256(str(data_file).encode()).hexdigest()[:20]}.json"


def _load_cache(file: Path) -> dict[str, list]:
    """The cached entries, or none if the file is absent, unreadable or of another version (it is only a cache)."""
    try:
        saved = json.loads(file.read_text())
        return saved["images"] if saved.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _save_cache(file: Path, data_file: Path, entries: dict[str, list]) -> None:
    """Write the cache whole (a temp file renamed over it, so a reader never sees half), and prune old ones."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        temp = file.with_suffix(f".{os.getpid()}.tmp")
        temp.write_text(json.dumps({"version": CACHE_VERSION, "data_file": str(data_file), "images": entries}))
        os.replace(temp, file)
        _prune(file.parent.glob("images-*.json"))  # its own files only
    except OSError as e:  # a read-only or full cache dir slows the next start, nothing more
        log.warning("could not write the image header cache %s: %s", file, e)


def _prune(files: Iterable[Path]) -> None:
    by_age = sorted(files, key=lambda f: f.stat().st_mtime, reverse=True)
    for old in by_age[CACHE_FILES_KEPT:]:
        old.unlink(missing_ok=True)
