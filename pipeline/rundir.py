"""The run directory: the folder `kdpipe train --out RUN` fills and every later stage reads.

Knows files, not models. It owns

- the name of every file of a run (no other module spells them out);
- ``require_run``: the one check that a folder is a run, with one error saying what is missing
  and what to pass;
- ``RunSpec``: RUN/student.json read once into typed fields, tolerating what older runs lack.

A run holds, in the order it is written::

    RUN/config.toml                 the resolved training config          (train)
    RUN/metrics.jsonl, curves.png   train and validation rows, their plot (train)
    RUN/tensorboard/, RUN/wandb/    the same rows, with --log tensorboard / wandb (runlog)
    RUN/checkpoints/                full training state to resume         (trainstate)
    RUN/whitening.safetensors       back-maps of a whitened run           (train)
    RUN/student-best.safetensors    the best validation score's weights   (students.save_weights)
    RUN/student-last.safetensors    the final step's weights
    RUN/student.json                how to rebuild the students; last     (students.write_spec)
    RUN/eval.json                                                         (evaluate)
    RUN/bench.json, bench.png, student_image.onnx                         (bench)
    RUN/bench_compare.{json,png}    several runs benched together, in the first one by default

``student.json`` is written last, so a folder holding it is a finished run. Runs saved before
best and last were kept apart hold one ``student.safetensors`` (the last weights) instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import read_toml
from .errors import BadValue, MissingInput

SPEC_FILE = "student.json"
CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"  # runlog's TensorBoard events; W&B names its own folder RUN/wandb/
WHITENING_FILE = "whitening.safetensors"
CKPT_DIR = "checkpoints"
LATEST_CKPT, PREVIOUS_CKPT, BEST_CKPT = "latest.pt", "previous.pt", "best.pt"  # in CKPT_DIR (trainstate writes them)
LEGACY_WEIGHTS_FILE = "student.safetensors"  # runs saved before best and last were kept apart: the last weights
EVAL_JSON = "eval.json"
BENCH_JSON, BENCH_PNG = "bench.json", "bench.png"
COMPARE_JSON, COMPARE_PNG = "bench_compare.json", "bench_compare.png"
ONNX_FILE = "student_image.onnx"
CHECKPOINTS = ("best", "last")  # the best validation score's weights, and the final step's
VALIDATED_SPLIT = "val"  # the cache split train validates on, so the one best.pt is picked on

TRAIN_HINT = "pass the --out folder of a finished `kdpipe train` run"


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether RUN holds a training checkpoint to continue (the latest, or the one before it)."""
    folder = Path(run_dir) / CKPT_DIR
    return (folder / LATEST_CKPT).exists() or (folder / PREVIOUS_CKPT).exists()


# --------------------------------------------------------------------------- names


def check_checkpoint(checkpoint: str) -> str:
    """``checkpoint`` if it names one of ``CHECKPOINTS``, else a ValueError listing them."""
    if checkpoint not in CHECKPOINTS:
        raise BadValue(f"unknown checkpoint {checkpoint!r}; valid: {', '.join(CHECKPOINTS)}")
    return checkpoint


def weights_file(checkpoint: str) -> str:
    """"best" -> "student-best.safetensors"."""
    return f"student-{check_checkpoint(checkpoint)}.safetensors"


def describe_checkpoint(entry: Any) -> str | None:
    """{"name": "best", "step": 12} -> "best (step 12)"; "last" when no step is recorded.

    ``entry`` is the ``checkpoint`` that eval.json / bench.json record (the weights they judged);
    None when it names none (files written before they recorded it).
    """
    if not isinstance(entry, dict) or "name" not in entry:
        return None
    step = entry.get("step")
    return entry["name"] + ("" if step is None else f" (step {step})")


def picked_on_split(entry: Any, split: str | None) -> bool:
    """Were the weights that eval.json judged (its ``checkpoint``) chosen by validation on ``split`` itself?
    best weights on the split train validates on, unless they are the last (no choice was made)."""
    return (isinstance(entry, dict) and entry.get("name") == "best" and entry.get("same_as") != "last"
            and split == VALIDATED_SPLIT)


# --------------------------------------------------------------------------- is this a run?


def _either(names: tuple[str, ...]) -> str:
    """("a", "b", "c") -> "a, b or c"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def require_run(path: str | Path, any_of: tuple[str, ...] = (SPEC_FILE,)) -> Path:
    """``path`` as a Path when it is a directory holding at least one of ``any_of``, else FileNotFoundError.

    The default asks for a finished training run (student.json is written last). A reader that
    can make do with later stages' files (the report) passes them too.
    """
    path = Path(path)
    if not path.is_dir():
        raise MissingInput(f"run directory {path} does not exist; {TRAIN_HINT}")
    if not any((path / name).is_file() for name in any_of):
        raise MissingInput(f"{path} holds no {_either(any_of)}: not a kdpipe run; {TRAIN_HINT}")
    return path


# --------------------------------------------------------------------------- reading files


def read_json(path: Path) -> dict[str, Any] | None:
    """A run's JSON file as a dict; None when it is absent, a ValueError naming it when it is not JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BadValue(f"{path} is not valid JSON ({err})") from None


def read_config(run: Path) -> dict[str, Any] | None:
    """RUN/config.toml as a dict (``config.read_toml``: dashes in keys read as underscores); None when
    absent, a ``ConfigError`` (a ValueError) naming it when it is not TOML."""
    path = run / CONFIG_FILE
    return read_toml(path) if path.is_file() else None


def _name(entry: Any) -> str | None:
    return entry.get("name") if isinstance(entry, dict) else None


def _whitening_mode(w: Any) -> Any:
    """{"mode": "joint", ...}, "joint", None, "none" or False -> "joint" / None."""
    mode = w.get("mode") if isinstance(w, dict) else w
    return None if mode in (None, False, "none") else mode


@dataclass(frozen=True)
class RunSpec:
    """RUN/student.json, typed: what the stages after train read about a run.

    Every field is optional: runs saved by older versions lack some (``labels_used``, the
    whitening file, ``interpolation``) and each reader decides whether it can do without.
    ``raw`` is the JSON as read; the student builders (``students.load_student``) use it.
    """

    image_name: str | None = None
    text_name: str | None = None  # None: an image-only student (captions go through the teacher)
    teacher: dict[str, Any] | None = None  # the teacher's fingerprint (store.describe_teacher)
    cache: str | None = None  # the cache it was trained on
    whitening: str | None = None  # "image" | "text" | "joint" | "separate" as recorded; None: not whitened
    whitening_file: str | None = None  # RUN/whitening.safetensors, when train kept the back-maps
    loss_weights: dict[str, float] | str | None = None  # {"fd": 7.8, "crd": 1.0}; a "fd=7.8,crd=1" string in old runs
    loss_options: dict[str, Any] | None = None
    labels_recorded: bool = False  # False: saved before student.json recorded labels_used
    labels_used: dict[str, Any] | None = None  # {"losses", "classnames"} when losses trained on class labels
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None  # None: the teacher's (older runs did not record it)
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunSpec:
        """A parsed student.json (any version) -> RunSpec; a field of the wrong kind reads as absent."""
        w, losses = d.get("whitening"), d.get("losses")
        teacher = d.get("teacher")
        return cls(
            image_name=_name(d.get("image")),
            text_name=_name(d.get("text")),
            teacher=teacher if isinstance(teacher, dict) else None,
            cache=d.get("cache"),
            whitening=_whitening_mode(w),
            whitening_file=w.get("file") if isinstance(w, dict) else None,
            loss_weights=losses.get("weights") if isinstance(losses, dict) else losses,
            loss_options=losses.get("options") if isinstance(losses, dict) else None,
            labels_recorded="labels_used" in d,
            labels_used=d.get("labels_used") or None,
            image_size=d.get("image_size"),
            mean=tuple(d["mean"]) if d.get("mean") is not None else None,
            std=tuple(d["std"]) if d.get("std") is not None else None,
            interpolation=d.get("interpolation"),
            raw=d,
        )


def read_spec(run: str | Path) -> RunSpec:
    """RUN/student.json of a finished run (``require_run`` first) as a RunSpec."""
    run = require_run(run)
    return RunSpec.from_json(read_json(run / SPEC_FILE))
