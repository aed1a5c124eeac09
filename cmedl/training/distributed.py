"""Data-parallel training across the processes of a ``torchrun`` launch (PyTorch DDP).

``torchrun --nproc_per_node N -m cmedl train ...`` starts N copies of the command and tells each, through
the environment, who it is: ``WORLD_SIZE`` (processes in all), ``RANK`` (this one, 0 .. WORLD_SIZE-1) and
``LOCAL_RANK`` (this one on its node; it picks the GPU). :func:`process_group` turns that into a PyTorch
process group for the length of a training run: NCCL between GPUs, Gloo between CPU processes. Without
``torchrun`` (``WORLD_SIZE`` unset or 1) nothing is set up and every helper here acts as the identity, so
the trainer calls them unconditionally.

The helpers are collective: every process of the group must call them in the same order, or the run
hangs until the group's timeout.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import inspect
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from cmedl.errors import ConfigError

# Rank 0 validates, exports and writes checkpoints while the other processes wait in a collective; a slow
# validation must not look like a dead peer (NCCL's own default is 10 minutes).
TIMEOUT = _dt.timedelta(minutes=30)


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a ``torchrun`` launch."""

    rank: int
    local_rank: int
    world_size: int


def launch_from_environment(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launch this process belongs to, read from the variables ``torchrun`` sets; None for one process."""
    environ = os.environ if environ is None else environ
    try:
        world = int(environ.get("WORLD_SIZE", "1") or "1")
        if world <= 1:
            return None
        rank = int(environ["RANK"])
        local_rank = int(environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise ConfigError(
            "WORLD_SIZE is set but RANK or LOCAL_RANK is missing or not a number; launch data-parallel "
            "training with torchrun"
        ) from None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK {rank} is outside 0..{world - 1} (WORLD_SIZE {world})")
    return Launch(rank=rank, local_rank=local_rank, world_size=world)


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Number of training processes (1 without a process group)."""
    return torch.distributed.get_world_size() if is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    """True in the one process that writes the run folder and reports progress."""
    return rank() == 0


def _collective_device() -> torch.device:
    # NCCL moves only CUDA tensors; Gloo moves CPU tensors.
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_initialized():
        torch.distributed.barrier()


def all_reduce_mean(value: float) -> float:
    """The mean of ``value`` over all processes."""
    if not is_initialized():
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(tensor)
    return float(tensor.item()) / world_size()


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on at least one (a stop request, a non-finite loss)."""
    if not is_initialized():
        return bool(flag)
    tensor = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def mean_over_processes(values: Mapping[str, float]) -> dict[str, float]:
    """Per-name means over all processes; a name missing on some process counts as 0 there.

    Loss terms can differ between processes (a term that needs labelled MRI is absent where a batch has none),
    so the names are gathered first and the values are then reduced in one all-reduce.
    """
    if not is_initialized():
        return {name: float(value) for name, value in values.items()}
    names = sorted({name for names in all_gather_object(sorted(values)) for name in names})
    tensor = torch.tensor([float(values.get(name, 0.0)) for name in names], dtype=torch.float64)
    tensor = tensor.to(_collective_device())
    torch.distributed.all_reduce(tensor)
    return {name: float(total) / world_size() for name, total in zip(names, tensor.tolist())}


def broadcast_object(value: Any, source: int = 0) -> Any:
    """``value`` as the process ``source`` holds it, on every process (any picklable object)."""
    if not is_initialized():
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=source, device=_collective_device())
    return holder[0]


def all_gather_object(value: Any) -> list[Any]:
    """Every process's ``value``, in rank order (any picklable object)."""
    if not is_initialized():
        return [value]
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def average_buffers(modules: Iterable[torch.nn.Module]) -> None:
    """Replace floating-point buffers (BatchNorm running statistics) by their mean over all processes.

    Each process updates its running statistics from its own patches (the wrappers do not broadcast buffers,
    see :func:`wrap`); averaging them before validation and checkpoints makes the saved networks reflect every
    process's data and puts all processes back in step.
    """
    if not is_initialized():
        return
    for module in modules:
        for buffer in module.buffers():
            if buffer.is_floating_point():
                reduced = buffer.detach().to(_collective_device(), copy=True)
                torch.distributed.all_reduce(reduced)
                buffer.copy_(reduced / world_size())


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` in a DistributedDataParallel wrapper that averages its gradients across processes.

    - ``find_unused_parameters=False``: the objectives see to it that every parameter of a wrapped network
      gets a gradient in each backward pass on every process (frozen networks are called unwrapped; a term
      that depends on the data is anchored by a zero-weighted one), so the search of the autograd graph that
      option runs after every forward call is not needed. It would not replace the anchoring either: a
      network called through its wrapper whose output reaches no loss stalls the all-reduce in both modes.
    - No buffer broadcast before each forward call: the objectives call some networks several times per
      backward pass (a generator for the fake and the cycle image, the teacher for pseudo and real MRI).
      Each process keeps its own BatchNorm statistics and :func:`average_buffers` averages them once per
      epoch, so the saved statistics reflect every process's patches rather than rank 0's alone.
    """
    from torch.nn.parallel import DistributedDataParallel

    options: dict[str, Any] = {"device_ids": [device.index] if device.type == "cuda" else None}
    # Newer PyTorch names the per-forward buffer sync forward_sync_buffers (buffers are still synced once at
    # construction, which is wanted); older releases only know broadcast_buffers.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        options["forward_sync_buffers"] = False
    else:
        options["broadcast_buffers"] = False
    return DistributedDataParallel(module, find_unused_parameters=False, **options)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join the launch's process group for the length of the block; yields the device this process uses.

    Under ``torchrun`` a CUDA ``device`` becomes ``cuda:LOCAL_RANK`` (one GPU per process). The group is
    destroyed when the block ends, also on an error, unless it existed before (a caller that set up its own
    group keeps it).
    """
    launch = launch_from_environment()
    if launch is None:
        yield device
        return
    if not torch.distributed.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed: data-parallel training is not possible")
    if device.type == "cuda":
        if launch.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {launch.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                f"start at most that many processes per node (--nproc_per_node)"
            )
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    if is_initialized():
        yield device
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
    try:
        yield device
    finally:
        torch.distributed.destroy_process_group()
