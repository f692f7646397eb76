"""The engine registry's declarations, on the shipped recipes: GPUs, media, what a worker is sent, which keys an
engine reads, and the window the workers live through while the learner updates."""

from typing import get_args

import pytest
import ray
from transformers import AutoProcessor

from morl.cluster import ClusterError, rollout_gpus, rollout_part
from morl.config import ENGINE_OPTIONS, ConfigError, RolloutConfig, load_config
from morl.ray_setup import start_ray
from morl.data.encoding import PromptEncoder
from morl.data.loading import load_dataset
from morl.rollout.engines import ENGINES, HFKind, VLLMKind, engine_of
from morl.rollout.hf_engine import HFEngine
from morl.rollout.vllm_engine import VLLMEngine

from helpers import REPO, toy_video_rows

RECIPES = REPO / "recipes"


def recipe(name: str, *overrides: str):
    return load_config(RECIPES / name, ["model.path=/models/sft", *overrides])


def test_the_registry_the_config_and_the_engine_options_name_the_same_engines():
    assert set(ENGINES) == set(get_args(RolloutConfig.model_fields["engine"].annotation)) == set(ENGINE_OPTIONS)
    assert all(kind.name == name for name, kind in ENGINES.items())


def test_gpus_each_engine_asks_for():
    spread = recipe("mimo_vl_7b_morl_8gpu.yaml", "rollout.tensor_parallel_size=2")
    colocated = recipe("qwen25vl_3b_1gpu.yaml")
    cpu = recipe("quickstart.yaml")
    assert isinstance(engine_of(spread.rollout), VLLMKind) and isinstance(engine_of(cpu.rollout), HFKind)
    assert engine_of(spread.rollout).gpus() == 4 * 2  # 4 workers x 2 tensor-parallel GPUs
    assert rollout_part(spread, on_gpus=True).bundle["GPU"] == 2
    assert "GPU" not in rollout_part(spread, on_gpus=False).bundle  # vLLM's CPU build
    assert rollout_gpus(colocated, on_gpus=True) == 0.5  # half of the GPU the learner holds too
    assert engine_of(colocated.rollout).gpus() == 1
    assert rollout_gpus(cpu, on_gpus=True) == 0.0 and engine_of(cpu.rollout).gpus() == 0  # HF runs on CPU
    with pytest.raises(ClusterError, match="rollout.colocate=true .* no GPU"):
        rollout_gpus(colocated, on_gpus=False)


def test_what_the_weights_do_between_syncs():
    assert not engine_of(recipe("qwen25vl_3b_1gpu.yaml").rollout).keeps_weights()  # sleep level 2 discards them
    level_1 = engine_of(recipe("qwen25vl_3b_1gpu.yaml", "rollout.sleep_level=1").rollout)
    assert level_1.keeps_weights() and level_1.shares_learner_gpu()
    spread = engine_of(recipe("mimo_vl_7b_morl_8gpu.yaml").rollout)
    assert spread.keeps_weights() and not spread.shares_learner_gpu()
    assert engine_of(recipe("quickstart.yaml").rollout).keeps_weights()


def test_media_limits_come_from_the_recipe():
    cfg = recipe("qwen25vl_3b_1gpu.yaml", "rollout.max_videos_per_prompt=1")
    assert engine_of(cfg.rollout).media_limits() == {"image": 2, "video": 1}
    assert engine_of(recipe("quickstart_video.yaml").rollout).media_limits()["video"] == 1


def test_each_engine_builds_its_own_engine_class():
    vllm = recipe("qwen25vl_3b_1gpu.yaml")
    make = engine_of(vllm.rollout).factory("/weights", vllm.model, seed=7)
    assert make.func is VLLMEngine and make.args[0] == "/weights"
    assert make.keywords["enable_sleep_mode"] and make.keywords["seed"] == 7
    hf = recipe("quickstart.yaml")
    make = engine_of(hf.rollout).factory("/weights", hf.model, seed=7)
    assert make.func is HFEngine and make.args == ("/weights", hf.model.processor_path, hf.model.dtype)


@pytest.mark.parametrize("key", ENGINE_OPTIONS["vllm"])
def test_a_vllm_only_key_under_hf_is_refused_by_name(key):
    value = {"tensor_parallel_size": 2, "colocate": True, "enforce_eager": True, "cpu_kv_cache_gib": 4}[key]
    with pytest.raises(ConfigError, match=rf"rollout\.{key}={value} needs rollout\.engine=vllm \(rollout\.engine=hf"):
        recipe("quickstart.yaml", f"rollout.{key}={str(value).lower()}")


def test_what_a_worker_is_sent_of_a_prompt(toy_world, tmp_path):
    """vLLM reads the images and the sampled frames itself: its workers get neither pixel tensor, and the encoder
    keeps the frames for it; HF is sent the prompt whole, and the encoder drops the frames it never reads."""
    processor = AutoProcessor.from_pretrained(toy_world / "sft")
    (image_row,) = load_dataset(toy_world / "data" / "counting" / "train.jsonl", known_tasks=None).rows[:1]
    rows = [image_row, *toy_video_rows(tmp_path, image_row)]
    for name in ("qwen25vl_3b_1gpu.yaml", "quickstart.yaml"):
        engine = engine_of(recipe(name).rollout)
        encoded = [PromptEncoder(processor, 512, keep_frames=engine.preprocesses_media)(row) for row in rows]
        sent = engine.sent(encoded)
        assert [p.input_ids for p in sent] == [p.input_ids for p in encoded]
        if isinstance(engine, VLLMKind):
            assert all(p.pixel_values is None and p.pixel_values_videos is None for p in sent)
            assert sent[0].image_grid_thw is not None and all(p.videos for p in sent[1:])
            assert encoded[0].pixel_values is not None  # the driver keeps them for the learner
        else:
            assert all(s is e for s, e in zip(sent, encoded)) and sent[0].pixel_values is not None
            assert all(p.pixel_values_videos is not None and not p.videos for p in sent[1:])


class Loads:
    """The weight load the window runs on leaving, counted."""

    def __init__(self, check=lambda: None):
        self.count = 0
        self.check = check

    def __call__(self) -> str:
        self.check()
        self.count += 1
        return f"load {self.count}"


@pytest.mark.parametrize("name", ["quickstart.yaml", "mimo_vl_7b_morl_8gpu.yaml"])  # hf; vLLM not colocated
def test_without_colocation_the_window_only_loads_the_weights_after_the_update(name):
    engine = engine_of(recipe(name).rollout)
    workers = [object(), object()]  # nothing is asked of them: any call would fail
    load = Loads()
    with engine.update_window(workers, load) as window:
        assert load.count == 0
    assert load.count == 1 and window.synced == "load 1"
    with pytest.raises(ValueError, match="update failed"), engine.update_window(workers, load):
        raise ValueError("update failed")
    assert load.count == 1  # no load after a failed update


@ray.remote(num_cpus=0)
class SleepLog:
    """A worker's sleep and wake-up calls, in order (the colocated engine itself needs a GPU:
    tests/rollout/test_vllm_gpu.py)."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def log(self):
        return self.calls


@pytest.fixture(scope="module")
def local_ray():
    started = start_ray(num_cpus=1)  # private; or the Ray an earlier module of this process started
    yield
    if started:
        ray.shutdown()


def test_colocated_vllm_sleeps_through_the_update_and_wakes_its_weights_before_the_load(local_ray):
    engine = engine_of(recipe("qwen25vl_3b_1gpu.yaml", "rollout.sleep_level=1").rollout)
    workers = [SleepLog.remote()]

    def log():
        return ray.get(workers[0].log.remote())

    def loading():
        assert log() == [("sleep", 1), ("wake_up", ("weights",))]  # the KV cache stays asleep during the load

    load = Loads(loading)
    with engine.update_window(workers, load) as window:
        assert log() == [("sleep", 1)]
    assert window.synced == "load 1"
    assert log() == [("sleep", 1), ("wake_up", ("weights",)), ("wake_up", ("kv_cache",))]
