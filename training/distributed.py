"""Single-process or DistributedDataParallel, behind one small object.

    torchrun --nproc_per_node 2 -m training.train --data DIR --preset tiny --out runs/x

`torchrun` sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything runs in one process and
the collective helpers are no-ops. CPU runs use the gloo backend, GPU runs NCCL with one device per
local rank. Every rank samples its own windows (seed + rank); validation windows are shared out and
their sums reduced, so every rank sees the same validation loss and takes the same early-stopping
decision; only rank 0 writes files.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def all_mean(self, value: float) -> float:
        return self.all_sum([value])[0] / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank's flag is set (a Ctrl-C seen by one rank stops all)."""
        return self.all_sum([1.0 if flag else 0.0])[0] > 0

    def broadcast_int(self, value: int) -> int:
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self._comm_device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's bytes, in rank order, on every rank (used for per-rank RNG states)."""
        if not self.enabled:
            return [data]
        sizes = [torch.zeros(1, dtype=torch.int64, device=self._comm_device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=self._comm_device))
        longest = max(int(s.item()) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=self._comm_device)
        padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        chunks = [torch.zeros(longest, dtype=torch.uint8, device=self._comm_device) for _ in range(self.world)]
        dist.all_gather(chunks, padded)
        return [bytes(c[: int(s.item())].cpu().tolist()) for c, s in zip(chunks, sizes, strict=True)]

    def say(self, message: str) -> None:
        """A progress line on stderr, from rank 0 only (every rank would print it once)."""
        if self.is_main:
            print(message, file=sys.stderr)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """`auto` takes a GPU when there is one."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda was asked for, but PyTorch sees no CUDA GPU")
        return torch.device("cuda", local_rank)
    return torch.device(preference)


def setup(device: str = "auto") -> Distributed:
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        # A long timeout: rank 0 may spend a while converting the built-in corpus while others wait.
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return Distributed(rank=rank, world=world, local_rank=local_rank, device=chosen)
