"""One run per run directory: a second run is refused with the holder's pid, a killed holder frees it, and a run
that fails to start frees it and stops what it started."""

import os
import signal
import subprocess
import sys

import psutil
import pytest
import ray

from morl.config import load_config
from morl.run import trainer as trainer_module
from morl.run.lock import RunDirBusyError, RunDirLock

from helpers import REPO, TINY_WORLD

HOLDER = """
import sys, time
from morl.run.lock import RunDirLock
RunDirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def held(tmp_path):
    """The run directory, locked by another live process (killed with SIGKILL at the end)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield tmp_path, holder
    holder.kill()
    holder.wait()


def test_a_second_holder_is_refused_with_the_first_ones_pid(held):
    run_dir, holder = held
    with pytest.raises(RunDirBusyError, match=rf"{run_dir} is in use by another morl run \(pid {holder.pid} on "):
        RunDirLock(run_dir).acquire()


def test_a_holder_killed_with_sigkill_frees_the_directory(held):
    run_dir, holder = held
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    lock = RunDirLock(run_dir).acquire()  # the kernel dropped the dead process's lock; the stale file is no obstacle
    assert f"pid {os.getpid()} " in (run_dir / ".morl.lock").read_text()
    lock.release()
    RunDirLock(run_dir).acquire().release()  # and a released lock can be taken again


def test_morl_train_into_a_busy_directory_exits_2_naming_the_holder(held, toy_world):
    run_dir, holder = held
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')  # the other run's output must stay as it is
    done = subprocess.run(
        [sys.executable, "-m", "morl.cli", "train", str(REPO / "recipes" / "quickstart.yaml"),
         f"toy_world.root={toy_world}", *(f"toy_world.{k}={v}" for k, v in TINY_WORLD.items()), "--output-dir", str(run_dir)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"pid {holder.pid}" in errors[0] and "Traceback" not in done.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in run_dir.iterdir()) == [".morl.lock", "metrics.jsonl"]


def live_children() -> list[str]:
    """This process's live descendants ("pid cmdline"), but multiprocessing's resource tracker: one per process."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{child.pid} {' '.join(child.cmdline())}")
        except psutil.NoSuchProcess:
            pass
    return [cmd for cmd in found if "resource_tracker" not in cmd]


def test_a_run_that_fails_to_start_stops_what_it_started_and_frees_the_directory(tmp_path, toy_world, monkeypatch):
    def learner_fails(*args, **kwargs):
        raise RuntimeError("the learner could not start")

    monkeypatch.setattr(trainer_module, "LearnerGroup", learner_fails)  # after Ray, reward workers and rollout actors
    tiny = [f"toy_world.{k}={v}" for k, v in TINY_WORLD.items()]
    run_dir = tmp_path / "run"
    cfg = load_config(REPO / "recipes" / "quickstart.yaml", [f"toy_world.root={toy_world}", *tiny,
                                                             f"trainer.output_dir={run_dir}"])
    ray.shutdown()  # an earlier test's Ray would be joined, not started, and so left running (rightly)
    handler, before = signal.getsignal(signal.SIGINT), live_children()
    with pytest.raises(RuntimeError, match="the learner could not start"):
        trainer_module.Trainer(cfg)
    assert not ray.is_initialized()
    assert [cmd for cmd in live_children() if cmd not in before] == []
    assert signal.getsignal(signal.SIGINT) is handler
    RunDirLock(run_dir).acquire().release()
