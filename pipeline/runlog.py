"""Where a training run's rows go besides RUN/metrics.jsonl: TensorBoard and Weights & Biases, on request.

``kdpipe train --log tensorboard,wandb`` (``TrainConfig.log``; default none). Each sink gets every
row metrics.jsonl gets (``{"kind": "train" | "val", "step": ..., ...}``, rank 0) as scalars named
``kind/key`` at the row's step: ``train/loss``, ``train/terms/crd``, ``train/lr``,
``train/samples_per_s``, ``train/clip_scale``, ``val/i2t_R@1``, ``val/cos``.

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` into ``RUN/tensorboard/``. A resumed
  run purges the events after its checkpoint's step, as metrics.jsonl drops those rows.
- ``wandb``: a W&B run under ``RUN/wandb/``, offline unless the user set ``WANDB_MODE``, so that a
  machine with no API key or no network neither waits nor fails (``wandb sync RUN/wandb/offline-run-*``
  uploads it later). Project ``$WANDB_PROJECT`` or "kdpipe", named after RUN, with the run's config.
  A resumed run is a new W&B run that starts at its step.

The packages are extras, imported only when asked for; a missing one is a one-line error naming
the extra to install (``pip install 'kdpipe[tensorboard]'``).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from .errors import BadValue
from .rundir import TENSORBOARD_DIR

class MissingExtra(BadValue):
    """A sink was asked for whose package is not installed (fixed by installing the extra)."""


class Sink(Protocol):
    def write(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def parse_sinks(spec: str) -> list[str]:
    """'tensorboard,wandb' -> ['tensorboard', 'wandb']; 'none' or '' -> []; an unknown name is refused."""
    names = [s.strip() for s in spec.split(",") if s.strip() and s.strip() != "none"]
    unknown = [s for s in names if s not in SINKS]
    if unknown:
        raise BadValue(f"unknown --log {', '.join(unknown)}; valid: {', '.join(SINKS)} (comma-separated) or none")
    return list(dict.fromkeys(names))


def require(sink: str) -> ModuleType:
    """The sink's package, or MissingExtra naming the extra that installs it."""
    try:
        return importlib.import_module(sink)
    except ImportError:
        raise MissingExtra(f"--log {sink} needs the {sink} package: pip install 'kdpipe[{sink}]'") from None


def check_sinks(spec: str) -> list[str]:
    """The sinks ``spec`` names, each package importable: call it before a run starts, on every rank."""
    names = parse_sinks(spec)
    for name in names:
        require(name)
    return names


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row -> {"kind/key": value}: nested dicts flattened (train/terms/crd), the key's
    own kind prefix dropped (val_cos -> val/cos), non-numbers, the kind and the step left out."""
    kind, out = row["kind"], {}
    for key, value in row.items():
        name = f"{kind}/{key.removeprefix(kind + '_')}"
        if isinstance(value, dict):
            out.update({f"{name}/{k}": float(v) for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)) and key not in ("kind", "step"):
            out[name] = float(value)
    return out


class TensorBoardSink:
    """Rows as TensorBoard scalars in RUN/tensorboard/."""

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None) -> None:
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415  (needs the extra)

        purge = None if resume_step is None else resume_step + 1  # events a killed run wrote after its checkpoint
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge)

    def write(self, row: dict[str, Any]) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=row["step"])
        if row["kind"] == "val":  # validations are rare and the figures people wait for
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Rows as a W&B run in RUN/wandb/, offline unless WANDB_MODE says otherwise."""

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None) -> None:
        del resume_step  # a resumed run is a new W&B run, starting at its step
        wandb = require("wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "kdpipe"), name=run_dir.name,
                              dir=str(run_dir), config=config, mode=os.environ.get("WANDB_MODE", "offline"))

    def write(self, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


# each name is also its package's and its kdpipe extra's
SINKS: dict[str, type[TensorBoardSink] | type[WandbSink]] = {"tensorboard": TensorBoardSink, "wandb": WandbSink}


def open_sinks(spec: str, run_dir: Path, config: dict[str, Any], resume_step: int | None) -> list[Sink]:
    """The sinks ``spec`` names, open on ``run_dir``; ``resume_step``: the checkpoint's step of a resumed run."""
    return [SINKS[name](run_dir, config, resume_step) for name in parse_sinks(spec)]
