"""Staged checkpoint files through a real NodeStage actor: a tree pushed to a node's staging directory and pulled
back arrives byte for byte (a file across the chunk boundary, an empty one, nested folders), merged with what the
destination holds; the staged copy and the staging directory are removed when asked."""

import os
from pathlib import Path

import pytest
import ray

from morl.ray_setup import start_ray
from morl.staging import CHUNK_BYTES, pull, push, start_stage


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    ray.shutdown()
    start_ray(num_cpus=2)
    parent = tmp_path_factory.mktemp("staging")
    actor = start_stage(ray.get_runtime_context().get_node_id(), str(parent))
    yield actor, parent
    ray.shutdown()


def tree(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def test_a_tree_pushed_and_pulled_back_arrives_whole_and_merges_with_the_destination(stage, tmp_path):
    actor, parent = stage
    source = tmp_path / "source"
    (source / "state" / "deep").mkdir(parents=True)
    (source / "state" / "big.pt").write_bytes(os.urandom(CHUNK_BYTES + 3))  # two chunks, the second 3 bytes
    (source / "state" / "deep" / "small.json").write_text('{"step": 2}')
    (source / "latest").write_bytes(b"")
    assert push(source, actor, "resume/deepspeed").files == 3

    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "trainer_state.json").write_text("kept")  # what the driver wrote there stays
    copied = pull(actor, "resume/deepspeed", dest)
    assert (copied.files, copied.nbytes) == (3, CHUNK_BYTES + 3 + 11)
    assert tree(dest) == {**tree(source), "trainer_state.json": b"kept"}

    ray.get(actor.remove.remote("resume"))
    (root,) = parent.iterdir()  # the run's own morl-stage-* directory, now empty
    assert root.name.startswith("morl-stage-") and not list(root.iterdir())
    ray.get(actor.close.remote())
    assert not list(parent.iterdir())
