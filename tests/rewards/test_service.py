"""Reward services over real HTTP: the standalone server with a tiny reward model, the router's batching client,
servers that fail in every way (counted errors, never silent zeros), the CLI, and one Ray Serve run."""

import http.client
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import ray
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from morl.rewards.cli import app
from morl.rewards.config import HttpService, RewardsConfig
from morl.rewards.contract import decode_request, encode_sample, media_bytes, open_image, request_body
from morl.rewards.http_client import HttpRewardClient
from morl.rewards.http_server import make_server
from morl.rewards.preference import PreferenceScorer
from morl.rewards.router import RewardErrorRateExceeded, RewardRouter
from morl.rewards.types import RewardInput
from morl.rollout.types import Completion
from morl.run.step import reward_input

from helpers import (  # noqa: E402
    build_text_rm,
    build_vl_rm,
    reference_text_rewards,
    text_samples,
    video_row,
    vl_samples,
    write_image,
    write_video,
)

FX = "reward_fixtures"


@pytest.fixture(scope="module")
def text_rm(tmp_path_factory):
    return build_text_rm(tmp_path_factory.mktemp("text_rm"))


@pytest.fixture(scope="module")
def scorer(text_rm):
    return PreferenceScorer(str(text_rm), batch_size=4)


@contextmanager
def serving(score, **options):
    """`score` behind the standalone server (made with `options`) on a free port; yields its URL."""
    server = make_server(score, port=0, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/score"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def scripted(answer):
    """A server that answers request number n (from 0) with `answer(n, payload)`: (status, body bytes), or None
    to drop the connection without answering. Yields (url, requests seen)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(payload)
            reply = answer(len(seen) - 1, payload)
            if reply is None:
                self.close_connection = True
                return
            status, body = reply
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/score", seen
    finally:
        server.shutdown()
        server.server_close()


def rewards_json(rewards, errors=None):
    return 200, json.dumps({"rewards": rewards, **({"errors": errors} if errors is not None else {})}).encode()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(url, **options):
    return HttpRewardClient(url, HttpService(kind="http", url=url, **options))


def sample(text="an answer", task="chat", **kwargs):
    return RewardInput.from_text(text, task, {}, **kwargs)


# --- the service: the reward model over HTTP ---


def test_the_service_returns_the_sigmoid_of_the_model_score(text_rm, scorer):
    samples = text_samples()
    with serving(scorer) as url:
        outcomes = client(url).score(samples)
    expected = reference_text_rewards(text_rm, samples)
    assert [error for _, error in outcomes] == [None] * len(samples)
    assert [reward for reward, _ in outcomes] == pytest.approx(expected, abs=1e-5)


def test_images_travel_as_paths_or_inline_and_score_the_same(tmp_path):
    vl = PreferenceScorer(str(build_vl_rm(tmp_path / "vl_rm")))
    images = [write_image(tmp_path / "red.png", (220, 30, 30)), write_image(tmp_path / "blue.png", (30, 30, 220))]
    samples = vl_samples(images)
    in_process = vl(samples)
    with serving(vl, image_root=tmp_path) as url:
        by_path = client(url, images="path").score(samples)
        inline = client(url, images="base64").score(samples)
        without = client(url, images="none").score(samples[:1])
    assert [r for r, _ in by_path] == pytest.approx([r for r, _ in in_process], abs=1e-6)
    assert [r for r, _ in inline] == pytest.approx([r for r, _ in in_process], abs=1e-6)
    assert without[0][0] is None and "1 image part(s)" in without[0][1]  # the prompt had an image; none was sent


def test_a_request_off_the_contract_is_a_400_naming_the_key(scorer):
    with serving(scorer) as url:
        for body, message in [
            (b"not json", "bad request"),
            (b'{"samples": [{"response": 3}]}', "samples[0].response must be a str"),
            (b'{"samples": [{"response": "x", "images": [1]}]}', "samples[0].images must be strings"),
            (b'{"samples": [{"response": "x", "videos": "a.mp4"}]}', "samples[0].videos must be a list, got str"),
            (b'{"samples": [{"response": "x", "videos": [1]}]}', "samples[0].videos must be strings"),
            (b'{"samples": [{"response": "x", "videos": [["0.png", 1]]}]}', "samples[0].videos must be strings"),
            (b'{"samples": [{"response": "x", "videos": [[]]}]}', "samples[0].videos must be strings"),
        ]:
            request = urllib.request.Request(url, data=body)
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=10)
            assert info.value.code == 400 and message in json.loads(info.value.read())["error"]


# --- the service's guards: token, image root, request size ---


def image_sizes(samples):
    """A scorer that opens every image of a sample, as a reward model does: its total width / 1000."""
    return [(sum(open_image(ref).size[0] for ref in s.images) / 1000, None) for s in samples]


def post_headers(url, headers):
    """A POST of `headers` alone, no body: (status, JSON answer). The server must answer without reading one."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.putrequest("POST", parts.path)
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        connection.close()


def test_a_token_guards_the_service_and_the_client_sends_it():
    with serving(image_sizes, token="s3cret-Token_1") as url:
        (_, no_token), = client(url).score([sample()])
        (_, wrong), = client(url, token="s3cret-Token_2").score([sample()])
        right = client(url, token="s3cret-Token_1").score([sample(), sample()])
        refused_first = post_headers(url, [("Content-Length", str(2**40))])  # 401 before the size is looked at
        health = urllib.request.urlopen(url.replace("/score", "/health"), timeout=10).read()
    assert no_token == wrong == f'HTTP 401 from {url}: {{"error": "unauthorized"}}'
    assert right == [(0.0, None)] * 2
    assert refused_first == (401, {"error": "unauthorized"})
    assert json.loads(health) == {"status": "ok"}  # liveness needs no token


def test_a_token_is_masked_in_config_dumps():
    cfg = RewardsConfig(services={"rm": {"kind": "http", "url": "http://h/s", "token": "s3cret"}},
                        routes={"c": [{"fn": "rm"}]})
    assert cfg.services["rm"].token.get_secret_value() == "s3cret"
    assert "s3cret" not in json.dumps(cfg.model_dump(mode="json"))


def test_image_paths_are_opened_only_under_the_image_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    inside = write_image(root / "sub" / "ok.png", (220, 30, 30))  # 112 pixels wide
    secret = write_image(outside / "secret.png", (30, 30, 220))
    (root / "escape.png").symlink_to(secret)
    (root / "ring.png").symlink_to(root / "ring.png")
    refs = {
        "inside": inside, "relative": "sub/ok.png", "dotdot inside": str(root / "sub" / ".." / "sub" / "ok.png"),
        "outside": secret, "symlink out": str(root / "escape.png"), "dotdot out": str(root / ".." / "outside" /
        "secret.png"), "relative out": "../outside/secret.png", "system file": "/etc/passwd",
        "missing inside": str(root / "nope.png"), "missing outside": str(outside / "nope.png"),
        "a folder": str(root / "sub"), "symlink loop": str(root / "ring.png"), "nul byte": str(root / "a\0.png"),
    }
    samples = [sample(images=(ref,)) for ref in refs.values()]
    with serving(image_sizes, image_root=root) as url:
        outcomes = dict(zip(refs, client(url, images="path").score(samples)))
    with serving(image_sizes) as url:  # no image root: no path at all, inline images still
        without_root = client(url, images="path").score([sample(images=(inside,))])
        inline = client(url, images="base64").score([sample(images=(inside,))])
    for name in ("inside", "relative", "dotdot inside"):
        assert outcomes.pop(name) == (0.112, None), name
    assert {outcome for outcome in outcomes.values()} == {
        (None, "service: images[0]: no file at this path under the service's image root")
    }  # forbidden, missing or odd: one message, naming no path
    assert without_root[0][0] is None and "started without an image root" in without_root[0][1]
    assert inline == [(0.112, None)]


def media(tmp_path):
    """A real video file and a video as two frame files, under `tmp_path`."""
    (tmp_path / "frames").mkdir()
    frames = (write_image(tmp_path / "frames" / "0.png", (220, 30, 30)),
              write_image(tmp_path / "frames" / "1.png", (30, 30, 220)))
    return write_video(tmp_path / "clip.mp4", seconds=0.5, fps=4), frames


def video_bytes(samples):
    """A scorer that reads every video of a sample, frames included, as a judge model does: their bytes / 1e6."""

    def size(video):
        return sum(len(media_bytes(ref)) for ref in ([video] if isinstance(video, str) else video))

    return [(sum(size(video) for video in s.videos) / 1e6, None) for s in samples]


def test_videos_travel_in_each_images_mode_and_decode_to_the_same_files(tmp_path):
    clip, frames = media(tmp_path)
    sent = sample(images=(frames[0],), videos=(clip, frames))

    def round_trip(mode):
        return decode_request(json.loads(request_body([encode_sample(sent, mode)])))[0]

    inline, by_path, without = round_trip("base64"), round_trip("path"), round_trip("none")
    (video, frame_refs) = inline.videos
    assert video.startswith("data:video/mp4;base64,") and media_bytes(video) == open(clip, "rb").read()
    assert isinstance(frame_refs, tuple) and all(ref.startswith("data:image/png;base64,") for ref in frame_refs)
    assert [media_bytes(ref) for ref in frame_refs] == [open(frame, "rb").read() for frame in frames]
    assert open_image(frame_refs[1]).getpixel((30, 40)) == (30, 30, 220)
    assert by_path.videos == (clip, frames) and by_path.images == (frames[0],)
    assert without.videos == () and without.images == ()
    assert decode_request({"samples": [{"response": "x"}]})[0].videos == ()  # a request from before videos


def test_reward_input_carries_the_rows_videos_as_absolute_paths(tmp_path):
    clip, frames = media(tmp_path)
    row = video_row("v", [clip, list(frames)], images=[frames[0]])
    seen = reward_input(row, Completion([1, 2], "<think>hm</think>[00:00, 00:01]", [0.0, 0.0], "stop"))
    assert seen.videos == (clip, frames) and seen.images == (frames[0],)
    assert seen.response == "[00:00, 00:01]" and seen.task == "temporal"
    assert seen.token_ids == (1, 2)  # for rewards that count tokens (TRL's completion_ids)


def test_video_paths_are_opened_only_under_the_image_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    clip, frames = media(root)
    secret = write_video(outside / "secret.mp4", seconds=0.5, fps=4)
    (root / "escape.mp4").symlink_to(secret)
    size = (os.path.getsize(clip) + sum(os.path.getsize(frame) for frame in frames)) / 1e6
    cases = {
        "file and frames": ((clip, frames), (size, None)),
        "relative": (("clip.mp4", ("frames/0.png", "frames/1.png")), (size, None)),
        "outside": ((secret,), (None, "service: videos[0]: no file at this path under the service's image root")),
        "symlink out": ((str(root / "escape.mp4"),), (None, "service: videos[0]: no file at this path under the "
                                                           "service's image root")),
        "a frame outside": ((clip, (frames[0], write_image(outside / "f.png", (0, 0, 0)))),
                            (None, "service: videos[1][1]: no file at this path under the service's image root")),
    }
    with serving(video_bytes, image_root=root) as url:
        outcomes = client(url, images="path").score([sample(videos=videos) for videos, _ in cases.values()])
    with serving(video_bytes) as url:  # no image root: no video path, inline videos still
        (_, without_root), = client(url, images="path").score([sample(videos=(clip,))])
        inline = client(url, images="base64").score([sample(videos=(clip, frames))])
    assert dict(zip(cases, outcomes)) == {name: outcome for name, (_, outcome) in cases.items()}
    assert without_root.startswith("service: videos[0]: paths are refused") and "image root" in without_root
    assert inline == [(size, None)]


@pytest.mark.parametrize(
    ("headers", "status", "error"),
    [
        ([("Content-Length", str(2**40))], 413, "over this service's limit of 1000 bytes"),
        ([("Content-Length", "1001")], 413, "over this service's limit of 1000 bytes"),
        ([], 411, "a Content-Length header is required"),
        ([("Transfer-Encoding", "chunked")], 411, "a Content-Length header is required"),
        ([("Content-Length", "ten")], 400, "invalid Content-Length"),
        ([("Content-Length", "-1")], 400, "invalid Content-Length"),
        ([("Content-Length", b"\xb2")], 400, "invalid Content-Length"),  # a superscript 2: a digit, not ASCII
        ([("Content-Length", "10"), ("Content-Length", "20")], 400, "invalid Content-Length"),
    ],
)
def test_a_request_body_is_refused_on_its_headers_before_it_is_read(headers, status, error):
    with serving(image_sizes, max_request_bytes=1000) as url:
        answer = post_headers(url, headers)
        scored = client(url).score([sample()])  # a body within the cap is still read and scored
    assert answer == (status, {"error": error if status != 413 else f"the request body is {error}"})
    assert scored == [(0.0, None)]


# --- the router's client: batching, retries, failures ---


def test_the_router_batches_service_calls_and_weights_them_with_functions(scorer):
    sizes = []

    def counting_scorer(samples):
        sizes.append(len(samples))
        return scorer(samples)

    samples = (text_samples() * 3)[:13]
    with serving(counting_scorer) as url:
        cfg = RewardsConfig(
            modules=[FX], num_workers=1,
            services={"rm": {"kind": "http", "url": url, "batch_size": 4, "max_concurrency": 2}},
            routes={"caption": [{"fn": "rm", "weight": 3}, {"fn": "fixture_half", "weight": 1}]},
        )
        router = RewardRouter(cfg)  # no `with`: the first submit connects to the service, as in the trainer
        try:
            results = router.score(samples)
        finally:
            router.close()
    rm = [reward for reward, _ in scorer(samples)]
    assert [r.reward for r in results] == pytest.approx([(3 * x + 0.5) / 4 for x in rm], abs=1e-6)
    assert [r.components["rm"] for r in results] == pytest.approx(rm, abs=1e-6)
    assert sum(sizes) == 13 and max(sizes) == 4 and len(sizes) <= math.ceil(13 / 4) + 2  # batches, not 13 calls


FAILING = {
    "http500": (lambda n, p: (500, b'{"error": "CUDA out of memory"}'), "HTTP 500 from "),
    "short": (lambda n, p: rewards_json([0.5] * (len(p["samples"]) - 1)), "2 rewards and 2 errors for 3 samples"),
    "notjson": (lambda n, p: (200, b"<html>proxy error</html>"), "the answer is not JSON"),
    "shape": (lambda n, p: (200, b'{"scores": [1, 1, 1]}'), 'not an object with a "rewards" list'),
    "hang": (lambda n, p: time.sleep(3), "TimeoutError: no answer from "),
}


def test_failing_services_give_counted_errors_never_zeros():
    with ExitStack() as servers:
        urls = {name: servers.enter_context(scripted(answer))[0] for name, (answer, _) in FAILING.items()}
        urls["refused"] = f"http://127.0.0.1:{free_port()}/score"  # nothing listens there
        services = {name: {"kind": "http", "url": url, "timeout_s": 1.0, "max_retries": 1}
                    for name, url in urls.items()}
        cfg = RewardsConfig(
            num_workers=1, max_error_rate=0.1, error_window=20, services=services,
            routes={name: [{"fn": name}] for name in services},
        )
        with RewardRouter(cfg) as router:
            start = time.monotonic()
            results = router.score([sample(task=name) for name in services for _ in range(3)])
            assert time.monotonic() - start < 10
            counts = router.error_counts()
            with pytest.raises(RewardErrorRateExceeded, match="18 of the last 18"):
                router.check_error_rate()
    expected = {**{name: message for name, (_, message) in FAILING.items()}, "refused": "(2 attempts)"}
    for i, name in enumerate(services):
        for result in results[3 * i : 3 * i + 3]:
            assert result.reward is None and result.error.startswith(f"{name}: ")
            assert expected[name] in result.error, (name, result.error)
        assert counts[name] == 3


def test_connection_drops_and_503_are_retried():
    def flaky(n, payload):
        return None if n == 0 else (503, b"starting") if n == 1 else rewards_json([0.75] * len(payload["samples"]))

    with scripted(flaky) as (url, seen):
        assert client(url, max_retries=3).score([sample(), sample()]) == [(0.75, None)] * 2
    assert len(seen) == 3

    with scripted(lambda n, p: (400, b"no")) as (url, seen):  # the client's fault: retrying cannot help
        (reward, error), = client(url, max_retries=3).score([sample()])
    assert reward is None and error.startswith("HTTP 400") and len(seen) == 1


def test_per_sample_errors_and_values_off_the_scale():
    answer = rewards_json([0.25, None, 1.7, "high", None], [None, "image unreadable", None, None, None])
    with scripted(lambda n, p: answer) as (url, _):
        outcomes = client(url).score([sample() for _ in range(5)])
    assert outcomes[:3] == [(0.25, None), (None, "service: image unreadable"), (1.7, None)]  # the router clamps
    assert outcomes[3] == (None, "service: reward returned str, expected a number")
    assert outcomes[4] == (None, "service returned a null reward without an error")


def test_a_sample_that_cannot_be_sent_fails_alone():
    with scripted(lambda n, p: rewards_json([0.5] * len(p["samples"]))) as (url, seen):
        outcomes = client(url).score([sample(images=("/no/such.png",)), sample(meta={"x": {1, 2}}), sample()])
    assert outcomes[0][0] is None and "FileNotFoundError" in outcomes[0][1]
    assert outcomes[1][0] is None and "not JSON serializable" in outcomes[1][1]
    assert outcomes[2] == (0.5, None) and len(seen[0]["samples"]) == 1


# --- config and CLI ---


@pytest.mark.parametrize(
    ("rewards", "key", "message"),
    [
        ({"services": {"rm": {"kind": "http", "url": "http://h/s", "urll": 1}}, "routes": {"c": [{"fn": "rm"}]}},
         "services.rm.http.urll", "Extra inputs"),
        ({"services": {"rm": {"kind": "http", "url": "h:80/s"}}, "routes": {"c": [{"fn": "rm"}]}},
         "services.rm.http.url", "not an http:// or https:// URL"),
        ({"services": {"rm": {"kind": "preference", "model_path": "/no/rm"}}, "routes": {"c": [{"fn": "rm"}]}},
         "services.rm.preference.model_path", "no reward model checkpoint at '/no/rm'"),
        ({"services": {"rm": {"kind": "judge"}}, "routes": {"c": [{"fn": "rm"}]}},
         "services.rm", "'http', 'preference'"),
        ({"services": {"math": {"kind": "http", "url": "http://h/s"}}, "routes": {"c": [{"fn": "math"}]}},
         "services", "'math' is already a registered reward"),
        ({"services": {"rm": {"kind": "http", "url": "http://h/s"}}, "routes": {"c": [{"fn": "r"}]}},
         "routes.c.0.fn", "unknown reward 'r'"),
        ({"services": {"rm": {"kind": "http", "url": "http://h/s"}}, "routes": {"c": [{"fn": "rm", "adapter": "trl"}]}},
         "routes.c.0", "is a reward service"),
        ({"services": {"rm": {"kind": "http", "url": "http://h/s"}}}, "", "services ['rm'] are not used by any route"),
        ({"services": {"rm": {"kind": "http", "url": "http://h/s", "token": "two words"}},
          "routes": {"c": [{"fn": "rm"}]}},
         "services.rm.http.token", "a token must be visible ASCII characters, without spaces"),
    ],
)
def test_service_config_errors_name_the_key(rewards, key, message):
    with pytest.raises(ValidationError) as info:
        RewardsConfig(**rewards)
    errors = info.value.errors()
    assert [".".join(map(str, e["loc"])) for e in errors] == [key]
    assert message in errors[0]["msg"]


def test_cli_score_routes_a_task_to_the_http_reward(tmp_path, text_rm, scorer):
    rows = [{"task": s.task, "response": s.full_response, "label": {}, "meta": s.meta} for s in text_samples()]
    rows.append({"task": "counting", "response": r"\boxed{3}", "label": {"count": 3}})
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with serving(scorer) as url:
        recipe = {"rewards": {"services": {"rm": {"kind": "http", "url": url}}, "routes": {"caption": [{"fn": "rm"}]}}}
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        recipe_file = str(tmp_path / "recipe.yaml")
        args = ["score", str(tmp_path / "r.jsonl"), "--recipe", recipe_file, "-o", str(tmp_path / "o")]
        result = CliRunner().invoke(app, args)
        listed = CliRunner().invoke(app, ["list", "--recipe", recipe_file])
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in (tmp_path / "o").read_text().splitlines()]
    expected = reference_text_rewards(text_rm, text_samples())
    assert [row["reward"] for row in out[:-1]] == pytest.approx(expected, abs=1e-5)
    assert out[-1]["reward"] == 1.0 and all(row["error"] is None for row in out)
    assert "rm" in listed.output and "http service" in listed.output


def test_cli_serve_preference_runs_a_standalone_service_with_its_guards(text_rm, tmp_path):
    port = free_port()
    rewards_cli = "from morl.rewards.cli import app; app()"  # `morl rewards`, without importing the trainer
    command = [sys.executable, "-c", rewards_cli, "serve", "preference", "--model", str(text_rm), "--port", str(port),
               "--image-root", str(tmp_path), "--max-request-mb", "1"]
    env = {**os.environ, "MORL_REWARDS_TOKEN": "cli-token", "COLUMNS": "500"}  # the token is not on the command line
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        client(f"{url}/score", token="cli-token").wait_ready(120)
        assert json.loads(urllib.request.urlopen(f"{url}/health", timeout=10).read()) == {"status": "ok"}
        samples = text_samples()[:2]
        outcomes = client(f"{url}/score", token="cli-token").score(samples)
        (_, no_token), = client(f"{url}/score").score(samples[:1])
        too_big = post_headers(f"{url}/score", [("Authorization", "Bearer cli-token"),
                                                ("Content-Length", str(2**20 + 1))])
    finally:
        process.terminate()
        process.wait(30)
    expected = reference_text_rewards(text_rm, samples)
    assert [r for r, _ in outcomes] == pytest.approx(expected, abs=1e-5)
    assert no_token.startswith("HTTP 401") and too_big[0] == 413
    banner = process.stdout.read().decode()
    assert f"token required, image and video paths under {tmp_path.resolve()}, requests up to 1 MiB" in banner


def test_cli_serve_refuses_a_token_http_cannot_carry(text_rm):
    args = ["serve", "preference", "--model", str(text_rm), "--port", str(free_port())]
    result = CliRunner().invoke(app, args, env={"MORL_REWARDS_TOKEN": "tab\tinside"})
    assert result.exit_code == 2 and "visible ASCII" in result.output


# --- Ray Serve, started and stopped by the router ---


@pytest.mark.slow
def test_the_router_starts_a_preference_service_on_ray_serve_and_stops_it(tmp_path):
    vl_rm = build_vl_rm(tmp_path / "vl_rm")
    images = [write_image(tmp_path / "red.png", (220, 30, 30)), write_image(tmp_path / "blue.png", (30, 30, 220))]
    samples = vl_samples(images)
    port = free_port()
    cfg = RewardsConfig(
        num_workers=1, serve_port=port,
        services={"pref": {"kind": "preference", "model_path": str(vl_rm), "num_cpus": 0, "forward_batch_size": 2}},
        routes={"caption": [{"fn": "pref"}]},
    )
    ray_was_up = ray.is_initialized()
    with RewardRouter(cfg) as router:
        results = router.score(samples)
    expected = PreferenceScorer(str(vl_rm))(samples)
    assert [r.reward for r in results] == pytest.approx([r for r, _ in expected], abs=1e-5)
    assert ray.is_initialized() == ray_was_up  # close() shuts Ray down only when the router started it
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/pref", data=b'{"samples": []}', timeout=5)
