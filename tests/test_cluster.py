"""A run on a Ray cluster of three nodes on this machine (Ray's own multi-node test cluster): learner ranks and
rollout workers on the nodes their custom resources name, checkpoints in the driver's run directory, a resume, a
recipe the cluster cannot hold refused before any actor starts, and the fit check's arithmetic."""

import json

import pytest
import ray

from morl.cluster import ClusterError, Part, check_fits
from morl.compat import loopback_node_ip

from helpers import OVERRIDES, REPO, morl, morl_train

pytestmark = pytest.mark.slow

# the cluster's servers listen on 127.0.0.1 only; a driver joins it in Ray's local-only mode (as compat does)
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
PLACED = ["learner.resources={learner_node: 1}", "rollout.resources={rollout_node: 1}", "rollout.num_workers=2",
          "eval.enabled=false"]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    ray.shutdown()
    with loopback_node_ip():  # every node's servers on 127.0.0.1, as a private run's
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        learner_node = cluster.add_node(num_cpus=2, resources={"learner_node": 1})  # the quickstart's learner.cpus
        rollout_node = cluster.add_node(num_cpus=2, resources={"rollout_node": 2})
        cluster.wait_for_nodes()
    yield cluster, learner_node.node_id, rollout_node.node_id
    ray.shutdown()
    cluster.shutdown()


def actors_by_class(address: str) -> dict[str, set[str]]:
    """The node ids every actor of the cluster ran on, by class (dead ones included: the runs have ended)."""
    from ray.util.state import list_actors

    with loopback_node_ip():
        ray.init(address=address)
    try:
        nodes: dict[str, set[str]] = {}
        for actor in list_actors(detail=True, limit=1000):
            nodes.setdefault(actor.class_name, set()).add(actor.node_id)
        return nodes
    finally:
        ray.shutdown()


def test_a_run_places_its_parts_on_the_named_nodes_and_resumes(cluster, toy_world, tmp_path):
    cluster, learner_node, rollout_node = cluster
    run = tmp_path / "run"
    address = ["--ray-address", cluster.address]
    morl_train(toy_world, run, *PLACED, *address, env=LOOPBACK)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (run / "checkpoints" / "step_000002" / "trainer_state.json").is_file()  # in the driver's run directory
    placed = actors_by_class(cluster.address)
    assert placed["PolicyLearner"] == {learner_node}
    assert placed["RolloutWorker"] == {rollout_node}
    assert not list(run.glob(".morl-storage-check-*"))  # the shared-directory markers are cleaned up

    done = morl_train(toy_world, run, *PLACED, *address, "trainer.max_steps=3", "--resume", env=LOOPBACK)
    assert "resuming from" in done.stdout
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_recipe_the_cluster_cannot_hold_is_refused_before_any_actor_starts(cluster, toy_world, tmp_path):
    cluster, _, _ = cluster
    recipe = str(REPO / "recipes" / "quickstart.yaml")
    done = morl("train", recipe, f"toy_world.root={toy_world}", *OVERRIDES, *PLACED[:2], "rollout.num_workers=3",
                "--ray-address", cluster.address, "--output-dir", str(tmp_path / "run"), env=LOOPBACK)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "the Ray cluster cannot hold this recipe" in done.stderr and "rollout workers do not fit" in done.stderr
    assert "rollout_node: 3 asked, 2 in the cluster" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_fit_check_packs_bundles_on_nodes_and_names_what_is_missing():
    nodes = {"a": {"CPU": 4, "GPU": 2}, "b": {"CPU": 4, "GPU": 2}}
    learner = Part("learner ranks", 2, {"CPU": 1, "GPU": 1}, "learner.num_ranks")
    rollout = Part("rollout workers", 2, {"CPU": 1, "GPU": 1}, "rollout.num_workers")
    check_fits([learner, rollout], nodes)  # 4 GPUs over two nodes
    with pytest.raises(ClusterError, match=r"GPU: 6 asked, 4 in the cluster"):
        check_fits([learner, Part("rollout workers", 4, {"CPU": 1, "GPU": 1}, "rollout.num_workers")], nodes)
    with pytest.raises(ClusterError, match=r"no node has GPU >= 4"):
        check_fits([Part("rollout workers", 1, {"CPU": 1, "GPU": 4}, "rollout.tensor_parallel_size")], nodes)
    with pytest.raises(ClusterError, match=r"no node has learner_node >= 1.*Nodes: a \{CPU: 4, GPU: 2\}"):
        check_fits([Part("learner ranks", 1, {"CPU": 1, "learner_node": 1}, "learner.resources")], nodes)
