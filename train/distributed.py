"""Process groups for multi-process training: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; we join the group.

NCCL on CUDA devices, gloo on the CPU. One process per device; with no torchrun environment everything is a
single process and these helpers are no-ops.
"""
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we created the process group, so we destroy it
    flag_group: object = None  # a gloo group beside an NCCL one, for host-side flags (None: the default group)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device_type: str, need_group: bool = False) -> Dist:
    """Join the process group torchrun describes (if any). device_type "cuda" -> NCCL, else gloo.
    need_group: create a one-process group when not launched by torchrun (DeepSpeed needs one)."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not launched_by_torchrun():
        if need_group and not dist.is_initialized():
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
            return Dist(owns_group=True)
        return Dist()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    owns = False
    if (world > 1 or need_group) and not dist.is_initialized():
        dist.init_process_group(backend=backend)
        owns = True
    flag_group = None
    if world > 1 and dist.get_backend() == "nccl":
        flag_group = dist.new_group(backend="gloo")  # every process creates it, in the same order
    return Dist(rank, world, local_rank, owns, flag_group)


def all_reduce_mean(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean of a tensor over all processes (returns a new tensor; the input is unchanged)."""
    if not d.enabled:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / d.world_size


def any_process(flag: bool, d: Dist, device) -> bool:
    """True when `flag` is true on any process (all processes get the same answer). Asked every step, so beside
    NCCL it goes through the gloo flag group on the CPU: a GPU all-reduce would make the host wait for the GPU."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device="cpu" if d.flag_group is not None else device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=d.flag_group)
    return bool(t.item() > 0)


def barrier(d: Dist):
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist, finished: bool = True):
    """Leave the process group we created. After a run that finished (or stopped) on every process, first wait for
    all of them: a process that tears its group down while a peer's last message is still in flight can leave a gloo
    worker thread running at exit, which aborts the process ("terminate called without an active exception"). After an
    error no barrier: the other processes may never reach it."""
    if d.owns_group and dist.is_initialized():
        if finished and d.enabled:
            dist.barrier()
        dist.destroy_process_group()
