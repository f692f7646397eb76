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

    return ensure_toy_world(ToyWorldConfig(root=str(tmp_path_factory.mktemp("toy") / "world"), **TINY_WORLD))
