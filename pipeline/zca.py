"""Whitening math: streaming moments, ZCA/PCA fit, apply, invert.

Pure numpy/torch, no files. Conventions (row vectors, as embeddings are stored):

    z = (x - mu) @ W.T          apply(w, x)      x [N, D] -> z [N, D]
    x = z @ W_inv.T + mu        invert(w, z)     z [N, D] -> x [N, D]

so that, with C the (population) covariance of the fitted data, ``W @ C @ W.T ≈ I``. A model
that learnt whitened targets gives directions s only; ``map_back_torch`` returns them to the
original space as ``normalise(r · normalise(s) @ W_inv.T + mu)``, ``r = whitened_rms(w)``.

ZCA: ``W = U diag(s) Uᵀ`` (the symmetric whitening; it rotates least, so whitened features stay
closest to the originals). PCA: ``W = diag(s) Uᵀ`` (coordinates along the principal axes, largest
variance first). Full whitening has ``s = (λ+ε)^-1/2``; ``ε = eps_rel × mean(λ)``: a relative
floor, so the same ``eps_rel`` means the same thing whatever the scale of the embeddings.

Variants (``Variant``) change only the per-direction scales s, so W stays exactly invertible:

- shrinkage γ: ``ε = γ·mean(λ)``, i.e. whitening Σ + γ·mean(λ)·I (γ = eps_rel; large γ ≈ no whitening);
- partial power α: ``s = (λ+ε)^(−α/2)``: α = 1 whitens, α = 0 only centres, α = ½ halves the
  log-spread of the spectrum (λ_max/λ_min → its square root);
- PCA-truncated, share p: only the top k directions that hold a share p of the variance are scaled;
  the other D − k keep s = 1 (as they are: small next to the whitened ones, so mostly dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BadValue
from .registry import Registry

Array = TypeVar("Array", np.ndarray, torch.Tensor)


# --------------------------------------------------------------------------- streaming moments


class RunningMoments:
    """Streaming mean and covariance in float64, merge-able across chunks, shards and ranks.

    Keeps ``n``, ``mean`` [D] and ``m2`` [D, D] = Σ (x − mean)(x − mean)ᵀ, combined chunk by
    chunk with Chan et al.'s pairwise update. This is the "sum and sum of outer products" of
    the design, but centred: raw Σ x xᵀ − n μ μᵀ cancels catastrophically when the mean is
    large against the spread (normalised CLIP features have |μ| ≈ 0.5–0.8, per-axis variance
    ≈ 1/D), while the centred form loses nothing and costs one subtraction per chunk.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.n = 0
        self.mean_ = np.zeros(dim, np.float64)
        self.m2 = np.zeros((dim, dim), np.float64)

    def update(self, x: np.ndarray | torch.Tensor) -> "RunningMoments":
        """Add rows x [N, D] (any float dtype; accumulated in float64)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape [N, {self.dim}], got {list(x.shape)}")
        if len(x) == 0:
            return self
        xc = _as_float64(x, copy=True)  # a private copy, centred in place
        mean = xc.mean(axis=0)
        xc -= mean
        self._combine(len(xc), mean, xc.T @ xc)  # numpy routes a.T @ a to BLAS syrk
        return self

    def merge(self, other: "RunningMoments") -> "RunningMoments":
        """Fold another accumulator into this one (in place) and return self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dim {other.dim} into dim {self.dim}")
        if other.n:
            self._combine(other.n, other.mean_, other.m2)
        return self

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a, n = self.n, self.n + n_b
        delta = mean_b - self.mean_
        self.m2 += m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.mean_ += delta * (n_b / n)
        self.n = n

    def copy(self) -> "RunningMoments":
        out = RunningMoments(self.dim)
        out.n, out.mean_, out.m2 = self.n, self.mean_.copy(), self.m2.copy()
        return out

    def mean(self) -> np.ndarray:
        """[D] float64."""
        return self.mean_.copy()

    def cov(self, unbiased: bool = False) -> np.ndarray:
        """[D, D] float64. Population covariance (÷ n) by default — the one whitening makes
        exactly I on the fitted data; ``unbiased=True`` divides by n − 1."""
        denom = self.n - 1 if unbiased else self.n
        if denom <= 0:
            raise ValueError(f"covariance needs more rows, have n = {self.n}")
        return self.m2 / denom


def _as_float64(x: np.ndarray | torch.Tensor, copy: bool = False) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.array(x, dtype=np.float64, copy=True) if copy else np.asarray(x, dtype=np.float64)


def merged(*moments: RunningMoments) -> RunningMoments:
    """A new accumulator holding all the given ones (e.g. joint = image + text)."""
    out = RunningMoments(moments[0].dim)
    for m in moments:
        out.merge(m)
    return out


# --------------------------------------------------------------------------- fit


@dataclass
class Whitening:
    """A fitted whitening transform. All arrays float64 numpy.

    mu [D], W [D, D], W_inv [D, D], eigvals [D] (of the fitted covariance, descending),
    eps (absolute ε added to every eigenvalue), n (rows fitted), method ("zca" | "pca").
    """

    mu: np.ndarray
    W: np.ndarray
    W_inv: np.ndarray
    eigvals: np.ndarray
    eps: float
    n: int
    method: str
    power: float = 1.0  # α: directions scaled by (λ+ε)^(−α/2)
    top_k: int | None = None  # the directions scaled (largest first); None: all D

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @property
    def scales(self) -> np.ndarray:
        """s [D]: the factor each principal direction (largest λ first) is multiplied by."""
        return direction_scales(self.eigvals, self.eps, self.power, self.top_k)

    @property
    def is_full(self) -> bool:
        """Whether every direction is whitened (α = 1, no truncation): W C Wᵀ = I − εWWᵀ."""
        return self.power == 1.0 and (self.top_k is None or self.top_k == self.dim)


DEFAULT_EPS_REL = 1e-4


@dataclass(frozen=True)
class Variant:
    """Which whitening to fit, beyond the method (module docstring). The defaults are full ZCA/PCA.

    shrink γ (ε = γ·mean(λ)), power α in (0, 1], share p in (0, 1] of the variance held by the
    whitened top directions (None: all directions).
    """

    shrink: float = DEFAULT_EPS_REL
    power: float = 1.0
    share: float | None = None

    def __post_init__(self) -> None:
        if not self.shrink >= 0:
            raise BadValue(f"whitening shrink (eps_rel) must be >= 0, got {self.shrink}")
        if not 0 < self.power <= 1:
            raise BadValue(f"whitening power alpha must be in (0, 1], got {self.power}")
        if self.share is not None and not 0 < self.share <= 1:
            raise BadValue(f"whitening share must be in (0, 1], got {self.share}")

    @property
    def name(self) -> str:
        """Canonical spelling: "full" for the defaults, else its non-default parts, e.g. "alpha=0.5,top=0.9"."""
        parts = [f"alpha={self.power:g}"] if self.power != 1.0 else []
        parts += [f"shrink={self.shrink:g}"] if self.shrink != DEFAULT_EPS_REL else []
        parts += [f"top={self.share:g}"] if self.share is not None else []
        return ",".join(parts) or "full"


VARIANT_KEYS = {"alpha": "power", "shrink": "shrink", "top": "share"}


def parse_variant(spec: str) -> Variant:
    """``"full"`` or comma-separated ``alpha=A``, ``shrink=G``, ``top=P`` -> Variant (bad input raises)."""
    spec = spec.strip()
    if spec in ("", "full"):
        return Variant()
    kwargs: dict[str, float] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in VARIANT_KEYS:
            raise BadValue(f"bad whitening variant part {part!r} in {spec!r}; expected 'full' or "
                           f"comma-separated {', '.join(k + '=NUMBER' for k in VARIANT_KEYS)}")
        try:
            kwargs[VARIANT_KEYS[key.strip()]] = float(value)
        except ValueError:
            raise BadValue(f"whitening variant {spec!r}: {key.strip()} needs a number, got {value!r}") from None
    return Variant(**kwargs)


def top_k_of_share(eigvals: np.ndarray, share: float | None) -> int | None:
    """The fewest leading directions whose eigenvalues hold ``share`` of the total (None: all)."""
    if share is None:
        return None
    cum = np.cumsum(eigvals) / max(float(eigvals.sum()), 1e-300)
    return int(min(np.searchsorted(cum, share - 1e-12) + 1, len(eigvals)))


def direction_scales(eigvals: np.ndarray, eps: float, power: float = 1.0, top_k: int | None = None) -> np.ndarray:
    """s [D] = (λ+ε)^(−α/2) on the top_k directions (all when None), 1 on the others."""
    s = (eigvals + eps) ** (-power / 2)
    if top_k is not None:
        s[top_k:] = 1.0
    return s


# method name -> (U [D, D], s [D] = (λ+ε)^-1/2) -> (W, W_inv)
Builder = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
METHODS: Registry[Builder] = Registry("whitening method")


@METHODS.register("zca")
def _zca(u: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (u * s) @ u.T, (u / s) @ u.T


@METHODS.register("pca")
def _pca(u: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return s[:, None] * u.T, u / s


def eigh_descending(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric [D, D] matrix in float64, largest first.

    Eigenvalues are clipped at 0 (rounding can make the smallest slightly negative); each
    eigenvector's sign is fixed (largest-magnitude entry positive) so PCA output is
    reproducible across LAPACK builds.
    """
    lam, u = np.linalg.eigh(np.asarray(cov, np.float64))
    lam, u = np.clip(lam[::-1], 0.0, None), u[:, ::-1]
    signs = np.sign(u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])])
    return lam, u * np.where(signs == 0, 1.0, signs)


def fit(moments: RunningMoments, eps_rel: float = DEFAULT_EPS_REL, method: str = "zca",
        power: float = 1.0, share: float | None = None) -> Whitening:
    """Fit a whitening transform to accumulated moments (population covariance).

    eps_rel is the shrinkage γ, power the partial exponent α, share the variance share of the
    whitened top directions (``Variant``; ``fit_variant`` takes one).
    """
    build = METHODS.get(method)
    Variant(eps_rel, power, share)  # validates
    if moments.n <= moments.dim:
        raise ValueError(f"whitening {moments.dim}-dim features needs more than {moments.dim} rows, "
                         f"got {moments.n}: the covariance would be singular")
    lam, u = eigh_descending(moments.cov())
    eps = float(eps_rel * lam.mean())
    top_k = top_k_of_share(lam, share)
    smallest = lam[(top_k or len(lam)) - 1]
    if smallest + eps <= 1e-12 * lam[0]:  # numerically singular: its inverse square root is noise
        rank = int((lam > 0).sum())
        raise BadValue(f"the covariance is singular (rank {rank} < {moments.dim}) and eps_rel is 0: "
                       "use eps_rel > 0 (or whiten fewer directions: share < 1)")
    w, w_inv = build(u, direction_scales(lam, eps, power, top_k))
    return Whitening(moments.mean(), w, w_inv, lam, eps, moments.n, method, power, top_k)


def fit_variant(moments: RunningMoments, variant: Variant, method: str = "zca") -> Whitening:
    """``fit`` with the variant's shrink, power and share."""
    return fit(moments, variant.shrink, method, variant.power, variant.share)


def whitened_cov(w: Whitening, cov: np.ndarray) -> np.ndarray:
    """Covariance of the whitened data, W C Wᵀ [D, D] (float64), given its input covariance."""
    return w.W @ cov @ w.W.T


def eps_target(w: Whitening) -> np.ndarray:
    """W C Wᵀ a full whitening (``is_full``) produces on its own data: I shrunk by ε, = I − ε W Wᵀ [D, D].

    (A partial or truncated one is not white by design: compare with ``whitened_cov`` of the
    fitted covariance instead.)

    (ZCA: U diag(λ/(λ+ε)) Uᵀ; PCA: diag(λ/(λ+ε)).) Its largest gap to I is ε / (λ_min + ε):
    when that exceeds a tolerance, ε — not the data or the arithmetic — sets how white the
    result is, and whitened data should be compared with this target instead of I.
    """
    return np.eye(w.dim) - w.eps * (w.W @ w.W.T)


def eps_max_deviation(w: Whitening) -> float:
    """max_i ε / (λ_i + ε) over the whitened directions: how far from 1 the smallest whitened
    variance of a full whitening is, by design."""
    smallest = w.eigvals[(w.top_k or w.dim) - 1]
    return float(w.eps / (smallest + w.eps)) if w.eps > 0 else 0.0


def whitened_rms(w: Whitening) -> float:
    """r = √(Σ λ s²) = √tr(W C Wᵀ): the RMS norm of the whitened rows it was fitted on
    (full whitening: √(Σ λ/(λ+ε))).

    A student trained against whitened targets learns their direction only (every loss
    normalises), so r is the length that direction is given back before un-whitening.
    """
    return float(np.sqrt((w.eigvals * w.scales ** 2).sum()))


# --------------------------------------------------------------------------- apply / invert


def apply(w: Whitening, x: Array) -> Array:
    """z = (x − μ) Wᵀ. x [N, D] numpy or torch; torch keeps its device and float dtype."""
    if isinstance(x, torch.Tensor):
        return apply_torch(x, *_torch_params(w.mu, w.W, x))
    return (np.asarray(x, np.float64) - w.mu) @ w.W.T


def invert(w: Whitening, z: Array) -> Array:
    """x = z W⁻¹ᵀ + μ. z [N, D] numpy or torch."""
    if isinstance(z, torch.Tensor):
        mu, w_inv = _torch_params(w.mu, w.W_inv, z)
        return invert_torch(z, mu, w_inv)
    return np.asarray(z, np.float64) @ w.W_inv.T + w.mu


def apply_torch(x: torch.Tensor, mu: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """z = (x − μ) Wᵀ on x's device. x [N, D], mu [D], W [D, D] (same dtype as x, or cast here)."""
    return (x - mu.to(x)) @ W.to(x).T


def invert_torch(z: torch.Tensor, mu: torch.Tensor, W_inv: torch.Tensor) -> torch.Tensor:
    """x = z W⁻¹ᵀ + μ. z [N, D], mu [D], W_inv [D, D]."""
    return z @ W_inv.to(z).T + mu.to(z)


def map_back_torch(s: torch.Tensor, mu: torch.Tensor, W_inv: torch.Tensor, scale: float) -> torch.Tensor:
    """Whitened-space directions s [N, D] (any row norm) -> unit rows [N, D] in the original space.

    t̂ = normalise(invert(r · normalise(s))): only the direction of s carries information, and
    ``scale`` r (``whitened_rms``) restores the typical whitened length before μ is added back,
    so that μ weighs as much as it did in the fitted data. Computed in float32 on s's device.
    """
    s = F.normalize(s.float(), dim=-1)
    return F.normalize(invert_torch(scale * s, mu, W_inv), dim=-1)


def to_torch(w: Whitening, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """{"mu", "W", "W_inv"} as tensors, for the trainer (apply_torch / invert_torch)."""
    return {k: torch.as_tensor(getattr(w, k), dtype=dtype, device=device) for k in ("mu", "W", "W_inv")}


def _torch_params(mu: np.ndarray, m: np.ndarray, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return (torch.as_tensor(mu, dtype=dtype, device=like.device),
            torch.as_tensor(m, dtype=dtype, device=like.device))


# --------------------------------------------------------------------------- sampling band


def eigen_band(n: int, d: int) -> tuple[float, float]:
    """Marchenko–Pastur support [(1 − √(d/n))², (1 + √(d/n))²].

    Where the eigenvalues of the sample covariance of n truly white d-dim rows fall from
    sampling alone (large n, d). Whitened held-out data with eigenvalues far outside it
    differ from the training distribution, or ε shrank those directions. For n < d the
    lower edge is the support of the non-zero eigenvalues; d − n of them are exactly 0.
    """
    if n <= 0 or d <= 0:
        raise ValueError(f"eigen_band needs n, d > 0, got n={n}, d={d}")
    r = np.sqrt(d / n)
    return float((1 - r) ** 2), float((1 + r) ** 2)
