"""The JSON contract between the router and a reward service, both halves, so anyone can host a reward.

    POST <url>   {"samples": [{"task", "response", "full_response", "label", "images", "meta"}, ...]}
    200          {"rewards": [float | null, ...], "errors": [str | null, ...]}

One reward per sample, in order; a null reward carries its reason in `errors` (optional when every reward is a
number). Images are strings: absolute paths, or `data:<mime>;base64,<bytes>` URLs. Anything else from a service
(a non-2xx status, a body that is not this shape) fails every sample of the request; the router counts those
failures like any reward error, never as a score. rewards/README.md documents the contract for users.
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
    """One sample as the JSON text of a request entry; `images` is "base64", "path" or "none".

    Raises OSError for an unreadable image and TypeError for a label or meta that is not JSON, so the caller can
    fail that sample alone.
    """
    refs = [] if images == "none" else [_data_url(path) if images == "base64" else path for path in sample.images]
    return json.dumps(
        {
            "task": sample.task,
            "response": sample.response,
            "full_response": sample.full_response,
            "label": sample.label,
            "images": refs,
            "meta": sample.meta,
        }
    )


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


@lru_cache(maxsize=256)  # a group's G samples share their images: read and encode each file once
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
        "meta": (entry.get("meta", {}), dict),
    }
    for key, (value, kind) in fields.items():
        if not isinstance(value, kind):
            raise ContractError(f"samples[{i}].{key} must be a {kind.__name__}, got {type(value).__name__}")
    images = fields["images"][0]
    if not all(isinstance(ref, str) for ref in images):
        raise ContractError(f"samples[{i}].images must be strings (paths or data: URLs)")
    return RewardInput(**{key: value for key, (value, _) in fields.items()} | {"images": tuple(images)})


def open_image(ref: str) -> Image.Image:
    """An image of a request, from its absolute path or its `data:` URL, as RGB."""
    if ref.startswith("data:"):
        header, _, data = ref.partition(",")
        if not header.endswith(";base64"):
            raise ValueError(f"image data URL is not base64 ({header[:40]!r})")
        return open_image_ref(base64.b64decode(data, validate=True))
    return open_image_ref(ref)
