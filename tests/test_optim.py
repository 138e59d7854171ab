"""Optimiser pieces shared by train and pretrain: the LR schedule's values and the parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdpipe.optim import lr_lambda, param_groups


def test_warmup_is_linear_and_ends_at_one():
    f = lr_lambda(total=100, warmup=10, floor=0.1)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(9) == 1.0 and f(10) == 1.0  # warm-up end, then the cosine starts at its top


def test_cosine_reaches_the_floor_at_the_last_step_and_stays_there():
    f = lr_lambda(total=100, warmup=10, floor=0.1)
    assert f(99) == pytest.approx(0.1, abs=1e-12)  # the last step (total - 1) runs at the floor
    assert f(98) > 0.1 and f(150) == pytest.approx(0.1, abs=1e-12)


def test_cosine_midpoint_is_halfway_between_one_and_the_floor():
    # no warm-up, 11 steps: step 5 is half-way through the cosine (progress 5/10)
    f = lr_lambda(total=11, warmup=0, floor=0.2)
    assert f(5) == pytest.approx(0.2 + 0.8 * 0.5)
    assert f(2) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.2)))


def test_param_groups_decay_only_matrices_and_skip_frozen():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Conv2d(4, 2, 1))
    model.scale = nn.Parameter(torch.ones([]))  # a logit scale: 0-dim
    model.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)
    decay, no_decay = param_groups(model, weight_decay=0.05)
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(decay) == {id(model[0].weight), id(model[2].weight)}  # Linear [4, 3], Conv [2, 4, 1, 1]
    assert ids(no_decay) == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].bias),
                             id(model.scale)}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert id(model.frozen) not in ids(decay) | ids(no_decay)


def test_param_groups_drive_adamw_decay():
    """Only the decayed group shrinks under pure weight decay (zero gradients)."""
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(1.0)
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.5), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(model.weight, torch.full((2, 2), 1 - 0.1 * 0.5))
    assert torch.equal(model.bias, torch.ones(2))
