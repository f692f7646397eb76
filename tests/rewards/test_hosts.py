"""Reward hosts, on a private Ray instance: the sandbox pools run in Ray actors and score what the driver's pool
would (failures and timeouts still one call's error), the reward modules reach them by Ray's py_modules, and a
host that dies fails its samples with Ray's error instead of a zero reward; a host on a node that cannot see the run
directory keeps what rewards print on its node and says where."""

import logging
import shutil
from pathlib import Path

import pytest
import ray

from morl.bench.rewards import bench_rewards
from morl.cluster import PART_LOSSES
from morl.ray_setup import start_ray
from morl.rewards.config import RewardsConfig
from morl.rewards.router import RewardRouter
from morl.rewards.types import RewardInput

from helpers import TESTS

FX = "reward_fixtures"
OUT = "reward_output_fixtures"


@pytest.fixture(scope="module")
def hosted_ray():
    ray.shutdown()
    # Ray's workers do not see pytest's sys.path
    start_ray(num_cpus=4, py_modules=[str(TESTS / f"{module}.py") for module in (FX, OUT)])
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


def test_a_batch_goes_to_the_hosts_in_shares_and_a_lost_host_fails_only_its_share(hosted_ray):
    """A group is one Ray call per host, not one per sample: 4 samples on 2 hosts are two shares of 2, so the host
    that dies takes the share it held and the other share is scored."""
    with router_for({"kill": [{"fn": f"{FX}:kill_host"}], "mixed": [{"fn": "fixture_half"}]}) as hosted:
        futures = hosted.submit_many([sample("kill", "x"), sample("mixed", "a"), sample("mixed", "b"),
                                      sample("mixed", "c")])
        for future in futures[:2]:
            with pytest.raises(PART_LOSSES):
                future.result(timeout=120)
        assert [f.result(timeout=120).reward for f in futures[2:]] == [0.5, 0.5]


def test_a_host_on_a_node_that_cannot_see_the_run_directory_logs_on_its_node_and_says_where(hosted_ray, tmp_path,
                                                                                           caplog):
    here = ray.get_runtime_context().get_node_id()
    cfg = RewardsConfig(num_workers=1, timeout_s=5.0, hosts=1, routes={"chatty": [{"fn": f"{OUT}:chatty"}]})
    router = RewardRouter(cfg, log_dir=tmp_path / "logs")
    with caplog.at_level(logging.WARNING, logger="morl.rewards.hosts"):
        router.start(blind_nodes=[here])  # as the run's start-up check would have found this node
    with router:
        assert [r.reward for r in router.score([sample("chatty", "abc")])] == [1.0]
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "morl.rewards.hosts"]
    where = Path(warning.rsplit(" goes to ", 1)[1].removesuffix(" on that node"))
    try:
        assert where.name == "rewards.host0.log" and "checking 'abc'" in where.read_text()
        assert not (tmp_path / "logs").exists()  # nothing written under the run directory's path on that node
    finally:
        shutil.rmtree(where.parent)


def test_the_rewards_bench_scores_on_hosts_as_the_bare_loop_does(hosted_ray):
    """`morl bench rewards --hosts N`: the hosted router is one more contender, on the Ray that is up."""
    report = bench_rewards(n=48, workers=1, rounds=1, hosts=1)
    assert report["mismatches"] == 0 and report["router_on_hosts_per_s"] > 0
    assert report["hosts_vs_router"] == pytest.approx(report["router_on_hosts_per_s"] / report["router_per_s"],
                                                      rel=1e-2)
    assert ray.is_initialized()  # the bench leaves a Ray it did not start running
