"""Short labels for several paths: the shortest endings that tell them apart (run directories, data files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def distinct_endings(paths: Sequence[str | Path]) -> list[str]:
    """The shortest path endings, the same depth for all, that no two paths share (`a/run` and `b/run`, not `run`
    twice); the paths as given when two are one."""
    parts = [Path(p).expanduser().resolve().parts for p in paths]
    for depth in range(1, max((len(p) for p in parts), default=0) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]
