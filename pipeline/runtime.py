"""Device, precision, seeding and torch.distributed in one place (open_clip's precision.py idea).

Stages ask this module for a device, an autocast context and the rank/world; nothing else
calls ``torch.cuda`` or ``torch.distributed`` directly.

Launchers. A distributed run is started by torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and
``MASTER_ADDR``/``MASTER_PORT``, read by the env:// rendezvous) or by SLURM's ``srun`` with one
task per process (``SLURM_PROCID``/``SLURM_LOCALID`` and the step's task count; the master is the
first host of the step's node list, the port ``MASTER_PORT`` or one derived from the job id).
torchrun's variables win when both are set (``srun torchrun ...``). Only an srun *step* counts:
a batch script also sees ``SLURM_NTASKS`` and ``SLURM_PROCID=0``, and a plain ``python`` there is
one process, not rank 0 of N.

Timeouts. Collectives fail after the process group's timeout (``dist_timeout`` minutes,
default 30; NCCL's own default is 10). Waits that are not bounded by the work of one step —
a rank that finished its shards while others still extract, ranks waiting while rank 0
validates or saves — go through ``wait_for_all``: a barrier on a gloo side group whose
timeout is a week, so an idle rank never times out while another still works (a crashed peer
still ends the wait at once: its connection closes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Mapping

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


DEFAULT_DIST_TIMEOUT_MIN = 30.0  # minutes; a collective that waits longer fails (NCCL's default is 10)
IDLE_WAIT = timedelta(days=7)  # wait_for_all's bound: "never", for a run
DEFAULT_PORT = 29500  # torchrun's; a SLURM run without MASTER_PORT derives one from its job id


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # none | torchrun | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class Launch:
    """Who started this process and how to reach its peers (``detect_launch``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # none | torchrun | slurm
    init_method: str = "env://"  # torchrun: its env vars; slurm: tcp://MASTER:PORT


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu1`` -> ``gpu07``, ``a[3-4]-ib`` -> ``a3-ib``.

    (``scontrol show hostnames | head -1`` without calling scontrol; zero padding kept.)
    """
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first entry ends at a comma outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end].strip())
    if not host:
        raise BadValue(f"SLURM node list {nodelist!r} names no host; set MASTER_ADDR")
    return host


def detect_launch(env: Mapping[str, str] | None = None) -> Launch:
    """torchrun's variables, else an srun step's, else a single process (see the module docstring)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:  # torchrun, or a user's own env:// setup
        world = int(env["WORLD_SIZE"])
        return Launch(int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")),
                      "torchrun" if world > 1 else "none")
    tasks = env.get("SLURM_STEP_NUM_TASKS") or (env.get("SLURM_NTASKS") if "SLURM_STEP_ID" in env else None)
    if tasks is None or int(tasks) <= 1 or "SLURM_PROCID" not in env:
        return Launch()
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    addr = env.get("MASTER_ADDR") or first_host(nodes)
    port = env.get("MASTER_PORT") or str(DEFAULT_PORT + 1 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return Launch(int(env["SLURM_PROCID"]), int(tasks), int(env.get("SLURM_LOCALID", "0")), "slurm",
                  f"tcp://{addr}:{port}")


_IDLE_GROUP: Any = None  # wait_for_all's gloo group, made with the default group


def init_distributed(device_name: str = "auto", timeout_min: float = DEFAULT_DIST_TIMEOUT_MIN,
                     env: Mapping[str, str] | None = None) -> DistInfo:
    """Join the process group of a torchrun or srun launch; a no-op for a single process.

    NCCL on CUDA, gloo on CPU; collectives time out after ``timeout_min`` minutes.
    """
    global _IDLE_GROUP
    launch = detect_launch(env)
    if launch.world_size <= 1:
        return DistInfo()
    if timeout_min <= 0:
        raise BadValue(f"the process-group timeout must be > 0 minutes, got {timeout_min}")
    if not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_cuda_index(launch.local_rank))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method=launch.init_method,
                                rank=launch.rank, world_size=launch.world_size,
                                timeout=timedelta(minutes=timeout_min))
        _IDLE_GROUP = dist.new_group(backend="gloo", timeout=IDLE_WAIT)
    return DistInfo(rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank,
                    launcher=launch.launcher)


def local_cuda_index(local_rank: int) -> int:
    """This rank's GPU among those it sees: local_rank when it sees the node's GPUs (torchrun,
    ``srun --gpus-per-node``), 0 when the scheduler gave each task its own (``--gpus-per-task=1``)."""
    return local_rank % max(torch.cuda.device_count(), 1)


def dist_device(info: DistInfo, device_name: str = "auto") -> torch.device:
    """The device for this rank: its GPU (``local_cuda_index``) when distributed with CUDA, else resolve_device."""
    device = resolve_device(device_name)
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", local_cuda_index(info.local_rank))
    return device


def barrier(info: DistInfo) -> None:
    """All ranks meet; bounded by the process group's timeout (use after work of similar length)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()


def wait_for_all(info: DistInfo) -> None:
    """All ranks meet, however long the others still work (no process-group timeout applies)."""
    if info.enabled and dist.is_initialized():
        dist.barrier(group=_IDLE_GROUP)


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
    global _IDLE_GROUP
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
        _IDLE_GROUP = None


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
