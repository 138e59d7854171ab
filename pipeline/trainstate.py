"""Training checkpoints: full state to resume exactly, written crash-safely.

A checkpoint is one ``torch.save`` dict of tensors and plain Python values only, so it loads
with ``torch.load(weights_only=True)``: model / loss parameters, optimizer, scheduler, grad
scaler, the RNG states of every rank (python, numpy, torch, cuda, the mask generator) and
the data position (epoch, batches done in that epoch, global step).

Files in ``RUN/checkpoints/``: ``latest.pt`` (the newest), ``previous.pt`` (the one before;
the fallback when ``latest.pt`` is truncated or unreadable) and ``best.pt`` (best validation
score). Each is written to a temporary file, fsynced, then renamed into place: a failed write (a full
disk raises ``errors.WriteFailed``) leaves the checkpoints as they were, and ``describe_kept`` says so.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import temp_beside
from .errors import BadValue, MissingInput, writing
from .rundir import BEST_CKPT, CKPT_DIR, LATEST_CKPT, PREVIOUS_CKPT, has_checkpoint  # noqa: F401  (has_checkpoint: also trainstate's)

log = logging.getLogger("kdpipe")

LATEST, PREVIOUS, BEST = LATEST_CKPT, PREVIOUS_CKPT, BEST_CKPT
FORMAT = 1


@dataclass
class Position:
    """Where training stands: ``step`` optimizer steps done in all; ``batch`` batches of ``epoch``."""

    epoch: int = 0
    batch: int = 0
    step: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# --------------------------------------------------------------------------- RNG


def capture_rng(mask_gen: torch.Generator | None = None) -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if mask_gen is not None:
        state["mask"] = mask_gen.get_state()
    return state


def restore_rng(state: dict[str, Any], mask_gen: torch.Generator | None = None) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if mask_gen is not None and "mask" in state:
        mask_gen.set_state(state["mask"])


# --------------------------------------------------------------------------- files


def ckpt_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CKPT_DIR


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested dict / list: about what ``torch.save`` writes of it."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _atomic_torch_save(obj: dict[str, Any], path: Path) -> Path:
    """torch.save to a temporary file in the same folder and fsync it; returns the temp path."""
    with writing(path, tensor_bytes(obj), "this checkpoint"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_beside(path)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return tmp


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], best: bool = False) -> Path:
    """Write ``latest.pt`` (the old one becomes ``previous.pt``), or ``best.pt`` when ``best``."""
    folder = ckpt_dir(run_dir)
    target = folder / (BEST if best else LATEST)
    tmp = _atomic_torch_save({"format": FORMAT, **state}, target)
    if not best and target.exists():
        os.replace(target, folder / PREVIOUS)
    os.replace(tmp, target)
    return target


def read_checkpoint(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BadValue(f"{path} is not a kdpipe training checkpoint (format {FORMAT})")
    return state


def load_latest(run_dir: str | Path) -> tuple[dict[str, Any], Path]:
    """The newest readable checkpoint: ``latest.pt``, else ``previous.pt`` (with a clear warning)."""
    folder = ckpt_dir(run_dir)
    problems = []
    for name in (LATEST, PREVIOUS):
        path = folder / name
        if not path.exists():
            problems.append(f"{path} does not exist")
            continue
        try:
            state = read_checkpoint(path)
        except Exception as err:  # noqa: BLE001  (a truncated zip raises RuntimeError, EOFError, ...)
            problems.append(f"{path} is unreadable ({type(err).__name__}: {str(err)[:120]})")
            log.warning("%s; trying the previous checkpoint", problems[-1])
            continue
        if name == PREVIOUS:
            log.warning("resuming from the previous good checkpoint %s (step %d) because %s",
                        path, state["position"]["step"], "; ".join(problems))
        return state, path
    raise MissingInput(f"no checkpoint to resume in {folder}: " + "; ".join(problems))


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint holds (memory-mapped: nothing else is read), None when it is missing or unreadable."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["position"]["step"])
    except Exception:  # noqa: BLE001  (a truncated zip raises RuntimeError, EOFError, ...)
        return None


def describe_kept(run_dir: str | Path) -> tuple[str, int | None]:
    """What a failed run leaves to resume from: a sentence naming the newest readable checkpoint, and its step."""
    for name in (LATEST, PREVIOUS):
        path = ckpt_dir(run_dir) / name
        step = checkpoint_step(path) if path.exists() else None
        if step is not None:
            return f"the last checkpoint, step {step}, is intact ({path})", step
    return f"no checkpoint was written yet in {ckpt_dir(run_dir)}", None


def all_finite(module: torch.nn.Module) -> bool:
    """True when every floating tensor of the state dict is finite (never save NaN weights).

    The state dict, not ``buffers()``: non-persistent buffers such as a causal attention mask
    hold −inf by design and are never saved.
    """
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if t.is_floating_point())
