"""The driver: one process that runs the MORL loop over Ray actors.

    prompt source -> rollout scheduler: workers sample G responses per prompt, the reward router scores each
                     call as it returns, groups without reward variance are dropped and refilled
                  -> group advantages -> learner (one on-policy step; the GRPO ablation: several)
                  -> weights back to the rollout workers, in buckets

The same loop drives a laptop CPU and a GPU cluster; only the actors' backends differ.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path

from morl.checkpoint_layout import POLICY_DIR, CheckpointError
from morl.cluster import PART_LOSSES, PartLostError, alive_nodes, lost_nodes, start_failure
from morl.compat import ray_job_working_dir
from morl.config import ConfigError, RunConfig, dump_config
from morl.console import console
from morl.learner.group import LearnerGroup
from morl.rewards.types import TrainingProgress
from morl.rng_state import capture_rng, restore_rng
from morl.rollout.engines import engine_of
from morl.run.build import build_run, prepare_model
from morl.run.checkpoint import Checkpoint, checkpoints_dir, resolve_resume, save_checkpoint, step_name
from morl.run.collection import RolloutAbandoned, RolloutScheduler
from morl.run.interrupts import RunInterrupted, StopRequest
from morl.run.lock import RunDirLock
from morl.run.metrics import MetricsWriter, ProgressDisplay, eval_table
from morl.run.evaluation import eval_report, eval_subset, evaluate
from morl.run.model_card import write_model_card
from morl.run.model_check import checkpoint_identity, dtype_notice
from morl.run.step import PhaseTimer, build_batch, dataset_names, prompt_set, reward_metrics, sample_rows
from morl.run.trackers import Trackers
from morl.run.weight_sync import (
    SyncStats,
    check_logprob_mismatch,
    form_weight_group,
    plan_buckets,
    sync_rollout_weights,
    sync_sizes,
)
from morl.staging import Copied

log = logging.getLogger("morl.run.trainer")


def check_outlives_job(out_dir: Path) -> None:
    """Refuse a run directory inside the folder a Ray job's uploaded working directory was unpacked into: it is on
    the head node only, and Ray removes it once the job is done."""
    job_dir = ray_job_working_dir()
    if job_dir is not None and out_dir.resolve().is_relative_to(job_dir):
        raise ConfigError(
            f"trainer.output_dir {out_dir}: inside this Ray job's unpacked working directory ({job_dir}), which is on "
            "the head node only and is removed once the job is done; give an absolute path on storage every node "
            "mounts (-o /shared/runs/NAME)"
        )


def report_copies(what: str, copies: dict[str, Copied]) -> None:
    """A line per node whose learner files were copied into the run directory (morl/staging.py)."""
    for node, copied in copies.items():
        console.print(f"{what}: copied from node {node}: {copied}")


class Trainer:
    def __init__(self, cfg: RunConfig, resume: str | None = None, force: bool = False):
        """`resume`: None (a new run), checkpoint.LATEST, or a checkpoint / run directory; see resolve_resume."""
        self.cfg = cfg
        self.force = force
        self.out_dir = Path(cfg.trainer.output_dir)
        check_outlives_job(self.out_dir)
        prepare_model(cfg)  # a bad model or toy-world root is refused before the run directory exists
        console.print(dtype_notice(cfg.model.path, cfg.model.dtype))
        self._started = ExitStack()  # what close() stops, newest first; a failed start stops what it started
        self.run_lock = RunDirLock(self.out_dir).acquire()  # before anything reads or prunes the directory
        self._started.callback(self.run_lock.release)
        try:
            self._start(resume)
        except BaseException:
            self.close()
            raise

    def _start(self, resume: str | None) -> None:
        cfg = self.cfg
        self.resume_from = resolve_resume(self.out_dir, resume, cfg, self.force)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(dump_config(cfg))
        # trackers first: one that cannot start fails the run before anything expensive has
        self.trackers = Trackers(cfg, self.out_dir, resume_step=self.resume_from.step if self.resume_from else 0)
        self._started.callback(self.trackers.close)
        # the rollout workers load the recipe's model, on every node; a resume syncs the checkpoint's weights to them
        self.parts = build_run(
            cfg, held_out=True, reward_log_dir=self.out_dir / "logs", model_prepared=True, learner=True,
            run_dir=self.out_dir,
        )
        self._started.callback(self.parts.close)
        self.nodes = alive_nodes()  # to name the one a run loses
        self.source, self.router, self.workers = self.parts.source, self.parts.router, self.parts.workers
        self.dataset_names = dataset_names(cfg.data.train)  # data/<name>/... metrics, with two files or more
        self.eval_rows = eval_subset(self.parts.held_out, cfg.eval.max_prompts_per_task)
        self.eval_prompts = prompt_set(self.eval_rows)  # which prompts an SFT score must share to be compared
        self.abandon_on_signal = cfg.trainer.on_signal == "abandon"
        self.stop = StopRequest("abandoning this step's rollout" if self.abandon_on_signal else "finishing this step")
        self.stop.install()
        self._started.callback(self.stop.uninstall)
        self.learner = LearnerGroup(cfg, self.parts.banned_ids, self.parts.blind_nodes)
        self._started.callback(self.learner.close)
        self.scheduler = RolloutScheduler.from_config(cfg, self.parts)
        self.engine = engine_of(cfg.rollout)
        # engines that keep their weights get the layers training changed, whole (vLLM sleep level 2 drops them all)
        sizes = sync_sizes(self.learner, cfg.model.dtype, self.engine.keeps_weights())
        self.sync_plan = plan_buckets(sizes, cfg.rollout.sync_bucket_mb * 2**20)
        self.broadcast = cfg.rollout.weight_transport == "broadcast"
        if self.broadcast:
            form_weight_group(self.learner, self.workers)
        self.start_step = self.done_step = 0  # done_step: the last step whose metrics are written
        self.saved_step = 0  # the newest step with a checkpoint (0: none)
        self.sft_eval: dict | None = None  # evaluate()'s reward, response_length and prompts; the SFT's checkpoint
        self._warned_eval_prompts = False
        if self.resume_from is not None:
            self.restore(self.resume_from)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train to trainer.max_steps, then save final/ and evaluate it; the held-out scores (empty when off).

        An actor of the run that dies, with its node or alone, stops the run with a PartLostError that names the
        node and the checkpoint to resume from; what Ray raised is its cause."""
        try:
            return self._fit()
        except PART_LOSSES as exc:
            if start_failure(exc) is not None:  # it never ran: its own error, not a loss to resume from
                raise
            raise self._lost(exc) from exc

    def _fit(self) -> dict:
        cfg = self.cfg
        if cfg.eval.enabled and self.resume_from is None:
            self.sft_eval = {**self.evaluate(), "checkpoint": checkpoint_identity(cfg.model.path)}
        if self._comparable_sft() is not None:
            eval_table({"sft": self.sft_eval["reward"]})
        metrics_file = MetricsWriter(self.out_dir / "metrics.jsonl")
        samples_file = MetricsWriter(self.out_dir / "samples.jsonl")
        for written in (metrics_file, samples_file):
            written.keep_until(self.start_step)  # steps logged after the checkpoint are trained again
        last = cfg.trainer.max_steps
        if self.start_step >= last:
            log.warning("the checkpoint is at step %d, trainer.max_steps=%d: no step to train", self.start_step, last)
        with ProgressDisplay(last, completed=min(self.start_step, last), log_every=cfg.trainer.log_every) as progress:
            for step in range(self.start_step + 1, last + 1):
                if self.stop.requested:  # asked during the SFT evaluation or a save
                    self._stop(step - 1, self.driver_state())
                # what a checkpoint of step - 1 holds, should this step be abandoned
                before = self.driver_state() if self.abandon_on_signal else None
                try:
                    metrics, samples = self.train_step(step)
                except RolloutAbandoned:
                    self._stop(step - 1, before)
                metrics_file.write(metrics)
                samples_file.write(*samples)
                self.trackers.log(step, metrics, samples)
                progress.update(metrics)
                self.done_step = step
                if step == last or (cfg.trainer.save_every and step % cfg.trainer.save_every == 0):
                    self.save_checkpoint(step)
                if self.stop.requested:
                    self._stop(step, self.driver_state())  # the last step included: final/ and the eval wait
        final = self.out_dir / "final"
        report_copies("final", self.learner.save_hf(str(final)))
        held_out = None
        if cfg.eval.enabled:
            policy = self.evaluate()
            report = eval_report(self._comparable_sft(), policy)
            (self.out_dir / "eval.json").write_text(json.dumps(report, indent=2))
            held_out = {model: report[model] for model in ("sft", "policy") if model in report}
            eval_table(held_out)
            self.trackers.log_eval(last, held_out)
        write_model_card(final, cfg, last, held_out)
        return held_out or {}

    def _lost(self, exc: BaseException) -> PartLostError:
        gone = lost_nodes(self.nodes)
        what = (f"node {', '.join(gone)} left the Ray cluster" if gone else
                "an actor of the run died on a node still alive (its process crashed; that node's Ray logs say why)")
        cause = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        if self.saved_step:
            ckpt = checkpoints_dir(self.out_dir) / step_name(self.saved_step)
            then = (f"its last complete checkpoint, {ckpt}, resumes it: `morl train` with --resume, on the nodes "
                    f"there are now, with the same learner.num_ranks={self.cfg.learner.num_ranks}")
        else:
            then = "no checkpoint had been written: start it again"
        return PartLostError(f"{what} after step {self.done_step} ({type(exc).__name__}: {cause}). The run stopped; "
                             f"{then}")

    def _stop(self, step: int, state: dict) -> None:
        """End the run after `step` on a signal: checkpoint it unless that is done (or no step trained), then raise."""
        if step > self.saved_step:
            self.save_checkpoint(step, state)
        raise RunInterrupted(self.stop.signum, step)

    def train_step(self, step: int) -> tuple[dict, list[dict]]:
        """One step: its metrics, and its sample rows when `trainer.log_samples_every` says so (else none)."""
        timer = PhaseTimer()
        rollout = self.scheduler.collect(
            self.cfg.trainer.prompts_per_step,
            lambda: self.abandon_on_signal and self.stop.requested,
            TrainingProgress(global_step=step - 1, max_steps=self.cfg.trainer.max_steps),
        )
        timer.lap("rollout")  # generation and scoring overlap: one phase
        batch, batch_metrics = build_batch(rollout.groups, self.cfg.algo.adv_eps, rollout.version)
        metrics = {"step": step, **reward_metrics(rollout.decided, self.dataset_names), **rollout.metrics,
                   **batch_metrics}
        if len(batch):
            if self.engine.shares_learner_gpu():  # partial rollout's carried segments end before the engine sleeps
                self.scheduler.settle()
            # the workers make room for the update as their engine needs (colocated vLLM sleeps), then load its weights
            with self.engine.update_window(self.workers, self.settle_and_sync) as window:
                metrics.update(self.learner.train_step(batch))
                timer.lap("update")
                # the rollouts this step trained on were sampled with the weights of the previous sync
                check_logprob_mismatch(metrics["logprob_mismatch"], self.cfg.learner.max_logprob_mismatch, step)
            metrics.update(window.synced)
            timer.lap("sync")
        else:
            log.warning("step %d: no group had reward variance (or every group had a reward error); no update", step)
        for name, count in self.router.error_counts().items():
            metrics[f"reward/{name}/errors"] = count
        for name, count in self.router.out_of_range_counts().items():
            metrics[f"reward/{name}/out_of_range"] = count
        self.router.log_errors(f"step {step}")
        self.router.check_error_rate()
        metrics.update(timer.as_metrics())
        every = self.cfg.trainer.log_samples_every
        samples = []
        if every and step % every == 0:
            samples = sample_rows(step, rollout.decided, self.cfg.trainer.samples_per_task, self.cfg.algo.adv_eps)
        return metrics, samples

    def settle_and_sync(self) -> dict[str, float]:
        """The learner's weights into every rollout worker, once partial rollout's carried segments, which ran
        beside the update under the old weights, have ended; the sync's metrics, and how long those segments made
        it wait."""
        waited = self.scheduler.settle()
        return {**self.sync_weights().as_metrics(), **({} if waited is None else {"time/carried_segments": waited})}

    def sync_weights(self) -> SyncStats:
        """The learner's weights into every rollout worker."""
        return sync_rollout_weights(self.learner, self.workers, self.sync_plan, dtype=self.cfg.model.dtype,
                                    cuda_ipc=self.engine.shares_learner_gpu(), broadcast=self.broadcast)

    # ------------------------------------------------------------------ checkpoints

    def driver_state(self) -> dict:
        """Every piece of driver state an exact resume needs, as a JSON copy that later steps do not touch."""
        state = {
            "sampler": self.source.state_dict(),
            "router": self.router.state_dict(),
            "scheduler": self.scheduler.state_dict(),  # its refill estimate: the same dispatch after a resume
            "rng": capture_rng(),
            "eval_sft": self.sft_eval,
        }
        return json.loads(json.dumps(state))

    def save_checkpoint(self, step: int, state: dict | None = None) -> Checkpoint:
        """The policy, the optimizer and the driver state (now, or `state` taken when the learner was as it is now),
        written atomically."""
        ckpt = save_checkpoint(
            self.out_dir,
            step,
            lambda directory: self._write_checkpoint(directory, step),
            state or self.driver_state(),
            self.cfg,
            self.cfg.trainer.keep_last,
        )
        self.saved_step = step
        return ckpt

    def _write_checkpoint(self, directory: Path, step: int) -> None:
        """The learner's files, and the policy's model card with the SFT table (the policy is evaluated at the end)."""
        report_copies(f"checkpoint {step_name(step)}", self.learner.save_checkpoint(str(directory)))
        sft = self._comparable_sft()
        write_model_card(directory / POLICY_DIR, self.cfg, step, {"sft": sft["reward"]} if sft else None)

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from `ckpt`: learner weights and optimizer, prompt order, reward counters, RNGs, step counter.

        The rollout workers, started from the recipe's model, get the checkpoint's weights from the learner. A data
        set whose size changed cannot continue its saved order; with --force the order starts over (the step counter
        still decides how many steps remain).
        """
        self.learner.load_checkpoint(str(ckpt.path))
        self.sync_weights()
        # checkpoints written before the scheduler had a state_dict hold its one number under this key
        scheduler = ckpt.state.get("scheduler") or {"valid_rate": ckpt.state["rollout_valid_rate"]}
        try:
            self.source.load_state_dict(ckpt.state["sampler"])
        except ValueError as exc:
            if not self.force:
                raise CheckpointError(
                    f"checkpoint {ckpt.path}: the training data changed ({exc}); pass --force to resume with the "
                    "data order started over"
                ) from None
            log.warning("--force: the data order starts over (%s)%s", exc,
                        "; the partial responses the checkpoint carried are dropped" if scheduler.get("carried") else "")
            scheduler = {**scheduler, "carried": []}  # their rows may no longer be where the checkpoint says
        self.router.load_state_dict(ckpt.state["router"])
        self.scheduler.load_state_dict(scheduler)
        restore_rng(ckpt.state["rng"])
        self.start_step = self.saved_step = self.done_step = ckpt.step
        self.sft_eval = ckpt.state["eval_sft"]
        console.print(f"resuming from {ckpt.path} (step {ckpt.step} of {self.cfg.trainer.max_steps})")

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict:
        """The workers' current weights on the held-out rows (evaluation.evaluate)."""
        return evaluate(self.parts, self.eval_rows)

    def _comparable_sft(self) -> dict | None:
        """The SFT evaluation, when it was taken on the prompts the policy's will be (None otherwise, or without
        one): a resume with other `eval.*` settings would compare scores of different prompt sets."""
        if not self.cfg.eval.enabled or self.sft_eval is None:
            return None
        current = self.eval_prompts
        if self.sft_eval.get("prompts") == current:
            return self.sft_eval
        if not self._warned_eval_prompts:
            saved = self.sft_eval.get("prompts", {}).get("count", "an unrecorded number of")
            log.warning(
                "the SFT checkpoint was evaluated on %s held-out prompts, the policy will be on %d others (eval.* "
                "changed on resume): no SFT score or delta is reported; resume with the original eval settings to "
                "compare",
                saved,
                current["count"],
            )
            self._warned_eval_prompts = True
        return None

    def close(self) -> None:
        """Stop every process the run started (Ray's too, when the run started Ray) and free the run directory."""
        self._started.close()
