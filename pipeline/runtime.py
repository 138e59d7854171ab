"""Device, precision, seeding, torch.distributed and process lifecycle in one place (open_clip's
precision.py idea).

Stages ask this module for a device, an autocast context and the rank/world; nothing else
calls ``torch.cuda`` or ``torch.distributed`` directly. It also owns how processes end: every
DataLoader gets ``WorkerInit()`` (a worker dies with its parent and leaves SIGTERM / SIGUSR1
to it), and a stage wraps its run in ``stop_requests()``, so that a scheduler's SIGTERM or
SIGUSR1 asks it to stop at its next safe point (a checkpoint, a finished shard) instead of
killing it.

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
import ctypes
import logging
import os
import random
import re
import signal
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping

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
    """This process's place in the run once the process group is up (``init_distributed``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

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
    if launch.launcher == "torchrun" and "TORCHELASTIC_RUN_ID" in (os.environ if env is None else env):
        # started by torchrun, from its main thread: end with it (a rank of a killed torchrun trains on
        # alone or waits in a collective forever)
        die_with_parent(os.getppid())
    if not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_cuda_index(launch.local_rank))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method=launch.init_method,
                                rank=launch.rank, world_size=launch.world_size,
                                timeout=timedelta(minutes=timeout_min))
        _IDLE_GROUP = dist.new_group(backend="gloo", timeout=IDLE_WAIT)
    return DistInfo(rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank)


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


# --------------------------------------------------------------------------- process lifecycle

# What schedulers send before they kill a job: SLURM sends SIGTERM at the time limit or on
# preemption (then SIGKILL after KillWait), and SIGUSR1 ahead of it with ``--signal=USR1@SECONDS``.
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1")
                                                 if hasattr(signal, name))
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """Have Linux SIGKILL this process as soon as its parent dies (a no-op on other systems).

    ``parent``: the pid that started this process. If it has died already (between the fork
    and this call, before the kernel was told), this process exits now. The kernel sends the
    signal when the parent *thread* that forked this process ends, so the process must be
    started from a thread that lives as long as the parent does (the stages iterate their
    loaders in the main thread).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        log.debug("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        return
    if os.getppid() != parent:  # orphaned before the prctl took effect
        os._exit(1)


def ignore_stop_signals() -> None:
    """SIG_IGN for the stop signals: a worker leaves them to its parent, which stops cleanly."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class WorkerInit:
    """The ``worker_init_fn`` of every DataLoader: each worker's life is tied to the process that built it.

    A worker dies with its parent (``die_with_parent``): torch's watchdog notices a dead parent
    only between batches, and a worker whose queue is full (the parent was killed before it read
    a large batch, and a sibling worker still holds the pipe's read end) never exits at all, keeping
    its memory and /dev/shm segments. It ignores SIGTERM and SIGUSR1: a scheduler signals the whole
    process group, and a worker killed first would crash its parent before the parent could save a
    checkpoint. Then ``then(worker_id)``, the loader's own init, if any. Picklable (module-level
    class), for the spawn start method.
    """

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        self.parent = os.getpid()  # the loader is built and iterated in the process that owns it
        self.then = then

    def __call__(self, worker_id: int) -> None:
        die_with_parent(self.parent)
        ignore_stop_signals()
        if self.then is not None:
            self.then(worker_id)


class StopRequest:
    """Whether a stop signal arrived, and which (``signal``: its name, e.g. "SIGTERM"; None: none yet).

    True once asked. Set only by the handlers ``stop_requests`` installs; a stage reads it at its
    safe points.
    """

    def __init__(self) -> None:
        self.signal: str | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def handle(self, signum: int, frame: Any) -> None:
        """The signal handler: record the first signal, nothing else (no I/O, no locks)."""
        if self.signal is None:
            self.signal = signal.Signals(signum).name


@contextlib.contextmanager
def stop_requests(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Within the block, ``signals`` (SIGTERM, SIGUSR1) only set the yielded ``StopRequest``.

    The previous handlers come back on exit. A signal that arrived is passed on to the previous
    handler when that is a Python function (an enclosing ``stop_requests``: a loop of stages), so a
    stop that came after a stage's last safe point is not lost to the loop around it. Handlers can
    be installed from the main thread only; elsewhere nothing is installed (the request then never
    becomes true).
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.signal(sig, request.handle) for sig in signals}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        outer = previous.get(signal.Signals[request.signal]) if request.signal else None
        if callable(outer):  # not SIG_DFL / SIG_IGN / None (a handler installed from C)
            outer(signal.Signals[request.signal].value, None)


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (one all_reduce of one number).

    Ranks stop together: each may get its stop signal at a different step, or only some get it.
    ``device``: this rank's device (NCCL reduces CUDA tensors only).
    """
    if not info.enabled:
        return flag
    box = torch.tensor([int(flag)], device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())
