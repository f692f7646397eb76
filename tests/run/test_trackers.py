"""Experiment trackers, read back with each one's own reader: TensorBoard's event accumulator, W&B's offline
transaction log, the MLflow client. A run's metrics reach each at their steps; a resume logs no step twice; a
tracker that cannot start stops the run by name; one that fails mid-run is dropped and the run goes on."""

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from morl.config import RunConfig
from morl.run.trackers import TrackerError, Trackers, side_by_side

from helpers import OVERRIDES, REPO, morl_train, small_tmpfs, wandb_history

ALL_TRACKERS = ["trainer.loggers=[jsonl,tensorboard,wandb,mlflow]", "tracking.wandb_mode=offline"]


def steps_of(run_dir) -> dict[str, dict[int, float]]:
    """metrics.jsonl, as {metric: {step: value}}."""
    out: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        metrics = json.loads(line)
        for key, value in metrics.items():
            out.setdefault(key, {})[metrics["step"]] = value
    return out


def tensorboard_scalars(run_dir, key: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(key)]


def mlflow_history(run_dir, key: str) -> list[tuple[int, float]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def wandb_steps(run_dir, key: str) -> list[tuple[int, float]]:
    return [(row["_step"], row[key]) for row in wandb_history(run_dir) if key in row]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, toy_world):
    """One tracked run, read back by each tracker's reader after its 2 steps, then resumed from its step 1 to step 3
    (step 2 trained again). One run serves both, as the resume must continue the very runs the trackers hold."""
    run = tmp_path_factory.mktemp("trackers") / "run"
    extra = [*ALL_TRACKERS, "trainer.log_samples_every=1", "trainer.save_every=1", "trainer.keep_last=null"]
    morl_train(toy_world, run, *extra)
    logged = steps_of(run)
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    ids = json.loads((run / "trackers.json").read_text())
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    keys = [k for k in logged if k.startswith("reward/") and k.count("/") == 1]
    first = {
        "logged": logged,
        "ids": ids,
        "series": {k: (tensorboard_scalars(run, k), wandb_steps(run, k), mlflow_history(run, k)) for k in keys},
        "mlflow_run": client.get_run(ids["mlflow"]["run_id"]),
        "artifacts": {a.path for a in client.list_artifacts(ids["mlflow"]["run_id"], "samples")},
        "tensor_tags": {tag.split("/")[0] for tag in events.Tags()["tensors"]},
        "eval": json.loads((run / "eval.json").read_text()),
        "samples": [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()],
    }
    morl_train(toy_world, run, *extra, "eval.enabled=false", "trainer.max_steps=3", "--resume",
               str(run / "checkpoints" / "step_000001"), "--force")  # fmt: skip
    return run, first


def test_every_tracker_gets_the_metrics_at_their_steps_the_config_the_samples_and_the_eval(tracked):
    _, first = tracked
    logged = first["logged"]
    per_task = next(k for k in logged if k.startswith("reward/") and k.count("/") == 1 and set(logged[k]) == {1, 2}
                    and k != "reward/mean")  # fmt: skip
    for key in ("reward/mean", per_task):
        expected = [(step, pytest.approx(value, rel=1e-6)) for step, value in sorted(logged[key].items())]
        tensorboard, wandb, mlflow = first["series"][key]
        assert tensorboard == expected
        assert wandb == expected
        assert mlflow == expected
    # the config as hyper-parameters, the eval table at the end
    mlflow_run = first["mlflow_run"]
    assert mlflow_run.data.params["rollout.group_size"] == "4" and mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.metrics["eval/policy/mean"] == pytest.approx(first["eval"]["policy"]["mean"])
    assert {"config", "eval", "samples"} <= first["tensor_tags"]
    # samples.jsonl: every response of the step's sampled groups, with reward, advantage and finish reason
    samples = first["samples"]
    assert {s["step"] for s in samples} == {1, 2}
    assert all(len([s for s in samples if s["prompt_id"] == p and s["step"] == 1]) == 4
               for p in {s["prompt_id"] for s in samples if s["step"] == 1})  # fmt: skip
    assert all(s["finish_reason"] in ("stop", "length") and 0.0 <= s["reward"] <= 1.0 for s in samples)
    assert first["artifacts"] == {"samples/step_000001.json", "samples/step_000002.json"}


def test_a_resume_continues_each_tracker_run_without_a_step_twice(tracked):
    run, first = tracked
    logged = steps_of(run)["reward/mean"]
    assert sorted(logged) == [1, 2, 3]
    assert [s for s, _ in tensorboard_scalars(run, "reward/mean")] == [1, 2, 3]
    assert [s for s, _ in mlflow_history(run, "reward/mean")] == [1, 2, 3]
    assert [s for s, _ in wandb_steps(run, "reward/mean")] == [1, 2, 3]  # over both offline runs of one id
    ids = json.loads((run / "trackers.json").read_text())
    assert ids["wandb"]["id"] == first["ids"]["wandb"]["id"] and ids["mlflow"] == first["ids"]["mlflow"]
    # the resume's step 2 replaced the first run's in every tracker
    assert mlflow_history(run, "reward/mean")[1][1] == pytest.approx(logged[2], rel=1e-6)


def test_a_tracker_that_cannot_start_stops_the_run_by_name(tmp_path, toy_world):
    env = {**os.environ, "WANDB_MODE": "online", "HOME": str(tmp_path), "PYTHONPATH": str(REPO / "tests")}
    env.pop("WANDB_API_KEY", None)
    cmd = [sys.executable, "-m", "morl.cli", "train", str(REPO / "recipes" / "quickstart.yaml"),
           f"toy_world.root={toy_world}", *OVERRIDES, "trainer.loggers=[wandb]", "--output-dir", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "trainer.loggers: wandb could not start" in errors[0], done.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_tracker_that_fails_mid_run_is_dropped_and_the_others_go_on(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow keeps a sqlite store's artifacts in ./mlruns
    run = tmp_path / "run"
    run.mkdir()
    with small_tmpfs(tmp_path / "disk", size_kib=2048) as disk:
        cfg = RunConfig.model_validate({
            "model": {"path": str(tmp_path)},
            "trainer": {"loggers": ["tensorboard", "mlflow"]},
            "tracking": {"mlflow_tracking_uri": f"sqlite:///{disk / 'mlflow.db'}"},  # on a disk about to fill up
        })  # fmt: skip
        trackers = Trackers(cfg, run, resume_step=0)
        trackers.log(1, {"step": 1, "reward/mean": 0.25})
        filler = disk / "filler"
        with pytest.raises(OSError), filler.open("wb") as f:
            while True:
                f.write(b"\0" * 2**12)
        trackers.log(2, {"step": 2, "reward/mean": 0.5})
        assert list(trackers.active) == ["tensorboard"] and "tracker mlflow failed on step 2" in caplog.text
        trackers.log(3, {"step": 3, "reward/mean": 0.75})
        trackers.close()
    assert [s for s, _ in tensorboard_scalars(run, "reward/mean")] == [1, 2, 3]
    assert "mlflow" in json.loads((run / "trackers.json").read_text())  # a resume would continue its run


def test_a_tracker_that_cannot_reach_its_store_is_named_before_anything_starts(tmp_path):
    cfg = RunConfig.model_validate(
        {"model": {"path": str(tmp_path)}, "trainer": {"loggers": ["mlflow"]},
         "tracking": {"mlflow_tracking_uri": "unknown-scheme://nowhere"}}
    )  # fmt: skip
    with pytest.raises(TrackerError, match=r"trainer.loggers: mlflow could not start"):
        Trackers(cfg, tmp_path, resume_step=0)


def test_a_prompts_images_reach_the_trackers_all_of_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))  # W&B stages a table's images here
    Image.new("RGB", (32, 16), "red").save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    strip = side_by_side([str(tmp_path / "a.png"), str(tmp_path / "b.png")], height=16)
    assert strip.size == (32 + 16, 16)
    assert strip.getpixel((31, 8)) == (255, 0, 0) and strip.getpixel((32, 8)) == (0, 0, 255)
    run = tmp_path / "run"
    run.mkdir()
    cfg = RunConfig.model_validate({"model": {"path": str(tmp_path)}, "tracking": {"wandb_mode": "offline"},
                                    "trainer": {"loggers": ["tensorboard", "wandb"]}})
    images = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    sample = {"step": 1, "task": "counting", "prompt_id": "p0", "prompt": "How many?", "images": images,
              "videos": [["f0.png", "f1.png"]], "response": "3", "reward": 1.0, "advantage": 0.5,
              "finish_reason": "stop"}
    text_only = {**sample, "prompt_id": "p1", "images": [], "videos": []}
    trackers = Trackers(cfg, run, resume_step=0)
    trackers.log(1, {"reward/mean": 1.0}, [sample, text_only])
    assert set(trackers.active) == {"tensorboard", "wandb"}  # neither failed on the lists nor on a text-only prompt
    trackers.close()
    (table,) = (run / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json")
    assert [row[4:6] for row in json.loads(table.read_text())["data"]] == [
        ["Image", '[["f0.png", "f1.png"]]'], [None, "[]"]  # the two images as one picture
    ]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    text = events.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"| {images[0]}, {images[1]} |" in text
