"""Several processes, as torchrun (torch.distributed elastic) starts them: which one this is, and
data-parallel training of one slider with DDP on its LoRA parameters only."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """False only on the data-parallel ranks other than 0 (job-parallel workers each write their own)."""
    return not data_parallel() or dist.get_rank() == 0


def init_process_group() -> bool:
    """Join the launcher's process group (gloo on the CPU, NCCL on GPUs) when there are several
    processes; True when training is data-parallel."""
    if world()[1] <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def data_parallel() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _Trainable(torch.nn.Module):
    """Holds only a slider's LoRA parameters, so DDP syncs and all-reduces those and never the frozen
    model; its forward runs the model call whose gradients are to be averaged."""

    def __init__(self, params: list[torch.nn.Parameter]):
        super().__init__()
        self.params = torch.nn.ParameterList(params)

    def forward(self, fn, *args):
        return fn(*args)


def wrap(params: list[torch.nn.Parameter], some_unused: bool = False):
    """DDP over `params` (rank 0's initial values are broadcast to all), or None in a single process.
    `some_unused`: a step may leave some of them out (a two-ended slider trains one end per step); DDP
    then looks for them every step, and leaves their gradients None, so the optimiser skips them."""
    if not data_parallel():
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(_Trainable(params), broadcast_buffers=False, find_unused_parameters=some_unused)


def all_finite(value: torch.Tensor) -> bool:
    """Whether `value` is finite on every process (so all stop together on a NaN, none hangs)."""
    finite = torch.tensor(float(torch.isfinite(value).all()))
    if data_parallel():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def batch_share(batch: int) -> slice:
    """This process's part of a global batch (every process draws the whole batch, then takes its part,
    so N processes see exactly the samples one process would)."""
    if not data_parallel():
        return slice(0, batch)
    rank, size = dist.get_rank(), dist.get_world_size()
    if batch % size:
        from .errors import SliderError

        raise SliderError(f"batch size {batch} must be a multiple of the {size} processes")
    share = batch // size
    return slice(rank * share, (rank + 1) * share)
