"""Where the toy world of given settings lives; the config resolves model and data paths with it, cheaply.

Each settings' world has its own folder `<toy_world.root>/<hash of the settings>/`, so changing a `toy_world.*`
key builds a new world beside the old one instead of over it. A root that is itself a world of these settings
(one built by morl before worlds had their own folders, or a root pointing straight at a world) is used as is.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from morl.toy.config import ToyWorldConfig

BUILD_VERSION = 6  # bump when the world's construction changes, so caches rebuild
STAMP = "world.json"  # the settings a finished world was built from, written last


def fingerprint(cfg: ToyWorldConfig) -> dict:
    """Everything the world's contents depend on (not where it lives)."""
    return {"version": BUILD_VERSION, **cfg.model_dump(mode="json", exclude={"root"})}


def fingerprint_hash(cfg: ToyWorldConfig) -> str:
    return hashlib.sha256(json.dumps(fingerprint(cfg), sort_keys=True).encode()).hexdigest()[:12]


def read_stamp(folder: Path) -> dict | None:
    """The settings of the world in `folder`, or None when it holds no readable stamp."""
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and "version" in stamp else None


def world_dir(cfg: ToyWorldConfig) -> Path:
    """The folder of the world of these settings (built or not)."""
    root = Path(cfg.root).expanduser()
    if read_stamp(root) == fingerprint(cfg):
        return root
    return root / fingerprint_hash(cfg)
