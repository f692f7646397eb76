"""The JSON contract between the router and a reward service, both halves, so anyone can host a reward.

    POST <url>   {"samples": [{"task", "response", "full_response", "label", "images", "videos", "meta"}, ...]}
    200          {"rewards": [float | null, ...], "errors": [str | null, ...]}

One reward per sample, in order; a null reward carries its reason in `errors` (optional when every reward is a
number). Images are strings: absolute paths, or `data:<mime>;base64,<bytes>` URLs; a video is one such string (the
whole file) or a list of them (its frames). Anything else from a service (a non-2xx status, a body that is not this
shape) fails every sample of the request; the router counts those failures like any reward error, never as a
score. rewards/README.md documents the contract for users.
"""

from __future__ import annotations

import base64
import json
import logging
import mimetypes
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from PIL import Image

from morl.data.rows import open_image as open_image_ref
from morl.rewards.adapters import finite_score
from morl.rewards.sandbox import MAX_ERROR_CHARS, Outcome
from morl.rewards.types import RewardInput

log = logging.getLogger(__name__)

ScoreBatch = Callable[[list[RewardInput]], list[Outcome]]  # a service's scorer: one outcome per sample, in order


class ContractError(ValueError):
    """A request or response that does not follow the contract."""


# --- the router's side ---


def encode_sample(sample: RewardInput, images: str) -> str:
    """One sample as the JSON text of a request entry; `images` ("base64", "path" or "none") is how its images and
    videos travel.

    Raises OSError for an unreadable image or video and TypeError for a label or meta that is not JSON, so the
    caller can fail that sample alone.
    """
    return json.dumps(
        {
            "task": sample.task,
            "response": sample.response,
            "full_response": sample.full_response,
            "label": sample.label,
            "images": _media_refs(sample.images, images),
            "videos": _media_refs(sample.videos, images),
            "meta": sample.meta,
        }
    )


def _media_refs(paths: Sequence[str | tuple[str, ...]], mode: str) -> list[str | list[str]]:
    """Each file (or list of frame files) as `mode` sends it: inline as data URLs, as the path, or not at all."""
    if mode == "none":
        return []
    ref = _data_url if mode == "base64" else str
    return [ref(path) if isinstance(path, str) else [ref(frame) for frame in path] for path in paths]


def request_body(encoded_samples: Sequence[str]) -> bytes:
    """The request for samples already encoded by `encode_sample`."""
    return ('{"samples": [' + ", ".join(encoded_samples) + "]}").encode()


def decode_response(payload: Any, n: int) -> list[Outcome]:
    """A service's answer for `n` samples as outcomes; raises ContractError when the answer as a whole is wrong."""
    if not isinstance(payload, dict) or not isinstance(payload.get("rewards"), list):
        raise ContractError('the answer is not an object with a "rewards" list')
    rewards, errors = payload["rewards"], payload.get("errors")
    if errors is None:
        errors = [None] * len(rewards)
    if not isinstance(errors, list):
        raise ContractError('"errors" is not a list')
    if len(rewards) != n or len(errors) != n:
        raise ContractError(f"{len(rewards)} rewards and {len(errors)} errors for {n} samples")
    return [_outcome(reward, error) for reward, error in zip(rewards, errors)]


def _outcome(reward: Any, error: Any) -> Outcome:
    if error is not None:
        return None, f"service: {error}"[:MAX_ERROR_CHARS]
    if reward is None:
        return None, "service returned a null reward without an error"
    try:
        return finite_score(reward), None  # the router clamps it, counting values outside [0, 1]
    except (TypeError, ValueError) as e:
        return None, f"service: {e}"


# a group's G samples share their images and videos: read and encode each file once; few kept, as a video inline
# weighs megabytes (services that take long videos should use `images: path`)
@lru_cache(maxsize=32)
def _data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


# --- the service's side ---


def handle(score: ScoreBatch, body: bytes) -> tuple[int, dict[str, Any]]:
    """Answer one request: (HTTP status, JSON body). 400 for a request off the contract, 500 when `score` fails."""
    try:
        samples = decode_request(json.loads(body))
    except ValueError as e:  # ContractError, or json.JSONDecodeError
        return 400, {"error": f"bad request: {e}"}
    if not samples:
        return 200, {"rewards": [], "errors": []}  # also the health probe
    try:
        outcomes = score(samples)
    except Exception as e:
        log.exception("reward service failed on a batch of %d samples", len(samples))
        return 500, {"error": f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]}
    if len(outcomes) != len(samples):
        return 500, {"error": f"the scorer returned {len(outcomes)} outcomes for {len(samples)} samples"}
    return 200, {"rewards": [reward for reward, _ in outcomes], "errors": [error for _, error in outcomes]}


def decode_request(payload: Any) -> list[RewardInput]:
    """The samples of a request; only `response` is required, the other keys default to empty."""
    if not isinstance(payload, dict) or not isinstance(payload.get("samples"), list):
        raise ContractError('the request is not an object with a "samples" list')
    return [_sample(i, entry) for i, entry in enumerate(payload["samples"])]


def _sample(i: int, entry: Any) -> RewardInput:
    if not isinstance(entry, dict):
        raise ContractError(f"samples[{i}] is not an object")
    fields = {
        "response": (entry.get("response"), str),
        "full_response": (entry.get("full_response", entry.get("response")), str),
        "task": (entry.get("task", ""), str),
        "label": (entry.get("label", {}), dict),
        "images": (entry.get("images", []), list),
        "videos": (entry.get("videos", []), list),
        "meta": (entry.get("meta", {}), dict),
    }
    for key, (value, kind) in fields.items():
        if not isinstance(value, kind):
            raise ContractError(f"samples[{i}].{key} must be a {kind.__name__}, got {type(value).__name__}")
    images, videos = fields["images"][0], fields["videos"][0]
    if not all(isinstance(ref, str) for ref in images):
        raise ContractError(f"samples[{i}].images must be strings (paths or data: URLs)")
    if not all(_is_video_ref(ref) for ref in videos):
        raise ContractError(f"samples[{i}].videos must be strings (paths or data: URLs) or non-empty lists of them")
    media = {"images": tuple(images), "videos": tuple(ref if isinstance(ref, str) else tuple(ref) for ref in videos)}
    return RewardInput(**{key: value for key, (value, _) in fields.items()} | media)


def _is_video_ref(ref: Any) -> bool:
    """A video file's ref, or a non-empty list of its frames' refs (a row has no video without frames)."""
    return isinstance(ref, str) or (isinstance(ref, list) and bool(ref) and all(isinstance(f, str) for f in ref))


def open_image(ref: str) -> Image.Image:
    """An image of a request (a frame of a video too), from its absolute path or its `data:` URL, as RGB."""
    return open_image_ref(media_bytes(ref) if ref.startswith("data:") else ref)


def media_bytes(ref: str) -> bytes:
    """The file an image or video ref of a request stands for: its path read, or its `data:` URL decoded.

    For a video sent inline: video decoders that read from memory take these bytes (`av.open(io.BytesIO(data))`);
    one that needs a path, write them to a temporary file. A video sent as a path needs no decoding here.
    """
    if not ref.startswith("data:"):
        with open(ref, "rb") as f:
            return f.read()
    header, _, data = ref.partition(",")
    if not header.endswith(";base64"):
        raise ValueError(f"data URL is not base64 ({header[:40]!r})")
    return base64.b64decode(data, validate=True)
