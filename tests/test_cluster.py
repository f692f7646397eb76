"""A run on a Ray cluster of three nodes on this machine (Ray's own multi-node test cluster): learner ranks, rollout
workers and reward hosts on the nodes their custom resources name, weights broadcast from the learner's node to
the rollout node, checkpoints in the driver's run directory, a resume, a reward module shipped only from the
driver (and one whose import fails on a node, named), a run directory no node sees (its checkpoints copied to the
driver, and back for a resume), a recipe the cluster cannot hold, refused before any actor starts (colocated vLLM
on a cluster without GPUs too), a node lost mid-run, and the fit check's arithmetic."""

import json
import os
import shlex
import subprocess
import sys
import time

import pytest
import ray

from morl.cluster import ClusterError, Part, check_fits
from morl.compat import loopback_node_ip
from morl.run.checkpoint import read_checkpoint

from helpers import OVERRIDES, REPO, TESTS, morl, morl_train

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
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"reward_node": 1}})
        learner_node = cluster.add_node(num_cpus=2, resources={"learner_node": 1})  # the quickstart's learner.cpus
        rollout_node = cluster.add_node(num_cpus=2, resources={"rollout_node": 2})
        cluster.wait_for_nodes()
    yield cluster, learner_node.node_id, rollout_node
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


SHIPPED_REWARD = """
from morl.rewards.registry import reward


@reward("shipped_length")
def shipped_length(response, sample):
    return min(len(response), 12) / 12
"""
ON_THE_REWARD_NODE = ["rewards.hosts=1", "rewards.host_resources={reward_node: 1}", "rewards.num_workers=1",
                      *(f"rewards.routes.{task}=[{{fn: shipped_length}}]" for task in ("counting", "grounding", "math",
                                                                                     "choice"))]


def test_a_run_places_its_parts_on_the_named_nodes_runs_shipped_rewards_and_resumes(cluster, toy_world, tmp_path):
    cluster, learner_node, rollout_node = cluster
    code, cwd = tmp_path / "code", tmp_path / "cwd"  # the cluster's workers see neither (Ray adds the driver's cwd)
    code.mkdir(), cwd.mkdir()
    (code / "shipped_reward.py").write_text(SHIPPED_REWARD)  # on the driver's PYTHONPATH only
    run = tmp_path / "run"
    recipe = [*PLACED, *ON_THE_REWARD_NODE, "rewards.modules=[shipped_reward]", "rollout.weight_transport=broadcast",
              "--ray-address", cluster.address]
    driver = {"env": {**LOOPBACK, "PYTHONPATH": str(code)}, "cwd": cwd}
    morl_train(toy_world, run, *recipe, **driver)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["reward/shipped_length/errors"] == 0 for m in metrics)  # scored on the host, which imported it
    assert metrics[1]["logprob_mismatch"] < 1e-5  # step 2 sampled on the weights broadcast to the other node
    assert (run / "checkpoints" / "step_000002" / "trainer_state.json").is_file()  # in the driver's run directory
    placed = actors_by_class(cluster.address)
    assert placed["PolicyLearner"] == {learner_node}
    assert placed["RolloutWorker"] == {rollout_node.node_id}
    assert placed["RewardHost"] == {cluster.head_node.node_id}
    assert not list(run.glob(".morl-storage-check-*"))  # the shared-directory markers are cleaned up

    done = morl_train(toy_world, run, *recipe, "trainer.max_steps=3", "--resume", **driver)
    assert "resuming from" in done.stdout
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_reward_module_that_imports_on_the_driver_but_not_on_a_node_is_refused_naming_it(cluster, toy_world,
                                                                                           tmp_path):
    cluster, _, _ = cluster
    code, helper, cwd = tmp_path / "code", tmp_path / "helper", tmp_path / "cwd"
    for folder in (code, helper, cwd):
        folder.mkdir()
    (helper / "local_helper.py").write_text("LENGTH = 12\n")  # on the driver's path only, and not listed to ship
    (code / "needs_helper.py").write_text("import local_helper\n" + SHIPPED_REWARD)
    recipe = str(REPO / "recipes" / "quickstart.yaml")
    done = morl("train", recipe, f"toy_world.root={toy_world}", *OVERRIDES, *PLACED, *ON_THE_REWARD_NODE,
                "rewards.modules=[needs_helper]", "--ray-address", cluster.address,
                "--output-dir", str(tmp_path / "run"),
                env={**LOOPBACK, "PYTHONPATH": f"{code}{os.pathsep}{helper}"}, cwd=cwd)
    assert done.returncode == 2, done.stderr[-3000:]
    head = cluster.head_node.node_id[:8]
    assert f"import on the driver but not on node 127.0.0.1 ({head}): ModuleNotFoundError: No module named " \
           "'local_helper'" in done.stderr, done.stderr[-3000:]
    assert "ray.py_modules" in done.stderr and "Traceback" not in done.stderr


def test_a_recipe_the_cluster_cannot_hold_is_refused_before_any_actor_starts(cluster, toy_world, tmp_path):
    cluster, _, _ = cluster
    recipe = str(REPO / "recipes" / "quickstart.yaml")
    done = morl("train", recipe, f"toy_world.root={toy_world}", *OVERRIDES, *PLACED[:2], "rollout.num_workers=3",
                "--ray-address", cluster.address, "--output-dir", str(tmp_path / "run"), env=LOOPBACK)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "the Ray cluster cannot hold this recipe" in done.stderr and "rollout workers do not fit" in done.stderr
    assert "rollout_node: 3 asked, 2 in the cluster" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_colocated_vllm_on_a_cluster_without_gpus_is_refused_before_any_actor_starts(toy_world, tmp_path):
    recipe = str(REPO / "recipes" / "quickstart.yaml")
    done = morl("train", recipe, f"toy_world.root={toy_world}", *OVERRIDES, "rollout.engine=vllm",
                "rollout.colocate=true", "--output-dir", str(tmp_path / "run"), timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "rollout.colocate=true" in done.stderr and "set rollout.colocate=false" in done.stderr
    assert "RolloutWorker" not in done.stderr  # refused by the driver, not by a worker that crashed
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_part_that_cannot_start_says_why_in_one_line(toy_world, tmp_path):
    """vLLM refusing a KV cache larger than the machine's memory (on GPUs: the commonest start-up failure) is the
    worker's own error on the last line, not 'an actor crashed, start it again'."""
    recipe = str(REPO / "recipes" / "quickstart.yaml")
    done = morl("train", recipe, f"toy_world.root={toy_world}", *OVERRIDES, "rollout.engine=vllm",
                "rollout.cpu_kv_cache_gib=100000", "--output-dir", str(tmp_path / "run"), timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: RolloutWorker could not start: ValueError: ") and "100000" in last, last
    assert "crashed" not in last


def test_a_run_directory_no_node_sees_gets_each_checkpoint_copied_to_the_driver_and_a_resume_sends_it_back(
        cluster, toy_world, tmp_path):
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a mount namespace of its own (unshare --mount: root, or CAP_SYS_ADMIN)")
    cluster, learner_node, _ = cluster
    shared, seen, staging = tmp_path / "shared", tmp_path / "seen", tmp_path / "staging"
    shared.mkdir()
    run = shared / "run"
    recipe = str(REPO / "recipes" / "quickstart.yaml")
    train = [sys.executable, "-m", "morl.cli", "train", recipe, f"toy_world.root={toy_world}", *OVERRIDES, *PLACED,
             "trainer.save_every=1", f"ray.staging_dir={staging}", "--ray-address", cluster.address,
             "--output-dir", str(run)]
    resume = [*train, "trainer.max_steps=3", "--resume"]
    # the driver in a mount namespace of its own, where `shared` is a tmpfs: a disk only the driver's machine has;
    # both runs in it, and the run directory copied out for the checks below before the tmpfs goes with it
    script = (f"mount -t tmpfs none {shared} && {shlex.join(train)} && {shlex.join(resume)}; status=$?; "
              f"cp -r {run} {seen}; exit $status")
    done = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **LOOPBACK, "PYTHONPATH": str(TESTS), "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    every = [cluster.head_node, *cluster.worker_nodes]
    warned = done.stderr.split("is not shared with node(s)", 1)[1].split(": learner ranks", 1)[0]
    assert all(f"({node.node_id[:8]})" in warned for node in every), warned
    learner = f"127.0.0.1 ({learner_node[:8]})"
    for copied in ("checkpoint step_000001", "checkpoint step_000002", "checkpoint step_000003", "final"):
        assert f"{copied}: copied from node {learner}: " in done.stdout, done.stdout[-3000:]
    assert "resuming from" in done.stdout
    checkpoints = sorted(path.name for path in (seen / "checkpoints").iterdir())
    assert checkpoints == ["step_000002", "step_000003"]  # keep_last=2, every one whole (its manifest checks out)
    engine = {f.name for f in (read_checkpoint(seen / "checkpoints" / "step_000003").path / "deepspeed").rglob("*")}
    assert {"mp_rank_00_model_states.pt", "latest"} <= engine and any(n.endswith("optim_states.pt") for n in engine)
    assert (seen / "final" / "model.safetensors").is_file()
    metrics = [json.loads(line) for line in (seen / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # step 3 sampled on the weights the resume sent back to the learner node and synced to the rollout node
    assert metrics[2]["logprob_mismatch"] < 1e-5
    assert not list(shared.iterdir())  # no node wrote a run directory of its own under the driver's path
    assert not list(staging.iterdir())  # each staged copy is gone, and the staging directory with the run


def steps_logged(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_node_lost_mid_run_stops_it_by_name_and_its_checkpoint_resumes_on_the_nodes_left(cluster, toy_world,
                                                                                          tmp_path):
    cluster, _, rollout_node = cluster
    run = tmp_path / "run"
    recipe = str(REPO / "recipes" / "quickstart.yaml")
    env = {**os.environ, **LOOPBACK, "PYTHONPATH": str(TESTS), "COLUMNS": "200"}
    command = [sys.executable, "-m", "morl.cli", "train", recipe, f"toy_world.root={toy_world}", *OVERRIDES, *PLACED,
               "trainer.max_steps=40", "trainer.save_every=2", "--ray-address", cluster.address,
               "--output-dir", str(run)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as driver:
        first = run / "checkpoints" / "step_000002" / "trainer_state.json"
        deadline = time.monotonic() + 300
        while not first.is_file() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.is_file(), driver.communicate(timeout=60)
        cluster.remove_node(rollout_node, allow_graceful=False)  # the rollout workers' node, mid-run
        out, err = driver.communicate(timeout=240)
    assert driver.returncode == 2, out[-2000:] + err[-3000:]
    assert f"node 127.0.0.1 ({rollout_node.node_id[:8]}) left the Ray cluster" in err
    saved = max(int(p.parent.name.split("_")[1]) for p in run.glob("checkpoints/step_*/trainer_state.json"))
    assert str(run / "checkpoints" / f"step_{saved:06d}") in err and "Traceback" not in err

    with loopback_node_ip():  # the cluster there is now: a new node in the lost one's place
        cluster.add_node(num_cpus=2, resources={"rollout_node": 2})
        cluster.wait_for_nodes()
    done = morl_train(toy_world, run, *PLACED, "--ray-address", cluster.address, f"trainer.max_steps={saved + 1}",
                      "--resume", env=LOOPBACK)
    assert f"resuming from {run / 'checkpoints' / f'step_{saved:06d}'}" in done.stdout.replace("\n", "")
    assert steps_logged(run) == list(range(1, saved + 2))


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
