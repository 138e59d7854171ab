"""Device, precision, seeding and torch.distributed in one place (open_clip's precision.py idea).

Stages ask this module for a device, an autocast context and the rank/world; nothing else
calls ``torch.cuda`` or ``torch.distributed`` directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from .errors import BadValue, CannotRun

log = logging.getLogger("kdpipe")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU. Asking for CUDA without one fails fast."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CannotRun(f"--device {name} asked for, but torch sees no CUDA device; pass --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise BadValue(f"unknown device {name!r}; use auto, cpu or cuda[:N]")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA, fp32 on CPU. Returns one of fp32, bf16, fp16."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name not in ("fp32", "bf16", "fp16"):
        raise BadValue(f"unknown precision {name!r}; use auto, fp32, bf16 or fp16")
    if name == "fp16" and device.type != "cuda":
        raise BadValue("fp16 autocast needs CUDA; use fp32 or bf16 on CPU")
    return name


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast context for the precision; fp32 is a no-op."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group torchrun set up (env:// rendezvous); a no-op without torchrun.

    NCCL on CUDA, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def dist_device(info: DistInfo, device_name: str = "auto") -> torch.device:
    """The device for this rank: cuda:local_rank under torchrun with CUDA, else resolve_device."""
    device = resolve_device(device_name)
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def all_gather_cat(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """[B, ...] on every rank -> [world·B, ...] in rank order; the local slice keeps its grad.

    (open_clip's ``gather_features`` with gather_with_grad=False.)
    """
    if not info.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[info.rank] = x
    return torch.cat(parts)


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order ([obj] when not distributed)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock time covers the work (CUDA runs async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pin_memory(device: torch.device) -> bool:
    return device.type == "cuda"


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set intra-op threads (benchmarks); None leaves torch's default."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
