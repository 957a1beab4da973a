"""Process setup: one process or torchrun (one node or several), gloo on CPU, NCCL on GPU, through
DeepSpeed's communication layer; expert-parallel process groups from DeepSpeed.

Design decisions:
- A plain ``python -m aria.train`` is a world of one: the launcher variables torchrun would set are
  filled in, so the same code path runs everywhere (DeepSpeed otherwise tries MPI discovery).
- On CPU DeepSpeed would JIT-compile a shared-memory all-reduce op on first use (~30 s); gloo does
  not need it, so its builder is replaced by a no-op before the engine starts.
- Expert parallelism uses DeepSpeed's groups: EP groups of consecutive ranks, expert-data-parallel
  groups strided across them, named ``ep_size_<P>`` as DeepSpeed's MoE parameter groups expect.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def placement() -> tuple[int, int, int]:
    """(rank, world size, processes per node) of this process as its launcher set them (a world of
    one without one), before anything is initialised."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def init_distributed() -> DistInfo:
    """Join (or create) the process group; returns this process's place in it."""
    if "RANK" not in os.environ:  # not launched by torchrun: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not cuda:
        comm_torch = sys.modules.get("deepspeed.comm.torch")
        if comm_torch is not None:
            comm_torch.build_shm_op = lambda: None
    # DeepSpeed's communication layer wraps an existing torch.distributed group if there is one.
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                               verbose=False)
    if world > 1:  # every rank creates it, in the same order
        _IO_GROUPS[id(dist.distributed_c10d._get_default_group())] = dist.new_group(backend="gloo",
                                                                                 timeout=IO_TIMEOUT)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(rank, world, local_rank, device)


# Checkpoint writing meets at barriers of its own gloo group: a rank waiting there for a slow
# filesystem waits on the host, with this timeout, instead of in a training collective whose
# (NCCL) timeout would abort the run.
IO_TIMEOUT = timedelta(hours=4)
_IO_GROUPS: dict[int, dist.ProcessGroup] = {}  # by the default group it belongs to


def io_barrier() -> None:
    """A barrier of all ranks for file I/O (long timeout; a no-op in a world of one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=_IO_GROUPS.get(id(dist.distributed_c10d._get_default_group())))


def expert_parallel_groups(ep_size: int) -> tuple[dist.ProcessGroup, str]:
    """This rank's expert-parallel group and its DeepSpeed name (creating DeepSpeed's groups)."""
    from deepspeed.utils import groups

    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"parallel.ep_size={ep_size} must divide the number of processes ({world})")
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name), name


def sequence_parallel_group(sp_size: int) -> dist.ProcessGroup | None:
    """This rank's sequence-parallel group: ``sp_size`` consecutive ranks (every rank creates every
    group, in the same order, as torch requires). None for ``sp_size`` 1."""
    if sp_size == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % sp_size:
        raise ValueError(f"parallel.sp_size={sp_size} must divide the number of processes ({world})")
    mine = None
    for start in range(0, world, sp_size):
        group = dist.new_group(list(range(start, start + sp_size)))
        if start <= rank < start + sp_size:
            mine = group
    return mine


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
