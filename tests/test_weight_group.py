"""The weight broadcast group, in real processes: buckets of any size and dtype reach every receiver in the order
rank 0 sent them, rank 0 running ahead of the receivers by its posted broadcasts."""

import multiprocessing as mp

import torch

from morl.learner.policy import free_port

BUCKETS = [(1000, "float32"), (7, "bfloat16"), (250_000, "float32"), (3, "uint8"), (64, "float16")]


def bucket(k: int, numel: int, dtype: str) -> torch.Tensor:
    return (torch.arange(numel) % 97 + k).to(getattr(torch, dtype))


def member(rank: int, port: int, world: int, answers) -> None:
    from morl.weight_group import WeightGroup

    group = WeightGroup("127.0.0.1", port, rank, world, torch.device("cpu"))
    if rank == 0:
        for k, (numel, dtype) in enumerate(BUCKETS):
            group.send(bucket(k, numel, dtype))  # returns before the receivers have it
        group.close()
        answers.put((0, True))
        return
    got = [group.receive(numel, dtype) for numel, dtype in BUCKETS]
    answers.put((rank, all(torch.equal(t, bucket(k, *spec)) for k, (t, spec) in enumerate(zip(got, BUCKETS)))))


def test_every_receiver_gets_every_bucket_in_order():
    ctx = mp.get_context("spawn")
    answers = ctx.Queue()
    world, port = 3, free_port()
    members = [ctx.Process(target=member, args=(rank, port, world, answers)) for rank in range(world)]
    for process in members:
        process.start()
    results = dict(answers.get(timeout=120) for _ in range(world))
    for process in members:
        process.join(30)
    assert results == {0: True, 1: True, 2: True}
    assert all(process.exitcode == 0 for process in members)
