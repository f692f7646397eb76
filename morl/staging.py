"""Checkpoint files of learner ranks whose node cannot see the run directory: written on their node, copied to the
driver's run directory through Ray, and back for a resume.

A cluster without a shared filesystem still keeps every checkpoint whole in the driver's run directory: a rank on
a blind node (one the start-up marker check found cannot see `trainer.output_dir`) writes into a staging
directory on its own disk (`ray.staging_dir`, default the node's temp directory), and the driver pulls those
files in chunks through Ray's object store into the checkpoint it is writing, then deletes the staged copy. A
resume pushes the checkpoint's engine state the other way, once per blind node. Each node's staging directory is
the run's own (a fresh `morl-stage-*` directory), removed when the run ends.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

CHUNK_BYTES = 64 << 20  # one object in Ray's store at a time per chunk
IN_FLIGHT = 4  # chunks requested ahead, so reading, moving and writing overlap


@ray.remote(num_cpus=0)
class NodeStage:
    """One node's staging directory for one run: where that node's blind ranks write, read and written by chunks."""

    def __init__(self, parent: str | None):
        parent_dir = Path(parent) if parent else Path(tempfile.gettempdir())
        parent_dir.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="morl-stage-", dir=parent_dir))

    def directory(self) -> str:
        return str(self.root)

    def files(self, name: str) -> list[tuple[str, int]]:
        """(path relative to the staged `name`, size) of each file under it."""
        top = self.root / name
        return [(str(f.relative_to(top)), f.stat().st_size) for f in sorted(top.rglob("*")) if f.is_file()]

    def read(self, name: str, relative: str, offset: int, size: int) -> bytes:
        with open(self.root / name / relative, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def write(self, name: str, relative: str, offset: int, data: bytes) -> None:
        file = self.root / name / relative
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(file, "r+b" if offset else "wb") as f:
            f.seek(offset)
            f.write(data)

    def remove(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass(frozen=True)
class Copied:
    """What one copy moved, for the run's log."""

    files: int
    nbytes: int
    seconds: float

    def __str__(self) -> str:
        rate = self.nbytes / 2**20 / self.seconds if self.seconds > 0 else float("inf")
        return f"{self.files} files, {self.nbytes / 2**20:.1f} MiB in {self.seconds:.1f} s ({rate:.0f} MiB/s)"


def start_stage(node_id: str, parent: str | None) -> ray.actor.ActorHandle:
    """A NodeStage on the node `node_id` (pinned there: the files it holds are that node's)."""
    return NodeStage.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(parent)


def _chunks(files: list[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """(file, offset, size) of every chunk; an empty file is one empty chunk, so it is created too."""
    return [(rel, offset, min(CHUNK_BYTES, size - offset))
            for rel, size in files for offset in range(0, max(size, 1), CHUNK_BYTES)]


def pull(stage: ray.actor.ActorHandle, name: str, dest: Path) -> Copied:
    """Copy the staged `name` into `dest`, merged with what is there (the files of ranks that wrote there)."""
    start = time.perf_counter()
    files = ray.get(stage.files.remote(name))
    chunks = _chunks(files)
    pending = [stage.read.remote(name, *chunk) for chunk in chunks[:IN_FLIGHT]]
    for i, (rel, offset, _) in enumerate(chunks):
        data = ray.get(pending.pop(0))
        if i + IN_FLIGHT < len(chunks):
            pending.append(stage.read.remote(name, *chunks[i + IN_FLIGHT]))
        file = dest / rel
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(file, "r+b" if offset else "wb") as f:
            f.seek(offset)
            f.write(data)
    return Copied(len(files), sum(size for _, size in files), time.perf_counter() - start)


def push(source: Path, stage: ray.actor.ActorHandle, name: str) -> Copied:
    """Copy the tree `source` into the stage as `name`, replacing what was staged under that name."""
    start = time.perf_counter()
    ray.get(stage.remove.remote(name))
    files = [(str(f.relative_to(source)), f.stat().st_size) for f in sorted(source.rglob("*")) if f.is_file()]
    pending = []
    for rel, offset, size in _chunks(files):
        with open(source / rel, "rb") as f:
            f.seek(offset)
            pending.append(stage.write.remote(name, rel, offset, f.read(size)))
        if len(pending) >= IN_FLIGHT:
            ray.get(pending.pop(0))
    ray.get(pending)
    return Copied(len(files), sum(size for _, size in files), time.perf_counter() - start)
