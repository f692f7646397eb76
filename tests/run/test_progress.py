"""Progress off a terminal (nohup, SLURM, a pipe): plain flushed lines for training steps and the toy world build."""

import io
import re

import pytest
from rich.console import Console

from morl.console import StepProgress
from morl.run.metrics import ProgressDisplay
from morl.toy.config import ToyWorldConfig
from morl.toy.world import ensure_toy_world

STEP_LINE = r"step {} reward 0\.500 \| choice=0\.25 counting=0\.75 \| 2\.5s/step \d+:\d\d:\d\d"


def step_metrics(step: int) -> dict:
    return {"step": step, "reward/mean": 0.5, "reward/choice": 0.25, "reward/counting": 0.75,
            "reward/choice/errors": 0.0, "time/step": 2.5}


def test_off_a_terminal_a_plain_line_every_log_every_steps_and_at_the_last(capsys):
    with ProgressDisplay(5, log_every=2) as progress:  # stdout here is pytest's capture: not a terminal
        for step in range(1, 6):
            progress.update(step_metrics(step))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines
    for line, shown in zip(lines, ("2/5", "4/5", "5/5")):
        assert re.fullmatch(STEP_LINE.format(shown), line), line


def test_a_resumed_run_counts_from_its_checkpoint(capsys):
    with ProgressDisplay(6, completed=3, log_every=2) as progress:
        for step in range(4, 7):
            progress.update(step_metrics(step))
    assert [line.split(" reward")[0] for line in capsys.readouterr().out.splitlines()] == ["step 4/6", "step 6/6"]


def test_on_a_terminal_the_line_is_live():
    screen = io.StringIO()
    with StepProgress("step", 3, out=Console(file=screen, force_terminal=True, width=100)) as progress:
        for _ in range(3):
            progress.advance("reward 0.500")
    assert "\x1b[" in screen.getvalue()  # redrawn in place with cursor controls, not appended as plain lines
    assert "3/3" in screen.getvalue()


def test_the_toy_world_build_shows_its_phases_and_sft_steps(tmp_path, capsys):
    ensure_toy_world(ToyWorldConfig(root=str(tmp_path / "w"), train_per_task=2, eval_per_task=1, sft_steps=20,
                                    sft_batch_size=2))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("toy ")]
    phases = [line for line in lines if line.startswith("toy world: ")]
    expected = ["writing data (4 tasks", "training the tokenizer", "initialising the model", "SFT warm-up, 20 steps",
                "saving the SFT checkpoint", f"ready in {tmp_path / 'w'}/"]
    assert len(phases) == len(expected) and all(
        line.startswith(f"toy world: {start}") for line, start in zip(phases, expected)
    ), phases
    sft = [line for line in lines if line.startswith("toy SFT step")]
    assert [line.split(" loss")[0] for line in sft] == [f"toy SFT step {i}/20" for i in range(2, 21, 2)]
    assert all(re.fullmatch(r"toy SFT step \d+/20 loss \d+\.\d{3} \d+:\d\d:\d\d", line) for line in sft), sft
    assert "\x1b[" not in "".join(lines)


@pytest.mark.slow
def test_morl_train_into_a_pipe_prints_a_line_every_log_every_steps(toy_world, tmp_path):
    from helpers import morl_train  # the CLI in a fresh process, its stdout a pipe

    (tmp_path / "world").symlink_to(toy_world)
    done = morl_train(tmp_path / "world", tmp_path / "run", "trainer.max_steps=3", "trainer.log_every=2",
                      "eval.enabled=false")
    steps = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" reward")[0] for line in steps] == ["step 2/3", "step 3/3"], done.stdout
    line = r"step \d/3 reward \d\.\d{3} \| .*counting=\d\.\d\d.* \| \d+\.\ds/step \d+:\d\d:\d\d"
    assert all(re.fullmatch(line, step) for step in steps), steps
