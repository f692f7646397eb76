"""The `rewards:` section of a recipe: which reward functions score each task type, and how they are run.

Reward names are checked when the config is built, so a typo fails before any GPU time is spent, with the key
named by pydantic (e.g. `rewards.routes.grounding.1.fn`). A route may also name a reward service from `services`:
a reward model the run starts on Ray Serve, or any URL speaking the HTTP contract of rewards/contract.py.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from morl.rewards.registry import declared_label_keys, get_reward

DEFAULT_ROUTES: dict[str, list[dict[str, str]]] = {
    **{task: [{"fn": task}] for task in ("math", "grounding", "point", "counting", "temporal", "choice")},
    "video_counting": [{"fn": "counting"}],
    "video_qa": [{"fn": "choice"}],
}

ImageMode = Literal["base64", "path", "none"]

# The service names of the RewardsConfig being validated, so its RewardSpecs accept them as reward names.
_SERVICE_NAMES: ContextVar[frozenset[str]] = ContextVar("service_names", default=frozenset())


class ServiceClientConfig(BaseModel, extra="forbid"):
    """How the router calls a reward service: batches of samples per HTTP request (rewards/README.md)."""

    batch_size: int = Field(32, ge=1)  # samples per request
    max_concurrency: int = Field(2, ge=1)  # requests in flight at once
    timeout_s: float = Field(60.0, gt=0)  # no answer by then fails the request's samples (not retried)
    max_retries: int = Field(3, ge=0)  # on connection errors and HTTP 503, with backoff
    images: ImageMode = "base64"  # image and video files inline as data URLs, as paths (shared filesystem), or not sent
    token: SecretStr | None = Field(
        None,
        description="the service's shared token (`morl rewards serve --token`), sent as `Authorization: Bearer "
        "<token>`; config dumps (the run's config.yaml) show it masked",
    )

    @field_validator("token")
    @classmethod
    def _header_safe(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None:
            check_token(token.get_secret_value())
        return token


def not_found_hint(error: BaseException | None, dirs: Sequence[str] | None = None) -> str:
    """What to do when a reward module is not found: where it was looked for, and the ways to put it there."""
    if not isinstance(error, ModuleNotFoundError) or error.name is None:
        return ""
    where = (f"rewards.import_dirs {list(dirs)}" if dirs
             else "rewards.import_dirs (default: the recipe's folder, then the working directory)")
    top = error.name.split(".")[0]
    return (f" (looked in {where}, then installed packages): put {top}.py, or the package {top}/, beside the recipe, "
            "add its folder to rewards.import_dirs (relative to the recipe), or pip install it")


def check_token(token: str) -> str:
    """A shared token both sides compare as the same bytes of an HTTP header: visible ASCII, no spaces."""
    if not token or not all("!" <= char <= "~" for char in token):
        raise ValueError("a token must be visible ASCII characters, without spaces")
    return token


class HttpService(ServiceClientConfig):
    """A reward hosted anywhere that speaks the contract: the router posts to `url`."""

    kind: Literal["http"]
    url: str

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        return url


class PreferenceService(ServiceClientConfig):
    """A Bradley-Terry reward model (rewards/preference.py) the run starts as a Ray Serve app."""

    kind: Literal["preference"]
    model_path: str  # HF checkpoint dir: *ForSequenceClassification, num_labels=1
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)  # Ray resources per replica
    num_gpus: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the replica sees a GPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    forward_batch_size: int = Field(8, ge=1)  # samples per forward pass inside a replica
    start_timeout_s: float = Field(600.0, gt=0)  # replicas not serving by then stop the run with the reason

    @field_validator("model_path")
    @classmethod
    def _checkpoint(cls, path: str) -> str:
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"no reward model checkpoint at {path!r} (no config.json)")
        return path


ServiceConfig = Annotated[HttpService | PreferenceService, Field(discriminator="kind")]


class RewardSpec(BaseModel, extra="forbid"):
    """One reward on a route: a function name (or `package.module:function`) or a service name, its weight, and
    the function's calling convention."""

    fn: str
    weight: float = Field(1.0, gt=0, allow_inf_nan=False)
    adapter: Literal["morl", "trl", "verl"] = "morl"

    @field_validator("fn")
    @classmethod
    def _known(cls, fn: str) -> str:
        if fn in _SERVICE_NAMES.get():
            return fn
        try:
            get_reward(fn)
        except LookupError as e:
            services = sorted(_SERVICE_NAMES.get())
            hint = not_found_hint(e.__cause__)
            raise ValueError(f"{e}{hint}{f'; services: {services}' if services else ''}") from None
        return fn

    @model_validator(mode="after")
    def _service_takes_no_adapter(self) -> RewardSpec:
        if self.adapter != "morl" and self.fn in _SERVICE_NAMES.get():
            raise ValueError(f"adapter: {self.fn!r} is a reward service (it speaks the HTTP contract): no adapter")
        return self


class RewardsConfig(BaseModel, extra="forbid"):
    """Routes from task type to weighted reward functions and services, plus the sandbox pool that runs the
    functions.

    `routes` given in a recipe override the built-in routing task by task; tasks not named keep their default.
    """

    # Declared before `routes`: pydantic validates fields in order, so the import path is set, the modules are
    # imported (and their @reward decorators have run) and the service names are known by the time the route names
    # are checked.
    import_dirs: list[str] = Field(
        [],
        description="folders searched first for rewards.modules and module:function routes (before installed "
        "packages), in the driver and in every reward worker; relative ones against the recipe's folder. Default "
        "when a recipe is read: the recipe's folder, then the working directory",
    )
    modules: list[str] = []  # extra modules to import, in the driver and in every worker, to register rewards
    services: dict[str, ServiceConfig] = {}  # reward services by name; routes name them like reward functions
    routes: dict[str, Annotated[list[RewardSpec], Field(min_length=1)]] = Field(
        # built-in names need no check, and skipping it keeps `import morl.config` from importing sympy and scipy
        default_factory=lambda: {
            task: [RewardSpec.model_construct(**spec) for spec in specs] for task, specs in DEFAULT_ROUTES.items()
        }
    )
    allow_unused_routes: list[str] = Field(
        [],
        description="tasks whose route in this recipe may have no training or held-out row (a rewards section shared "
        "by several recipes, say); any other route of the recipe for a task the data does not have stops the run",
    )
    num_workers: int = Field(2, ge=1)  # sandbox processes (per host, with hosts)
    hosts: int = Field(0, ge=0)  # 0: the sandbox processes run on the driver; N: N Ray actors hold them (hosts.py)
    host_resources: dict[str, float] = {}  # custom Ray resources each host asks for: the nodes they may land on
    timeout_s: float = Field(10.0, gt=0)  # hard limit per reward call; a hung call is killed and counted as an error
    max_error_rate: float = Field(0.05, ge=0, le=1)  # share of errored samples in the window that stops the run
    error_window: int = Field(1000, ge=1)  # samples in that window
    serve_port: int = Field(8000, ge=1, le=65535)  # HTTP port of Ray Serve, for the services the run starts

    @field_validator("import_dirs")
    @classmethod
    def _on_import_path(cls, dirs: list[str]) -> list[str]:
        """Put the folders at the front of this process's import path; the sandbox workers it spawns inherit it."""
        for folder in dirs:
            if not Path(folder).is_dir():
                raise ValueError(f"{folder!r} is not a directory")
        for folder in reversed(dirs):
            if folder in sys.path:
                sys.path.remove(folder)
            sys.path.insert(0, folder)
        return dirs

    @field_validator("modules")
    @classmethod
    def _import_modules(cls, modules: list[str], info: ValidationInfo) -> list[str]:
        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError as e:
                hint = not_found_hint(e, info.data.get("import_dirs"))
                raise ValueError(f"cannot import reward module {name!r}: {e}{hint}") from None
        return modules

    @field_validator("services")
    @classmethod
    def _service_names(cls, services: dict[str, Any]) -> dict[str, Any]:
        for name in services:
            if ":" in name:
                raise ValueError(f"service name {name!r} must not contain ':' (reserved for module:function paths)")
            try:
                get_reward(name)
            except LookupError:
                continue
            raise ValueError(f"service name {name!r} is already a registered reward; pick another name")
        return services

    @field_validator("routes", mode="before")
    @classmethod
    def _over_defaults(cls, routes: object) -> object:
        return {**DEFAULT_ROUTES, **routes} if isinstance(routes, dict) else routes

    @model_validator(mode="wrap")
    @classmethod
    def _with_service_names(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Validate with the given service names in scope (even a service that fails its own checks), so the
        routes accept them as reward names and only the service itself is reported."""
        services = data.get("services") if isinstance(data, dict) else None
        token = _SERVICE_NAMES.set(frozenset(services) if isinstance(services, dict) else frozenset())
        try:
            return handler(data)
        finally:
            _SERVICE_NAMES.reset(token)

    def own_routes(self) -> list[str]:
        """The tasks whose route is not the built-in one: the routes a recipe wrote."""
        builtin = {task: [RewardSpec.model_construct(**s) for s in specs] for task, specs in DEFAULT_ROUTES.items()}
        return [task for task, specs in self.routes.items() if specs != builtin.get(task)]

    def label_keys(self) -> dict[str, dict[str, str]]:
        """{task: {label key: the reward that reads it}} for every routed reward function that declares its keys."""
        keys: dict[str, dict[str, str]] = {}
        for task, specs in self.routes.items():
            for spec in specs:
                if spec.fn not in self.services:
                    keys.setdefault(task, {}).update(dict.fromkeys(declared_label_keys(spec.fn), spec.fn))
        return keys

    @model_validator(mode="after")
    def _allowed_unused_are_routes(self) -> RewardsConfig:
        unknown = sorted(set(self.allow_unused_routes) - set(self.routes))
        if unknown:
            raise ValueError(f"allow_unused_routes names {unknown}, which have no route in rewards.routes")
        return self

    @model_validator(mode="after")
    def _services_are_routed(self) -> RewardsConfig:
        routed = {spec.fn for specs in self.routes.values() for spec in specs}
        unused = sorted(set(self.services) - routed)
        if unused:
            raise ValueError(f"services {unused} are not used by any route (name them as fn: in rewards.routes)")
        return self
