"""The router's client for one reward service: samples in batches over HTTP, every failure an error outcome.

Samples are submitted one by one as responses finish; `max_concurrency` sender threads each take up to
`batch_size` waiting samples per request, after lingering a few milliseconds for a batch to form. Connection
errors and HTTP 503 (a service starting or overloaded) are retried with backoff; a request with no answer within
`timeout_s`, any other status, or an answer off the contract fails all its samples with the reason. Nothing here
turns a failure into a score.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import Future

from morl.rewards.config import ServiceClientConfig
from morl.rewards.contract import ContractError, decode_response, encode_sample, request_body
from morl.rewards.sandbox import MAX_ERROR_CHARS, Outcome
from morl.rewards.types import RewardInput

LINGER_S = 0.005  # wait this long for more samples before sending a batch that is not full
BACKOFF_S = 0.25  # first retry delay, doubled on each further retry
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # services are called directly, no proxy


class ServiceError(RuntimeError):
    """A request to a reward service failed as a whole."""


class HttpRewardClient:
    """Scores samples with the reward service at `url`; futures resolve to (score, None) or (None, reason)."""

    def __init__(self, url: str, cfg: ServiceClientConfig):
        self.url = url
        self.cfg = cfg
        self._cond = threading.Condition()
        self._pending: deque[tuple[RewardInput, Future[Outcome]]] = deque()
        self._closing = False
        self._senders = [
            threading.Thread(target=self._send_loop, name="morl-reward-http", daemon=True)
            for _ in range(cfg.max_concurrency)
        ]
        for sender in self._senders:
            sender.start()

    def submit(self, sample: RewardInput) -> Future[Outcome]:
        future: Future[Outcome] = Future()
        with self._cond:
            if self._closing:
                raise RuntimeError(f"reward service client for {self.url} is closed")
            self._pending.append((sample, future))
            self._cond.notify()
        return future

    def wait_ready(self, timeout_s: float) -> None:
        """Post empty batches until the service answers one by the contract; raise ServiceError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                decode_response(self._post_once(request_body([])), 0)
                return
            except (ServiceError, ContractError, OSError, http.client.HTTPException) as e:
                if time.monotonic() > deadline:
                    raise ServiceError(f"{self.url} did not answer within {timeout_s}s: {e}") from None
            time.sleep(0.2)

    def close(self) -> None:
        """Fail the samples not yet sent; requests in flight finish (bounded by their timeout)."""
        with self._cond:
            self._closing = True
            dropped = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for _, future in dropped:
            future.set_result((None, "reward service client closed"))
        for sender in self._senders:
            sender.join()

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                deadline = time.monotonic() + LINGER_S
                while len(self._pending) < self.cfg.batch_size and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = [self._pending.popleft() for _ in range(min(self.cfg.batch_size, len(self._pending)))]
            if batch:
                try:
                    outcomes = self.score([sample for sample, _ in batch])
                except Exception as e:  # a bug here must fail the callers, not hang them
                    outcomes = [(None, f"reward service client crashed: {type(e).__name__}: {e}")] * len(batch)
                for (_, future), outcome in zip(batch, outcomes):
                    future.set_result(outcome)

    def score(self, samples: list[RewardInput]) -> list[Outcome]:
        """One request for `samples`, blocking. A sample that cannot be encoded fails alone and is not sent."""
        outcomes: list[Outcome] = [(None, None)] * len(samples)
        sent: list[tuple[int, str]] = []
        for i, sample in enumerate(samples):
            try:
                sent.append((i, encode_sample(sample, self.cfg.images)))
            except (OSError, TypeError, ValueError) as e:
                outcomes[i] = (None, f"cannot send the sample: {type(e).__name__}: {e}"[:MAX_ERROR_CHARS])
        if sent:
            try:
                answers = decode_response(self._post(request_body([text for _, text in sent])), len(sent))
            except ContractError as e:
                answers = [(None, f"bad answer from {self.url}: {e}")] * len(sent)
            except ServiceError as e:
                answers = [(None, str(e)[:MAX_ERROR_CHARS])] * len(sent)
            for (i, _), answer in zip(sent, answers):
                outcomes[i] = answer
        return outcomes

    def _post(self, body: bytes) -> object:
        """POST with retries on connection errors and 503; the parsed JSON answer, or ServiceError."""
        for attempt in range(self.cfg.max_retries + 1):
            try:
                return self._post_once(body)
            except urllib.error.HTTPError as e:
                if e.code != 503 or attempt == self.cfg.max_retries:
                    raise ServiceError(f"HTTP {e.code} from {self.url}: {_excerpt(e.read())}") from None
                reason = f"HTTP 503: {_excerpt(e.read())}"
            except TimeoutError:
                raise ServiceError(f"TimeoutError: no answer from {self.url} within {self.cfg.timeout_s}s") from None
            except urllib.error.URLError as e:
                if isinstance(e.reason, TimeoutError):
                    raise ServiceError(f"TimeoutError: cannot connect to {self.url} within {self.cfg.timeout_s}s")
                reason = f"{type(e.reason).__name__}: {e.reason}"
            except (ConnectionError, http.client.HTTPException) as e:  # reset, or closed before answering
                reason = f"{type(e).__name__}: {e}"
            if attempt < self.cfg.max_retries:
                time.sleep(BACKOFF_S * 2**attempt)
        raise ServiceError(f"cannot reach {self.url} ({self.cfg.max_retries + 1} attempts): {reason}")

    def _post_once(self, body: bytes) -> object:
        headers = {"Content-Type": "application/json"}
        if self.cfg.token is not None:
            headers["Authorization"] = f"Bearer {self.cfg.token.get_secret_value()}"
        request = urllib.request.Request(self.url, data=body, headers=headers)
        with _DIRECT.open(request, timeout=self.cfg.timeout_s) as reply:
            text = reply.read()
        try:
            return json.loads(text)
        except ValueError:
            raise ContractError(f"the answer is not JSON: {_excerpt(text)}") from None


def _excerpt(body: bytes) -> str:
    return body[:300].decode(errors="replace")
