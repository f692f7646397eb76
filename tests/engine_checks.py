"""Checks shared by the engine tests (CPU and GPU): how far a rollout engine's log-probs are from the learner's."""

import torch

from morl.logprobs import response_logprobs


def learner_logprob_gap(hf_model, processor, engine, prompts, groups, temperature: float) -> float:
    """Mean |rollout - learner| log-prob per response token; the learner is an HF forward of the same weights."""
    flat = [c for g in groups for c in g]
    with torch.no_grad():
        logprobs, mask = response_logprobs(
            hf_model,
            [p for p, g in zip(prompts, groups) for _ in g],
            [c.token_ids for c in flat],
            config=hf_model.config,
            pad_id=processor.tokenizer.pad_token_id,
            temperature=temperature,
            banned_ids=engine.banned_ids,
        )
    rollout = torch.zeros(logprobs.shape)
    for i, c in enumerate(flat):
        rollout[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    return (((logprobs.float().cpu() - rollout).abs() * mask.cpu()).sum() / mask.sum()).item()
