"""The weight broadcast group: learner rank 0 and every rollout worker in a process group of their own (gloo on CPU,
NCCL on GPUs), so each bucket of a weight sync reaches all workers, on any node, in one broadcast.

The group stands beside the learner's own torch.distributed group (it is built from its own store, never as the
process's default group), so neither side's collectives can interleave with the other's. Rank 0 posts each bucket's
broadcast and returns at once, so it can pack the next bucket while the workers receive this one; every member
issues the broadcasts in the same order, which is how they pair up.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from collections import deque

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=5)


def bound_store(addr: str, port: int, rank: int, world: int) -> dist.TCPStore:
    """A torch.distributed store for a group, listening on `addr` only.

    torch's TCPStore listens on every interface by itself: rank 0 hands it a socket bound to `addr` instead, so a
    local run (127.0.0.1, Ray on loopback) opens no port beyond loopback; gloo's and NCCL's own sockets then stay on
    the loopback interface too.
    """
    if ipaddress.ip_address(addr).is_loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    listen_fd = socket.create_server((addr, port)).detach() if rank == 0 else None  # the store owns it from here
    return dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=TIMEOUT, master_listen_fd=listen_fd)


class WeightGroup:
    """This process's membership: rank 0 (the learner) sends each bucket's buffer, the rollout workers receive it."""

    def __init__(self, addr: str, port: int, rank: int, world: int, device: torch.device):
        store = bound_store(addr, port, rank, world)
        if device.type == "cuda":
            self.group = dist.ProcessGroupNCCL(store, rank, world, TIMEOUT)
        else:
            self.group = dist.ProcessGroupGloo(store, rank, world, TIMEOUT)
        self.device = device
        self._sending: deque[tuple[dist.Work, torch.Tensor]] = deque()  # rank 0: broadcasts posted, not yet done

    def send(self, flat: torch.Tensor) -> None:
        """Post the broadcast of `flat` (rank 0) and return; its buffer is kept until the broadcast is done."""
        self._sending.append((self.group.broadcast([flat], _from_rank_0()), flat))
        while len(self._sending) > 2:  # the one the workers receive now and the one packed ahead of it
            self._sending.popleft()[0].wait()

    def receive(self, numel: int, dtype: str) -> torch.Tensor:
        """The next bucket's buffer, as rank 0 sent it."""
        flat = torch.empty(numel, dtype=getattr(torch, dtype), device=self.device)
        self.group.broadcast([flat], _from_rank_0()).wait()
        return flat

    def close(self) -> None:
        while self._sending:
            self._sending.popleft()[0].wait()


def _from_rank_0() -> dist.BroadcastOptions:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    return options
