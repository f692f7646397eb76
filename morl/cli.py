"""`morl` command line: train, eval, config, compare, plot, filter, preflight, rewards, bench."""

from __future__ import annotations

import contextlib
import errno
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import typer
from ray.exceptions import RayActorError
from rich.console import Console
from rich.markup import escape

from morl.checkpoint_layout import CheckpointError
from morl.cluster import ClusterError, start_failure
from morl.config import ConfigError, RunConfig, dump_config, load_config
from morl.data.rows import DataError
from morl.learner.policy import LearnerOutOfMemoryError, NonFiniteLossError
from morl.rewards import cli as rewards_cli
from morl.rewards.router import RewardErrorRateExceeded
from morl.run.checkpoint import LATEST
from morl.run.interrupts import RunInterrupted
from morl.run.lock import RunDirBusyError
from morl.run.model_check import ModelDirError
from morl.run.trackers import TrackerError
from morl.run.weight_sync import StaleWeightsError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Mixed On-policy RL for vision-language models.")
console = Console(stderr=True)
USER_ERRORS = (
    ConfigError,
    DataError,
    RewardErrorRateExceeded,
    NonFiniteLossError,
    LearnerOutOfMemoryError,
    CheckpointError,
    ModelDirError,
    StaleWeightsError,
    RunDirBusyError,
    TrackerError,
    ClusterError,
)

# a full disk, an exceeded quota, a failing or read-only one: the machine's state, not a bug to trace
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)

app.add_typer(rewards_cli.app, name="rewards")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks, each against a bare baseline in the same run.")
bench_app.command("rewards")(rewards_cli.bench)
app.add_typer(bench_app, name="bench")


def _split_resume_path(args: list[str], resume: bool) -> tuple[list[str], str | None]:
    """`--resume` is a flag, so its optional PATH arrives among the overrides: the one argument without `=`."""
    paths = [a for a in args if "=" not in a]
    if not resume:
        return args, None
    if len(paths) > 1:
        raise ConfigError(f"--resume takes one checkpoint path, got {len(paths)}: {' '.join(paths)}")
    return [a for a in args if "=" in a], paths[0] if paths else LATEST


def _ray_override(address: str | None) -> list[str]:
    """`--ray-address` as the override it stands for (quoted: YAML must not read host:port as a number)."""
    return [f"ray.address='{address}'"] if address else []


@contextlib.contextmanager
def exit_on(*errors: type[Exception]) -> Iterator[None]:
    """Bad input (a user's recipe, data, checkpoint, ...), a part of the run that could not start, or a full or
    failing disk ends the command with its message and exit status 2."""
    try:
        yield
    except errors as exc:
        _error_line(str(exc))
    except RayActorError as exc:  # a part of the run that could not start says why; any other loss is a bug's trace
        why = start_failure(exc)
        if why is None:
            raise
        _error_line(why)
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        _error_line(f"disk error: {exc}")


def _error_line(message: str) -> None:
    # one line however long (paths stay whole for copying), and brackets in the message are text, not markup
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2) from None


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="YAML recipe, e.g. recipes/quickstart.yaml"),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides (and the PATH of --resume PATH)"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="run directory"),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="continue from the newest complete checkpoint of the run directory (from the beginning if it has none); "
        "`--resume PATH`: from that checkpoint, or that run directory's newest",
    ),
    force: bool = typer.Option(False, "--force", help="resume even though the config changed keys that are not safe"),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help='join this Ray cluster ("auto" or host:port; sets ray.address)'
    ),
) -> None:
    """Run a MORL recipe."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    interrupted: RunInterrupted | None = None
    with exit_on(*USER_ERRORS):
        overrides, resume_from = _split_resume_path(overrides or [], resume)
        extra = [f"trainer.output_dir={output_dir}"] if output_dir else []
        cfg = load_config(recipe, [*overrides, *extra, *_ray_override(ray_address)])
        from morl.run.trainer import Trainer

        trainer = Trainer(cfg, resume=resume_from, force=force)
        try:
            trainer.fit()
        except RunInterrupted as stopped:
            interrupted = stopped
        finally:
            trainer.close()
    if interrupted:
        where = (
            f"its checkpoint is in {cfg.trainer.output_dir}; run the same command with --resume to continue"
            if interrupted.step
            else "no step was trained"
        )
        console.print(f"{interrupted}: {where}", soft_wrap=True)
        raise typer.Exit(interrupted.exit_status)
    console.print(f"run directory: {cfg.trainer.output_dir}")


@app.command()
def config(
    recipe: Path = typer.Argument(..., help="YAML recipe"),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides"),
) -> None:
    """Print the resolved config of a recipe (defaults filled, overrides applied)."""
    with exit_on(ConfigError):
        cfg = load_config(recipe, overrides or [])
    typer.echo(dump_config(cfg), nl=False)


@app.command()
def preflight(
    recipe: Path = typer.Argument(..., help="YAML recipe"),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides"),
    gpus: int = typer.Option(1, min=0, help="GPUs per node the run gets (0: a CPU run)"),
    gpu_mem_gib: float = typer.Option(80.0, min=1, help="memory of one GPU, GiB"),
    host_mem_gib: Optional[float] = typer.Option(
        None, min=1, help="host memory of a node, GiB (default: unchecked for a GPU run; this machine's for a CPU run)"
    ),
    data: bool = typer.Option(
        False, "--data", help="also load the training and held-out data with every check `morl train` makes (rows, "
        "images, label keys, routes without data)"
    ),
) -> None:
    """Estimate GPU and host memory for a recipe from its model's config.json; refuse one that cannot fit (with
    --data, or whose data `morl train` would refuse)."""
    from morl.tools.preflight import PreflightError, hardware, report

    with exit_on(ConfigError, PreflightError, DataError):
        cfg = load_config(recipe, overrides or [])
        lines, fits = report(cfg, hardware(gpus, gpu_mem_gib, host_mem_gib))
        if data:
            lines.append(_data_line(cfg))
    typer.echo("\n".join(lines))
    if not fits:
        raise typer.Exit(2)


def _data_line(cfg: RunConfig) -> str:
    """The recipe's data, loaded and checked as `morl train` does, in one line: rows per split and per task."""
    from morl.data.source import load_training_data

    source, held_out = load_training_data(cfg)
    train = source.task_counts()
    tasks = train + Counter(held.row.task for held in held_out)
    return (f"data: {train.total()} training rows, {len(held_out)} held-out rows; tasks: "
            f"{', '.join(f'{task} {n}' for task, n in sorted(tasks.items()))}; every row checked")


@app.command()
def compare(
    runs: list[Path] = typer.Argument(
        ..., help="run directories (each with the eval.json of a finished run) or JSON files of `morl eval -o`"
    ),
) -> None:
    """Held-out reward and response length per task of several runs, side by side (e.g. morl vs grpo)."""
    from morl.console import console as stdout
    from morl.tools.compare import CompareError, load_run_eval, print_comparison

    with exit_on(CompareError):
        print_comparison([load_run_eval(run) for run in runs], stdout)


@app.command("eval")
def eval_checkpoint(
    model_dir: Path = typer.Argument(..., help="HF-format checkpoint: RUN/final, a checkpoint's policy/, an SFT dir"),
    recipe: Path = typer.Option(
        ..., "--recipe", "-r", help="YAML recipe whose held-out data, rewards and engine are used"
    ),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides of the recipe"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write eval.json's JSON here (a new file)"),
    sft_from: Optional[Path] = typer.Option(
        None, "--sft-from", help="an earlier eval.json of the same held-out prompts: its SFT result is reused"
    ),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help='join this Ray cluster ("auto" or host:port; sets ray.address)'
    ),
) -> None:
    """Held-out reward per task of a checkpoint against the recipe's SFT model, as `morl train` reports it."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from morl.run.metrics import eval_table
    from morl.tools.evaluate import EvalError, check_new_output, evaluate_checkpoint, write_report

    with exit_on(*USER_ERRORS, EvalError):
        if output is not None:
            check_new_output(output)
        cfg = load_config(recipe, [*(overrides or []), "eval.enabled=true", *_ray_override(ray_address)])
        report = evaluate_checkpoint(cfg, model_dir, sft_from)
        eval_table({model: report[model] for model in ("sft", "policy")})
        if output is not None:
            write_report(report, output)
            console.print(f"wrote {output}")


@app.command()
def plot(
    runs: list[Path] = typer.Argument(..., help="run directories (their metrics.jsonl, and eval.json when present)"),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="directory for the PNGs (created)"),
    smoothing: float = typer.Option(0.6, "--smooth", min=0.0, max=0.99, help="EMA weight of the smoothed curves"),
) -> None:
    """PNGs of reward, pass rate and response length per task, advantages, sample waste, step time and held-out
    reward, the runs overlaid and labelled."""
    from morl.tools.plot import PlotError, plot_runs

    with exit_on(PlotError):
        written = plot_runs(runs, output_dir, smoothing)
    for path in written:
        typer.echo(str(path))


@bench_app.command("rollout")
def bench_rollout(
    recipe: Path = typer.Argument(..., help="YAML recipe, e.g. recipes/quickstart.yaml"),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides"),
    steps: int = typer.Option(8, min=0, help="rollout batches collected in each mode (0: skip the mode comparison); "
                              "partial rollout's settings are the recipe's rollout.partial (or its defaults)"),
    rounds: int = typer.Option(3, min=0, help="batches generated by the framework and the bare engine (0: skip)"),
    workload: str = typer.Option(
        "recipe", help="recipe: sample as the recipe does; long-tail: G = 16, 64 prompts, each group's answer a fixed "
        "length from a heavy tail (a few groups about 10x the median)"
    ),
    median_tokens: int = typer.Option(16, min=1, help="long-tail: the median answer length"),
    max_tokens: int = typer.Option(192, min=1, help="long-tail: the longest answer"),
) -> None:
    """Rollout throughput against the bare engine (tokens/s), then seamless vs synchronous on the same batches, and
    partial rollout's batches one after another (s/batch, waste, engine occupancy)."""
    from morl.bench.rollout import CARRYING, FULL, MODES, WORKLOADS, AnswerLengths, bench_engine
    from morl.bench.rollout import bench_rollout as run_bench

    if workload not in WORKLOADS:
        raise typer.BadParameter(f"{workload!r}; one of {', '.join(WORKLOADS)}", param_hint="--workload")
    logging.basicConfig(level=logging.ERROR)
    with exit_on(*USER_ERRORS):
        cfg = load_config(recipe, overrides or [])
        lengths = AnswerLengths(median_tokens, max_tokens, cfg.trainer.seed) if workload == "long-tail" else None
        engine = bench_engine(cfg, rounds, lengths) if rounds else None
        result = run_bench(cfg, steps, lengths) if steps else None
        if lengths is not None:
            drawn = sorted(lengths(seq) for seq in range(1000))
            typer.echo(f"long-tail answer lengths: median {drawn[500]}, 90th percentile {drawn[900]}, "
                       f"99th {drawn[990]}, longest {drawn[-1]} tokens (per group)")
    if engine:
        typer.echo(f"{engine['engine']} engine, {engine['prompts']} prompts x {engine['samples_per_prompt']} samples, "
                   f"one worker, best of {rounds} rounds")
        typer.echo(f"framework {engine['framework_tokens_per_s']:>9.1f} tokens/s")
        typer.echo(f"bare      {engine['bare_tokens_per_s']:>9.1f} tokens/s")
        typer.echo(f"framework / bare: {engine['framework_over_bare']:.3f}")
    if result:
        typer.echo(f"{steps} batches of {result['prompts_per_step']} groups x {result['group_size']}, "
                   f"{result['workers']} rollout workers, dynamic sampling {'on' if cfg.algo.dynamic_sampling else 'off'}")
        typer.echo(f"{'mode':<12} {'s/batch':>8} {'sample waste':>13} {'worker idle':>12} {'occupancy':>10} "
                   f"{'before tail':>12} {'full until':>11}")
        for mode in (*MODES, CARRYING):
            r = result[mode]
            typer.echo(f"{mode:<12} {r['seconds_per_step']:>8.2f} {r['sample_waste']:>13.1%} "
                       f"{r['worker_idle_fraction']:>12.1%} {r['occupancy']:>10.1%} {r['occupancy_before_tail']:>12.1%} "
                       f"{r['full_until']:>11.1%}")
        typer.echo("occupancy: sequences in flight over max_num_seqs, from the first request to the last group taken; "
                   f"full until: the share of that time after which no engine step ran {FULL:.0%} full (the tail)")
        typer.echo(f"speedup (synchronous / seamless time): {result['speedup']:.2f}x; "
                   f"same batches in both modes: {'yes' if result['same_batches'] else 'NO'}")
        typer.echo(f"speedup (synchronous / partial time): {result['partial_speedup']:.2f}x; partial's batches follow "
                   f"one another, {result[CARRYING]['stale_token_share']:.1%} of their tokens sampled by an older "
                   "policy version")


@bench_app.command("data")
def bench_data(
    images: int = typer.Option(100_000, min=0, help="PNGs in the data set whose start-up check is timed (0: skip)"),
    size: int = typer.Option(32, min=1, help="side of each PNG, in pixels"),
    prompts: int = typer.Option(256, min=0, help="prompts held by the driver in the memory figure (0: skip)"),
    image_side: int = typer.Option(1024, min=28, help="side of each prompt's image in the memory figure"),
) -> None:
    """Seconds to check a data set of many images (verified one by one, against morl's header check without and
    with its cache); the driver's peak memory for a step's prompts with and without their pixels."""
    from morl.bench.data import bench_driver_memory, bench_load

    if images:
        t = bench_load(images, size)
        typer.echo(f"{images:,} PNGs of {size} x {size}: check of every image")
        typer.echo(f"bare (open + verify, one by one) {t['bare_verify_s']:>8.2f} s")
        typer.echo(f"morl, rows only (no image opened) {t['rows_only_s']:>7.2f} s")
        typer.echo(f"morl, empty header cache         {t['cold_cache_s']:>8.2f} s")
        typer.echo(f"morl, header cache written       {t['warm_cache_s']:>8.2f} s")
    if prompts:
        memory = bench_driver_memory(prompts, image_side)
        typer.echo(f"{prompts} prompts of one {image_side} x {image_side} image ({memory['with_pixels']['tokens']} "
                   "tokens each) held by the driver")
        for mode, m in memory.items():
            typer.echo(f"{mode:<15} peak {m['peak_mb']:>7.0f} MB ({m['over_start_mb']:>6.0f} MB over the peak before "
                       f"encoding); pixel tensors {m['pixel_mb']:>6.0f} MB")


@bench_app.command("learner")
def bench_learner(
    recipe: Path = typer.Argument(..., help="YAML recipe: its model and learner settings"),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides"),
    sequences: int = typer.Option(8, min=1, help="sequences per update"),
    prompt_tokens: int = typer.Option(256, min=1, help="prompt tokens per sequence"),
    response_tokens: str = typer.Option(
        "256", help="answer tokens per sequence; several, comma-separated (2048,8192), are a sweep: one column each"
    ),
    steps: int = typer.Option(3, min=1, help="timed updates after one warm-up, per answer length; the best counts"),
    shape: str = typer.Option(
        "recipe", help="the model: the recipe's, or a shape built locally around its processor: real-vocab, "
        "real-vocab-narrow (MiMo-VL-7B's vocabulary and heads, 2 narrow layers; random weights)"
    ),
    shape_cache: Path = typer.Option(Path("~/.cache/morl/shapes"), help="where built shapes are kept"),
    padding_batches: int = typer.Option(
        1, min=0, help="rollout batches of the recipe (its model) whose padded share is reported (0: skip)"
    ),
    bare: bool = typer.Option(True, help="also time the bare torch loop on the same tokens (skipped where it cannot fit)"),
) -> None:
    """Tokens/s, MFU and peak memory per rank of one learner update, against a bare torch loop on the same tokens;
    the padded share of the recipe's micro-batches before and after packing."""
    from morl.bench.learner import bench_learner as run_bench
    from morl.toy.model import BENCH_SHAPES

    if shape not in ("recipe", *BENCH_SHAPES):
        raise typer.BadParameter(f"{shape!r}: choose recipe, {', '.join(BENCH_SHAPES)}", param_hint="--shape")
    lengths = _positive_ints(response_tokens, "--response-tokens")
    logging.basicConfig(level=logging.ERROR)
    with exit_on(*USER_ERRORS):
        report = run_bench(load_config(recipe, overrides or []), sequences, prompt_tokens, lengths, steps,
                           shape=shape, shape_cache=shape_cache, padding_batches=padding_batches, bare=bare)
    for key, value in report.items():
        values = value if isinstance(value, list) else [value]
        typer.echo(f"{key:<28} " + " ".join(f"{'-' if v is None else v:>10}" for v in values))
    if bare and None in report["bare_tokens_per_s"]:
        typer.echo("note: '-' in bare rows: its full float32 logits would not fit the free memory (bare_need_mib)")


def _positive_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{text!r}: positive integers, comma-separated", param_hint=option)
    return values


@bench_app.command("sync")
def bench_sync(
    recipe: Path = typer.Argument(..., help="YAML recipe: its model, rollout engine and workers"),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides"),
    rounds: int = typer.Option(3, min=1, help="timed syncs after one warm-up; the best counts"),
) -> None:
    """Seconds per GB of the learner -> rollout weight sync, vs a bare transfer of the same bytes."""
    from morl.bench.sync import bench_sync as run_bench

    logging.basicConfig(level=logging.ERROR)
    with exit_on(*USER_ERRORS):
        report = run_bench(load_config(recipe, overrides or []), rounds)
    typer.echo("\n".join(f"{key:<20} {value}" for key, value in report.items()))


@app.command("filter")
def filter_prompts(
    recipe: Path = typer.Argument(..., help="YAML recipe whose model, rewards and train datasets are used"),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides"),
    samples: int = typer.Option(..., "--samples", "-k", help="K: responses sampled per prompt"),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="new (or empty) directory for the results"),
    max_pass_rate: float = typer.Option(0.9, help="drop prompts whose pass rate is above this (too easy)"),
    min_pass_rate: float = typer.Option(0.0, help="drop prompts whose pass rate is below this (too hard)"),
    pass_threshold: float = typer.Option(1.0, help="a sample passes when its reward is >= this"),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help='join this Ray cluster ("auto" or host:port; sets ray.address)'
    ),
) -> None:
    """Offline pass-rate filter: K samples per train prompt; keep the prompts neither too easy nor too hard."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from morl.console import console as stdout
    from morl.tools.filter import FilterError, FilterSettings, run_filter

    with exit_on(*USER_ERRORS, FilterError):
        cfg = load_config(recipe, [*(overrides or []), *_ray_override(ray_address)])
        settings = FilterSettings(samples, max_pass_rate, min_pass_rate, pass_threshold)
        run_filter(cfg, settings, output_dir, stdout)


if __name__ == "__main__":
    app()
