"""The learner's side of a weight sync: named tensors packed into one flat buffer per bucket, shared by CUDA IPC."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from morl.compat import share_by_cuda_ipc
from morl.types import PackedBucket, TensorMeta


def pack_bucket(named: Sequence[tuple[str, torch.Tensor]], dtype: torch.dtype) -> PackedBucket:
    """Copy the tensors (cast to `dtype`) into one new flat buffer on the first tensor's device."""
    if not named:
        raise ValueError("cannot pack an empty bucket")
    metas, offset = [], 0
    for name, tensor in named:
        metas.append(TensorMeta(name, tuple(tensor.shape), offset))
        offset += tensor.numel()
    flat = torch.empty(offset, dtype=dtype, device=named[0][1].device)
    for meta, (_, tensor) in zip(metas, named):
        flat[meta.offset : meta.offset + tensor.numel()].copy_(tensor.reshape(-1))
    return PackedBucket(metas, flat=flat)


class SharedBuckets:
    """Keeps the sender's last two CUDA-IPC-shared buffers alive.

    The sync loop fetches one bucket ahead, so when bucket k + 2 is packed, bucket k has been
    loaded by every receiver and its buffer may go.
    """

    def __init__(self, depth: int = 2):
        self._alive: deque[PackedBucket] = deque(maxlen=depth)

    def share(self, bucket: PackedBucket) -> PackedBucket:
        """The same bucket as a CUDA IPC handle: the receiver maps the sender's buffer, no copy."""
        self._alive.append(bucket)
        return PackedBucket(bucket.metas, cuda_ipc=share_by_cuda_ipc(bucket.flat))

    def release(self) -> None:
        self._alive.clear()
