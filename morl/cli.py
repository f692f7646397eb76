"""`morl` command line: train, config, rewards, bench."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from morl.config import ConfigError, RunConfig, dump_config, load_config
from morl.data import DataError
from morl.learner import NonFiniteLossError
from morl.multimodal import PromptTooLongError
from morl.rewards import cli as rewards_cli
from morl.rewards.router import RewardErrorRateExceeded

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Mixed On-policy RL for vision-language models.")
console = Console(stderr=True)
USER_ERRORS = (ConfigError, DataError, PromptTooLongError, RewardErrorRateExceeded, NonFiniteLossError)

app.add_typer(rewards_cli.app, name="rewards")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks, each against a bare baseline in the same run.")
bench_app.command("rewards")(rewards_cli.bench)
app.add_typer(bench_app, name="bench")


def _resolve(recipe: Path, overrides: list[str], output_dir: Optional[Path]) -> RunConfig:
    extra = [f"trainer.output_dir={output_dir}"] if output_dir else []
    return load_config(recipe, [*overrides, *extra])


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="YAML recipe, e.g. recipes/quickstart.yaml"),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="run directory"),
) -> None:
    """Run a MORL recipe."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = _resolve(recipe, overrides or [], output_dir)
        if cfg.toy_world is not None:
            from morl.toy.world import ensure_toy_world

            ensure_toy_world(cfg.toy_world)
        from morl.trainer import Trainer

        trainer = Trainer(cfg)
        try:
            trainer.fit()
        finally:
            trainer.close()
    except USER_ERRORS as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"run directory: {cfg.trainer.output_dir}")


@app.command()
def config(
    recipe: Path = typer.Argument(..., help="YAML recipe"),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides"),
) -> None:
    """Print the resolved config of a recipe (defaults filled, overrides applied)."""
    try:
        cfg = load_config(recipe, overrides or [])
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    typer.echo(dump_config(cfg), nl=False)


if __name__ == "__main__":
    app()
