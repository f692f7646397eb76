"""Building a run's parts once from its config, and closing them: what training, the filter and the benches share.

    toy world (when the recipe has one) -> model directory check -> processor -> prompt encoder
    -> prompt source -> reward router -> Ray (a private loopback instance, or the recipe's cluster)
    -> the router's reward hosts and services -> rollout workers

A tool asks only for the parts it uses; `close()` stops every process the parts started, Ray's too when this
build started Ray.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group

from morl.cluster import (
    alive_nodes,
    check_fits,
    cluster_has_gpus,
    learner_part,
    nodes_blind_to,
    reward_part,
    rollout_part,
)
from morl.config import ConfigError, RunConfig
from morl.data.budget import VisionBudget
from morl.data.encoding import PromptEncoder, vision_token_ids
from morl.data.source import HeldOutRow, PromptSource, load_held_out_rows, load_training_data
from morl.learner.lora import check_targets_before_start
from morl.ray_setup import QUIET_OFFLINE_ENV, init_ray
from morl.rewards.router import RewardRouter
from morl.rollout.engines import engine_of
from morl.rollout.fleet import rollout_placement, start_rollout_workers
from morl.run.interrupts import children_ignore_sigint
from morl.run.model_check import check_model_dir, max_positions

log = logging.getLogger(__name__)


@dataclass
class RunParts:
    """The parts of one run; those a tool did not ask for are None (or empty: held-out rows, workers)."""

    cfg: RunConfig
    processor: Any
    encode: PromptEncoder
    banned_ids: list[int]  # vision placeholder tokens: never sampled, never scored by the learner
    source: PromptSource | None
    held_out: list[HeldOutRow]  # the held-out rows to evaluate on (empty unless asked for and eval.enabled)
    router: RewardRouter | None
    workers: list  # rollout worker actors (empty when not asked for)
    owns_ray: bool
    placement: PlacementGroup | None = None  # the rollout workers' bundles
    blind_nodes: dict[str, str] = field(default_factory=dict)  # {node id: name} of nodes that cannot see run_dir

    def restart_workers(self, weights: str) -> None:
        """Replace the rollout workers with new ones loaded from `weights` (an HF-format directory)."""
        self._stop_workers()
        self.workers = start_rollout_workers(self.cfg, weights, self.placement)

    def _stop_workers(self) -> None:
        for actor in self.workers:
            ray.kill(actor)
        self.workers = []

    def close(self) -> None:
        """Stop the reward workers and the rollout actors, and Ray when this build started it."""
        if self.router is not None:
            self.router.close()
        self._stop_workers()
        if self.placement is not None:
            remove_placement_group(self.placement)
            self.placement = None
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False


def prepare_model(cfg: RunConfig) -> None:
    """The recipe's model directory, checked: its toy world built first when it has one (a no-op once built).

    `morl train` calls this before it creates the run directory, so a bad model path or toy-world root leaves
    nothing behind, and `morl filter` before it reads the data; `build_run` calls it for every other tool.
    """
    if cfg.toy_world is not None:
        from morl.toy.world import ensure_toy_world

        ensure_toy_world(cfg.toy_world)
    check_model_dir(cfg.model.path, cfg.model.processor_path)
    if cfg.learner.lora is not None:
        check_targets_before_start(cfg.model.path, cfg.learner.lora)
    positions = max_positions(Path(cfg.model.path).expanduser())
    longest = cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens
    if positions is not None and longest > positions:  # vLLM refuses to start; HF would sample past its positions
        raise ConfigError(
            f"rollout.max_prompt_tokens + rollout.max_new_tokens = {longest} is longer than the model takes: "
            f"max_position_embeddings {positions} in {cfg.model.path}/config.json; lower them"
        )


def build_run(
    cfg: RunConfig,
    *,
    prompts: bool = True,
    held_out: bool = False,
    rewards: bool = True,
    workers: bool = True,
    weights: str | None = None,
    reward_log_dir: Path | None = None,
    model_prepared: bool = False,
    learner: bool = False,
    run_dir: Path | None = None,
    record_timeline: bool = False,
) -> RunParts:
    """The parts `cfg` describes: the prompt source (`prompts`), the held-out rows (`held_out`), the reward router
    (`rewards`, writing what reward functions print to `reward_log_dir`), Ray, and the rollout workers (`workers`,
    loaded from `weights`, default the recipe's model). `model_prepared`: the caller ran prepare_model already.

    Before any actor starts, the cluster is checked to hold the workers, the reward hosts and, when the caller will
    start one (`learner`), the learner's ranks: a recipe that cannot be placed is refused saying what is missing.
    On a cluster of more than one node, the nodes that cannot see `run_dir` (where checkpoints go) are found, for
    the learner to copy its ranks' files from them (morl/staging.py). `record_timeline`: the workers keep their
    engines' occupancy per step (`morl bench rollout`)."""
    if not model_prepared:
        prepare_model(cfg)
    os.environ.update(QUIET_OFFLINE_ENV)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(cfg.model.processor_dir)
    budget = VisionBudget.of(processor, cfg.rollout.max_prompt_tokens)  # too-long rows found as the data loads
    if prompts and held_out:  # a training run: its routes are checked against all of its data
        source, held_out_rows = load_training_data(cfg, budget)
    else:
        source = PromptSource.from_config(cfg, budget) if prompts else None
        held_out_rows = load_held_out_rows(cfg, budget) if held_out and cfg.eval.enabled else []
    engine = engine_of(cfg.rollout)
    parts = RunParts(
        cfg=cfg,
        processor=processor,
        encode=PromptEncoder(
            processor,
            cfg.rollout.max_prompt_tokens,
            cfg.data.video,
            keep_frames=engine.preprocesses_media,  # the engine samples the frames' pixels itself
            keep_pixels=not engine.preprocesses_media,  # it reads the media itself; the learner computes the pixels
        ),
        banned_ids=vision_token_ids(processor.tokenizer),
        source=source,
        held_out=held_out_rows,
        router=RewardRouter(cfg.rewards, log_dir=reward_log_dir) if rewards else None,
        workers=[],
        owns_ray=not ray.is_initialized(),
    )
    try:
        with children_ignore_sigint():  # a terminal's Ctrl-C must not kill the actors a checkpoint needs
            init_ray(cfg)
        on_gpus = cluster_has_gpus()
        asked = [rollout_part(cfg, on_gpus)] if workers else []
        asked += [learner_part(cfg, on_gpus)] if learner else []
        asked += [reward_part(cfg)] if rewards and cfg.rewards.hosts else []
        nodes = alive_nodes()
        check_fits(asked, nodes)
        if run_dir is not None and len(nodes) > 1:
            parts.blind_nodes = nodes_blind_to(run_dir)
            if parts.blind_nodes:
                log.warning(
                    "trainer.output_dir %s is not shared with node(s) %s: learner ranks there write checkpoints to "
                    "their own disk (ray.staging_dir) and the driver copies them here through Ray",
                    run_dir, ", ".join(parts.blind_nodes.values()),
                )
        if parts.router is not None:  # its reward hosts and services, before the rollout workers load the model
            parts.router.start(parts.blind_nodes)
        if workers:
            parts.placement = rollout_placement(cfg)
            parts.workers = start_rollout_workers(cfg, weights or cfg.model.path, parts.placement, record_timeline)
    except BaseException:
        parts.close()
        raise
    return parts
