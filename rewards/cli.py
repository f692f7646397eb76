"""`morl rewards ...`: list the registered rewards, score a JSONL of responses offline, benchmark the router, and
serve a reward model over HTTP."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from morl.config import ConfigError, read_recipe
from morl.rewards.config import RewardsConfig, check_token
from morl.rewards.http_server import DEFAULT_MAX_REQUEST_MB, make_server
from morl.rewards.registry import list_rewards
from morl.rewards.router import RewardRouter
from morl.rewards.types import RewardInput, RewardResult

app = typer.Typer(help="Reward functions: list them, score responses offline, benchmark the router, serve them.")
serve_app = typer.Typer(help="Run a reward service standalone: an HTTP server speaking the reward service contract.")
app.add_typer(serve_app, name="serve")
console = Console()
TOKEN_ENV = "MORL_REWARDS_TOKEN"  # the serve commands' --token, kept out of the process list


@app.command("list")
def list_command(
    recipe: Path | None = typer.Option(None, exists=True, dir_okay=False, help="also its rewards.modules"),
) -> None:
    """Show every registered reward with its one-line doc, and the recipe's reward services."""
    cfg = _config(recipe)  # imports the recipe's reward modules, which registers their rewards
    table = Table("name", "doc")
    for name, doc in list_rewards().items():
        table.add_row(name, escape(doc))
    for name, service in cfg.services.items():
        where = service.url if service.kind == "http" else f"started on Ray Serve from {service.model_path}"
        table.add_row(name, escape(f"{service.kind} service: {where}"))
    console.print(table)


@app.command()
def score(
    responses: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL rows: task, response, label"),
    recipe: Path | None = typer.Option(None, exists=True, dir_okay=False, help="take routes from its rewards:"),
    out: Path | None = typer.Option(None, "-o", "--out", help="write each row with reward and error added"),
) -> None:
    """Score model responses with the recipe's reward routes (built-in routing without --recipe)."""
    cfg = _config(recipe)
    rows = _read_rows(responses)
    samples = [_sample(row, responses, line) for line, row in rows]
    unknown = sorted({s.task for s in samples} - set(cfg.routes))
    if unknown:
        raise typer.BadParameter(f"no reward route for task(s) {unknown} (routed: {sorted(cfg.routes)})")
    with RewardRouter(cfg) as router:
        results = router.score(samples)
    if out is not None:
        with out.open("w") as f:
            for (_, row), result in zip(rows, results):
                f.write(json.dumps({**row, "reward": result.reward, "error": result.error}) + "\n")
    console.print(_summary(samples, results))


@app.command()
def bench(
    n: int = typer.Option(3000, help="responses per round"),
    workers: int = typer.Option(2, help="sandbox workers of the router under test"),
    rounds: int = typer.Option(3, help="rounds; the best of each contender counts"),
    hosts: int = typer.Option(0, help="also the router on this many reward hosts (rewards.hosts), on a local Ray"),
) -> None:
    """Router throughput vs a bare single-process loop on mixed math / grounding / counting responses (and, with
    --hosts, on reward hosts vs the driver's pool), then the time each built-in reward takes on hostile inputs (each
    must get its score in under 50 ms)."""
    from morl.bench.rewards import HOSTILE_BUDGET_MS, bench_hostile, bench_rewards

    report = bench_rewards(n=n, workers=workers, rounds=rounds, hosts=hosts)
    table = Table("metric", "value")
    for key, value in report.items():
        table.add_row(key, str(value))
    console.print(table)
    rows = bench_hostile()
    hostile = Table("hostile input", "chars", "score", "expected", "ms (best of 3)", "ok", title="hostile inputs")
    for row in rows:
        ok = row["score"] == row["expected"] and row["ms"] < HOSTILE_BUDGET_MS
        hostile.add_row(escape(row["input"]), str(row["chars"]), str(row["score"]), str(row["expected"]),
                        str(row["ms"]), "yes" if ok else "NO")
    console.print(hostile)


def _header_safe(token: str | None) -> str | None:
    """The --token as given, checked before the model loads."""
    try:
        return None if token is None else check_token(token)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


@serve_app.command("preference")
def serve_preference(
    model: Path = typer.Option(..., exists=True, file_okay=False, help="reward model checkpoint directory"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, help="port to listen on"),
    device: str = typer.Option("auto", help="auto (cuda when there is a GPU), cpu or cuda"),
    dtype: str = typer.Option("auto", help="auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16, float16"),
    batch_size: int = typer.Option(8, help="samples per forward pass"),
    token: str | None = typer.Option(
        None, envvar=TOKEN_ENV, show_envvar=True, callback=_header_safe,
        help=f"answer only requests with 'Authorization: Bearer TOKEN' (401 otherwise); prefer ${TOKEN_ENV}: a "
        "flag shows in `ps`",
    ),
    image_root: Path | None = typer.Option(
        None, exists=True, file_okay=False, help="open image and video paths only for files under this folder "
        "(without it every path is refused; data: URLs always work)",
    ),
    max_request_mb: int = typer.Option(
        DEFAULT_MAX_REQUEST_MB, min=1, help="refuse a request body over this many MiB (413), before reading it"
    ),
) -> None:
    """Serve a Bradley-Terry reward model: POST samples to http://HOST:PORT/score, sigmoid(score) back."""
    from morl.rewards.preference import PreferenceScorer

    server = make_server(
        PreferenceScorer(str(model), device, dtype, batch_size), host, port,
        token=token, image_root=image_root, max_request_bytes=max_request_mb * 2**20,
    )
    guards = [
        "token required" if token else "no token",
        f"image and video paths under {escape(str(image_root.resolve()))}" if image_root
        else "no image or video paths",
        f"requests up to {max_request_mb} MiB",
    ]
    url = f"http://{host}:{server.server_port}/score"
    console.print(f"preference reward model {escape(str(model))} at {url} ({', '.join(guards)})")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _config(recipe: Path | None) -> RewardsConfig:
    """The recipe's rewards section, its reward modules found as `morl train` finds them (rewards.import_dirs)."""
    if recipe is None:
        return RewardsConfig()
    try:
        section = read_recipe(recipe).get("rewards") or {}
    except ConfigError as e:
        raise typer.BadParameter(str(e), param_hint="--recipe") from None
    try:
        return RewardsConfig(**section)
    except ValidationError as e:
        raise typer.BadParameter(_format_errors(e), param_hint="--recipe") from None


def _format_errors(error: ValidationError) -> str:
    return "; ".join(
        "rewards." + ".".join(str(p) for p in e["loc"]) + ": " + e["msg"].removeprefix("Value error, ")
        for e in error.errors()
    )


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise typer.BadParameter(f"{path}:{line}: not JSON: {e}") from None
        missing = [key for key in ("task", "response", "label") if not isinstance(row, dict) or key not in row]
        if missing:
            raise typer.BadParameter(f"{path}:{line}: missing {', '.join(missing)}")
        rows.append((line, row))
    return rows


def _sample(row: dict[str, Any], path: Path, line: int) -> RewardInput:
    """A row as the router's input; image and video paths (frames too) are taken relative to the JSONL file."""
    if not isinstance(row["label"], dict):
        raise typer.BadParameter(f"{path}:{line}: label must be an object")
    token_ids = row.get("token_ids")
    if token_ids is not None and not (
        isinstance(token_ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids)
    ):
        raise typer.BadParameter(f"{path}:{line}: token_ids must be a list of integers")

    def resolve(ref: str) -> str:
        return str((path.parent / ref).resolve())

    images = tuple(resolve(image) for image in row.get("images", []))
    videos = tuple(
        resolve(video) if isinstance(video, str) else tuple(resolve(frame) for frame in video)
        for video in row.get("videos", [])
    )
    return RewardInput.from_text(
        str(row["response"]), str(row["task"]), row["label"], images=images, videos=videos, meta=row.get("meta") or {},
        token_ids=None if token_ids is None else tuple(token_ids),
    )


def _summary(samples: list[RewardInput], results: list[RewardResult]) -> Table:
    by_task: dict[str, list[RewardResult]] = defaultdict(list)
    for sample, result in zip(samples, results):
        by_task[sample.task].append(result)
    table = Table("task", "count", "mean reward", "errors")
    for task, task_results in sorted(by_task.items()):
        scored = [r.reward for r in task_results if r.reward is not None]
        mean = f"{sum(scored) / len(scored):.3f}" if scored else "-"
        table.add_row(task, str(len(task_results)), mean, str(len(task_results) - len(scored)))
    return table
