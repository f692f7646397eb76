"""Shared fixtures: one tiny toy world per test session, built locally (nothing downloaded)."""

import os

import pytest

from helpers import TINY_WORLD

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    from morl.toy.config import ToyWorldConfig
    from morl.toy.world import ensure_toy_world

    # under pytest-xdist each worker has a session of its own: they share one world, in the run's common temporary
    # folder (the build's lock makes the others wait for the first builder and reuse its world)
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return ensure_toy_world(ToyWorldConfig(root=str(shared / "toy" / "world"), **TINY_WORLD))
