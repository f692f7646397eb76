"""Reward models the run starts itself: each `kind: preference` service is a Ray Serve app on Serve's HTTP proxy.

The router reaches them at `http://127.0.0.1:<serve_port>/<service name>` through the same HTTP contract as any
hosted reward (rewards/contract.py), so there is one client path. Imported only when a recipe has such services:
it needs `ray[serve]` (`pip install "morl[serve]"`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from morl.ray_setup import start_ray
from morl.rewards.config import PreferenceService
from morl.rewards.contract import handle
from morl.rewards.preference import PreferenceScorer

REPLICA_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # checkpoints are local; nothing downloads


class PreferenceDeployment:
    """One Serve replica holding a reward model; answers the contract on its app's route."""

    def __init__(self, model_path: str, device: str, dtype: str, batch_size: int):
        self.score = PreferenceScorer(model_path, device, dtype, batch_size)

    async def __call__(self, request: Request) -> JSONResponse:
        body = await request.body()
        status, payload = await asyncio.to_thread(handle, self.score, body)  # the forward pass leaves the loop free
        return JSONResponse(payload, status_code=status)


class RayServeServices:
    """Starts the given services as Serve apps, and removes them (with Serve and Ray, when it started those)."""

    def __init__(self, services: Mapping[str, PreferenceService], port: int):
        self.services = dict(services)
        self.port = port
        self._started: list[str] = []
        self._owns_ray = False
        self._owns_serve = False

    def start(self) -> dict[str, str]:
        """Deploy every service and wait for it; its URL by name. Raises RuntimeError naming a service that fails."""
        self._owns_ray = start_ray()  # Ray not up yet: a private instance on 127.0.0.1, like a run's
        status = serve.status()
        self._owns_serve = not (status.proxies or status.applications)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        deploys = {name: _Deploy(name, spec) for name, spec in self.services.items()}
        self._started = list(deploys)
        for deploy in deploys.values():
            deploy.join()
        return {name: f"http://127.0.0.1:{self.port}/{name}" for name in self.services}

    def close(self) -> None:
        for name in self._started:
            serve.delete(name)
        self._started = []
        if self._owns_serve:
            serve.shutdown()
        if self._owns_ray:
            ray.shutdown()


class _Deploy:
    """`serve.run` of one service on a thread of its own: all services load at once, each under its timeout."""

    def __init__(self, name: str, spec: PreferenceService):
        self.name = name
        self.spec = spec
        self.error: BaseException | None = None
        self.started = time.monotonic()
        app = (
            serve.deployment(PreferenceDeployment, name="preference")
            .options(
                num_replicas=spec.num_replicas,
                ray_actor_options={
                    "num_cpus": spec.num_cpus,
                    "num_gpus": spec.num_gpus,
                    "runtime_env": {"env_vars": REPLICA_ENV},
                },
            )
            .bind(spec.model_path, spec.device, spec.dtype, spec.forward_batch_size)
        )
        self.thread = threading.Thread(target=self._run, args=(app,), name=f"morl-serve-{name}", daemon=True)
        self.thread.start()

    def _run(self, app: serve.Application) -> None:
        try:
            serve.run(app, name=self.name, route_prefix=f"/{self.name}")
        except BaseException as e:
            self.error = e

    def join(self) -> None:
        spec = self.spec
        self.thread.join(max(0.0, self.started + spec.start_timeout_s - time.monotonic()))
        where = f"reward service {self.name!r} (preference, {spec.model_path})"
        if self.thread.is_alive():
            raise RuntimeError(
                f"{where} was not serving after start_timeout_s={spec.start_timeout_s}s; does the cluster have "
                f"num_cpus={spec.num_cpus} and num_gpus={spec.num_gpus} free for each of its {spec.num_replicas} "
                "replica(s)? Ray Serve's log says more"
            )
        if self.error is not None:
            raise RuntimeError(f"{where} failed to start: {self.error}{_replica_error(self.name)}")


def _replica_error(app: str) -> str:
    """The last lines of the replica's failure as Serve reports it (serve.run's own message omits the cause)."""
    application = serve.status().applications.get(app)
    messages = [d.message for d in application.deployments.values() if d.message] if application else []
    return "\n" + "\n".join(messages[-1].strip().splitlines()[-6:]) if messages else ""
