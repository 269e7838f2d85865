"""One run on several processes: ``torchrun --nproc_per_node=N -m harness ...``.

torchrun starts N copies of the command and tells each its place (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); :func:`start` joins them in one
``torch.distributed`` process group (gloo on CPU, NCCL on GPUs). Every rank trains on its shard of
each batch under DistributedDataParallel and runs the same pruning engine on the same synchronized
weights, so every rank selects the same masks; rank 0 alone writes (the baseline cache, the MLflow
run, the artifacts, the checkpoint, the summary).

The process group is torch.distributed's own global state, so :func:`current` reads it rather than
a world object being threaded through every call: a single process is a world of one.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from harness.errors import ConfigError, HarnessError

# A rank that stops answering (killed, or stuck on its data) fails the others within this time
# instead of hanging them forever; long enough for a rank 0 that writes a large cache meanwhile.
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def from_env(environ: Mapping[str, str] = os.environ) -> World:
    """The place torchrun gave this process (a world of one without torchrun)."""
    try:
        world = World(int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)),
                      int(environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ConfigError(f"RANK={environ.get('RANK')!r}, WORLD_SIZE={environ.get('WORLD_SIZE')!r}: "
                          "torchrun's variables must be integers") from None
    if not 0 <= world.rank < world.size:
        raise ConfigError(f"RANK={world.rank} with WORLD_SIZE={world.size}: the rank must be in 0..WORLD_SIZE-1")
    return world


def current() -> World:
    """This process's place in the process group :func:`start` joined (a world of one before)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def start(device: torch.device) -> World:
    """Join torchrun's process group, once (nothing to do in a single process): NCCL for CUDA
    devices, gloo for the CPU."""
    world = from_env()
    if not world.distributed or dist.is_initialized():
        return current()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=TIMEOUT)
    return current()


def device_for(device: torch.device, world: World) -> torch.device:
    """A rank's own GPU (``cuda:LOCAL_RANK``) when the run is on CUDA; the CPU stays the CPU."""
    if device.type != "cuda" or not world.distributed:
        return device
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise ConfigError(f"train.device={device}: LOCAL_RANK={world.local_rank} but this node has {count} CUDA "
                          f"device(s); start at most {count} processes per node (torchrun --nproc_per_node)")
    return torch.device("cuda", world.local_rank)


def stop() -> None:
    """Leave the process group (at the end of a run, so that torchrun sees a clean exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """End a rank's process with ``code``: leave the process group, run the exit handlers (the MLflow
    writer's close, logging's flush) and flush the standard streams, then exit without Python's
    interpreter teardown.

    Why not a plain ``sys.exit``: in torch 2.14, ``destroy_process_group`` does not free gloo's process
    group, whose worker threads drop their last collective's tensors a moment after the collective has
    returned. Dropping a tensor that Python has seen takes the GIL; a thread that asks for the GIL
    while the interpreter is being torn down is ended by Python, and ending a C++ thread there aborts
    the process ("terminate called without an active exception", SIGABRT): on this 2-core machine
    about one finished two-process run in twenty exited -6. ``os._exit`` after the handlers leaves no
    teardown for such a thread to fall into.
    """
    stop()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank (any picklable value)."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def reduce_sum(values: list[float], world: World) -> list[float]:
    """The sums of ``values`` over the ranks (float64, on the CPU: a few numbers, whatever the backend)."""
    if not world.distributed:
        return values
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(values, dtype=torch.float64, device=backend_device)
    dist.all_reduce(total)
    return total.tolist()


def masks_digest(masks: Mapping[str, torch.Tensor]) -> str:
    """One checksum of every mask (names and bytes), to compare across ranks."""
    digest = hashlib.sha256()
    for name in sorted(masks):
        digest.update(name.encode())
        digest.update(masks[name].detach().to("cpu", torch.bool).numpy().tobytes())
    return digest.hexdigest()


class MasksDiffer(HarnessError):
    """The ranks of one run hold different masks: their models have drifted apart."""


def check_same_masks(masks: Mapping[str, torch.Tensor], world: World, where: str) -> str:
    """Every rank's masks compared by checksum; :class:`MasksDiffer` on every rank when they differ."""
    mine = masks_digest(masks)
    if not world.distributed:
        return mine
    digests: list[Any] = [None] * world.size
    dist.all_gather_object(digests, mine)
    if len(set(digests)) > 1:
        differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
        raise MasksDiffer(f"{where}: the masks of rank(s) {differ} differ from rank 0's; the ranks' weights have "
                          "drifted apart (a data-dependent step that is not synchronized)")
    return mine
