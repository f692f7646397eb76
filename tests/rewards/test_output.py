"""What reward functions print, with real worker processes: truncated per call into the run's rewards.log, never
flooding the console; one warning per function with its first lines; the log rolls over at its size bound."""

import logging

from morl.rewards.config import RewardsConfig
from morl.rewards.router import RewardRouter
from morl.rewards.types import RewardInput
from morl.rewards.worker_output import MAX_CALL_BYTES, OutputLog

from reward_output_fixtures import flood_bytes  # noqa: E402

RO = "reward_output_fixtures"
ROUTES = {"flood": [{"fn": f"{RO}:flood"}], "chatty": [{"fn": f"{RO}:chatty"}]}


def sample(task: str, text: str) -> RewardInput:
    return RewardInput.from_text(text, task, {})


def output_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "morl.rewards.worker_output"]


def test_a_flooding_reward_is_kept_truncated_in_the_log_and_off_the_console(tmp_path, capfd, caplog):
    caplog.set_level(logging.WARNING, logger="morl.rewards.worker_output")
    cfg = RewardsConfig(num_workers=2, routes=ROUTES)
    with RewardRouter(cfg, log_dir=tmp_path / "logs") as router:  # workers started now share capfd's descriptors
        results = router.score([*(sample("flood", str(i)) for i in range(3)), sample("chatty", "abc")])
    assert [(r.reward, r.error) for r in results] == [(0.5, None)] * 3 + [(1.0, None)]
    out, err = capfd.readouterr()
    assert len(out) + len(err) < 1000  # 12 MB were printed

    log = (tmp_path / "logs" / "rewards.log").read_text()
    entries = log.split("\n--- ")
    assert len(entries) == 4 and len(log) < 4 * (MAX_CALL_BYTES + 200)
    for i in range(3):
        total = flood_bytes(str(i))
        (entry,) = [e for e in entries if f"flood-start {i}\n" in e]
        header, text = entry.lstrip("-").split(" ---\n", 1)
        assert header.endswith(
            f"reward '{RO}:flood' on a 'flood' sample printed {total} bytes, "
            f"the {total - MAX_CALL_BYTES} after the first {MAX_CALL_BYTES} dropped"
        )
        assert text.startswith(f"flood-start {i}\n") and len(text.rstrip("\n").encode()) == MAX_CALL_BYTES
    assert f"reward '{RO}:chatty' on a 'chatty' sample printed 15 bytes ---\nchecking 'abc'\n" in log

    chatty_warning, flood_warning = sorted(output_warnings(caplog))  # once per reward function
    assert flood_warning.startswith(f"reward '{RO}:flood' on a 'flood' sample printed ")
    assert f"kept in {tmp_path / 'logs' / 'rewards.log'}, up to {MAX_CALL_BYTES} bytes per call" in flood_warning
    assert "\nflood-start " in flood_warning and len(flood_warning) < 1000
    assert chatty_warning.endswith(":\nchecking 'abc'")


def test_without_a_log_dir_only_a_first_excerpt_reaches_the_console(capfd, caplog):
    caplog.set_level(logging.WARNING, logger="morl.rewards.worker_output")
    with RewardRouter(RewardsConfig(num_workers=1, routes=ROUTES)) as router:
        router.score([sample("chatty", "a"), sample("chatty", "b"), sample("flood", "0")])
    out, err = capfd.readouterr()
    assert len(out) + len(err) < 1000
    warned = output_warnings(caplog)
    assert len(warned) == 2 and all("not kept: no log directory" in w for w in warned)
    assert any(w.endswith(":\nchecking 'a'") for w in warned)


def test_what_a_reward_module_prints_on_import_is_kept_too(tmp_path, capfd):
    cfg = RewardsConfig(num_workers=1, modules=["noisy_reward_module"], routes=ROUTES)
    capfd.readouterr()  # the driver's own import of the module printed here
    with RewardRouter(cfg, log_dir=tmp_path):
        pass
    assert capfd.readouterr() == ("", "")
    log = (tmp_path / "rewards.log").read_text()
    start_up = "a reward worker starting (importing the reward modules)"
    assert f"{start_up} printed 22 bytes ---\nnoisy module imported\n" in log


def test_the_log_rolls_over_and_keeps_one_older_file(tmp_path):
    output = OutputLog(tmp_path / "rewards.log", max_bytes=1000)
    for i in range(10):
        output.add("fn", f"call {i}", (f"{i}".encode() * 300, 0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rewards.log", "rewards.log.1"]
    newest, older = (tmp_path / "rewards.log").read_text(), (tmp_path / "rewards.log.1").read_text()
    assert len(newest) <= 1000 and len(older) <= 1000
    assert "call 9 printed 300 bytes" in newest and "call 0" not in newest + older
