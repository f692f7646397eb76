"""What the scheduler's test modules share: a private Ray with a reward router for counting."""

import pytest

from morl.ray_setup import start_ray
from morl.rewards.config import RewardsConfig
from morl.rewards.router import RewardRouter


@pytest.fixture(scope="module")
def router():
    start_ray(num_cpus=2)  # private, as a run's: never a `ray start` cluster that happens to run on this machine
    r = RewardRouter(RewardsConfig(routes={"counting": [{"fn": "counting"}]}, num_workers=1))
    yield r
    r.close()
