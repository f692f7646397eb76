"""What several test modules share: the tiny toy world's settings, the CLI in a fresh process, a small real
filesystem, listening sockets, tiny reward models, and the rollout-vs-learner log-prob gap."""

import contextlib
import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

from morl.data.rows import Row
from morl.learner.logprobs import response_logprobs
from morl.rewards.preference import Qwen2_5_VLForSequenceClassification
from morl.rewards.types import RewardInput
from morl.rollout.types import Continuation
from morl.toy.model import build_model, build_processor, build_tokenizer, save_checkpoint

TESTS = Path(__file__).parent
REPO = TESTS.parent


# --- the tiny toy world and the CLI ---------------------------------------------------------------------------

# The same toy-world settings as the end-to-end test passes on the command line, so its run reuses this build.
TINY_WORLD = dict(train_per_task=16, eval_per_task=4, sft_steps=40, sft_batch_size=8)
VIDEO_WORLD_TASKS = ("counting", "grounding", "math", "choice", "temporal", "video_counting")  # quickstart_video's

OVERRIDES = [
    *(f"toy_world.{key}={value}" for key, value in TINY_WORLD.items()),
    "trainer.max_steps=2",
    "trainer.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=12",
    "rollout.num_workers=1",  # one actor less to start per run; the end-to-end runs keep the recipe's two
    "algo.dynamic_sampling=false",
    "rewards.num_workers=1",
    # a registered custom reward (by module, as users do), whose groups always vary: a 2-step run must learn
    "rewards.modules=[reward_fixtures]",
    *(f"rewards.routes.{task}=[{{fn: fixture_length}}]" for task in ("counting", "grounding", "math", "choice")),
]


def morl_train(world, out_dir, *extra, recipe: str = "quickstart.yaml", env: dict[str, str] | None = None,
               cwd: Path | None = None):
    recipe = str(REPO / "recipes" / recipe)
    done = morl("train", recipe, f"toy_world.root={world}", *OVERRIDES, *extra, "--output-dir", str(out_dir),
                env=env, cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


# what in-process learner and vLLM engine tests set in this process's environment (rollout/vllm_compat.py)
LEFT_BY_IN_PROCESS_TESTS = (
    "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE",
    "VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_ALLOW_INSECURE_SERIALIZATION",
)


def morl(*args: str, timeout: float = 600, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`morl ARGS` in a fresh process (in `cwd`), as a user starts it: no torch.distributed variables left by
    in-process learner tests nor vLLM settings left by in-process engine tests (an exported
    VLLM_CPU_KVCACHE_SPACE would override the recipe's), and the tests' reward modules importable; `env` adds
    variables (PYTHONPATH's after the tests' folder)."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in LEFT_BY_IN_PROCESS_TESTS}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env.setdefault("COLUMNS", "200")
    return subprocess.run([sys.executable, "-m", "morl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


# --- processes and sockets -----------------------------------------------------------------------------------


def listeners(root: psutil.Process) -> dict[psutil.Process, list[tuple[str, int]]]:
    """Every listening TCP socket of `root` and its descendants, by process."""
    found = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            sockets = [c.laddr for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
        found[process] = [(addr.ip, addr.port) for addr in sockets]
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # a dual-stack socket bound to ::ffff:127.0.0.1
    return (mapped or address).is_loopback


@contextlib.contextmanager
def small_tmpfs(path: Path, size_kib: int) -> Iterator[Path]:
    """A tmpfs of `size_kib` KiB mounted at `path` (created), unmounted afterwards; skips where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"mounting a tmpfs needs root: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


# --- tiny reward models --------------------------------------------------------------------------------------

CORPUS = [
    "How many red squares are in the picture? There are three red squares.",
    "What colour is the circle? The circle is blue, I am quite sure.",
    "Describe the image: a small green triangle next to a large yellow box.",
] * 4

HEAD_STD = 0.3  # a score head wide enough that sigmoid(score) spreads over (0, 1) instead of sitting at 0.5


def build_text_rm(out: Path) -> Path:
    """A 2-layer Qwen2 sequence classifier (num_labels=1) with the toy tokenizer and its chat template."""
    tokenizer = build_tokenizer(CORPUS, vocab_size=320)
    config = Qwen2Config(
        vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=HEAD_STD)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_vl_rm(out: Path) -> Path:
    """The toy Qwen2.5-VL with a scalar head: the multimodal reward-model format."""
    tokenizer = build_tokenizer(CORPUS, vocab_size=320)
    config = build_model(tokenizer, seed=0).config
    config.num_labels = 1
    torch.manual_seed(0)
    model = Qwen2_5_VLForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=HEAD_STD)
    save_checkpoint(model, build_processor(tokenizer), out)
    return out


def write_image(path: Path, colour: tuple[int, int, int]) -> str:
    image = Image.new("RGB", (112, 112), (255, 255, 255))
    image.paste(Image.new("RGB", (48, 48), colour), (20, 30))
    image.save(path)
    return str(path)


def text_samples() -> list[RewardInput]:
    """Responses of different lengths, with the prompt given each way a sample can carry it."""
    return [
        RewardInput.from_text("<think>count</think>There are three red squares.", "caption", {},
                              meta={"prompt": "How many red squares are in the picture?"}),
        RewardInput.from_text("blue", "caption", {}, meta={"prompt": "What colour is the circle?"}),
        RewardInput.from_text("A small green triangle next to a large yellow box, I am quite sure.", "caption", {},
                              meta={"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe"}]}]}),
        RewardInput.from_text("The circle is blue.", "caption", {}),
        RewardInput.from_text("three", "caption", {}, meta={"prompt": "How many red squares are in the picture?"}),
    ]


def vl_samples(images):
    red, blue = images
    ask = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}
    return [
        RewardInput.from_text("red", "caption", {}, images=(red,), meta={"messages": [ask]}),
        RewardInput.from_text("red", "caption", {}, images=(blue,), meta={"messages": [ask]}),
        RewardInput.from_text("The square is blue, I am quite sure.", "caption", {}, images=(blue,),
                              meta={"prompt": "What colour is the square?"}),
        RewardInput.from_text("a square", "caption", {}, images=(red, blue)),
        RewardInput.from_text("no image at all", "caption", {}, meta={"prompt": "Say something."}),
    ]


def reference_text_rewards(path: Path, samples: list[RewardInput]) -> list[float]:
    """sigmoid(score) of each conversation, one at a time straight from transformers: no padding, no scorer code."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    rewards = []
    for sample in samples:
        prompt = _prompt_text(sample)
        turns = ([{"role": "user", "content": prompt}] if prompt else []) + [
            {"role": "assistant", "content": sample.response}
        ]
        text = tokenizer.apply_chat_template(turns, tokenize=False)
        with torch.no_grad():
            logit = model(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0]
        rewards.append(torch.sigmoid(logit).item())
    return rewards


def _prompt_text(sample: RewardInput) -> str | None:
    if "messages" in sample.meta:
        return "".join(p["text"] for m in sample.meta["messages"] for p in m["content"])
    return sample.meta.get("prompt")


# --- engines ---------------------------------------------------------------------------------------------------


# --- videos ------------------------------------------------------------------------------------------------------

VIDEO_CODECS = {".mp4": ("libx264", {"qp": "0"}), ".webm": ("libvpx-vp9", {"lossless": "1"}), ".avi": ("ffv1", {})}


def write_video(path: Path, *, seconds: float, fps: int, size: int = 56) -> str:
    """A lossless video whose frame k is one flat colour, red level 4 (k mod 64) and green level 4 (k div 64 mod 64):
    which frame is which reads back, up to frame 4095."""
    import av

    codec, options = VIDEO_CODECS[path.suffix]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv444p"
        for k in range(round(seconds * fps)):
            rgb = np.zeros((size, size, 3), dtype=np.uint8)
            rgb[..., 0], rgb[..., 1] = 4 * (k % 64), 4 * (k // 64 % 64)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=stream.pix_fmt)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


def video_row(row_id: str, videos: list, *, images: list | None = None, meta: dict | None = None) -> Row:
    """A temporal-grounding row showing its images, then its videos, then the question."""
    images = images or []
    parts = [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos)
    return Row(
        id=row_id,
        task="temporal",
        messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "When is the square on screen?"}]}],
        images=images,
        videos=videos,
        label={"segment": [0, 1]},
        meta=meta or {},
    )


def toy_video_rows(out: Path, image_row: Row) -> list[Row]:
    """Two toy video rows (temporal grounding, video counting) and one prompt showing `image_row`'s image and a
    video: the video cases every engine and the learner are tested on."""
    from morl.data.loading import load_dataset
    from morl.toy.tasks import write_split

    rows = [
        load_dataset(write_split(task, 1, 0, out, "train"), known_tasks=None).rows[0]
        for task in ("temporal", "video_counting")
    ]
    return [*rows, video_row("image-and-video", rows[0].videos, images=image_row.images)]


def learner_logprob_gap(hf_model, processor, engine, prompts, groups, temperature: float) -> float:
    """Mean |rollout - learner| log-prob per response token; the learner is an HF forward of the same weights."""
    flat = [c for g in groups for c in g]
    with torch.no_grad():
        scores = response_logprobs(
            hf_model,
            [p for p, g in zip(prompts, groups) for _ in g],
            [c.token_ids for c in flat],
            temperature=temperature,
            banned_ids=engine.banned_ids,
        )
    logprobs, mask = scores.logprobs, scores.mask
    rollout = torch.zeros(logprobs.shape)
    for i, c in enumerate(flat):
        rollout[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    return (((logprobs.float().cpu() - rollout).abs() * mask.cpu()).sum() / mask.sum()).item()


def forward_logprobs(model, prompts, responses, temperature: float, banned_ids) -> list[list[float]]:
    """Each response's token log-probs under a teacher-forced HF forward of prompt + response (the learner's)."""
    with torch.no_grad():
        scores = response_logprobs(model, prompts, responses, temperature=temperature, banned_ids=banned_ids)
    return [scores.logprobs[i, : len(r)].float().cpu().tolist() for i, r in enumerate(responses)]


def carry_on(group, seeds, budgets, kept=None) -> Continuation:
    """A group's samples continued: each one's tokens so far (its first `kept[j]`, else all) as its prefix, with these
    seeds and token budgets."""
    kept = kept or [len(c.token_ids) for c in group]
    return Continuation(tuple(tuple(c.token_ids[:k]) for c, k in zip(group, kept)), tuple(seeds), tuple(budgets))


def check_continued(engine, continuation: Continuation, completions) -> list[list[int]]:
    """What every continued sample must be (rollout/types.py `RolloutEngine.add`); the whole responses."""
    assert len(completions) == len(continuation.prefixes)
    stop_ids = set(engine.stop_ids)
    for prefix, budget, c in zip(continuation.prefixes, continuation.max_new_tokens, completions):
        assert 0 < len(c.token_ids) == len(c.logprobs) <= budget
        assert c.finish_reason == ("stop" if c.token_ids[-1] in stop_ids else "length")
        assert c.finish_reason == "stop" or len(c.token_ids) == budget
        kept = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
        assert c.text == engine.tokenizer.decode([*prefix, *kept])  # the whole response, not the new piece
    return [[*prefix, *c.token_ids] for prefix, c in zip(continuation.prefixes, completions)]


def gathered_weights(learner) -> dict[str, torch.Tensor]:
    """A PolicyLearner's full parameters by name (gathered under ZeRO-3), copied: what the tests compare."""
    import deepspeed

    params = dict(learner.engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=learner.cfg.zero_stage == 3):
        return {name: p.detach().clone() for name, p in params.items()}


# --- experiment trackers' own records ---------------------------------------------------------------------------

WANDB_BLOCK, WANDB_HEADER = 32768, 7  # a .wandb file: a 7-byte ident, then LevelDB-log records in 32 KiB blocks


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of each W&B offline run in `run_dir/wandb`, in order, read from its .wandb transaction log
    (records of W&B's own `wandb_internal_pb2.Record`)."""
    import json

    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
        pos, chunks = WANDB_HEADER, b""
        while pos + WANDB_HEADER <= len(data):
            if WANDB_BLOCK - pos % WANDB_BLOCK < WANDB_HEADER:  # a block's tail too short for a header is padding
                pos += WANDB_BLOCK - pos % WANDB_BLOCK
                continue
            length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
            chunks += data[pos + WANDB_HEADER : pos + WANDB_HEADER + length]
            pos += WANDB_HEADER + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunks)
                chunks = b""
                if record.WhichOneof("record_type") == "history":
                    items = record.history.item
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows


# --- real HF rollout workers on the toy world, for the scheduler's tests ------------------------------------------


@contextlib.contextmanager
def toy_hf_rollout(world: Path, workers: int, max_num_seqs: int) -> Iterator[tuple]:
    """`workers` real HF rollout-worker actors on the toy world's SFT model, its counting and choice training data,
    their prompt encoder and a reward router for both tasks: (datasets, encoder, router, workers). Ray must be
    started."""
    import functools

    import ray
    from transformers import AutoProcessor

    from morl.data.encoding import PromptEncoder
    from morl.data.loading import load_dataset
    from morl.rewards.config import RewardsConfig
    from morl.rewards.router import RewardRouter
    from morl.rollout.hf_engine import HFEngine
    from morl.rollout.worker import CONCURRENCY_GROUPS, RolloutWorker

    data = [load_dataset(world / "data" / t / "train.jsonl", known_tasks=None) for t in ("counting", "choice")]
    encode = PromptEncoder(AutoProcessor.from_pretrained(world / "sft"), 4096)
    router = RewardRouter(RewardsConfig(routes={"counting": [{"fn": "counting"}], "choice": [{"fn": "choice"}]},
                                        num_workers=1))
    actor = ray.remote(num_cpus=0, concurrency_groups=CONCURRENCY_GROUPS)(RolloutWorker)
    make = functools.partial(HFEngine, str(world / "sft"), None, "float32", max_num_seqs=max_num_seqs)
    pool = [actor.remote(make, 1) for _ in range(workers)]
    try:
        yield data, encode, router, pool
    finally:
        router.close()
        for worker in pool:
            ray.kill(worker)


def scripted_workers(engine: type, count: int = 2, **options) -> Iterator[list]:
    """`count` rollout-worker actors, each around a scripted `engine` (a class its test module ships to Ray by value),
    started, so tests time only the scheduling; a generator for a fixture to yield from. Ray must be started."""
    import ray

    from morl.rollout.worker import CONCURRENCY_GROUPS, RolloutWorker

    actor = ray.remote(num_cpus=0, concurrency_groups=CONCURRENCY_GROUPS)(RolloutWorker)
    workers = [actor.remote(engine, 1, **options) for _ in range(count)]
    ray.get([w.load_weights.remote({}) for w in workers])
    yield workers
    for w in workers:
        ray.kill(w)
