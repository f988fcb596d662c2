"""torch.distributed glue for torchrun: one process per device, DDP, reductions, rank-0 I/O.

A single-process run gets `Dist()` (world 1), whose methods are no-ops, so the trainer has no
distributed branches of its own.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# A rank that dies leaves the others blocked in a collective; this bounds the wait (seconds).
TIMEOUT_S = int(os.environ.get("FASTRES_DIST_TIMEOUT", "120"))


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env(device_kind: str) -> "Dist":
        """Join the process group when launched by torchrun (WORLD_SIZE > 1), else a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Dist()
        cuda = device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available())
        backend = "nccl" if cuda else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local_rank)
            # NCCL errors surface as exceptions instead of hangs.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank, backend)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_str(self, s: str) -> str:
        """Rank 0's value of s on every rank."""
        if self.world == 1:
            return s
        box = [s]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def close(self):
        if self.world > 1 and dist.is_initialized():
            # Leave together: a rank that tears its group down while another still works with it
            # was seen to abort at exit ("terminate called without an active exception"), now
            # and then, under load.
            dist.barrier()
            dist.destroy_process_group()
