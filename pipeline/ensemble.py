"""Which of a cache's teachers a student learns from (`kdpipe train --teachers A,B --teacher-weights`).

A cache may hold several teachers (docs/ARCHITECTURE.md, "Several teachers"). A run picks some of
them by name, in order, with positive weights normalised to sum 1. The student lives in the
*first* one's space (its embedding dim, preprocessing and cached targets); the batch's top-level
``t_img`` / ``t_txt`` are that teacher's. With more than one, the batch also carries every
teacher's targets (``losses``' ``teachers`` key), and the student reaches each other teacher's
space through a projection head (``teacher_heads``, Linear D_0 -> D_k, trained with the student
and dropped after training, like afd's fusion heads).

The primary's targets come from the tar shards; an added teacher's from its own h5 shards, joined
by key in the reader (``cachereader.TeacherShards``). A run on the primary alone reads nothing else,
so it is the run a single-teacher cache gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .errors import BadValue, UnknownName
from .store import Cache


@dataclass(frozen=True)
class Teacher:
    """One teacher of a run: its name in the cache, normalised weight, and what the losses need of it."""

    name: str
    weight: float
    embed_dim: int
    logit_scale: float
    fingerprint: dict[str, Any]
    primary: bool

    def record(self) -> dict[str, Any]:
        """What student.json keeps of it."""
        return {"name": self.name, "weight": self.weight, "embed_dim": self.embed_dim,
                "logit_scale": self.logit_scale, "fingerprint": self.fingerprint}


def select_teachers(cache: Cache, names: Sequence[str] | None, weights: Sequence[float] | None) -> list[Teacher]:
    """The run's teachers in order; default: the cache's first (primary) teacher alone, weight 1.

    Refuses an unknown or repeated name (listing the cache's), and weights that are not positive
    or not one per teacher.
    """
    table = cache.teachers()
    names = list(names) if names else [cache.primary]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise UnknownName(f"--teachers {','.join(unknown)}: cache {cache.root} has no such teacher; "
                          f"it has {', '.join(table)}")
    if len(set(names)) != len(names):
        raise BadValue(f"--teachers names a teacher twice: {','.join(names)}")
    norm = normalised_weights(weights, len(names))
    return [Teacher(n, w, int(table[n]["embed_dim"]), float(table[n]["logit_scale"]), table[n]["fingerprint"],
                    bool(table[n]["primary"])) for n, w in zip(names, norm)]


def normalised_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """``weights`` / their sum (equal weights when None); each must be a positive finite number."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise BadValue(f"--teacher-weights gives {len(weights)} weight(s) for {n} teacher(s); give one per teacher")
    if not all(0 < float(w) < float("inf") for w in weights):
        raise BadValue(f"--teacher-weights must all be positive, got {','.join(str(w) for w in weights)}")
    total = sum(float(w) for w in weights)
    return [float(w) / total for w in weights]


def teacher_heads(teachers: Sequence[Teacher]) -> nn.ModuleList:
    """One projection head per teacher after the first: Linear(D_0 -> D_k), no bias (empty for one teacher)."""
    return nn.ModuleList(nn.Linear(teachers[0].embed_dim, t.embed_dim, bias=False) for t in teachers[1:])


STUDENT_SIDES = ("s_img", "s_txt", "s_img_masked")


def teacher_views(feats: dict[str, torch.Tensor], targets: Sequence[dict[str, torch.Tensor]],
                  teachers: Sequence[Teacher], heads: nn.ModuleList) -> list[dict[str, Any]]:
    """The ``teachers`` list of the losses' batch: per teacher, its targets, weight and τ, and the
    student's features [B, D_0] through its head -> [B, D_k] (the first teacher's: as they are).

    targets[k]: {t_img, t_txt [B, D_k]} of teacher k.
    """
    out = []
    for k, (teacher, target) in enumerate(zip(teachers, targets, strict=True)):
        head = heads[k - 1] if k else nn.Identity()
        view: dict[str, Any] = {**target, "weight": teacher.weight, "logit_scale": teacher.logit_scale}
        view.update({side: head(feats[side]) for side in STUDENT_SIDES if side in feats})
        out.append(view)
    return out
