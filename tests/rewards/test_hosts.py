"""Reward hosts, on a private Ray instance: the sandbox pools run in Ray actors and score what the driver's pool
would (failures and timeouts still one call's error), the reward modules reach them by Ray's py_modules, and a
host that dies fails its samples with Ray's error instead of a zero reward."""

import pytest
import ray

from morl.cluster import PART_LOSSES
from morl.ray_setup import start_ray
from morl.rewards.config import RewardsConfig
from morl.rewards.router import RewardRouter
from morl.rewards.types import RewardInput

from helpers import TESTS

FX = "reward_fixtures"


@pytest.fixture(scope="module")
def hosted_ray():
    ray.shutdown()
    start_ray(num_cpus=4, py_modules=[str(TESTS / f"{FX}.py")])  # Ray's workers do not see pytest's sys.path
    yield
    ray.shutdown()


def router_for(routes, hosts=2):
    return RewardRouter(RewardsConfig(modules=[FX], num_workers=1, timeout_s=1.0, hosts=hosts, routes=routes))


def sample(task, text, label=None):
    return RewardInput.from_text(text, task, label or {})


def test_hosts_score_as_the_driver_pool_does_and_keep_failures_to_one_call(hosted_ray):
    routes = {"mixed": [{"fn": "counting", "weight": 3}, {"fn": "fixture_half"}],
              "boom": [{"fn": "fixture_boom"}], "sleep": [{"fn": f"{FX}:sleep_forever"}]}
    batch = [sample("mixed", rf"\boxed{{{i % 4}}}", {"count": i % 2}) for i in range(12)]
    with router_for(routes, hosts=0) as local:
        expected = [r.reward for r in local.score(batch)]
    with router_for(routes) as hosted:
        results = hosted.score([*batch, sample("boom", "x"), sample("sleep", "x"), *batch[:2]])
    assert [r.reward for r in results[:12]] == expected and expected.count(0.875) == 6
    assert results[12].reward is None and "reward exploded" in results[12].error
    assert results[13].reward is None and "TimeoutError after 1.0s" in results[13].error
    assert [r.reward for r in results[14:]] == expected[:2]  # the host that ran the hung call goes on
    assert hosted.error_counts()["fixture_boom"] == 1


def test_a_host_that_dies_fails_its_samples_with_rays_error(hosted_ray):
    with router_for({"kill": [{"fn": f"{FX}:kill_host"}], "mixed": [{"fn": "fixture_half"}]}, hosts=1) as hosted:
        with pytest.raises(PART_LOSSES):
            hosted.submit(sample("kill", "x")).result(timeout=120)
        assert hosted.error_counts()[f"{FX}:kill_host"] == 0  # not counted as the reward's failure
