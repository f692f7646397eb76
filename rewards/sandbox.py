"""Run reward calls in a pool of worker processes, each call under a hard timeout.

Model text is untrusted and sympy can hang on it, so no reward runs in the driver. Workers are started with
"spawn" (safe when the driver already has threads, as a Ray driver does), stay warm, and take samples in chunks to
keep IPC off the hot path; each worker holds up to two chunks so it never waits on the driver between them. A call
that runs past the timeout has its worker killed and replaced; the call fails, the rest of the worker's chunks are
re-queued, and the pool goes on. Workers resolve rewards by name, importing `morl.rewards.builtin` and the
configured modules, so no function objects cross the process boundary. What a reward prints is captured per
call and kept truncated in the run's log (rewards/worker_output.py), never on the console.

One dispatcher thread owns the pool; callers only append to the queue. Each worker has a sender thread, so a
large chunk that fills the pipe can block only that thread, never the timeout enforcement.
"""

from __future__ import annotations

import atexit
import importlib
import math
import multiprocessing as mp
import queue
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from morl.rewards.adapters import finite_score, resolve
from morl.rewards.types import RewardInput
from morl.rewards.worker_output import OutputCapture, OutputLog, Printed

Outcome = tuple[float | None, str | None]  # (score, None) | (None, error) | (None, None): not run
# A score is finite but not yet clamped to [0, 1]: the router clamps it and counts those outside.

MAX_CHUNK = 32  # samples per message: big enough to amortize IPC, small enough to balance work across workers
CHUNKS_IN_FLIGHT = 2  # per worker: one running, one waiting in its pipe
MAX_ERROR_CHARS = 500
_IDLE = -1.0
_CTX = mp.get_context("spawn")


@dataclass
class _Job:
    seq: int
    calls: Sequence[tuple[str, str]]  # (reward name or module:function path, adapter)
    sample: RewardInput
    future: Future[list[Outcome]]  # resolved on the dispatcher thread


@dataclass
class _Worker:
    process: Any  # a spawn-context Process
    conn: Connection
    progress: Any  # shared doubles: [seq of the running job or _IDLE, index of its running call, start time]
    outbox: queue.SimpleQueue[Any]
    sender: threading.Thread
    ready: bool = False
    chunks: deque[list[_Job]] = field(default_factory=deque)  # sent, not yet answered, in order


class SandboxPool:
    """`num_workers` warm processes running reward calls under a hard per-call timeout.

    What the calls print goes to `output_log` (appended; None: only a first excerpt per reward on the console).
    """

    def __init__(
        self,
        num_workers: int,
        timeout_s: float,
        modules: Sequence[str] = (),
        start_timeout_s: float = 120,
        output_log: Path | None = None,
    ):
        self.timeout_s = timeout_s
        self._modules = list(modules)
        self._output = OutputLog(output_log)
        self._lock = threading.Lock()
        self._pending: deque[_Job] = deque()
        self._seq = 0
        self._woken = False
        self._closing = False
        self._broken: str | None = None
        self._started = threading.Event()
        self._wake_r, self._wake_w = _CTX.Pipe(duplex=False)
        self._workers = [self._spawn() for _ in range(num_workers)]
        self._thread = threading.Thread(target=self._run, name="morl-reward-dispatcher", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # before multiprocessing's own exit hook, which would kill workers under us
        if not self._started.wait(start_timeout_s) or self._broken:
            reason = self._broken or f"reward workers did not start within {start_timeout_s}s"
            self.close()
            raise RuntimeError(f"reward sandbox failed to start:\n{reason}")

    def submit(self, sample: RewardInput, calls: Sequence[tuple[str, str]]) -> Future[list[Outcome]]:
        """Run each (reward, adapter) call on `sample` in a worker; the future gets their outcomes."""
        with self._lock:
            if self._broken or self._closing:
                raise RuntimeError(f"reward sandbox is {'broken: ' + self._broken if self._broken else 'closed'}")
            self._seq += 1
            job = _Job(self._seq, calls, sample, Future())
            self._pending.append(job)
            wake, self._woken = not self._woken, True
        if wake:
            self._wake_w.send_bytes(b"")
        return job.future

    def submit_many(
        self, samples: Sequence[RewardInput], calls: Sequence[Sequence[tuple[str, str]]]
    ) -> list[Future[list[Outcome]]]:
        """`submit` for each sample with its calls; each future gets the sample's outcomes."""
        return [self.submit(sample, sample_calls) for sample, sample_calls in zip(samples, calls)]

    def close(self) -> None:
        """Stop the workers; samples still queued or running get a 'closed' error outcome."""
        atexit.unregister(self.close)
        with self._lock:
            self._closing = True
        self._wake_w.send_bytes(b"")
        self._thread.join()

    # --- everything below runs on the dispatcher thread ---

    def _run(self) -> None:
        try:
            while not self._closing and not self._broken:
                self._dispatch()
                busy = any(w.chunks for w in self._workers)
                conns = [self._wake_r] + [w.conn for w in self._workers]
                for conn in wait(conns, timeout=min(0.05, self.timeout_s / 10) if busy else None):
                    if conn is self._wake_r:
                        self._drain_wake()
                    else:
                        self._receive(next(w for w in self._workers if w.conn is conn))
                self._enforce_timeouts()
        except BaseException as e:  # a bug here must fail the callers, not hang them
            self._broken = f"dispatcher crashed: {type(e).__name__}: {e}"
            raise
        finally:
            self._shutdown()

    def _drain_wake(self) -> None:
        while self._wake_r.poll():
            self._wake_r.recv_bytes()
        with self._lock:
            self._woken = False

    def _dispatch(self) -> None:
        # free slots, every worker's first slot before any second one, so work spreads across workers
        slots = [w for depth in range(CHUNKS_IN_FLIGHT) for w in self._workers if w.ready and len(w.chunks) <= depth]
        with self._lock:
            for i, worker in enumerate(slots):
                if not self._pending:
                    break
                size = min(MAX_CHUNK, math.ceil(len(self._pending) / (len(slots) - i)))
                chunk = []
                while len(chunk) < size and self._pending:
                    job = self._pending.popleft()
                    if job.future.running() or job.future.set_running_or_notify_cancel():  # not cancelled
                        chunk.append(job)
                if chunk:
                    worker.chunks.append(chunk)
                    worker.outbox.put([(job.seq, job.calls, job.sample) for job in chunk])

    def _receive(self, worker: _Worker) -> None:
        try:
            kind, payload = worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(1)
            self._replace(worker, f"worker died (exit code {worker.process.exitcode})")
            return
        if kind == "ready":
            if payload is not None:
                self._output.add("start-up", "a reward worker starting (importing the reward modules)", payload)
            worker.ready = True
            if all(w.ready for w in self._workers):
                self._started.set()
        elif kind == "init_error":
            self._broken = f"reward worker failed to start: {payload}"  # stops the loop; shutdown fails all jobs
        else:
            chunk = worker.chunks.popleft()
            self._dispatch()  # refill the worker before running callbacks
            for job, (outcomes, printed) in zip(chunk, payload):
                for index, output in printed:
                    name = job.calls[index][0]
                    self._output.add(name, f"reward {name!r} on a {job.sample.task!r} sample", output)
                _finish(job, outcomes)

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            p = worker.progress
            seq, index, started, index_again, seq_again = p[0], p[1], p[2], p[1], p[0]
            stable = seq == seq_again and index == index_again
            if worker.chunks and stable and seq != _IDLE and now - started > self.timeout_s:
                self._replace(worker, f"TimeoutError after {self.timeout_s}s", seq, int(index))

    def _replace(self, worker: _Worker, reason: str, seq: float | None = None, index: int = 0) -> None:
        """Kill `worker`; the call it was running fails with `reason`, the rest is re-queued; start a fresh one."""
        if seq is None:
            seq, index = worker.progress[0], int(worker.progress[1])
        worker.process.kill()
        worker.process.join()
        worker.outbox.put(None)  # sending to the dead worker fails at once, which ends the sender thread
        worker.sender.join()
        worker.conn.close()
        jobs = [job for chunk in worker.chunks for job in chunk]
        with self._lock:
            self._pending.extendleft(reversed([job for job in jobs if job.seq != seq]))
        for job in jobs:
            if job.seq == seq:
                _finish(job, [(None, reason) if i == index else (None, None) for i in range(len(job.calls))])
        self._workers[self._workers.index(worker)] = self._spawn()

    def _spawn(self) -> _Worker:
        conn, child = _CTX.Pipe()
        progress = _CTX.RawArray("d", [_IDLE, 0.0, 0.0])
        process = _CTX.Process(
            target=_worker_main, args=(child, progress, self._modules), name="morl-reward-worker", daemon=True
        )
        process.start()
        child.close()
        outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        sender = threading.Thread(target=_send_loop, args=(conn, outbox), name="morl-reward-sender", daemon=True)
        sender.start()
        return _Worker(process, conn, progress, outbox, sender)

    def _shutdown(self) -> None:
        with self._lock:
            self._closing = True
            jobs = list(self._pending) + [job for w in self._workers for chunk in w.chunks for job in chunk]
            self._pending.clear()
        reason = self._broken or "reward sandbox closed"
        for job in jobs:
            if job.future.running() or job.future.set_running_or_notify_cancel():
                _finish(job, [(None, reason)] * len(job.calls))
        self._started.set()
        for worker in self._workers:
            if worker.chunks:  # its calls were just failed; no point waiting for them
                worker.process.kill()
            worker.outbox.put(None)  # asks an idle worker to exit
        deadline = time.monotonic() + 2
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.sender.join()
            worker.conn.close()


def _finish(job: _Job, outcomes: list[Outcome]) -> None:
    job.future.set_result(outcomes)


def _send_loop(conn: Connection, outbox: queue.SimpleQueue[Any]) -> None:
    """Send chunks to one worker in order; None is sent as the stop message and ends the loop."""
    while True:
        message = outbox.get()
        try:
            conn.send(message)
        except OSError:  # the worker is dead; the dispatcher has noticed or will
            return
        if message is None:
            return


def _worker_main(conn: Connection, progress: Any, modules: list[str]) -> None:
    """Worker process: import the rewards, then run chunks of jobs until told to stop.

    A chunk's answer holds, per job, its outcomes and [(call index, what that call printed)].
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it stops the pool
    capture = OutputCapture()
    try:
        for name in ["morl.rewards.builtin", *modules]:
            importlib.import_module(name)
    except BaseException:
        conn.send(("init_error", traceback.format_exc()))
        return
    conn.send(("ready", capture.take()))
    fns: dict[tuple[str, str], Any] = {}
    while True:
        try:
            chunk = conn.recv()
        except EOFError:  # the driver is gone
            return
        if chunk is None:
            return
        results = []
        for seq, calls, sample in chunk:
            outcomes: list[Outcome] = []
            printed: list[tuple[int, Printed]] = []
            for index, (name, adapter) in enumerate(calls):
                progress[2] = time.monotonic()  # written before the ids: the driver reads the ids first
                progress[1] = index
                progress[0] = seq
                try:
                    if (name, adapter) not in fns:
                        fns[name, adapter] = resolve(name, adapter)
                    outcomes.append((finite_score(fns[name, adapter](sample.response, sample)), None))
                except Exception as e:
                    outcomes.append((None, f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]))
                output = capture.take()
                if output is not None:
                    printed.append((index, output))
            results.append((outcomes, printed))
        progress[0] = _IDLE
        conn.send(("results", results))
