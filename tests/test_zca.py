"""Unit tests for kdpipe.zca against independent numpy/scipy references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from kdpipe import zca


def correlated(n: int, d: int, seed: int = 0, offset: float = 0.5) -> np.ndarray:
    """n rows of d-dim data with a random rotation, spread-out variances and a mean offset."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = np.geomspace(3.0, 0.05, d)
    return rng.standard_normal((n, d)) * scales @ q.T + offset * rng.standard_normal(d)


def moments_of(x: np.ndarray) -> zca.RunningMoments:
    return zca.RunningMoments(x.shape[1]).update(x)


def test_moments_match_numpy_one_pass():
    x = correlated(1500, 20)
    m = moments_of(x)
    assert m.n == 1500
    np.testing.assert_allclose(m.mean(), x.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(m.cov(), np.cov(x.T, bias=True), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(m.cov(unbiased=True), np.cov(x.T), rtol=1e-10, atol=1e-14)


def test_streaming_many_uneven_chunks_equals_one_pass():
    x = correlated(2000, 16, seed=1)
    one = moments_of(x)
    rng = np.random.default_rng(3)
    cuts = np.sort(rng.choice(np.arange(1, 2000), 40, replace=False))
    streamed = zca.RunningMoments(16)
    for chunk in np.split(x, cuts):
        streamed.update(chunk.astype(np.float32) if len(chunk) % 2 else chunk)  # mixed dtypes too
    streamed.update(np.zeros((0, 16)))  # empty chunks are no-ops
    # float32 chunks round the inputs: compare with the same rounding applied to one pass
    ref = moments_of(np.concatenate([c.astype(np.float32) if len(c) % 2 else c for c in np.split(x, cuts)]))
    assert streamed.n == one.n == 2000
    np.testing.assert_allclose(streamed.cov(), ref.cov(), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(streamed.mean(), ref.mean(), rtol=0, atol=1e-12)


def test_merge_equals_one_pass_and_leaves_other_untouched():
    x = correlated(900, 12, seed=2)
    a, b = moments_of(x[:300]), moments_of(x[300:])
    b_cov = b.cov().copy()
    joint = zca.merged(a, b)
    np.testing.assert_allclose(joint.cov(), np.cov(x.T, bias=True), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(b.cov(), b_cov)  # merged() copies
    assert a.copy().merge(zca.RunningMoments(12)).n == 300


def test_centred_accumulation_survives_a_large_mean():
    """Raw Σxxᵀ − nμμᵀ loses every digit here (mean 1e6, std 1e-2); the centred update does not."""
    rng = np.random.default_rng(4)
    x = 1e6 + 1e-2 * rng.standard_normal((4000, 4))
    m = zca.RunningMoments(4)
    for chunk in np.array_split(x, 17):
        m.update(chunk)
    ref = np.cov(x.T, bias=True)
    np.testing.assert_allclose(m.cov(), ref, rtol=1e-6, atol=1e-12)
    naive = (x.T @ x - len(x) * np.outer(x.mean(0), x.mean(0))) / len(x)
    assert np.abs(naive - ref).max() > 1e-3  # the failure mode this design avoids


def test_zca_matches_scipy_matrix_powers():
    x = correlated(3000, 24, seed=5)
    eps_rel = 1e-3
    w = zca.fit(moments_of(x), eps_rel=eps_rel, method="zca")
    cov = np.cov(x.T, bias=True)
    lam = scipy.linalg.eigh(cov, eigvals_only=True)
    eps = eps_rel * lam.mean()
    shifted = cov + eps * np.eye(24)
    np.testing.assert_allclose(w.eps, eps, rtol=1e-12)
    np.testing.assert_allclose(w.mu, x.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(w.W, scipy.linalg.fractional_matrix_power(shifted, -0.5).real, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(w.W_inv, scipy.linalg.sqrtm(shifted).real, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(w.eigvals, lam[::-1], rtol=1e-9, atol=1e-15)
    assert np.all(np.diff(w.eigvals) <= 0) and w.n == 3000 and w.method == "zca"
    np.testing.assert_allclose(w.W, w.W.T, atol=1e-12)  # ZCA is symmetric


@pytest.mark.parametrize("method", ["zca", "pca"])
def test_whitened_covariance_is_identity_and_inverse_round_trips(method):
    x = correlated(2500, 16, seed=6)
    w = zca.fit(moments_of(x), eps_rel=0.0, method=method)
    z = zca.apply(w, x)
    np.testing.assert_allclose(np.cov(z.T, bias=True), np.eye(16), atol=1e-9)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(w.W_inv @ w.W, np.eye(16), atol=1e-9)
    np.testing.assert_allclose(zca.invert(w, z), x, atol=1e-9)
    np.testing.assert_allclose(zca.whitened_cov(w, np.cov(x.T, bias=True)), np.eye(16), atol=1e-9)


def test_pca_is_zca_rotated_onto_principal_axes():
    x = correlated(2000, 10, seed=7)
    m = moments_of(x)
    w_zca, w_pca = zca.fit(m, method="zca"), zca.fit(m, method="pca")
    _, u = scipy.linalg.eigh(m.cov())
    u = u[:, ::-1]
    # PCA rows are the principal axes (up to sign), scaled; ZCA = U · PCA
    np.testing.assert_allclose(np.abs(w_pca.W / np.linalg.norm(w_pca.W, axis=1, keepdims=True)), np.abs(u.T), atol=1e-8)
    np.testing.assert_allclose(w_pca.W_inv @ w_pca.W, np.eye(10), atol=1e-9)
    axes = w_pca.W_inv / np.sqrt(w_pca.eigvals + w_pca.eps)  # PCA's W_inv = U diag(√(λ+ε))
    np.testing.assert_allclose(axes.T @ axes, np.eye(10), atol=1e-9)
    np.testing.assert_allclose(axes @ w_pca.W, w_zca.W, atol=1e-8)
    z = zca.apply(w_pca, x)
    np.testing.assert_allclose(np.var(z, axis=0), w_pca.eigvals / (w_pca.eigvals + w_pca.eps), rtol=1e-9)


def test_eps_shrinks_small_directions_exactly_as_predicted():
    x = correlated(2000, 12, seed=8)
    w = zca.fit(moments_of(x), eps_rel=0.5)
    c = np.cov(zca.apply(w, x).T, bias=True)
    target = zca.eps_target(w)
    np.testing.assert_allclose(c, target, atol=1e-9)
    # the smallest direction keeps variance λ/(λ+ε): the gap to I is ε/(λ_min+ε)
    dev = zca.eps_max_deviation(w)
    np.testing.assert_allclose(dev, w.eps / (w.eigvals[-1] + w.eps))
    np.testing.assert_allclose(1 - np.linalg.eigvalsh(c).min(), dev, rtol=1e-6)
    assert np.abs(c - np.eye(12)).max() > 0.1
    assert zca.eps_max_deviation(zca.fit(moments_of(x), eps_rel=0.0)) == 0.0


def test_torch_apply_matches_numpy_and_keeps_device_dtype():
    x = correlated(500, 8, seed=9)
    w = zca.fit(moments_of(x))
    xt = torch.from_numpy(x).float()
    z = zca.apply(w, xt)
    assert isinstance(z, torch.Tensor) and z.dtype == torch.float32
    np.testing.assert_allclose(z.numpy(), zca.apply(w, x), rtol=1e-4, atol=1e-4)
    p = zca.to_torch(w)
    z2 = zca.apply_torch(xt, p["mu"], p["W"])
    torch.testing.assert_close(z2, z)
    torch.testing.assert_close(zca.invert_torch(z2, p["mu"], p["W_inv"]), xt, rtol=1e-4, atol=1e-4)
    back = zca.invert(w, z2.double())
    assert back.dtype == torch.float64
    torch.testing.assert_close(back, torch.from_numpy(x), rtol=1e-4, atol=1e-5)


def test_eigen_band_formula_and_white_noise_falls_inside():
    assert zca.eigen_band(400, 100) == pytest.approx((0.25, 2.25))
    lo, hi = zca.eigen_band(4000, 200)
    rng = np.random.default_rng(10)
    lam = np.linalg.eigvalsh(np.cov(rng.standard_normal((4000, 200)).T, bias=True))
    assert lo * 0.9 < lam.min() < lo * 1.25 and hi * 0.9 < lam.max() < hi * 1.1
    with pytest.raises(ValueError):
        zca.eigen_band(0, 3)


def test_bad_inputs_are_refused():
    m = moments_of(correlated(8, 8))
    with pytest.raises(ValueError, match="more than 8 rows"):
        zca.fit(m)
    good = moments_of(correlated(100, 8))
    with pytest.raises(KeyError, match="valid: pca, zca"):
        zca.fit(good, method="cholesky")
    with pytest.raises(ValueError, match="eps_rel"):
        zca.fit(good, eps_rel=-1)
    flat = correlated(100, 8)
    flat[:, 3] = 0.0  # a direction with no variance at all
    with pytest.raises(ValueError, match="singular .* use eps_rel > 0"):
        zca.fit(moments_of(flat), eps_rel=0.0)
    assert np.isfinite(zca.fit(moments_of(flat), eps_rel=1e-4).W).all()
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        good.update(np.zeros((3, 7)))
    with pytest.raises(ValueError, match="dim"):
        good.merge(zca.RunningMoments(4))


# --------------------------------------------------------------------------- variants (shrink, partial, truncated)


def _whitened_eigvals(w: zca.Whitening, x: np.ndarray) -> np.ndarray:
    """Eigenvalues (descending) of the covariance of apply(w, x)."""
    z = zca.apply(w, x)
    return np.linalg.eigvalsh(np.cov(z.T, bias=True))[::-1]


@pytest.mark.parametrize("method", ["zca", "pca"])
@pytest.mark.parametrize("power", [0.25, 0.5, 0.75, 1.0])
def test_partial_whitening_scales_each_direction_by_its_power(method, power):
    x = correlated(3000, 12, seed=5)
    w = zca.fit(moments_of(x), eps_rel=0.0, method=method, power=power)
    lam = np.linalg.eigvalsh(np.cov(x.T, bias=True))[::-1]
    # W C Wᵀ's eigenvalues are λ·λ^(−α) = λ^(1−α), by hand from the data's own spectrum
    np.testing.assert_allclose(_whitened_eigvals(w, x), lam ** (1 - power), rtol=1e-8)
    if power == 0.5:  # the condition number falls to its square root
        cond = lam[0] / lam[-1]
        z = _whitened_eigvals(w, x)
        assert z[0] / z[-1] == pytest.approx(np.sqrt(cond), rel=1e-8)
    assert w.is_full == (power == 1.0)


@pytest.mark.parametrize("gamma", [0.01, 0.1, 1.0])
def test_shrinkage_whitens_sigma_plus_gamma_mean_lambda(gamma):
    x = correlated(3000, 10, seed=6)
    w = zca.fit_variant(moments_of(x), zca.Variant(shrink=gamma))
    lam = np.linalg.eigvalsh(np.cov(x.T, bias=True))[::-1]
    ridge = gamma * lam.mean()
    np.testing.assert_allclose(_whitened_eigvals(w, x), lam / (lam + ridge), rtol=1e-8)
    # the same W as inverting the square root of Σ + γ·mean(λ)·I directly (scipy)
    reference = np.linalg.inv(scipy.linalg.sqrtm(np.cov(x.T, bias=True) + ridge * np.eye(10)).real)
    np.testing.assert_allclose(w.W, reference, rtol=1e-7, atol=1e-9)


def test_truncated_whitens_the_top_directions_and_leaves_the_rest():
    x = correlated(4000, 10, seed=7)
    lam = np.linalg.eigvalsh(np.cov(x.T, bias=True))[::-1]
    share = 0.9
    k = int(np.argmax(np.cumsum(lam) / lam.sum() >= share)) + 1  # fewest leading directions holding 90%
    assert 1 < k < 10
    w = zca.fit(moments_of(x), eps_rel=0.0, share=share)
    assert w.top_k == k and not w.is_full
    expected = np.sort(np.concatenate([np.ones(k), lam[k:]]))[::-1]  # top k at variance 1, the rest as they were
    np.testing.assert_allclose(_whitened_eigvals(w, x), expected, rtol=1e-8)
    assert zca.fit(moments_of(x), eps_rel=0.0, share=1.0).top_k == 10


@pytest.mark.parametrize("variant", ["full", "alpha=0.5", "shrink=0.1", "top=0.8", "alpha=0.25,shrink=0.01,top=0.95"])
@pytest.mark.parametrize("method", ["zca", "pca"])
def test_every_variant_maps_back_exactly(variant, method):
    x = correlated(2000, 12, seed=8)
    w = zca.fit_variant(moments_of(x), zca.parse_variant(variant), method)
    np.testing.assert_allclose(zca.invert(w, zca.apply(w, x)), x, rtol=0, atol=1e-10)
    np.testing.assert_allclose(w.W @ w.W_inv, np.eye(12), atol=1e-10)
    # the back-map's length r is the RMS norm of the whitened rows it was fitted on
    z = zca.apply(w, x)
    assert zca.whitened_rms(w) == pytest.approx(np.sqrt((z ** 2).sum(axis=1).mean()), rel=1e-9)


def test_variant_names_round_trip_and_bad_specs_are_refused():
    for spec in ("full", "alpha=0.5", "shrink=0.1", "top=0.9", "alpha=0.25,shrink=0.01,top=0.95"):
        assert zca.parse_variant(spec).name == spec
    assert zca.parse_variant("top=0.9,alpha=0.5").name == "alpha=0.5,top=0.9"  # canonical order
    assert zca.parse_variant("") == zca.Variant()
    for bad, msg in (("alpha=0", "in \\(0, 1\\]"), ("alpha=1.5", "in \\(0, 1\\]"), ("top=0", "share"),
                     ("shrink=-1", ">= 0"), ("beta=1", "expected 'full'"), ("alpha", "expected 'full'"),
                     ("alpha=half", "needs a number")):
        with pytest.raises(ValueError, match=msg):
            zca.parse_variant(bad)
