"""The run's Ray, started for real: a private instance listens on loopback only; a cluster is joined by
`ray.address` or RAY_ADDRESS (as `ray job submit` sets it), and "local" keeps a run private whatever the environment."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import ray
import yaml

from morl.cluster import ClusterError
from morl.config import ConfigError, RunConfig, load_config
from morl.ray_setup import _check_answers, init_ray, user_code
from morl.rewards.router import RewardRouter
from morl.rewards.types import RewardInput

from helpers import REPO, TESTS, is_loopback, listeners

RAY_CLI = str(Path(sys.executable).with_name("ray"))


def run_config(tmp_path, **ray_section):
    return RunConfig(model={"path": str(tmp_path)}, ray=ray_section)


def ports(found: dict[psutil.Process, list[tuple[str, int]]]) -> set[int]:
    return {port for sockets in found.values() for _, port in sockets}


@ray.remote(num_cpus=0)
class Echo:
    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()


@pytest.fixture
def shutdown_ray():
    ray.shutdown()  # an in-process Ray an earlier test left running is not this test's
    yield
    ray.shutdown()


def test_a_local_run_listens_on_loopback_only(tmp_path, monkeypatch, shutdown_ray):
    # Ray's metrics servers, the last of its servers to start, on ports of this test's own (no other Ray holds them)
    metrics_ports = {name: free_port() for name in ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")}
    for name, port in metrics_ports.items():
        monkeypatch.setenv(name, str(port))
    driver = psutil.Process()
    # sockets this process (or an earlier test's child) already had, a test's in-process torch.distributed store
    # among them: not Ray's
    before = {(p.pid, ip, port) for p, sockets in listeners(driver).items() for ip, port in sockets}
    init_ray(run_config(tmp_path))
    echo = Echo.remote()  # a worker process, with its own server
    assert ray.get(echo.node_ip.remote()) == "127.0.0.1"
    deadline = time.monotonic() + 120
    found = listeners(driver)
    while not set(metrics_ports.values()) <= ports(found) and time.monotonic() < deadline:
        time.sleep(0.5)
        found = listeners(driver)
    everywhere = {f"{p.name()} (pid {p.pid}) on {ip}:{port}" for p, sockets in found.items() for ip, port in sockets
                  if not is_loopback(ip) and (p.pid, ip, port) not in before}
    assert not everywhere
    gcs_host, gcs_port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
    assert gcs_host == "127.0.0.1"
    assert {int(gcs_port), *metrics_ports.values()} <= ports(found)  # the walk saw Ray's servers, the last included
    names = {p.name() for p, sockets in found.items() if sockets}
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::Echo"} <= names


JOIN = """
import sys, ray
from morl.config import RunConfig
from morl.ray_setup import init_ray
init_ray(RunConfig(model={"path": "/m"}, ray={"address": sys.argv[1] or None}))
print(ray.get_runtime_context().gcs_address, ray.cluster_resources()["CPU"])
"""


def test_a_cluster_is_joined_by_the_recipe_or_the_environment_and_local_stays_private(
    tmp_path, monkeypatch, shutdown_ray
):
    temp_dir = tempfile.mkdtemp(prefix="morl-ray-")  # short: Ray's socket paths must fit in 107 bytes
    address = f"127.0.0.1:{free_port()}"
    # Ray's local-only mode, for the cluster and its driver: this test opens nothing beyond loopback either
    loopback = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    head = subprocess.Popen(
        [RAY_CLI, "start", "--head", "--block", f"--port={address.rsplit(':', 1)[1]}", "--num-cpus=1",
         "--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=loopback, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        ready = Path(temp_dir) / "ray_current_cluster"  # `ray start` writes it once the head is up
        deadline = time.monotonic() + 120
        while not ready.exists() and head.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ready.read_text().strip() == address

        monkeypatch.setenv("RAY_ADDRESS", address)
        init_ray(run_config(tmp_path, address="local"))  # "local": a private instance, RAY_ADDRESS or not
        assert ray.get_runtime_context().gcs_address != address
        ray.shutdown()

        monkeypatch.delenv("RAY_ADDRESS")
        # `ray start` made the head require its token (~/.ray/auth_token): without it, one line that says so
        refused = subprocess.run([sys.executable, "-c", JOIN, address], env={**loopback, "RAY_AUTH_MODE": "disabled"},
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0
        assert f"ClusterError: could not join the Ray cluster at {address}" in refused.stderr
        assert "InvalidAuthToken" in refused.stderr and "run with RAY_AUTH_MODE=token" in refused.stderr
        auth = {"RAY_AUTH_MODE": "token"}
        for how, argument, env in (("recipe", address, {}), ("environment", "", {"RAY_ADDRESS": address})):
            joined = subprocess.run([sys.executable, "-c", JOIN, argument], env={**loopback, **auth, **env},
                                    capture_output=True, text=True, timeout=300)
            assert joined.returncode == 0, how + joined.stderr[-2000:]
            gcs_address, cpus = joined.stdout.split()
            assert gcs_address == address and float(cpus) == 1, how  # the cluster's own size, not the run's
    finally:
        stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_an_address_where_nothing_answers_is_refused_at_once_naming_it(tmp_path, shutdown_ray):
    """Ray would retry a dead GCS address for minutes; the run says so before it tries."""
    address = f"127.0.0.1:{free_port()}"  # closed again: nothing listens there
    with pytest.raises(ClusterError, match=rf"could not join the Ray cluster at {address} .*nothing answers there"):
        init_ray(run_config(tmp_path, address=address))
    assert not ray.is_initialized()


def test_only_host_port_addresses_are_probed_before_joining():
    """"auto" and Ray Client (ray://) addresses are Ray's to resolve; a host:port, IPv6 in brackets too, is probed."""
    dead = free_port()
    for address in ("auto", f"ray://127.0.0.1:{dead}"):
        _check_answers(address, timeout_s=1.0)  # returns: not ours to probe
    for address in (f"127.0.0.1:{dead}", f"[::1]:{dead}"):
        with pytest.raises(ClusterError, match=r"nothing answers there"):
            _check_answers(address, timeout_s=1.0)
    with socket.create_server(("127.0.0.1", 0)) as server:
        _check_answers(f"127.0.0.1:{server.getsockname()[1]}", timeout_s=1.0)  # something listens: no refusal


@pytest.mark.parametrize("address", ["locale", ":6379", "head:", "head:0", "head:65536", "head:port"])
def test_a_ray_address_that_is_not_auto_or_host_port_names_the_key(address):
    with pytest.raises(ConfigError, match=r"ray\.address: .*must be \"auto\", \"local\" or host:port"):
        load_config(None, ["model.path=/m", f"ray.address='{address}'"])


def test_the_users_reward_code_is_shipped_and_installed_code_is_not(tmp_path):
    (tmp_path / "my_rewards").mkdir()
    (tmp_path / "my_rewards" / "__init__.py").write_text("")
    (tmp_path / "my_rewards" / "math_checks.py").write_text("def exact(response, sample):\n    return 1.0\n")
    (tmp_path / "helpers_dir").mkdir()
    sys.path.insert(0, str(tmp_path))
    try:
        cfg = load_config(None, [
            f"model.path={tmp_path}", "rewards.modules=[reward_fixtures, sympy]",
            "rewards.routes.math=[{fn: 'my_rewards.math_checks:exact'}, {fn: counting}]",
            f"ray.py_modules=[{tmp_path / 'helpers_dir'}]",
        ])
        # the listed folder, then each module's own package directory or file; sympy is installed, counting is morl's
        assert user_code(cfg) == [str(tmp_path / "helpers_dir"), str(tmp_path / "my_rewards"),
                                  str(TESTS / "reward_fixtures.py")]
    finally:
        sys.path.remove(str(tmp_path))


def test_ray_py_modules_that_do_not_exist_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"ray\.py_modules: .*neither a directory nor a \.py file"):
        load_config(None, [f"model.path={tmp_path}", f"ray.py_modules=[{tmp_path / 'missing'}]"])


def test_a_ray_job_refuses_a_run_directory_inside_its_uploaded_working_directory(tmp_path):
    """A real `ray job submit --working-dir`: the job's relative run directory would live in Ray's unpacked copy."""
    temp_dir = tempfile.mkdtemp(prefix="morl-job-")  # short: Ray's socket paths must fit in 107 bytes
    port, dashboard, agent = free_port(), free_port(), free_port()
    loopback = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    head = subprocess.Popen(
        [RAY_CLI, "start", "--head", "--block", f"--port={port}", "--num-cpus=1", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
         f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        env=loopback, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        ready = Path(temp_dir) / "ray_current_cluster"
        deadline = time.monotonic() + 120
        while not ready.exists() and head.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        folder = tmp_path / "job"
        folder.mkdir()
        recipe = REPO / "recipes" / "quickstart.yaml"
        while True:  # the head's job agent comes up a little after the head itself
            submitted = subprocess.run(
                [RAY_CLI, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(folder),
                 "--", sys.executable, "-m", "morl.cli", "train", str(recipe), "-o", "runs/r1"],
                env=loopback, capture_output=True, text=True, timeout=300,
            )
            out = submitted.stdout + submitted.stderr
            if "No available agent to submit job" not in out or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert submitted.returncode != 0 and "failed" in out, out[-3000:]
        assert "trainer.output_dir runs/r1: inside this Ray job's unpacked working directory" in out, out[-3000:]
        assert "-o /shared/runs/NAME" in out
    finally:
        stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(head: subprocess.Popen) -> None:
    """End the head's processes, by their ids (never `ray stop`, which would end every Ray on this host)."""
    try:
        processes = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
    except psutil.NoSuchProcess:  # it ended already, and with it what it started (`ray start --block` sees to it)
        return
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=30)
    for process in alive:
        process.kill()


def test_reward_hosts_on_the_private_instance_import_a_module_beside_the_recipe(tmp_path, monkeypatch):
    """Ray's workers do not share the driver's import path: the module the recipe's folder holds is shipped to them."""
    (tmp_path / "beside_host_rewards.py").write_text(
        "from morl.rewards.registry import reward\n\n@reward\ndef beside_host(response, sample):\n"
        '    """Beside the recipe."""\n    return 0.25\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": str(tmp_path)}, "rewards": {
        "modules": ["beside_host_rewards"], "hosts": 1, "num_workers": 1,
        "routes": {"counting": [{"fn": "beside_host"}]},
    }}))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the recipe's folder goes on this test's copy only
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(recipe)
    try:
        init_ray(cfg)
        with RewardRouter(cfg.rewards) as router:
            (result,) = router.score([RewardInput.from_text("3", "counting", {})])
    finally:
        ray.shutdown()
    assert result.error is None and result.reward == 0.25
