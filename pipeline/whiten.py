"""Stage 2: fit whitening transforms on the cached teacher embeddings.

Flow: stream the TRAIN split shard by shard (memory: one shard + D×D float64 per modality),
accumulating float64 moments of every image view (``image``) and every caption (``text``);
``joint`` is the two pooled, so all three cost one pass. Fit ZCA/PCA (kdpipe.zca), write
``CACHE/whitening.h5`` atomically, then check what was written:

- train: the whitened train covariance (a second pass, float32 apply as the trainer does)
  against I — or against I − εWWᵀ where ε, not the data, limits whiteness;
- held out (val/test, never used to fit): whitened eigenvalues next to the Marchenko–Pastur
  band expected from sampling alone;
- the teacher's own retrieval R@1 and zero-shot top-1 on the held-out split (view 0), raw and
  in each whitened space (per-modality modes: images through the image transform, texts and
  prompts through the text transform; joint: everything through the joint transform).

The results go to ``CACHE/whitening.json`` and a table. ``--teacher NAME`` fits another teacher of a
cache with several (its embeddings and prompts): its files go to ``CACHE/teachers/NAME/`` instead
(``store.Cache.teacher_folder``); the primary's stay at the cache root. The file's name, its reader
(``load_whitening``, which refuses a file fitted for another teacher) and which modalities
each transform covers belong to ``kdpipe.targetspace``, shared with the trainer and evaluator.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from . import metrics, zca
from .progress import Bar, console, make_progress
from .prompts import read_prompts
from .atomic import atomic_write, atomic_write_json
from .errors import BadValue
from .store import Cache, CacheError, H5Shard, open_cache
from .targetspace import (FIT_MODES, FITTED_ON, FULL, H5_ARRAYS, MEASURED, SPACES, WHITENING_H5, group_name,  # noqa: F401
                          load_whitening, read_transform, split_mode, whitening_path)  # WHITENING_H5: kept importable

log = logging.getLogger("kdpipe")


@dataclass
class WhitenConfig:
    cache: str | Path
    mode: str = "all"  # image | text | joint | all (= all three)
    eps_rel: float = 1e-4  # ε = eps_rel × mean eigenvalue
    method: str = "zca"  # zca | pca (zca.METHODS)
    variants: list[str] | None = None  # more transforms per mode (zca.Variant specs): groups MODE@VARIANT
    eval_split: str | None = None  # held-out split for the checks; None: "val", else "test", else none
    check_train: bool = True  # second pass over train for the whitened covariance (else analytic)
    verify: str = "size"  # cache verification: none | size | sha256
    teacher: str | None = None  # which teacher of the cache (default: the primary; `kdpipe extract --add-teacher`)
    progress: bool = True


MODE_CHOICES = (*FIT_MODES, "all")
WHITENING_JSON = "whitening.json"
FORMAT_VERSION = 1
EMBEDDINGS = "normalised features as stored in the cache (fp16, L2-normalised teacher embeddings)"
FIT_SPLIT = "train"  # the only split a fit ever reads
VERIFY_CHOICES = ("none", "size", "sha256")
COV_TOL = 1e-3  # max |whitened train covariance − I| accepted


def resolve_modes(mode: str) -> list[str]:
    """'all' -> every mode; otherwise the one named. Unknown names raise listing the valid ones."""
    if mode not in MODE_CHOICES:
        raise BadValue(f"unknown whitening mode {mode!r}; valid: {', '.join(MODE_CHOICES)}")
    return list(FIT_MODES) if mode == "all" else [mode]


# --------------------------------------------------------------------------- streaming


def check_finite(shard: H5Shard) -> None:
    """Refuse NaN/Inf embeddings, naming the shard file, the dataset and the first sample key."""
    for name, rows, owner in (("img", shard.img, np.arange(len(shard.keys))),
                              ("txt", shard.txt, shard.txt_to_img)):
        if rows.size == 0:
            continue
        bad = ~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
        if bad.any():
            first = shard.keys[int(owner[np.argmax(bad)])]
            raise BadValue(
                f"{shard.path}: dataset {name!r} holds NaN/Inf embeddings in {int(bad.sum())} row(s), "
                f"first at sample key {first!r}; the teacher produced non-finite features (fp16 "
                "overflow? extract with --precision fp32): delete this shard's files and re-run `kdpipe extract`")


def modality_rows(shard: H5Shard) -> dict[str, np.ndarray]:
    """{"image": every view of every image [N·V, D], "text": every caption [M, D]} (fp16)."""
    return {"image": shard.img.reshape(-1, shard.img.shape[-1]), "text": shard.txt}


def teacher_dim(cache: Cache, teacher: str) -> int:
    """The embedding width of one teacher of the cache."""
    return int(cache.teacher_entry(teacher)["embed_dim"])


def accumulate(cache: Cache, progress: Bar | None = None, teacher: str | None = None) -> dict[str, zca.RunningMoments]:
    """One pass over the train split -> float64 moments for "image", "text" and "joint".

    ``teacher``: whose embeddings (a name of the cache's teachers; None: the primary).
    """
    teacher = teacher or cache.primary
    moments = {m: zca.RunningMoments(teacher_dim(cache, teacher)) for m in ("image", "text")}
    paths = cache.teacher_h5_paths(FIT_SPLIT, teacher)
    task = progress.add_task(f"fit   {FIT_SPLIT}", total=len(paths), info="") if progress else None
    for shard in cache.iter_h5(FIT_SPLIT, fields=("img", "txt"), teacher=teacher):
        check_finite(shard)
        for modality, rows in modality_rows(shard).items():
            moments[modality].update(rows)
        if progress:
            progress.update(task, advance=1, info=f"{moments['image'].n:,} img / {moments['text'].n:,} txt")
    moments["joint"] = zca.merged(moments["image"], moments["text"])
    return moments


def variant_of(group: str, eps_rel: float) -> zca.Variant:
    """The variant a whitening.h5 group is fitted with: the plain mode groups use --eps-rel."""
    _, variant = split_mode(group)
    return zca.Variant(shrink=eps_rel) if variant == FULL else zca.parse_variant(variant)


def groups_of(modes: list[str], variants: list[str] | None) -> list[str]:
    """Every whitening.h5 group to fit: each mode, then each mode through each extra variant."""
    names = [zca.parse_variant(v).name for v in variants or []]
    return modes + [group_name(m, v) for v in dict.fromkeys(names) if v != FULL for m in modes]


def fit_modes(moments: dict[str, zca.RunningMoments], modes: list[str], eps_rel: float,
              method: str) -> dict[str, zca.Whitening]:
    """Fit one transform per group (a mode, or MODE@VARIANT); too few rows for the dimension is
    refused, not shrunk."""
    out = {}
    for mode in modes:
        m = moments[split_mode(mode)[0]]
        if m.n <= m.dim:
            what = {"image": "image views", "text": "captions", "joint": "image views + captions"}[split_mode(mode)[0]]
            raise BadValue(
                f"the {FIT_SPLIT} split has {m.n} {what} for {m.dim}-dim embeddings; fitting a "
                f"{m.dim}×{m.dim} covariance needs more than {m.dim} rows (≥ 10×{m.dim} for a stable "
                "estimate): extract more training images (or views) first")
        out[mode] = zca.fit_variant(m, variant_of(mode, eps_rel), method)
    return out


# --------------------------------------------------------------------------- whitening.h5


def write_whitening(path: Path, fitted: dict[str, zca.Whitening], teacher: dict, eps_rel: float) -> None:
    """Write whitening.h5 under a temporary name, check it reopens, then rename it into place.

    One group per mode or MODE@VARIANT (datasets mu, W, W_inv, eigvals in float64; attrs eps, n,
    method, power, top_k (−1: every direction));
    root attrs: format, teacher fingerprint (JSON), embeddings, modes (JSON), eps_rel.
    """
    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({"format": FORMAT_VERSION, "teacher": json.dumps(teacher, sort_keys=True),
                            "embeddings": EMBEDDINGS, "modes": json.dumps(list(fitted)),
                            "eps_rel": eps_rel, "fit_split": FIT_SPLIT})
            for mode, w in fitted.items():
                g = f.create_group(mode)
                for name in H5_ARRAYS:
                    g.create_dataset(name, data=getattr(w, name).astype(np.float64))
                g.attrs.update({"eps": w.eps, "n": w.n, "method": w.method, "power": w.power,
                                "top_k": -1 if w.top_k is None else w.top_k})
        for mode, w in fitted.items():  # a file that does not read back must never replace a good one
            back = read_transform(tmp, mode)
            if not np.array_equal(back.W, w.W) or not np.isfinite(back.W_inv).all():
                raise CacheError(f"{tmp} did not read back what was written; disk problem?")

    atomic_write(path, write)


# --------------------------------------------------------------------------- checks: train


def _params(w: zca.Whitening) -> tuple[torch.Tensor, torch.Tensor]:
    """μ and W as float32 tensors: the precision the trainer applies them in."""
    t = zca.to_torch(w, dtype=torch.float32)
    return t["mu"], t["W"]


def _space(mode: str, fitted: dict[str, zca.Whitening]) -> dict[str, zca.Whitening]:
    """Which transform whitens each modality in ``mode``'s space: the joint one for both, or
    (a per-modality fit) each modality through its own of the same variant, as ``--whiten
    separate`` trains."""
    base, variant = split_mode(mode)
    space = SPACES["joint" if base == "joint" else "separate"]
    return {modality: fitted[group_name(fit_mode, variant)] for modality, fit_mode in space.items()}


def whitened_train_moments(cache: Cache, fitted: dict[str, zca.Whitening], modes: list[str],
                           progress: Bar | None = None, teacher: str | None = None) -> dict[str, zca.RunningMoments]:
    """Second pass over train: moments of each mode's own data after its float32 transform."""
    teacher = teacher or cache.primary
    params = {m: _params(w) for m, w in fitted.items()}
    out = {m: zca.RunningMoments(teacher_dim(cache, teacher)) for m in modes}
    paths = cache.teacher_h5_paths(FIT_SPLIT, teacher)
    task = progress.add_task(f"check {FIT_SPLIT}", total=len(paths), info="") if progress else None
    for shard in cache.iter_h5(FIT_SPLIT, fields=("img", "txt"), teacher=teacher):
        rows = {k: torch.from_numpy(v).float() for k, v in modality_rows(shard).items()}
        for mode in modes:
            for modality in FITTED_ON[split_mode(mode)[0]]:
                out[mode].update(zca.apply_torch(rows[modality], *params[mode]))
        if progress:
            progress.update(task, advance=1)
    return out


def cov_check(w: zca.Whitening, cov: np.ndarray, how: str, fit_cov: np.ndarray | None = None) -> dict[str, Any]:
    """Compare a whitened covariance [D, D] with I, or with I − εWWᵀ when ε dominates.

    A partial or truncated variant is not white by design: it is compared with W C Wᵀ of the
    fitted covariance ``fit_cov`` (what the fit promised), in float64.
    """
    dev_i = float(np.abs(cov - np.eye(w.dim)).max())
    if not w.is_full and fit_cov is not None:
        dev = float(np.abs(cov - zca.whitened_cov(w, fit_cov)).max())
        return {"max_abs_C_minus_I": dev_i, "max_abs_C_minus_target": dev, "tolerance": COV_TOL,
                "eps_max_deviation": None, "eps_dominates": False, "partial": True, "ok": dev <= COV_TOL,
                "how": how + "; target W C Wᵀ of the fitted covariance (partial or truncated: not white by design)"}
    dev_target = float(np.abs(cov - zca.eps_target(w)).max())
    eps_dev = zca.eps_max_deviation(w)
    dominates = eps_dev > COV_TOL
    out = {"max_abs_C_minus_I": dev_i, "max_abs_C_minus_target": dev_target, "tolerance": COV_TOL,
           "eps_max_deviation": eps_dev, "eps_dominates": dominates,
           "ok": (dev_target if dominates else dev_i) <= COV_TOL, "how": how}
    if dominates:
        out["explain"] = (
            f"ε = {w.eps:.3g} is within {1 / COV_TOL:.0f}× of the smallest eigenvalue {w.eigvals[-1]:.3g}, "
            f"so by design those directions keep variance λ/(λ+ε) down to {1 - eps_dev:.4f}; the check "
            "compares with I − εWWᵀ instead of I (lower --eps-rel to whiten them fully, at the cost "
            "of amplifying noise)")
    return out


def train_checks(cache: Cache, moments: dict[str, zca.RunningMoments], fitted: dict[str, zca.Whitening],
                 modes: list[str], data_pass: bool, progress: Bar | None = None,
                 teacher: str | None = None) -> dict[str, dict]:
    """Per mode: whitened train covariance vs I (data pass in float32, or analytic in float64)."""
    if data_pass:
        white = whitened_train_moments(cache, fitted, modes, progress, teacher)
        return {m: cov_check(fitted[m], white[m].cov(), "second pass over train, float32 apply",
                             moments[split_mode(m)[0]].cov()) for m in modes}
    return {m: cov_check(fitted[m], zca.whitened_cov(fitted[m], moments[split_mode(m)[0]].cov()),
                         "analytic W C Wᵀ, float64", moments[split_mode(m)[0]].cov()) for m in modes}


# --------------------------------------------------------------------------- checks: held out


def pick_eval_split(cache: Cache, wanted: str | None) -> str | None:
    """The held-out split: the one asked for, else "val", else "test", else None."""
    if wanted is not None:
        if wanted == FIT_SPLIT:
            raise BadValue(f"--eval-split must be held out, not {FIT_SPLIT!r}")
        cache.require_split(wanted)
        return wanted
    return next((s for s in ("val", "test") if s in cache.splits() and cache.manifest["splits"][s]["shards"]), None)


def heldout_band(held: H5Shard, w: zca.Whitening, mode: str) -> dict[str, Any] | None:
    """Eigenvalues of the held-out whitened covariance next to the MP band for that n, D
    (None for a partial or truncated variant: the band describes white data only)."""
    if not w.is_full:
        return None
    rows = modality_rows(held)
    x = np.concatenate([rows[modality] for modality in FITTED_ON[split_mode(mode)[0]]])
    z = zca.apply(w, x.astype(np.float64))
    lam = np.linalg.eigvalsh(np.cov(z.T, bias=True)) if len(z) > 1 else np.zeros(w.dim)
    lo, hi = zca.eigen_band(len(z), w.dim)
    inside = (lam >= lo * 0.999) & (lam <= hi * 1.001)
    return {"n": int(len(z)), "eig_min": float(lam.min()), "eig_max": float(lam.max()),
            "eig_mean": float(lam.mean()), "mp_band": [lo, hi], "share_in_band": float(inside.mean())}


def read_prompt_sets(path: Path, classnames: list[str] | None) -> dict[str, np.ndarray]:
    """Prompt sets of prompts.h5 whose class names match the cache's: {name: emb [K, T, D]}."""
    if classnames is None or not path.exists():
        return {}
    return {name: s.emb for name, s in read_prompts(path).items() if list(s.classnames) == list(classnames)}


def teacher_scores(held: H5Shard, prompt_sets: dict[str, np.ndarray],
                   space: dict[str, zca.Whitening] | None) -> dict[str, Any]:
    """Teacher R@K both ways and zero-shot accuracy on held-out view 0, raw (space None) or whitened."""
    img, txt = held.img[:, 0].astype(np.float64), held.txt.astype(np.float64)
    if space is not None:
        img, txt = zca.apply(space["image"], img), zca.apply(space["text"], txt)
    out: dict[str, Any] = {"retrieval": metrics.retrieval_recall(
        torch.from_numpy(img).float(), torch.from_numpy(txt).float(), torch.from_numpy(held.txt_to_img))}
    labelled = held.labels >= 0
    zero_shot = {}
    for name, emb in prompt_sets.items():
        k, t, d = emb.shape
        e = emb.reshape(-1, d).astype(np.float64)
        e = zca.apply(space["text"], e) if space is not None else e
        classifier = metrics.zero_shot_classifier(torch.from_numpy(e.reshape(k, t, d)).float())
        if labelled.any():
            zero_shot[name] = metrics.zero_shot_accuracy(torch.from_numpy(img[labelled]).float(), classifier,
                                                          torch.from_numpy(held.labels[labelled]))
    out["zero_shot"] = zero_shot
    return out


def heldout_checks(cache: Cache, split: str, fitted: dict[str, zca.Whitening], modes: list[str],
                   partners: dict[str, zca.Whitening], teacher: str | None = None) -> tuple[dict, dict, list[str]]:
    """-> (per-mode {heldout, teacher}, raw teacher scores, notes). ``partners`` supply the
    other modality's transform for per-modality spaces when it was not asked for; ``teacher``: whose
    embeddings and prompts (None: the primary)."""
    teacher = teacher or cache.primary
    held = cache.load_split(split, fields=("img", "txt"), teacher=teacher)
    try:
        check_finite(held)
    except ValueError:  # name the shard, not the split: rescan shard by shard (rare path)
        for shard in cache.iter_h5(split, fields=("img", "txt"), teacher=teacher):
            check_finite(shard)
        raise
    prompt_sets = read_prompt_sets(cache.teacher_prompts_path(teacher), cache.classnames)
    notes = [] if prompt_sets else ["zero-shot skipped: no prompt set in prompts.h5 matches the cache's class names"]
    if prompt_sets and not (held.labels >= 0).any():
        notes.append(f"zero-shot skipped: the {split} split has no labels")
    everything = {**partners, **fitted}
    per_mode = {}
    for mode in modes:
        space = _space(mode, everything)
        per_mode[mode] = {"heldout": heldout_band(held, fitted[mode], mode),
                          "teacher": {"space": _space_name(mode), **teacher_scores(held, prompt_sets, space),
                                      **embedding_geometry(held, space)}}
    return per_mode, {**teacher_scores(held, prompt_sets, None), **embedding_geometry(held, None)}, notes


def embedding_geometry(held: H5Shard, space: dict[str, zca.Whitening] | None) -> dict[str, Any]:
    """The teacher's held-out modality gap and effective ranks (view 0 images, every caption), in
    its own space (None) or whitened: what whitening is said to change ("mitigates the modality
    gap and prevents feature collapse")."""
    img, txt = held.img[:, 0].astype(np.float64), held.txt.astype(np.float64)
    if space is not None:
        img, txt = zca.apply(space["image"], img), zca.apply(space["text"], txt)
    img, txt = torch.from_numpy(img), torch.from_numpy(txt)
    return {"modality_gap": metrics.modality_gap(img, txt),
            "effective_rank": {"image": metrics.effective_rank(img), "text": metrics.effective_rank(txt)}}


def _space_name(mode: str) -> str:
    via = f" ({split_mode(mode)[1]})" if split_mode(mode)[1] != FULL else ""
    return (f"images and texts via joint{via}" if split_mode(mode)[0] == "joint"
            else f"images via image{via}, texts/prompts via text{via}")


# --------------------------------------------------------------------------- report


def _fmt_range(a: float, b: float) -> str:
    return f"{a:.2f}-{b:.2f}"


def print_table(report: dict[str, Any]) -> None:
    """One row per space: the raw teacher first, then each fitted mode."""
    from rich import box
    from rich.table import Table

    split = report.get("eval_split") or "held-out"
    table = Table(title=f"whitening: {report['method']}, eps_rel {report['eps_rel']:g}, fit on {FIT_SPLIT}",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("space", "n fit", "λmax/λmin", "max|C−I|", f"{split} eig", "MP band", "i2t@1", "t2i@1", "zs@1",
                "gap", "erank i/t"):
        table.add_column(col, justify="left" if col == "space" else "right", no_wrap=True)

    def scores(t: dict | None) -> list[str]:
        if not t:
            return ["–"] * 5
        r, zs, er = t["retrieval"], t["zero_shot"], t["effective_rank"]
        return [f"{r['i2t_R@1']:.3f}", f"{r['t2i_R@1']:.3f}", " ".join(f"{v['top1']:.3f}" for v in zs.values()) or "–",
                f"{t['modality_gap']:.2f}", f"{er['image']:.0f}/{er['text']:.0f}"]

    table.add_row("raw", "", "", "", "", "", *scores(report.get("teacher_raw")))
    for mode, m in report["modes"].items():
        cov = m["train_cov"]
        dev = (f"{cov['max_abs_C_minus_target']:.1e}(W C Wᵀ)" if cov.get("partial") else
               f"{cov['max_abs_C_minus_I']:.1e}" + ("(ε)" if cov["eps_dominates"] else ""))
        dev = dev if cov["ok"] else f"[red]{dev} FAIL[/]"
        h = m.get("heldout")
        band = (_fmt_range(h["eig_min"], h["eig_max"]), _fmt_range(*h["mp_band"])) if h else ("–", "–")
        cond = m["eigvals"]["max"] / max(m["eigvals"]["min"], 1e-300)
        table.add_row(mode, f"{m['n']:,}", f"{cond:.3g}", dev, *band, *scores(m.get("teacher")))
    console.print(table)


def _mode_summary(w: zca.Whitening) -> dict[str, Any]:
    return {"n": w.n, "method": w.method, "eps": w.eps, "power": w.power, "top_k": w.top_k,
            "eigvals": {"max": float(w.eigvals[0]), "min": float(w.eigvals[-1]), "mean": float(w.eigvals.mean())}}


def _partners(moments: dict[str, zca.RunningMoments], modes: list[str], cfg: WhitenConfig,
              notes: list[str]) -> dict[str, zca.Whitening]:
    """Per-modality spaces pair the image and text transforms: fit the missing one for the checks only."""
    out = {}
    for group in modes:
        base, variant = split_mode(group)
        other = {"image": "text", "text": "image"}.get(base)
        partner = group_name(other, variant) if other else None
        if partner and partner not in modes and partner not in out and moments[other].n > moments[other].dim:
            out[partner] = zca.fit_variant(moments[other], variant_of(partner, cfg.eps_rel), cfg.method)
            notes.append(f"the {partner} transform was fitted for the {group} mode's retrieval check only (not stored)")
    return out


def _validate(cfg: WhitenConfig) -> list[str]:
    """Check every name before reading anything; -> the modes to fit."""
    modes = groups_of(resolve_modes(cfg.mode), cfg.variants)
    zca.METHODS.get(cfg.method)
    if cfg.verify not in VERIFY_CHOICES:
        raise BadValue(f"unknown --verify {cfg.verify!r}; valid: {', '.join(VERIFY_CHOICES)}")
    return modes


def _add_heldout(report: dict[str, Any], cache: Cache, teacher: str, split: str,
                 moments: dict[str, zca.RunningMoments], fitted: dict[str, zca.Whitening], cfg: WhitenConfig) -> None:
    notes = report["notes"]
    per_mode, raw, more = heldout_checks(cache, split, fitted, list(fitted),
                                         _partners(moments, list(fitted), cfg, notes), teacher)
    for mode, checks in per_mode.items():
        report["modes"][mode].update(checks)
    report["teacher_raw"] = raw
    notes.extend(more)


def run(cfg: WhitenConfig) -> dict[str, Any]:
    """Fit, write CACHE/whitening.h5, check, write CACHE/whitening.json (an added teacher's: in
    CACHE/teachers/NAME/); returns the report."""
    modes = _validate(cfg)
    cache = open_cache(cfg.cache, verify=cfg.verify)
    teacher = cfg.teacher or cache.primary
    fingerprint = cache.teacher_entry(teacher)["fingerprint"]  # an unknown name is refused, listing the teachers
    eval_split = pick_eval_split(cache, cfg.eval_split)
    folder = cache.teacher_folder(teacher)
    h5_path, json_path = whitening_path(cache, teacher), folder / WHITENING_JSON
    t0 = time.perf_counter()
    with make_progress("shards", disable=not cfg.progress) as progress:
        moments = accumulate(cache, progress, teacher)
        fitted = fit_modes(moments, modes, cfg.eps_rel, cfg.method)
        t_fit = time.perf_counter() - t0
        folder.mkdir(parents=True, exist_ok=True)
        write_whitening(h5_path, fitted, fingerprint, cfg.eps_rel)
        json_path.unlink(missing_ok=True)  # it described the previous fit
        fitted = {m: load_whitening(cache, m, teacher=teacher) for m in modes}  # check what the trainer will read
        train = train_checks(cache, moments, fitted, modes, cfg.check_train, progress, teacher)
    report: dict[str, Any] = {
        "cache": str(cache.root), "whitening": str(h5_path), "teacher": fingerprint, "teacher_name": teacher,
        "embeddings": EMBEDDINGS, "method": cfg.method, "eps_rel": cfg.eps_rel,
        "fit_split": FIT_SPLIT, "eval_split": eval_split,
        "train": {"image_rows": moments["image"].n, "captions": moments["text"].n},
        "modes": {m: {**_mode_summary(fitted[m]), "train_cov": train[m]} for m in modes},
        "teacher_raw": None, "notes": [], "config": {**asdict(cfg), "cache": str(cfg.cache)},
    }
    if eval_split is None:
        report["notes"].append("no held-out split (val/test) in the cache: held-out checks skipped")
    else:
        _add_heldout(report, cache, teacher, eval_split, moments, fitted, cfg)
    report["seconds"] = {"fit": round(t_fit, 3), "total": round(time.perf_counter() - t0, 3)}
    report["measured"] = MEASURED  # what training on these spaces did to students, so far
    atomic_write_json(json_path, report)
    print_table(report)
    console.print(f"[yellow]note:[/] {MEASURED}")
    for note in report["notes"]:
        log.info(note)
    failed = [m for m in modes if not report["modes"][m]["train_cov"]["ok"]]
    if failed:
        log.warning("whitened train covariance is not within %g of its target for %s", COV_TOL, failed)
    return report
