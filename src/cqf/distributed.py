"""Data-parallel training on torch.distributed: `torchrun --nproc_per_node=N -m cqf train ...`.

Every rank holds a full replica. `train.batch_size` (and `train.quality_batch_size`) stays the global batch:
rank r takes rows [r B/N, (r+1) B/N) of the step's batch, and every per-sample random draw of the step
(dequantization, z, decoder noise, augmentation) is the rank's rows of the draw a single process would make,
so a run's data and noise do not depend on N. Gradients are averaged with one all-reduce per optimizer step
(the adaptive weight is computed from the averaged gradients), so the replicas stay identical and the run is,
to float rounding, the single-process run. NCCL on GPUs, gloo on CPUs; only rank 0 writes files.

With one process (no torchrun) every function here is the plain single-process operation.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError

__all__ = [
    "Context",
    "any_rank",
    "average_gradients",
    "average_parameter_gradients",
    "check_global_batches",
    "check_replicas",
    "context",
    "finish",
    "init_from_env",
    "main_decides",
    "min_over_ranks",
    "rand_rows",
    "randint_rows",
    "randn_rows",
    "same_on_all_ranks",
    "shard",
    "shard_rows",
    "sum_over_ranks",
]


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


_CONTEXT = Context()
_SHARDED = False  # inside a training step: per-sample draws are this rank's rows of the global draw


def context() -> Context:
    return _CONTEXT


def check_global_batches(**batches: int) -> None:
    """Each global batch (by its `train.` key, in images as a step takes them) divides evenly over the processes
    of this run (`WORLD_SIZE`), or a one-line ConfigError names the key and the fix."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for key, size in batches.items():
        if size % world:
            raise ConfigError(f"train.{key}: a global batch of {size} images must divide evenly over the {world} "
                              f"processes; set train.{key} to a multiple of {world}")


def init_from_env(device: str) -> tuple[Context, str]:
    """Join the process group torchrun describes (WORLD_SIZE > 1), once; returns the context and the device
    this rank trains on (`cuda:LOCAL_RANK` under NCCL)."""
    global _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _CONTEXT, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    _CONTEXT = Context(rank, world, local_rank)
    return _CONTEXT, device


@contextlib.contextmanager
def shard():
    """Per-sample draws inside the block are this rank's rows of the global batch's draw."""
    global _SHARDED
    previous, _SHARDED = _SHARDED, _CONTEXT.distributed
    try:
        yield
    finally:
        _SHARDED = previous


def shard_rows(x: Tensor) -> Tensor:
    """This rank's rows of a global batch (all of it with one process)."""
    if not _CONTEXT.distributed:
        return x
    rows = len(x) // _CONTEXT.world
    return x[_CONTEXT.rank * rows : (_CONTEXT.rank + 1) * rows]


def local_rows(rows: int) -> int:
    """How many of a global batch's `rows` are this rank's (all of them with one process)."""
    return rows // _CONTEXT.world if _CONTEXT.distributed else rows


def _rows(draw, rows: int, *args, **kwargs) -> Tensor:
    if not _SHARDED:
        return draw(rows, *args, **kwargs)
    full = draw(rows * _CONTEXT.world, *args, **kwargs)
    return full[_CONTEXT.rank * rows : (_CONTEXT.rank + 1) * rows]


def randn_rows(rows: int, *shape: int, **kwargs) -> Tensor:
    """`torch.randn(rows, *shape)`; in a sharded step, this rank's rows of the global draw."""
    return _rows(lambda n, *s, **k: torch.randn(n, *s, **k), rows, *shape, **kwargs)


def rand_rows(rows: int, *shape: int, **kwargs) -> Tensor:
    """`torch.rand(rows, *shape)`; in a sharded step, this rank's rows of the global draw."""
    return _rows(lambda n, *s, **k: torch.rand(n, *s, **k), rows, *shape, **kwargs)


def randint_rows(low: int, high: int, rows: int, *shape: int, **kwargs) -> Tensor:
    """`torch.randint(low, high, (rows, *shape))`; in a sharded step, this rank's rows of the global draw."""
    return _rows(lambda n, *s, **k: torch.randint(low, high, (n, *s), **k), rows, *shape, **kwargs)


def average_gradients(grads: list[Tensor | None]) -> list[Tensor | None]:
    """The mean over ranks of each gradient, with one all-reduce, written back in place (so each keeps its
    memory layout, which fused Adam requires to match the parameter's). None stays None: it is None on every
    rank, since every rank runs the same graph."""
    present = [g for g in grads if g is not None]
    if not _CONTEXT.distributed or not present:
        return grads
    flat = torch.cat([g.reshape(-1) for g in present])
    dist.all_reduce(flat)
    flat /= _CONTEXT.world
    offset = 0
    for g in present:
        g.copy_(flat[offset : offset + g.numel()].view(g.shape))
        offset += g.numel()
    return grads


def average_parameter_gradients(parameters) -> None:
    """Replace every `.grad` of `parameters` by its mean over ranks."""
    if not _CONTEXT.distributed:
        return
    average_gradients([p.grad for p in parameters])


def sum_over_ranks(values: Tensor) -> Tensor:
    """Elementwise sum over ranks of a small tensor (a copy; the input is untouched)."""
    values = values.clone()
    if _CONTEXT.distributed:
        dist.all_reduce(values)
    return values


def min_over_ranks(values: Tensor) -> Tensor:
    """Elementwise minimum over ranks of a small tensor (a copy)."""
    values = values.clone()
    if _CONTEXT.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when `flag` is true on any (e.g. the wall-clock budget: all ranks stop together)."""
    if not _CONTEXT.distributed:
        return flag
    return bool(sum_over_ranks(torch.tensor([float(flag)], device=device)).item() > 0)


def check_replicas(modules: list[torch.nn.Module | None], device: torch.device | str) -> None:
    """Raise if this rank's weights and buffers differ from rank 0's (they must be identical after every step)."""
    if not _CONTEXT.distributed:
        return
    flat = torch.cat([t.detach().reshape(-1).double() for m in modules if m is not None
                      for t in m.state_dict().values() if t.is_floating_point()]).to(device)
    reference = flat.clone()
    dist.broadcast(reference, 0)
    if not torch.equal(reference, flat):
        raise RuntimeError(f"rank {_CONTEXT.rank}: the replica differs from rank 0's")


def same_on_all_ranks(value: int, device: torch.device | str = "cpu") -> bool:
    """Whether an integer (e.g. the resumed step) is the same on every rank."""
    if not _CONTEXT.distributed:
        return True
    pair = torch.tensor([value, -value], dtype=torch.float64, device=device)
    low, negative_high = min_over_ranks(pair).tolist()
    return low == -negative_high


def main_decides(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Rank 0's `flag`, on every rank (a decision only rank 0 can take, e.g. from the files it writes)."""
    if not _CONTEXT.distributed:
        return flag
    return any_rank(flag and _CONTEXT.is_main, device)


def finish(synchronize: bool = False) -> None:
    """Leave the process group this module joined (none with one process). With `synchronize` (a run that
    ended normally) the ranks first meet at a barrier, so that no rank tears its group down while another
    still has work in flight (gloo can abort the process at exit then); a failed run leaves at once."""
    global _CONTEXT
    if _CONTEXT.distributed and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
    _CONTEXT = Context()
