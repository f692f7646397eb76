"""Shared fixtures: one tiny toy world per test session, built locally (nothing downloaded)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# The same toy-world settings as the end-to-end test passes on the command line, so its run reuses this build.
TINY_WORLD = dict(train_per_task=16, eval_per_task=4, sft_steps=40, sft_batch_size=8)


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    from morl.config import ToyWorldConfig
    from morl.toy.world import ensure_toy_world

    return ensure_toy_world(ToyWorldConfig(root=str(tmp_path_factory.mktemp("toy") / "world"), **TINY_WORLD))
