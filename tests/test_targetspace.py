"""Target spaces: the map back against hand-built transforms, the scale, the mode table, the files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cache_factory import fake_teacher, make_fake_cache
from kdpipe import targetspace as TS
from kdpipe import whiten, zca
from kdpipe.store import CacheError, open_cache

DIM = 8


def hand_built(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """μ [D], a well-conditioned non-symmetric W [D, D] and its inverse, float64."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    w = q * torch.linspace(0.5, 3.0, DIM, dtype=torch.float64) + 0.1 * torch.triu(torch.ones(DIM, DIM))
    mu = 0.3 * torch.randn(DIM, generator=g, dtype=torch.float64)
    return mu, w, torch.linalg.inv(w)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A tiny fake cache with every transform fitted (image, text, joint)."""
    root = make_fake_cache(tmp_path_factory.mktemp("ts") / "cache", n_train=40, n_val=8, dim=DIM, shard_size=32)
    whiten.run(whiten.WhitenConfig(cache=root, check_train=False, progress=False))
    return root


# --------------------------------------------------------------------------- the map back


def test_whiten_then_map_back_returns_the_input():
    mu, w, w_inv = hand_built()
    x = torch.nn.functional.normalize(torch.randn(6, DIM, dtype=torch.float64), dim=-1)  # teacher rows
    z = zca.apply_torch(x, mu, w)  # the whitened targets
    for row, target in zip(z, x):  # r = that row's whitened length: the map is then exact
        back = TS.BackMap(mu.float(), w_inv.float(), float(row.norm()))(7.0 * row[None].float())
        torch.testing.assert_close(back[0], target.float(), atol=1e-5, rtol=0)


def test_one_scale_maps_a_whole_batch_back_when_rows_have_that_length():
    mu, w, w_inv = hand_built(1)
    r = 3.0
    z = r * torch.nn.functional.normalize(torch.randn(10, DIM, dtype=torch.float64), dim=-1)
    x = zca.invert_torch(z, mu, w_inv)  # rows whose whitened length is exactly r
    params = {"mu": mu.float(), "W": w.float(), "W_inv": w_inv.float(), "scale": torch.tensor(r)}
    student = 0.01 * TS.Targets("image", {"image": params}).apply(x.float(), "image")  # any norm
    expect = torch.nn.functional.normalize(x, dim=-1).float()
    torch.testing.assert_close(TS.to_teacher_space(student, params), expect, atol=1e-5, rtol=0)
    torch.testing.assert_close(TS.Space(image=TS.BackMap.from_params(params)).image_out(student), expect,
                               atol=1e-5, rtol=0)


def test_unwhitened_modalities_pass_through():
    x = torch.randn(4, DIM)
    targets = TS.Targets("image", {"image": {"mu": torch.ones(DIM), "W": 2 * torch.eye(DIM)}})
    assert torch.equal(targets.apply(x, "text"), x)
    torch.testing.assert_close(targets.apply(x, "image"), 2 * (x - 1))
    unit = torch.nn.functional.normalize(x, dim=-1)
    torch.testing.assert_close(TS.to_teacher_space(5 * x, None), unit)
    torch.testing.assert_close(TS.Space().text_out(5 * x), unit)


@pytest.mark.parametrize("method", ["zca", "pca"])
def test_scale_is_the_rms_norm_of_the_whitened_fit_rows(method):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, DIM)) @ rng.normal(size=(DIM, DIM)) + 2.0
    w = zca.fit(zca.RunningMoments(DIM).update(x), eps_rel=0.05, method=method)  # ε large enough to matter
    z = zca.apply(w, x)
    assert zca.whitened_rms(w) == pytest.approx(np.sqrt((z ** 2).sum(axis=1).mean()), rel=1e-9)
    assert zca.whitened_rms(w) < np.sqrt(DIM) - 0.01  # ε shortens it below √D


# --------------------------------------------------------------------------- the mode table


def test_mode_table():
    assert TS.WHITEN_MODES == ("none", "image", "text", "joint", "separate")
    assert TS.SPACES["none"] == {}
    assert TS.SPACES["joint"] == {"image": "joint", "text": "joint"}
    assert TS.SPACES["separate"] == {"image": "image", "text": "text"}
    assert TS.SPACES["text"] == {"text": "text"}
    assert TS.FITTED_ON == {"image": ("image",), "text": ("text",), "joint": ("image", "text")}
    for mode, space in TS.SPACES.items():  # every transform a space uses is fitted on what it maps
        for modality, fit_mode in space.items():
            assert modality in TS.FITTED_ON[fit_mode], (mode, modality)
    with pytest.raises(ValueError, match="valid: none, image, text, joint, separate"):
        TS.space_of("both")


def test_whitening_mode_of_student_json():
    assert TS.whitening_mode({}) is None
    assert TS.whitening_mode({"whitening": None}) is None
    assert TS.whitening_mode({"whitening": {"mode": "separate"}}) == "separate"
    assert TS.whitening_mode({"whitening": "joint"}) == "joint"
    with pytest.raises(ValueError, match="'both'"):
        TS.whitening_mode({"whitening": {"mode": "both"}})


# --------------------------------------------------------------------------- files


def test_reads_the_file_whiten_writes(tmp_path):
    rng = np.random.default_rng(1)
    fitted = {m: zca.fit(zca.RunningMoments(DIM).update(rng.normal(size=(50, DIM)))) for m in ("image", "joint")}
    teacher = fake_teacher(DIM)
    path = tmp_path / TS.WHITENING_H5
    whiten.write_whitening(path, fitted, teacher, 1e-4)
    for mode, w in fitted.items():
        back = TS.load_whitening(path, mode, expect_teacher=teacher)
        for name in TS.H5_ARRAYS:
            np.testing.assert_array_equal(getattr(back, name), getattr(w, name))
        assert (back.eps, back.n, back.method) == (w.eps, w.n, w.method)
    assert TS.whitening_info(path)["modes"] == ["image", "joint"]
    with pytest.raises(ValueError, match="--mode text"):
        TS.load_whitening(path, "text", expect_teacher=teacher)
    with pytest.raises(CacheError, match="another-vit"):
        TS.load_whitening(path, "image", expect_teacher={**teacher, "name": "another-vit"})


@pytest.mark.parametrize("mode", ["image", "text", "joint", "separate"])
def test_targets_use_the_transform_the_table_names(cache, mode):
    c = open_cache(cache)
    targets = TS.load_targets(c, mode)
    assert targets.source == str(cache / TS.WHITENING_H5) and set(targets.params) == set(TS.SPACES[mode])
    for modality, fit_mode in TS.SPACES[mode].items():
        w = TS.load_whitening(c, fit_mode)
        p = targets.params[modality]
        torch.testing.assert_close(p["W_inv"], torch.as_tensor(w.W_inv, dtype=torch.float32))
        assert float(p["scale"]) == pytest.approx(zca.whitened_rms(w), rel=1e-6)
    assert TS.load_targets(c, "none").params == {}


def test_run_copy_round_trips_and_the_cache_rebuilds_the_same_maps(cache, tmp_path):
    c = open_cache(cache)
    meta = TS.save_whitening(tmp_path, TS.load_targets(c, "separate"))
    assert meta["file"] == TS.RUN_WHITENING and set(meta["modalities"]) == {"image", "text"}
    assert set(load_file(str(tmp_path / TS.RUN_WHITENING))) == {
        f"{m}.{k}" for m in ("image", "text") for k in ("mu", "W", "W_inv", "scale")}
    from_run = TS.student_space(tmp_path, {"whitening": meta}, c, text_tower=True)
    from_cache = TS.cache_back_maps(c, "separate", ("image", "text"))
    for modality in ("image", "text"):
        a, b = getattr(from_run, modality), from_cache[modality]
        assert torch.equal(a.mu, b.mu) and torch.equal(a.w_inv, b.w_inv) and a.scale == b.scale
    assert not torch.equal(from_run.image.w_inv, from_run.text.w_inv)
    assert from_run.description == "teacher (mapped back from whitened separate: image, text)"


def test_image_only_student_maps_its_image_side_only(cache, tmp_path):
    c = open_cache(cache)
    space = TS.student_space(tmp_path, {"whitening": {"mode": "joint"}}, c, text_tower=False)  # no run copy
    assert space.text is None and space.image.scale == pytest.approx(zca.whitened_rms(TS.load_whitening(c, "joint")))
    assert TS.student_space(tmp_path, {"whitening": {"mode": "text"}}, c, text_tower=False) == TS.Space()
