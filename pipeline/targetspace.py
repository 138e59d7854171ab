"""The space a student learns in, and the exact way back to the teacher's.

A student learns either the teacher's own (normalised) embeddings, the raw space, or targets
whitened by transforms that ``kdpipe fit-whitening`` fitted on the cache. This module owns
what the trainer and the evaluator must agree on; the math is in ``kdpipe.zca``.

- ``CACHE/whitening.h5`` (written by the whiten stage; an added teacher's in
  ``CACHE/teachers/NAME/``, ``whitening_path``): one group per fitted transform
  (``FIT_MODES``, and ``MODE@VARIANT`` for each extra variant of ``zca.Variant``, e.g.
  ``joint@alpha=0.5``), each with datasets ``H5_ARRAYS`` (float64) and attrs eps, n, method,
  power, top_k; root attrs teacher (fingerprint JSON), modes (JSON: the group names), eps_rel.
  ``load_whitening`` reads a group.
- The space table ``SPACES``: for each ``--whiten`` mode, the fitted transform each
  modality's targets go through (a modality not listed stays in the teacher's space).
  ``FITTED_ON``: the modalities each transform is fitted on. ``--whiten joint@alpha=0.5``
  is the same space through the variant's transforms (``space_of``).
- ``Targets``: teacher embeddings -> the student's space, z = (t − μ)Wᵀ per modality.
- The map back: t̂ = normalise(r · normalise(s) W⁻¹ᵀ + μ), r = √(Σ λ/(λ+ε)) the RMS norm
  of whitened train targets (``BackMap``, ``zca.map_back_torch``, ``zca.whitened_rms``).
- The run's copy ``RUN/whitening.safetensors`` ({modality}.{mu, W, W_inv, scale}, float32)
  and the ``whitening`` entry of student.json that names it (``save_whitening``); the
  evaluator reads them back (``student_space``), or rebuilds the maps from the cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import zca
from .errors import BadValue, MissingInput
from .rundir import WHITENING_FILE, RunSpec
from .store import Cache, CacheError, Manifest, describe_teacher, same_fingerprint

WHITENING_H5 = "whitening.h5"
RUN_WHITENING = WHITENING_FILE  # the run keeps its own copy of the maps: rundir names it
H5_ARRAYS = ("mu", "W", "W_inv", "eigvals")
RAW_SPACE = "teacher"

# fitted transform (a group of whitening.h5) -> the modalities whose rows it is fitted on
FITTED_ON: dict[str, tuple[str, ...]] = {"image": ("image",), "text": ("text",), "joint": ("image", "text")}
FIT_MODES = tuple(FITTED_ON)

# --whiten mode -> {modality: the fitted transform its targets go through}. "joint" keeps
# image-text alignment (one shared transform); "separate" gives each modality its own.
SPACES: dict[str, dict[str, str]] = {
    "none": {},
    "image": {"image": "image"},
    "text": {"text": "text"},
    "joint": {"image": "joint", "text": "joint"},
    "separate": {"image": "image", "text": "text"},
}
WHITEN_MODES = tuple(SPACES)
VARIANT_SEP = "@"  # joint@alpha=0.5: the joint space through the alpha=0.5 variant's transform
FULL = zca.Variant().name


def split_mode(mode: str) -> tuple[str, str]:
    """"joint@alpha=0.5" -> ("joint", "alpha=0.5") (variant canonical); "joint" -> ("joint", "full")."""
    base, _, variant = mode.partition(VARIANT_SEP)
    return base, zca.parse_variant(variant).name if variant else FULL


def group_name(fit_mode: str, variant: str = FULL) -> str:
    """The whitening.h5 group of a fitted transform: "joint" (full) or "joint@alpha=0.5"."""
    return fit_mode if variant == FULL else f"{fit_mode}{VARIANT_SEP}{variant}"


def space_of(mode: str) -> dict[str, str]:
    """{modality: whitening.h5 group} for a ``--whiten`` mode (optionally ``MODE@VARIANT``);
    unknown modes raise listing the valid ones."""
    base, variant = split_mode(mode)
    if base not in SPACES or (base == "none" and variant != FULL):
        raise BadValue(f"unknown whitening mode {mode!r}; valid: {', '.join(WHITEN_MODES)}, each but none "
                       f"optionally @VARIANT (e.g. joint@alpha=0.5; variants: full or alpha=A,shrink=G,top=P)")
    return {modality: group_name(fit, variant) for modality, fit in SPACES[base].items()}


# --------------------------------------------------------------------------- CACHE/whitening.h5


def read_transform(path: Path, mode: str) -> zca.Whitening:
    """Group ``mode`` of a whitening file, unchecked (``load_whitening`` checks the teacher)."""
    with h5py.File(path, "r") as f:
        g = f[mode]
        arrays = {k: g[k][()] for k in H5_ARRAYS}
        top_k = int(g.attrs.get("top_k", -1))  # files before variants: full whitening
        return zca.Whitening(**arrays, eps=float(g.attrs["eps"]), n=int(g.attrs["n"]),
                             method=str(g.attrs["method"]), power=float(g.attrs.get("power", 1.0)),
                             top_k=None if top_k < 0 else top_k)


def whitening_info(path: str | Path) -> dict[str, Any]:
    """Root attributes of a whitening file: {"teacher": dict, "modes": list, "embeddings", "eps_rel", ...}."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except OSError as err:
        raise CacheError(f"{path} is not a readable whitening file ({err}); re-run `kdpipe fit-whitening`") from None
    attrs["teacher"] = json.loads(attrs["teacher"])
    attrs["modes"] = json.loads(attrs["modes"])
    return attrs


def whitening_path(cache: Cache, teacher: str | None = None) -> Path:
    """A teacher's whitening.h5 in ``cache`` (None: the primary's, ``CACHE/whitening.h5``)."""
    return cache.teacher_folder(teacher) / WHITENING_H5


def load_whitening(cache_or_path: Cache | str | Path, mode: str,
                   expect_teacher: dict | None = None, teacher: str | None = None) -> zca.Whitening:
    """The fitted transform of ``mode`` for the trainer/evaluator.

    cache_or_path: a Cache, a cache directory, or a whitening.h5 file. The file's teacher
    fingerprint must equal ``expect_teacher`` — by default the teacher of the cache it sits in
    (or the given Cache), so a whitening file copied next to another teacher's cache is refused.
    ``teacher`` (a Cache only): the whitening of that teacher of the cache (``whitening_path``),
    checked against that teacher's fingerprint.
    """
    if split_mode(mode)[0] not in FIT_MODES:
        raise BadValue(f"unknown whitening mode {mode!r}; valid: {', '.join(FIT_MODES)} (optionally @VARIANT)")
    if teacher is not None and not isinstance(cache_or_path, Cache):
        raise BadValue("a teacher's whitening is found from its Cache (open_cache), not from a path")
    path, expect_teacher = _locate(cache_or_path, expect_teacher, teacher)
    fit = f"kdpipe fit-whitening {path.parent}" if teacher is None else \
        f"kdpipe fit-whitening {cache_or_path.root} --teacher {teacher}"
    if not path.exists():
        raise MissingInput(f"no whitening at {path}; run `{fit} --mode {mode}`")
    info = whitening_info(path)
    if expect_teacher is not None and not same_fingerprint(info["teacher"], expect_teacher):
        raise CacheError(f"{path} was fitted on embeddings of teacher {describe_teacher(info['teacher'])}, "
                         f"not {describe_teacher(expect_teacher)}; re-run `kdpipe fit-whitening` on this cache"
                         + (f" with --teacher {teacher}" if teacher else ""))
    if mode not in info["modes"]:
        raise BadValue(f"{path} holds modes {info['modes']}, not {mode!r}; re-run `{fit} --mode {mode}` (or --mode all)")
    return read_transform(path, mode)


def _locate(cache_or_path: Cache | str | Path, expect: dict | None,
            teacher: str | None = None) -> tuple[Path, dict | None]:
    if isinstance(cache_or_path, Cache):
        fingerprint = cache_or_path.teacher_entry(teacher)["fingerprint"] if teacher else cache_or_path.teacher
        return whitening_path(cache_or_path, teacher), expect or fingerprint
    path = Path(cache_or_path)
    if path.is_dir():
        manifest = Manifest.load(path)
        if expect is None and manifest is not None:
            expect = manifest.data.get("teacher")
        return path / WHITENING_H5, expect
    return path, expect


def _cache_params(cache: Cache, mode: str, modalities: tuple[str, ...],
                  teacher: str | None = None) -> tuple[dict, str | None]:
    """{modality: {"mu" [D], "W" [D, D], "W_inv" [D, D], "scale" []} (float32)} and the fit method;
    ``teacher``: whose whitening (None: the primary's), D its embedding width."""
    params, method = {}, None
    entry = cache.teacher_entry(teacher or cache.primary)
    dim = int(entry["embed_dim"])
    for modality in modalities:
        fit_mode = space_of(mode)[modality]
        w = load_whitening(cache, fit_mode, expect_teacher=entry["fingerprint"], teacher=teacher)
        if w.W.shape != (dim, dim):
            raise CacheError(f"whitening {fit_mode} is {w.W.shape[0]}-dim, the teacher's embeddings {dim}-dim")
        params[modality] = {**zca.to_torch(w, dtype=torch.float32),
                            "scale": torch.tensor(zca.whitened_rms(w), dtype=torch.float32)}
        method = w.method
    return params, method


# --------------------------------------------------------------------------- into the student's space


# What the whitening study measured (benchmarks/whitening_study.py; benchmarks/README.md, "Whitening
# variants"; results/whitening.json). fit-whitening's summary and `train --whiten` print it, once each:
# so far no whitened target space has trained a better student than the raw one.
MEASURED = (
    "whitening has not helped a student in any measured setup: on the shapes world (benchmarks/README.md, "
    "'Whitening variants'), mobilenetv3_050 distilled for 6 epochs (3 seeds) reached held-out I->T R@1 "
    "0.416 +- 0.033 on raw targets, 0.234 +- 0.020 on full joint ZCA (much worse; mobilenetv3: 0.275 "
    "against 0.437), 0.409 +- 0.041 on joint alpha=0.25 (partial whitening, the variant that keeps the "
    "teacher's own retrieval best: the same as raw within seed noise) and 0.385 +- 0.061 on alpha=0.5, and "
    "no whitened run converged faster; train on raw targets (--whiten none, the default) unless a "
    "measurement of your own says otherwise")


@dataclass
class Targets:
    """Maps cached (normalised) teacher targets into the space the student learns.

    ``params[modality]`` = {"mu" [D], "W" [D, D], "W_inv" [D, D], "scale" []} for each
    whitened modality; a modality not in ``params`` stays in the teacher's space.
    """

    mode: str = "none"
    params: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    source: str | None = None
    method: str | None = None

    def apply(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """x [N, D] teacher embeddings -> the student's target space (identity if not whitened)."""
        p = self.params.get(modality)
        return x if p is None else zca.apply_torch(x, p["mu"].to(x.device), p["W"].to(x.device))

    def to(self, device: torch.device) -> "Targets":
        return replace(self, params={m: {k: v.to(device) for k, v in p.items()} for m, p in self.params.items()})


def load_targets(cache: Cache, mode: str, teacher: str | None = None) -> Targets:
    """The stored whitening for ``mode``; its teacher must be the cache's (``teacher``: that teacher of
    the cache, its whitening fitted by ``kdpipe fit-whitening --teacher NAME``; None: the primary)."""
    if not space_of(mode):
        return Targets()
    params, method = _cache_params(cache, mode, tuple(space_of(mode)), teacher)
    return Targets(mode, params, str(whitening_path(cache, teacher)), method)


# --------------------------------------------------------------------------- back to the teacher's space


@dataclass
class BackMap:
    """How one modality's whitened student outputs return to the teacher's space:
    t̂ = normalise(r · normalise(s) W⁻¹ᵀ + μ) (``zca.map_back_torch``).

    mu [D], w_inv [D, D], scale r = √(Σ λ/(λ+ε)): the RMS norm of whitened train targets, i.e. the
    length the student's direction lost (every loss normalises, so only the direction is learnt).
    """

    mu: torch.Tensor
    w_inv: torch.Tensor
    scale: float

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        """s [N, D] raw student outputs -> [N, D] unit rows in teacher space."""
        return zca.map_back_torch(s, self.mu, self.w_inv, self.scale)

    @classmethod
    def from_params(cls, p: dict[str, torch.Tensor]) -> "BackMap":
        """From one modality's {"mu", "W_inv", "scale"} (``Targets.params`` or the run's copy)."""
        return cls(p["mu"], p["W_inv"], float(p["scale"]))


def _to_teacher(s: torch.Tensor, back: BackMap | None) -> torch.Tensor:
    return back(s) if back is not None else F.normalize(s.float(), dim=-1)


def to_teacher_space(s: torch.Tensor, params: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """Student embeddings [N, D] -> normalised teacher-space embeddings [N, D].

    Unwhitened modality (``params`` None): just normalise. Whitened: normalise(r·ŝ W⁻¹ᵀ + μ).
    """
    return _to_teacher(s, None if params is None else BackMap.from_params(params))


@dataclass
class Space:
    """Where a student's outputs live: a back-map per whitened modality (None: teacher space already)."""

    image: BackMap | None = None
    text: BackMap | None = None
    description: str = RAW_SPACE

    def image_out(self, z: torch.Tensor) -> torch.Tensor:
        """Student image outputs [N, D] -> unit rows in teacher space."""
        return _to_teacher(z, self.image)

    def text_out(self, z: torch.Tensor) -> torch.Tensor:
        return _to_teacher(z, self.text)


# --------------------------------------------------------------------------- the run's copy


def save_whitening(run_dir: Path, targets: Targets) -> dict[str, Any] | None:
    """RUN/whitening.safetensors ({modality}.{mu,W,W_inv,scale}) and its description for student.json."""
    if targets.mode == "none":
        return None
    tensors = {f"{m}.{k}": v.detach().cpu().clone() for m, p in targets.params.items() for k, v in p.items()}
    save_file(tensors, str(run_dir / RUN_WHITENING))
    return {"mode": targets.mode, "file": RUN_WHITENING, "source": targets.source, "method": targets.method,
            "modalities": {m: {"scale": float(p["scale"])} for m, p in targets.params.items()},
            "map_back": "teacher = normalize(scale * normalize(student) @ W_inv.T + mu)"}


def whitening_mode(spec: RunSpec | dict[str, Any]) -> str | None:
    """The run's whitening mode (a key of ``SPACES`` other than "none") or None; an unknown one raises.

    ``spec``: the run's ``RunSpec``, or its student.json as read.
    """
    spec = spec if isinstance(spec, RunSpec) else RunSpec.from_json(spec)
    if spec.whitening is not None:
        space_of(spec.whitening)  # an unknown mode raises
    return spec.whitening


def run_back_maps(path: Path, modalities: tuple[str, ...]) -> dict[str, BackMap]:
    """The back-maps stored in RUN/whitening.safetensors (``save_whitening``)."""
    t = load_file(str(path))
    missing = [f"{m}.{k}" for m in modalities for k in ("mu", "W_inv", "scale") if f"{m}.{k}" not in t]
    if missing:
        raise BadValue(f"{path} lacks {missing}; re-run `kdpipe train` to rewrite it")
    return {m: BackMap.from_params({k: t[f"{m}.{k}"] for k in ("mu", "W_inv", "scale")}) for m in modalities}


def cache_back_maps(cache: Cache, mode: str, modalities: tuple[str, ...],
                    teacher: str | None = None) -> dict[str, BackMap]:
    """The same maps rebuilt from the cache's whitening.h5 when the run kept no copy: ``teacher``'s
    (``whitening_path``; None: the primary's, CACHE/whitening.h5)."""
    params, _ = _cache_params(cache, mode, modalities, teacher)
    return {m: BackMap.from_params(params[m]) for m in modalities}


def run_teacher(cache: Cache, spec: RunSpec) -> str | None:
    """The cache's name of the teacher whose space the run learnt (student.json's ``teacher``), whose
    whitening it used; None for the primary (its files at the cache root) or a run that records none."""
    name = cache.find_teacher(spec.teacher) if spec.teacher else None
    return None if name is None or cache.teacher_entry(name)["primary"] else name


def student_space(run: Path, spec: RunSpec | dict[str, Any], cache: Cache, text_tower: bool) -> Space:
    """The back-maps a whitened run needs, from the run's own whitening file (else the cache's, of the
    teacher the run learnt: ``run_teacher``).

    An image-only student is paired with the teacher's (raw) text embeddings, so only its image
    side can be whitened; a text-whitened image-only run has nothing to map.
    """
    spec = spec if isinstance(spec, RunSpec) else RunSpec.from_json(spec)
    mode = whitening_mode(spec)
    if mode is None:
        return Space()
    mapped = tuple(m for m in space_of(mode) if m == "image" or text_tower)
    if not mapped:
        return Space()
    path = run / spec.whitening_file if spec.whitening_file else None
    maps = run_back_maps(path, mapped) if path and path.is_file() else \
        cache_back_maps(cache, mode, mapped, run_teacher(cache, spec))
    return Space(image=maps.get("image"), text=maps.get("text"),
                 description=f"{RAW_SPACE} (mapped back from whitened {mode}: {', '.join(mapped)})")
