"""Reward sandboxes on the Ray cluster: `rewards.hosts` actors, each a sandbox pool on its node, behind the pool's
interface, so scoring grows with the cluster instead of the driver's cores.

Each host imports the reward modules in its own sandbox processes when it starts, so a module that imports on the
driver but not where a host landed is refused at start-up, naming that node. The user's modules reach the nodes
through the job's runtime environment (morl/ray_setup.py ships them). A host that dies mid-run fails the calls it
held with Ray's error, which stops the run (the trainer names the node); a reward that raises or hangs is still only
that call's error, as in the driver's pool.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
from collections.abc import Collection, Sequence
from concurrent.futures import Future
from pathlib import Path

import ray

from morl.cluster import ClusterError
from morl.rewards.sandbox import Outcome, SandboxPool
from morl.rewards.types import RewardInput

log = logging.getLogger(__name__)
START_TIMEOUT_S = 180.0  # a host's workers import sympy and the reward modules: slower on a busy node
MAX_BATCH = 32  # samples in one Ray call to a host: a few groups, so a large batch still spreads over the hosts


def node_name() -> str:
    """This process's node as alive_nodes() names it: address (node id prefix)."""
    context = ray.get_runtime_context()
    return f"{ray.util.get_node_ip_address()} ({context.get_node_id()[:8]})"


@ray.remote(num_cpus=0)  # started with the CPUs of its sandbox processes (rewards.num_workers)
class RewardHost:
    """A sandbox pool on one node; `run` answers one sample's calls as their outcomes."""

    def __init__(self, num_workers: int, timeout_s: float, modules: Sequence[str], output_log: str | None,
                 blind_nodes: Collection[str] = ()):
        """`blind_nodes`: ids of the nodes that cannot see the run directory `output_log` is in; on one of those,
        what the reward functions print goes to a directory of this node's own instead."""
        self.node = node_name()
        if output_log and ray.get_runtime_context().get_node_id() in blind_nodes:
            output_log = str(Path(tempfile.mkdtemp(prefix="morl-reward-log-")) / Path(output_log).name)
        self.output_log = output_log
        self.failure: str | None = None  # why the pool did not start, for the driver to report (start())
        self.pool: SandboxPool | None = None
        try:
            self.pool = SandboxPool(num_workers, timeout_s, modules, start_timeout_s=START_TIMEOUT_S,
                                    output_log=Path(output_log) if output_log else None)
        except RuntimeError as e:
            self.failure = str(e)

    def start(self) -> tuple[str, str | None, str | None]:
        """This host's node, why its sandbox did not start (None: it did), and where its output log is."""
        return self.node, self.failure, self.output_log

    async def run(
        self, samples: Sequence[RewardInput], calls: Sequence[Sequence[tuple[str, str]]]
    ) -> list[list[Outcome]]:
        """Each sample's outcomes, its calls spread over this host's sandbox processes."""
        return await asyncio.gather(*map(asyncio.wrap_future, self.pool.submit_many(samples, calls)))

    def close(self) -> None:
        if self.pool is not None:  # a pool that failed to start closed itself
            self.pool.close()


class HostedPool:
    """The sandbox pool's interface (`submit_many`, `close`) over RewardHost actors: a batch goes in shares, each
    to the host with the fewest samples in flight."""

    def __init__(self, hosts: int, num_workers: int, timeout_s: float, modules: Sequence[str],
                 resources: dict[str, float], log_dir: Path | None, blind_nodes: Collection[str] = ()):
        options = {"num_cpus": num_workers, "resources": resources, "scheduling_strategy": "SPREAD"}
        logs = [str(log_dir / f"rewards.host{i}.log") if log_dir is not None else None for i in range(hosts)]
        self.hosts = [
            RewardHost.options(**options).remote(num_workers, timeout_s, list(modules), logs[i], list(blind_nodes))
            for i in range(hosts)
        ]
        self._in_flight = [0] * hosts
        self._lock = threading.Lock()
        try:
            started = ray.get([host.start.remote() for host in self.hosts], timeout=START_TIMEOUT_S + 60)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise ClusterError(
                f"the {hosts} reward host(s) did not start in {START_TIMEOUT_S + 60:.0f} s: does the cluster have "
                f"rewards.num_workers={num_workers} CPUs and rewards.host_resources={resources} free for each?"
            ) from None
        failed = [(node, failure) for node, failure, _ in started if failure is not None]
        if failed:
            self.close()
            raise ClusterError(_start_failure(*failed[0], modules))
        for i, (node, _, output_log) in enumerate(started):
            if output_log != logs[i]:
                log.warning("reward host %d is on node %s, which cannot see the run directory: what its reward "
                            "functions print goes to %s on that node", i, node, output_log)

    def submit_many(
        self, samples: Sequence[RewardInput], calls: Sequence[Sequence[tuple[str, str]]]
    ) -> list[Future[list[Outcome]]]:
        """Run each sample's (reward, adapter) calls on a host, in one Ray call per share of the batch (a share per
        host, at most MAX_BATCH samples); a future each, with the sample's outcomes, or Ray's error when its host
        is gone."""
        futures: list[Future[list[Outcome]]] = [Future() for _ in samples]
        size = min(MAX_BATCH, -(-len(samples) // len(self.hosts))) or 1
        for start in range(0, len(samples), size):
            self._send(samples[start:start + size], calls[start:start + size], futures[start:start + size])
        return futures

    def _send(self, samples: Sequence[RewardInput], calls: Sequence[Sequence[tuple[str, str]]],
              futures: list[Future[list[Outcome]]]) -> None:
        """One Ray call to the host with the fewest samples in flight."""
        with self._lock:
            index = min(range(len(self.hosts)), key=self._in_flight.__getitem__)
            self._in_flight[index] += len(samples)

        def done(answer: Future[list[list[Outcome]]]) -> None:
            with self._lock:
                self._in_flight[index] -= len(samples)
            try:
                outcomes = answer.result()
            except BaseException as e:  # the host (or its node) is gone: the caller must see it, not a zero
                for future in futures:
                    future.set_exception(e)
                return
            for future, sample_outcomes in zip(futures, outcomes):
                future.set_result(sample_outcomes)

        self.hosts[index].run.remote(list(samples), [list(c) for c in calls]).future().add_done_callback(done)

    def close(self) -> None:
        """Stop every host's sandbox processes (those of a host that is gone need nothing), then the hosts."""
        closing = [host.close.remote() for host in self.hosts]
        ray.wait(closing, num_returns=len(closing), timeout=30)
        for host in self.hosts:
            ray.kill(host)
        self.hosts = []


def _start_failure(node: str, failure: str, modules: Sequence[str]) -> str:
    """What a host whose sandbox did not start says, as one line: the node, and the import error when that was it."""
    lines = [line.strip() for line in failure.splitlines() if line.strip()]
    if "Traceback (most recent call last)" not in failure:
        return f"the reward host on node {node} did not start: {' '.join(lines)}"
    return (f"the reward modules {list(modules)} import on the driver but not on node {node}: {lines[-1]}. List the "
            "missing code in ray.py_modules (it is shipped to every node), or install it there")
