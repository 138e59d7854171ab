"""Optimiser pieces shared by the training stages: parameter groups and the LR schedule.

Pure functions of a module or a step number (no files, no devices), used by ``train`` (students)
and ``pretrain`` (teachers) so both decay the same parameters and warm up the same way.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and logit scales (parameters with < 2 dims)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(total: int, warmup: int, floor: float) -> Callable[[int], float]:
    """LR multiplier of step ``step`` (0-based): linear warmup to 1 over ``warmup`` steps, then
    cosine down to ``floor``, reached by the last step (``total − 1``)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f
