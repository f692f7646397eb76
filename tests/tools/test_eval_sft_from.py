"""`morl eval --sft-from EARLIER.json`: an earlier SFT result is reused only when it was taken on the same held-out
prompts and of the recipe's own SFT checkpoint."""

import json

import pytest
import torch
from safetensors.torch import save_file

from morl.run.model_check import checkpoint_identity
from morl.tools.evaluate import EvalError, _earlier_sft

PROMPTS = {"count": 4, "digest": "0123456789abcdef"}


def checkpoint(path, seed: int) -> dict:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    save_file({"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))}, path / "model.safetensors")
    return checkpoint_identity(str(path))


def earlier(tmp_path, **extra):
    path = tmp_path / "earlier.json"
    report = {"sft": {"counting": 0.5, "mean": 0.5}, "policy": {"counting": 0.6, "mean": 0.6},
              "response_length": {"sft": {"counting": 9.0, "mean": 9.0}, "policy": {"counting": 8.0, "mean": 8.0}},
              "prompts": PROMPTS, **extra}
    path.write_text(json.dumps(report))
    return path


def test_an_earlier_sft_result_of_another_checkpoint_is_refused(tmp_path):
    sft, other = checkpoint(tmp_path / "sft", 0), checkpoint(tmp_path / "other", 1)
    reused = _earlier_sft(earlier(tmp_path, sft_checkpoint=sft), PROMPTS, sft)
    assert reused["checkpoint"] == sft and reused["reward"] == {"counting": 0.5, "mean": 0.5}
    with pytest.raises(EvalError, match=rf"another checkpoint \({tmp_path / 'other'}\) than the recipe's model.path "
                                        rf"\({tmp_path / 'sft'}\)"):
        _earlier_sft(earlier(tmp_path, sft_checkpoint=other), PROMPTS, sft)
    with pytest.raises(EvalError, match="other held-out prompts"):
        _earlier_sft(earlier(tmp_path, sft_checkpoint=sft), {"count": 4, "digest": "f" * 16}, sft)


def test_an_earlier_result_that_records_no_checkpoint_is_kept_without_one(tmp_path):
    sft = checkpoint(tmp_path / "sft", 0)
    reused = _earlier_sft(earlier(tmp_path), PROMPTS, sft)
    assert "checkpoint" not in reused  # so `morl compare` gives it an SFT column of its own
