"""Stage 3: distil a student from the cache, never running the teacher.

Flow: verify the cache (manifest, shard sizes, embedding dim) and the whitening file's
teacher -> build the image student (+ optional text student) with a projection to the
teacher's dim, and the losses -> stream batches from the cache's train tar shards
(``kdpipe.cachereader``: the stored view replayed on the stored JPEG, its cached
embedding as target) -> AdamW + warmup/cosine, AMP on CUDA -> periodic quick validation on
the val split (precise BN first, eval mode) -> checkpoints (latest, previous, best), the
student (safetensors + JSON), metrics.jsonl and curves.png in RUN/.

Whitening (``--whiten``). ``joint``: image and text targets go through the same joint
transform (image-text alignment kept). ``image`` / ``text``: only that modality's targets
are whitened (with that modality's transform); the other stays in the teacher's space, so
cross-modal terms (clip, crd, icl, gd, afd, in-batch hinton) then compare two spaces — use
``joint`` for them (a warning says so). Targets are *not* re-normalised here: every loss
L2-normalises its inputs, so the student learns the direction of z = (t − μ)Wᵀ. To map a
student embedding back to the teacher's space: t̂ = normalise(r · ŝ W⁻¹ᵀ + μ), where ŝ is the
normalised student output and r = √(Σ λ/(λ+ε)) the RMS norm of whitened train targets (the
scale the direction lost). ``RUN/whitening.safetensors`` holds μ, W, W⁻¹ and r per whitened
modality; ``to_teacher_space`` applies it; validation does so before comparing with the
teacher. The spaces, the whitening files and both maps are ``kdpipe.targetspace``'s.

Temperatures in whitened space. Losses that build a teacher softmax (crd, hinton, gd) use the
teacher's logit scale τ_t, which is calibrated for cosines in the teacher's own space. Whitened
targets are nearly orthogonal, so the same τ_t would make those softmaxes far sharper than the
teacher's. With ``--whiten``, the losses get instead the scale at which the teacher's in-batch
softmaxes over whitened cosines have the same mean entropy as its raw ones, on the same train
pairs (``target_logit_scale``); it is logged and recorded as ``target_logit_scale`` in
student.json.

Several teachers (``--teachers A,B --teacher-weights``, ``kdpipe.ensemble``): the student lives in
the first one's space (its D, preprocessing, targets, validation); an added teacher's targets are
joined to each sample by key from its h5 (``cachereader.TeacherShards``). With more than one, the
losses get every teacher's targets and the student through one projection head per other teacher
(``Distiller.heads``, applied before the DDP gather), as ``kdpipe.losses`` describes. The primary
alone (the default) reads exactly what a single-teacher cache gives. Each teacher's cache-level files
are its own: ``--whiten`` with one added teacher uses its whitening (``fit-whitening --teacher NAME``)
and calibrates τ on its rows (refused for an ensemble: the teachers' spaces differ); hinton over
class prompts, and ``--labels``' teacher logits, take each teacher's classifier from its own prompts.h5.
Validation of an ensemble also scores the student against each teacher and the ensemble (logged;
best.pt is picked on the first teacher's score), and train rows split the per-teacher terms by teacher.

DDP (torchrun): the student, text student and loss modules are one ``Distiller`` wrapped in
DDP; features are all-gathered (the local slice keeps its gradient, as open_clip's
``gather_features``) before the losses, so contrastive terms see the global batch. Every
rank then holds the same global loss; it is back-propagated × world so that, after DDP's
gradient averaging, student gradients equal those of one process on the global batch, and
the loss-owned parameters (whose gradient each rank already has in full) are divided back.

Resume: see ``kdpipe.cachereader`` (the batch sequence of an epoch is a function of the
seed and epoch; a resumed run skips the batches already done) and ``kdpipe.trainstate``.
``max_steps`` stops a run early without changing its schedule (the cosine spans
``epochs × steps_per_epoch``), so a run stopped at k and resumed to N logs what an
uninterrupted run to N logs.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import cachereader, ensemble, losses, metrics, runlog, runtime, trainstate
from .atomic import atomic_write, sweep_orphans
from .errors import AlreadyExists, BadValue, CannotRun, MissingInput, on_write_failure
from .optim import lr_lambda, param_groups
from .progress import StepLines, console, interactive, line_every, make_progress
from .rundir import CONFIG_FILE, CURVES_FILE, METRICS_FILE, VALIDATED_SPLIT, WHITENING_FILE  # noqa: F401  (WHITENING_FILE: kept importable)
from .store import ENSEMBLE, Cache, CacheError, describe_teacher, open_cache, same_fingerprint
from .students import (NO_BEST, ImageStudent, TextStudent, build_student, build_text_student, precise_bn,
                             save_weights, weights_file, write_spec)
from .targetspace import MEASURED, Targets, load_targets, save_whitening, space_of, split_mode, to_teacher_space
from .trainconfig import TrainConfig, config_toml, continues, resolve_config  # noqa: F401  (resolve_config: also kdpipe.train's)

log = logging.getLogger("kdpipe")

CROSS_MODAL = ("clip", "crd", "icl", "gd", "afd", "hinton")


# --------------------------------------------------------------------------- config files


def write_config(cfg: TrainConfig, path: Path) -> None:
    """The resolved config as TOML (None values are left out: TOML has no null)."""
    path.write_text(config_toml(cfg))


# --------------------------------------------------------------------------- checks


def check_config(cfg: TrainConfig) -> None:
    if not cfg.cache or not cfg.out:
        raise BadValue("both --cache and --out are required")
    space_of(cfg.whiten)  # an unknown --whiten raises, listing the valid ones
    if cfg.views_used not in ("all", "0"):
        raise BadValue(f"--views-used must be 'all' or '0', got {cfg.views_used!r}")
    for name in ("epochs", "batch_size", "log_every", "bn_samples", "val_samples", "max_nonfinite"):
        if getattr(cfg, name) < 1:
            raise BadValue(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "print_every"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise BadValue(f"{name} must be at least 1, got {getattr(cfg, name)}")
    runlog.check_sinks(cfg.log)  # on every rank, before any step: a missing package is one line now
    if cfg.lr <= 0:
        raise BadValue(f"lr must be > 0, got {cfg.lr}")


def open_checked_cache(cfg: TrainConfig) -> Cache:
    """The cache, verified against its manifest; its dims and splits checked before any step."""
    cache = open_cache(cfg.cache, verify=cfg.verify)
    teacher = cache.teacher
    if int(teacher.get("embed_dim", cache.embed_dim)) != cache.embed_dim:
        raise CacheError(f"cache {cache.root}: manifest embed_dim {cache.embed_dim} differs from its teacher "
                         f"fingerprint's {teacher.get('embed_dim')}")
    cache.require_split("train")
    first = next(cache.iter_h5("train", fields=("img",)))
    if first.img.ndim != 3 or first.img.shape[1:] != (cache.views, cache.embed_dim):
        raise CacheError(f"{first.path}: img has shape {first.img.shape}, the manifest says "
                         f"[N, {cache.views}, {cache.embed_dim}]")
    return cache


# --------------------------------------------------------------------------- whitening


def calibration_pairs(cache: Cache, n: int, teacher: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` train images' view-0 embeddings and first-caption embeddings, [n', D] each
    (``teacher``: that teacher's rows; None: the primary's)."""
    imgs, txts, have = [], [], 0
    for shard in cache.iter_h5("train", fields=("img", "txt"), teacher=teacher):
        keep = np.flatnonzero(np.diff(shard.txt_offsets) > 0)[: n - have]  # images with a caption
        imgs.append(shard.img[keep, 0])
        txts.append(shard.txt[shard.txt_offsets[keep]])
        have += len(keep)
        if have >= n:
            break
    return (torch.from_numpy(np.concatenate(imgs).astype(np.float32)),
            torch.from_numpy(np.concatenate(txts).astype(np.float32)))


def target_logit_scale(cache: Cache, targets: Targets, teacher_scale: float, batch: int,
                       blocks: int = 8, teacher: str | None = None) -> float:
    """The teacher's logit scale for the space the student learns (the raw one when not whitened).

    The teacher's scale τ_t (e.g. 100) is calibrated for cosines in its own space. Whitened
    targets are far more spread out (nearly orthogonal), so τ_t on whitened cosines makes
    CRD's / hinton's / gd's teacher distributions much sharper than the teacher's own. The
    whitened-space scale is the one whose in-batch softmaxes are as sharp (same mean
    entropy) as the teacher's raw ones on the same pairs: up to ``blocks`` train batches of
    ``batch`` image-caption pairs (``losses.entropy_matched_scale``) of ``teacher`` (None: the
    primary), the teacher whose whitening ``targets`` holds.
    """
    if targets.mode == "none":
        return teacher_scale
    t_img, t_txt = calibration_pairs(cache, blocks * batch, teacher)
    b = min(batch, t_img.shape[0])
    n = (t_img.shape[0] // b) * b

    def cos_blocks(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:  # [n/b, b, b]
        img, txt = (nn.functional.normalize(x[:n], dim=-1).view(-1, b, x.shape[1]) for x in (img, txt))
        return img @ txt.transpose(1, 2)

    raw = cos_blocks(t_img, t_txt)
    white = cos_blocks(targets.apply(t_img, "image"), targets.apply(t_txt, "text"))
    return losses.entropy_matched_scale(raw, white, teacher_scale)


# --------------------------------------------------------------------------- model + losses


class Distiller(nn.Module):
    """Students + loss modules in one module (what DDP wraps); forward returns the loss terms."""

    def __init__(self, image: nn.Module, text: TextStudent | None, loss_modules: nn.ModuleDict,
                 dist: runtime.DistInfo, teachers: Sequence[ensemble.Teacher] = ()) -> None:
        super().__init__()
        self.image, self.text, self.losses = image, text, loss_modules
        self.dist = dist
        # An ensemble's projection heads (student -> each other teacher's space); none for one teacher.
        self.teachers = list(teachers)
        self.heads = ensemble.teacher_heads(self.teachers) if len(self.teachers) > 1 else None

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch: image [B,3,S,S], t_img/t_txt [B,D] (+ tokens [B,L], image_masked, labels, class_emb, t_logits; an
        ensemble: teachers, one {t_img, t_txt [B,D_k] (+ class_emb [K,D_k], t_logits [B,K])} per teacher, the first
        = the top-level ones)."""
        feats = {"s_img": self.image(batch["image"]), "t_img": batch["t_img"], "t_txt": batch["t_txt"],
                 "labels": batch["labels"]}
        if self.text is not None:
            feats["s_txt"] = self.text(batch["tokens"])
        if "image_masked" in batch:
            feats["s_img_masked"] = self.image(batch["image_masked"])
        if self.heads is not None:  # projected before the gather: heads get gradients as the student does
            feats["teachers"] = ensemble.teacher_views(feats, batch["teachers"], self.teachers, self.heads)
        if "t_logits" in batch:  # --labels: the class head on the student's embedding, vs the teacher's logits
            feats["s_logits"], feats["t_logits"] = self.image.classify(feats["s_img"]), batch["t_logits"]
        if self.dist.enabled:
            feats = gather_features(feats, self.dist)
        if "class_emb" in batch:
            feats["class_emb"] = batch["class_emb"]
        return losses.compute_terms(self.losses, feats)


NOT_GATHERED = ("class_emb",)  # the same on every rank (not per sample): an ensemble's teachers' dicts hold one


def gather_features(feats: dict[str, Any], dist: runtime.DistInfo) -> dict[str, Any]:
    """All-gather every [B, ...] tensor across ranks -> [world·B, ...]; the local slice keeps its grad.

    An ensemble's ``teachers`` dicts are gathered the same way (their floats pass as they are).
    """
    def gather(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return runtime.all_gather_cat(x, dist)
        return [gather_features(t, dist) for t in x] if isinstance(x, list) else x

    return {name: x if name in NOT_GATHERED else gather(x) for name, x in feats.items()}


def build_students(cfg: TrainConfig, cache: Cache,
                   teacher: ensemble.Teacher | None = None) -> tuple[ImageStudent, TextStudent | None]:
    """The students in ``teacher``'s space (its D and preprocessing; default: the cache's primary)."""
    fp, dim = (cache.teacher, cache.embed_dim) if teacher is None else (teacher.fingerprint, teacher.embed_dim)
    pre = fp["preprocess"]
    image = build_student(cfg.student, dim, cfg.image_size or int(pre["size"]),
                          mean=tuple(cfg.mean or pre["mean"]), std=tuple(cfg.std or pre["std"]),
                          init_checkpoint=cfg.init_checkpoint, **cfg.student_kwargs)
    text = None
    if cfg.text_student != "none":
        text = build_text_student(cfg.text_student, dim, **cfg.text_student_kwargs)
    return image, text


def select_teachers(cfg: TrainConfig, cache: Cache) -> list[ensemble.Teacher]:
    """``--teachers`` / ``--teacher-weights`` resolved on the cache; refuses what this run cannot do.

    ``--whiten`` takes one teacher (its own whitening, ``whitening_teacher``); an ensemble's teachers
    live in different spaces, each with its own transform, while its losses compare the student
    through one projection head per teacher with every teacher's targets as they are: refused.
    """
    teachers = ensemble.select_teachers(cache, cfg.teachers, cfg.teacher_weights)
    if cfg.whiten != "none" and len(teachers) > 1:
        raise BadValue(f"--whiten {cfg.whiten} cannot be used with an ensemble (--teachers "
                       f"{','.join(t.name for t in teachers)}): the teachers' spaces differ (each has its own "
                       f"dimension and whitening), and the ensemble's losses compare the student with every "
                       f"teacher's unwhitened targets; whiten one teacher alone (e.g. --teachers "
                       f"{teachers[0].name} --whiten {cfg.whiten}) or drop --whiten")
    for t in teachers:  # refuses, before any step, a teacher whose add has not covered a split the run reads
        for split in ("train", "val") if "val" in cache.splits() else ("train",):
            cache.teacher_h5_paths(split, t.name)
    return teachers


def whitening_teacher(teachers: Sequence[ensemble.Teacher]) -> str | None:
    """Whose whitening (and prompts) the student's space uses: the first teacher's name, None for the
    primary (its files at the cache root, read exactly as a single-teacher cache's)."""
    return None if teachers[0].primary else teachers[0].name


def teacher_streams(cache: Cache, teachers: Sequence[ensemble.Teacher], split: str) -> tuple[cachereader.TeacherShards, ...]:
    """The added teachers' h5 files the reader joins to the split's tar samples (the primary's are in the tars)."""
    return tuple(cachereader.TeacherShards(t.name, tuple(str(p) for p in cache.teacher_h5_paths(split, t.name)))
                 for t in teachers if not t.primary)


def class_prompts(cache: Cache, teacher: str | None = None) -> torch.Tensor | None:
    """[K, T, D] ``teacher``'s prompt embeddings of the cache's own classes (class x template), from its
    prompts.h5 (None: the primary's); None when the cache has no classes or that file no set of them."""
    from .prompts import find_set, read_prompts  # noqa: PLC0415

    path = cache.teacher_prompts_path(teacher)
    if cache.classnames is None or not path.exists():
        return None
    sets = read_prompts(path)
    name = find_set(sets, list(cache.classnames))
    return None if name is None else torch.from_numpy(sets[name].emb.astype(np.float32))


def class_embeddings(cache: Cache, targets: Targets, teacher: str | None = None) -> torch.Tensor | None:
    """[K, D] zero-shot classifier of the cache's own classes (for hinton), in the target space, from
    ``teacher``'s prompts.h5 (None: the primary's); None when it has no prompt set of those classes."""
    emb = class_prompts(cache, teacher)
    return None if emb is None else targets.apply(metrics.zero_shot_classifier(emb).T.contiguous(), "text")


def teachers_class_embeddings(cache: Cache, teachers: Sequence[ensemble.Teacher],
                              targets: Targets) -> list[torch.Tensor] | None:
    """hinton over class prompts: each run teacher's classifier of the cache's classes, [K, D_k] (the
    first in the student's target space), from its own prompts.h5; None when one of them has none
    (hinton is then in-batch, over the batch's captions)."""
    embs = [class_embeddings(cache, targets if k == 0 else Targets(), None if t.primary else t.name)
            for k, t in enumerate(teachers)]
    lacking = [t.name for t, emb in zip(teachers, embs) if emb is None]
    if lacking and len(lacking) < len(teachers):
        log.warning("hinton is in-batch: teacher(s) %s have no prompts.h5 set of the cache's classes (the other "
                    "teachers have); re-run `kdpipe extract --add-teacher` without --no-prompts", ", ".join(lacking))
    return None if lacking else embs


def check_labelled(cache: Cache) -> None:
    """``--labels``: refuses a cache without classes or without a labelled train image."""
    hint = "extract a labelled input (an image folder, CIFAR batches, a COCO root with labels_*.json, ...)"
    if not cache.classnames:
        raise BadValue(f"--labels: the cache {cache.root} has no classes (its input had no labels); {hint}")
    if not any(bool((shard.labels >= 0).any()) for shard in cache.iter_h5("train", fields=("img_norms",))):
        raise BadValue(f"--labels: no train image of the cache {cache.root} has a label; {hint}")


def teacher_classifier(cache: Cache, teacher: ensemble.Teacher | None = None) -> torch.Tensor:
    """``--labels``: ``teacher``'s prompt-ensemble classifier of the cache's classes, [D_k, K] (its raw space),
    from its own prompts.h5 (None: the primary's).

    The teacher's logits over the class prompts are not stored in the cache: for an image, they are
    τ_k · (its stored normalised embedding) · this classifier (``metrics.zero_shot_logits``), exactly
    what open_clip's zero-shot classifier gives on the same pixels. Refuses a teacher without the set.
    """
    name = None if teacher is None or teacher.primary else teacher.name
    emb = class_prompts(cache, name)
    if emb is None:
        rerun = ("`kdpipe extract` with prompts (not --no-prompts)" if name is None else
                 f"`kdpipe extract --add-teacher` of teacher {name!r} without --no-prompts (its shards are kept)")
        raise BadValue(f"--labels: {cache.teacher_prompts_path(name)} has no prompt set of the cache's "
                       f"{len(cache.classnames or ())} classes (the teacher side of task KD); re-run {rerun}")
    return metrics.zero_shot_classifier(emb)


def add_class_head(cfg: TrainConfig, cache: Cache, image: ImageStudent, weights: dict[str, float],
                   teachers: list[ensemble.Teacher]) -> list[torch.Tensor] | None:
    """``--labels``: a class head on the image student; returns each run teacher's classifier [D_k, K]
    (its raw space; None without --labels)."""
    if not cfg.labels:
        return None
    if "hinton" not in weights:
        raise BadValue(f"--labels trains a class head with the hinton loss; --losses {cfg.losses!r} has no hinton "
                       "(e.g. --losses hinton=1, or hinton=1 --loss-options hinton.alpha=0 for the CE baseline)")
    check_labelled(cache)
    classifiers = [teacher_classifier(cache, t) for t in teachers]
    image.add_class_head(classifiers[0].shape[1])
    return classifiers


# --------------------------------------------------------------------------- the run's pieces


@dataclass
class Setup:
    """Everything built before the first step."""

    cfg: TrainConfig
    cache: Cache
    dist: runtime.DistInfo
    device: torch.device
    precision: str
    image: ImageStudent
    text: TextStudent | None
    distiller: Distiller
    model: nn.Module  # the distiller, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    mask_gen: torch.Generator
    targets: Targets
    class_emb: list[torch.Tensor] | None  # hinton over class prompts: each teacher's [K, D_k] (first: target space)
    weights: dict[str, float]
    stream: cachereader.StreamConfig  # train stream template (epoch / skip filled per epoch)
    steps_per_epoch: int
    total_steps: int
    run_dir: Path
    teachers: list[ensemble.Teacher]  # the run's, the student's space first
    teacher_classes: list[torch.Tensor] | None = None  # --labels: each run teacher's classifier [D_k, K], raw space


def build_setup(cfg: TrainConfig) -> Setup:
    check_config(cfg)
    dist = runtime.init_distributed(cfg.device, cfg.dist_timeout)
    device = runtime.dist_device(dist, cfg.device)
    precision = runtime.resolve_precision(cfg.precision, device)
    cache = open_checked_cache(cfg)
    teachers = select_teachers(cfg, cache)
    targets = load_targets(cache, cfg.whiten, teacher=whitening_teacher(teachers))
    if cfg.whiten != "none" and dist.is_main:
        log.warning("--whiten %s: %s", cfg.whiten, MEASURED)
    weights = losses.parse_losses(cfg.losses)
    if split_mode(cfg.whiten)[0] in ("image", "text") and set(weights) & set(CROSS_MODAL):
        log.warning("--whiten %s whitens only %s targets; cross-modal losses (%s) then compare a whitened with "
                    "an unwhitened space: use --whiten joint to keep image-text alignment", cfg.whiten, cfg.whiten,
                    ", ".join(sorted(set(weights) & set(CROSS_MODAL))))
    runtime.seed_everything(cfg.seed + dist.rank)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    image, text = build_students(cfg, cache, teachers[0])
    teacher_classes = add_class_head(cfg, cache, image, weights, teachers)
    raw_scale = teachers[0].logit_scale
    scale = target_logit_scale(cache, targets, raw_scale, cfg.batch_size * dist.world_size,
                               teacher=whitening_teacher(teachers))
    if targets.mode != "none":
        log.info("teacher logit scale %.2f in the raw space = %.2f in the %s-whitened space (same softmax entropy)",
                 raw_scale, scale, targets.mode)
    if len(teachers) > 1:
        loss_modules = losses.build_ensemble_losses(weights, [(t.embed_dim, t.logit_scale) for t in teachers],
                                                    text_student=text is not None, **cfg.loss_options)
    else:
        loss_modules = losses.build_losses(weights, teachers[0].embed_dim, scale, text_student=text is not None,
                                           **cfg.loss_options)
    distiller = Distiller(image, text, loss_modules, dist, teachers).to(device)
    runtime.seed_everything(cfg.seed + dist.rank)
    model: nn.Module = distiller
    if dist.enabled:
        model = DistributedDataParallel(distiller, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=False)
    optimizer = torch.optim.AdamW(param_groups(distiller, cfg.weight_decay), lr=cfg.lr)
    spe = cachereader.steps_per_epoch(cache.count("train"), cfg.batch_size, dist.world_size)
    total = cfg.epochs * spe
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, min(cfg.warmup_steps, total),
                                                                       cfg.min_lr_ratio))
    pre = teachers[0].fingerprint["preprocess"]
    stream = cachereader.stream_config(cache.shard_paths("train", "tar"), batch_size=cfg.batch_size,
                                       image_size=image.image_size, interpolation=pre["interpolation"],
                                       seed=cfg.seed, rank=dist.rank, world=dist.world_size,
                                       views_used=cfg.views_used, shuffle_buffer=cfg.shuffle_buffer,
                                       workers=cfg.workers, teachers=teacher_streams(cache, teachers, "train"))
    mask_gen = torch.Generator().manual_seed(cfg.seed * 1000 + dist.rank)
    class_emb = teachers_class_embeddings(cache, teachers, targets) if "hinton" in weights else None
    return Setup(cfg=cfg, cache=cache, dist=dist, device=device, precision=precision,
                 image=image, text=text, distiller=distiller, model=model,
                 optimizer=optimizer, scheduler=scheduler,
                 scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"), mask_gen=mask_gen,
                 targets=targets.to(device), class_emb=None if class_emb is None else [c.to(device) for c in class_emb],
                 weights=weights, stream=stream, steps_per_epoch=spe, total_steps=total, run_dir=Path(cfg.out),
                 teachers=teachers,
                 teacher_classes=None if teacher_classes is None else [c.to(device) for c in teacher_classes])


def prepare_run_dir(cfg: TrainConfig, dist: runtime.DistInfo) -> None:
    run_dir = Path(cfg.out)
    if not cfg.resume and trainstate.has_checkpoint(run_dir):
        raise AlreadyExists(f"{run_dir} already holds a training run; pass --resume to continue it "
                            "or choose another --out")
    if cfg.resume and not trainstate.has_checkpoint(run_dir):
        raise MissingInput(f"--resume: no checkpoint in {trainstate.ckpt_dir(run_dir)}")
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        sweep_orphans(run_dir)  # the temporary files of a killed run's last writes
        write_config(cfg, run_dir / CONFIG_FILE)


# --------------------------------------------------------------------------- one step


def images_on(setup: Setup, batch: dict[str, Any]) -> torch.Tensor:
    """The batch's uint8 images, on the device, normalised with the student's mean/std."""
    return cachereader.normalize_images(batch["image"].to(setup.device, non_blocking=True),
                                        setup.image.mean, setup.image.std)


def to_device_batch(setup: Setup, batch: dict[str, Any]) -> dict[str, Any]:
    """The loader's batch on the device, targets mapped to the student's space, extras added."""
    d = setup.device
    targets = run_targets(setup, batch)
    out: dict[str, Any] = {
        "image": images_on(setup, batch),
        "t_img": setup.targets.apply(targets[0]["t_img"].to(d, non_blocking=True), "image"),
        "t_txt": setup.targets.apply(targets[0]["t_txt"].to(d, non_blocking=True), "text"),
        "labels": batch["labels"].to(d),
    }
    if len(targets) > 1:  # an ensemble (never whitened: select_teachers refuses it)
        out["teachers"] = [{side: t[side].to(d, non_blocking=True) for side in ("t_img", "t_txt")} for t in targets]
    if setup.text is not None:
        out["tokens"] = setup.text.tokenize(batch["captions"]).to(d)
    if "mfd" in setup.weights:
        out["image_masked"] = losses.mask_images(out["image"], setup.image.mask_kind, setup.cfg.mask_ratio,
                                                 setup.image.patch_size, generator=setup.mask_gen)
    if setup.class_emb is not None:  # the first teacher's at the top level (the student's side), each one's in its dict
        out["class_emb"] = setup.class_emb[0]
        for view, emb in zip(out.get("teachers", ()), setup.class_emb):
            view["class_emb"] = emb
    if setup.teacher_classes is not None:  # the first's at the top level, each one's in its dict (as class_emb)
        logits = teacher_logits(setup, targets)
        out["t_logits"] = logits[0]
        for view, z in zip(out.get("teachers", ()), logits):
            view["t_logits"] = z
    return out


def teacher_logits(setup: Setup, targets: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """``--labels``: each run teacher's zero-shot logits over the class prompts, [B, K] each: τ_k · its raw
    (never whitened) stored embedding, normalised, · its classifier (hinton averages their probabilities)."""
    return [metrics.zero_shot_logits(target["t_img"].to(setup.device).float(), classifier, teacher.logit_scale)
            for target, classifier, teacher in zip(targets, setup.teacher_classes or (), setup.teachers, strict=True)]


def run_targets(setup: Setup, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """Each of the run's teachers' targets {t_img, t_txt [B, D_k]}, in the run's order: the primary's
    from the tar members (the batch's t_img / t_txt), an added teacher's joined from its h5."""
    return [{"t_img": batch["t_img"], "t_txt": batch["t_txt"]} if t.primary else batch["teachers"][t.name]
            for t in setup.teachers]


def backward_global(total: torch.Tensor, distiller: Distiller, world: int) -> None:
    """Backward of the (gathered, global-batch) loss so gradients equal one process's on the global batch.

    Each rank's student gradient comes only through its local slice of the gathered features:
    the ranks' gradients *sum* to the global one, and DDP averages them, hence × world. The
    loss-owned parameters see the whole gathered batch on every rank, so each rank already has
    their full gradient: divide those back by world.
    """
    (total * world).backward()
    if world > 1:
        for p in distiller.losses.parameters():
            if p.grad is not None:
                p.grad.div_(world)


@dataclass
class StepResult:
    terms: dict[str, float]
    total: float
    finite: bool
    grad_norm: float
    lr: float  # the learning rate this step used (whether or not it was applied)
    teacher_terms: dict[str, float] = field(default_factory=dict)  # an ensemble's "fd_img/NAME": w_k · term_k


def teacher_terms(setup: Setup) -> dict[str, float]:
    """The last step's per-teacher terms by teacher name, {"fd_img/b": w_b · fd_img_b, ...}; {} for one teacher."""
    return {f"{term}/{teacher.name}": float(value)
            for term, values in losses.teacher_shares(setup.distiller.losses).items()
            for teacher, value in zip(setup.teachers, values, strict=True)}


def optimizer_step(setup: Setup, finite: bool) -> None:
    """Apply the gradients if the step is finite; the schedule advances either way.

    fp16: the scaler skips the step by itself when the unscaled gradients overflow, and
    ``update()`` must follow every ``unscale_()`` (even when the step is skipped), or the
    next ``unscale_()`` raises. The LR schedule counts steps, not applied updates, so a run
    with skipped steps still reaches the cosine's floor at its last step. Logit scales are
    capped after the update, as open_clip does.
    """
    if setup.scaler.is_enabled():
        if finite:
            setup.scaler.step(setup.optimizer)
        setup.scaler.update()
    elif finite:
        setup.optimizer.step()
    with warnings.catch_warnings():  # a skipped first step: torch warns that the schedule leads
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        setup.scheduler.step()
    losses.clamp_logit_scales(setup.distiller.losses)


def train_step(setup: Setup, batch: dict[str, Any]) -> StepResult:
    """Forward, backward and (if everything is finite) an optimizer step."""
    setup.model.train()
    lr = setup.scheduler.get_last_lr()[0]
    inputs = to_device_batch(setup, batch)  # outside autocast: whitening is applied in float32
    with runtime.autocast(setup.precision, setup.device):
        terms = setup.model(inputs)
    total = losses.total_loss(terms)
    setup.optimizer.zero_grad(set_to_none=True)
    backward_global(setup.scaler.scale(total), setup.distiller, setup.dist.world_size)  # always: DDP expects one
    setup.scaler.unscale_(setup.optimizer)
    max_norm = setup.cfg.grad_clip if setup.cfg.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(setup.distiller.parameters(), max_norm))
    finite = math.isfinite(float(total.detach()))
    if not setup.scaler.is_enabled():  # fp16: gradient overflow is the scaler's business (it skips and rescales)
        finite = finite and math.isfinite(grad_norm)
    optimizer_step(setup, finite)
    setup.optimizer.zero_grad(set_to_none=True)
    return StepResult({k: float(v.detach()) for k, v in terms.items()}, float(total.detach()), finite, grad_norm, lr,
                      teacher_terms(setup))


# --------------------------------------------------------------------------- validation


def bn_batches(setup: Setup) -> Iterator[torch.Tensor]:
    """Training images for precise BN: a fixed stream (epoch −1) that never touches the run's."""
    cfg = replace(setup.stream, epoch=-1, skip_batches=0, workers=min(setup.cfg.workers, 1))
    for batch in cachereader.make_loader(cfg):
        yield images_on(setup, batch)


def refresh_bn(setup: Setup) -> int:
    """Precise BN on the image student (the text tower has LayerNorm only)."""
    return precise_bn(setup.image, bn_batches(setup), max_samples=setup.cfg.bn_samples)


@torch.no_grad()
def embed_val(setup: Setup) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
    """Keys [N], student view-0 image embeddings [N, D] (teacher space) and, with a text
    student, [N, D] embeddings of each image's first caption."""
    cache, pre = setup.cache, setup.teachers[0].fingerprint["preprocess"]
    cfg = cachereader.stream_config(cache.shard_paths(VALIDATED_SPLIT, "tar"), batch_size=setup.cfg.batch_size,
                                    image_size=setup.image.image_size, interpolation=pre["interpolation"],
                                    train=False, workers=min(setup.cfg.workers, 1))
    keys, img, txt = [], [], []
    setup.image.eval()
    for batch in cachereader.make_loader(cfg):
        with runtime.autocast(setup.precision, setup.device):
            out = setup.image(images_on(setup, batch))
        img.append(to_teacher_space(out, setup.targets.params.get("image")))
        if setup.text is not None:
            setup.text.eval()
            with runtime.autocast(setup.precision, setup.device):
                out = setup.text(setup.text.tokenize(batch["captions"]).to(setup.device))
            txt.append(to_teacher_space(out, setup.targets.params.get("text")))
        keys += batch["keys"]
        if len(keys) >= setup.cfg.val_samples:
            break
    n = min(len(keys), setup.cfg.val_samples)
    return keys[:n], torch.cat(img)[:n].cpu(), torch.cat(txt)[:n].cpu() if txt else None


@torch.no_grad()
def head_accuracy(setup: Setup) -> dict[str, float]:
    """``--labels``: the class head's top-1 on up to ``val_samples`` labelled val images (view 0, eval mode)."""
    cache, pre = setup.cache, setup.teachers[0].fingerprint["preprocess"]  # the student's teacher's, as embed_val
    cfg = cachereader.stream_config(cache.shard_paths(VALIDATED_SPLIT, "tar"), batch_size=setup.cfg.batch_size,
                                    image_size=setup.image.image_size, interpolation=pre["interpolation"],
                                    train=False, workers=min(setup.cfg.workers, 1))
    hits, seen = 0, 0
    setup.image.eval()
    for batch in cachereader.make_loader(cfg):
        known = batch["labels"] >= 0
        with runtime.autocast(setup.precision, setup.device):
            logits = setup.image.classify(setup.image(images_on(setup, batch)))
        hits += int((logits.argmax(dim=1).cpu() == batch["labels"])[known].sum())
        seen += int(known.sum())
        if seen >= setup.cfg.val_samples:
            break
    return {"val_top1": hits / max(seen, 1), "val_labelled": seen}


@dataclass
class ValRows:
    """One teacher's cached val embeddings of the validated images, in their order: view 0 [n, D_k],
    every caption [m, D_k] with its image txt_to_img [m], and each image's first caption [n, D_k]."""

    img: torch.Tensor
    txt: torch.Tensor
    txt_to_img: torch.Tensor
    first_txt: torch.Tensor


def val_rows(cache: Cache, teacher: str, keys: Sequence[str]) -> ValRows:
    """``teacher``'s val rows of the images ``keys`` (the same captions, in the same order, for every teacher)."""
    val = cache.load_split(VALIDATED_SPLIT, fields=("img", "txt"), teacher=teacher)
    index = {k: i for i, k in enumerate(val.keys)}
    rows = np.array([index[k] for k in keys])
    starts, ends = val.txt_offsets[rows], val.txt_offsets[rows + 1]
    txt_rows = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)])
    as_tensor = lambda x: torch.from_numpy(x.astype(np.float32))  # noqa: E731
    return ValRows(as_tensor(val.img[rows, 0]), as_tensor(val.txt[txt_rows]),
                   torch.from_numpy(np.repeat(np.arange(len(rows)), ends - starts)), as_tensor(val.txt[starts]))


VAL_TEACHER_KEYS = ("i2t_R@1", "t2i_R@1", "agreement/i2t_top1")  # of metrics.teacher_rows, logged per teacher


@torch.no_grad()
def ensemble_validation(setup: Setup, keys: Sequence[str], s_img: torch.Tensor,
                        first: ValRows) -> dict[str, float]:
    """An ensemble run's student against each teacher's val rows and against the ensemble.

    The student reaches teacher k's space through its projection head (as the losses see it; the first
    teacher's: as it is): its R@1 both ways with k's captions, and the share of images whose top-1 caption
    is the same as k's own (``metrics.teacher_rows``, eval's ``teachers/NAME/`` rows). The ensemble's: the
    same on ``metrics.ensemble_embeddings`` of the student's and the teachers' (similarity Σ_k w_k cos_k).
    s_img [n, D_0]. Keys ``val_teachers/NAME/i2t_R@1``, ..., ``val_teachers/ensemble/i2t_R@1``, ...
    """
    heads = [nn.Identity(), *(setup.distiller.heads or ())]
    students, teachers = [], []
    for k, (teacher, head) in enumerate(zip(setup.teachers, heads, strict=True)):
        rows = first if k == 0 else val_rows(setup.cache, teacher.name, keys)
        s_k = head(s_img.to(setup.device, torch.float32)).cpu()  # [n, D_k]
        students.append((teacher.weight, metrics.Embeddings(s_k, rows.txt)))
        teachers.append((teacher.weight, metrics.Embeddings(rows.img, rows.txt)))
    no_labels = torch.full((len(keys),), -1)  # no classifier: retrieval and agreement only
    found: dict[str, dict] = {}
    for teacher, (_, s), (_, t) in zip(setup.teachers, students, teachers):
        found.update(metrics.teacher_rows(s, t, first.txt_to_img, no_labels, f"teachers/{teacher.name}"))
    found.update(metrics.teacher_rows(metrics.ensemble_embeddings(students), metrics.ensemble_embeddings(teachers),
                                      first.txt_to_img, no_labels, f"teachers/{ENSEMBLE}"))
    return {f"val_{name}": row["student"] for name, row in found.items() if name.endswith(VAL_TEACHER_KEYS)}


def validate(setup: Setup) -> dict[str, float]:
    """Quick validation: student (view 0, eval mode, after precise BN) vs cached teacher embeddings.

    R@1 both ways with the texts the student will be used with, as eval judges it: the first teacher's
    text embeddings of the same images' captions, or, with a text student, its own embeddings of each
    image's first caption (a student that learns its own text space, as the no-teacher baseline does,
    cannot retrieve among the teacher's). Also the mean cosine to the first teacher's view-0 embedding
    (with a text student, ``val_txt_cos``: its text tower's to the first caption's). An ensemble adds
    the student against each teacher and the ensemble (``ensemble_validation``); the score that picks
    best.pt stays the first teacher's (or, with ``--labels``, the class head's top-1).
    """
    refresh_bn(setup)
    keys, s_img, s_txt = embed_val(setup)
    first = val_rows(setup.cache, setup.teachers[0].name, keys)
    if s_txt is None:
        recall = metrics.retrieval_recall(s_img, first.txt, first.txt_to_img, ks=(1,),
                                          img_name="val split: student image embeddings",
                                          txt_name="val split: teacher text embeddings")
    else:
        recall = metrics.retrieval_recall(s_img, s_txt, torch.arange(len(keys)), ks=(1,),
                                          img_name="val split: student image embeddings",
                                          txt_name="val split: student text embeddings")
    out = {f"val_{k}": v for k, v in recall.items()}
    out["val_cos"] = metrics.agreement(s_img, first.img)["cosine"]
    if s_txt is not None:
        out["val_txt_cos"] = metrics.agreement(s_txt, first.first_txt)["cosine"]
    out["val_score"] = (out["val_i2t_R@1"] + out["val_t2i_R@1"]) / 2 + 1e-3 * out["val_cos"]
    if setup.teacher_classes is not None:  # --labels: the best checkpoint is the best classifier
        out.update(head_accuracy(setup))
        out["val_score"] = out["val_top1"] + 1e-3 * out["val_cos"]
    if len(setup.teachers) > 1:
        out.update(ensemble_validation(setup, keys, s_img, first))
    out["val_images"] = len(keys)
    return out


# --------------------------------------------------------------------------- checkpoints


def gather_rng(setup: Setup) -> list[dict[str, Any]]:
    """Every rank's RNG state (rank order), so a resumed DDP run restores each rank's own."""
    return runtime.all_gather_objects(trainstate.capture_rng(setup.mask_gen), setup.dist)


def checkpoint_state(setup: Setup, pos: trainstate.Position, counters: dict[str, int],
                     best: dict[str, Any], rng: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "model": setup.distiller.state_dict(), "optimizer": setup.optimizer.state_dict(),
        "scheduler": setup.scheduler.state_dict(), "scaler": setup.scaler.state_dict(), "rng": rng,
        "position": pos.to_dict(), "counters": dict(counters), "best": dict(best),
        "teacher": setup.teachers[0].fingerprint, "world_size": setup.dist.world_size, "workers": setup.cfg.workers,
        "batch_size": setup.cfg.batch_size, "seed": setup.cfg.seed,
    }


def save_ckpt(setup: Setup, pos: trainstate.Position, counters: dict[str, int], best: dict[str, Any],
              is_best: bool = False) -> None:
    rng = gather_rng(setup)  # collective: every rank calls save_ckpt
    if not setup.dist.is_main:
        return
    if not trainstate.all_finite(setup.distiller):
        raise RuntimeError(f"step {pos.step}: the weights are not finite; refusing to overwrite the checkpoint")
    state = checkpoint_state(setup, pos, counters, best, rng)
    trainstate.save_checkpoint(setup.run_dir, state)
    if is_best:
        trainstate.save_checkpoint(setup.run_dir, state, best=True)


def restore(setup: Setup) -> tuple[trainstate.Position, dict[str, int], dict[str, Any]]:
    """Load the newest readable checkpoint into every piece of the run."""
    state, path = trainstate.load_latest(setup.run_dir)
    if not same_fingerprint(state["teacher"], setup.teachers[0].fingerprint):
        raise CacheError(f"{path} was trained on teacher {describe_teacher(state['teacher'])}, but this run "
                         f"learns from {describe_teacher(setup.teachers[0].fingerprint)} of {setup.cache.root}")
    setup.distiller.load_state_dict(state["model"])
    setup.optimizer.load_state_dict(state["optimizer"])
    setup.scheduler.load_state_dict(state["scheduler"])
    setup.scaler.load_state_dict(state["scaler"])
    same_data = all(state[k] == v for k, v in (("world_size", setup.dist.world_size), ("workers", setup.cfg.workers),
                                                ("batch_size", setup.cfg.batch_size), ("seed", setup.cfg.seed)))
    if not same_data:
        log.warning("resuming with a different world size / workers / batch size / seed than the checkpoint: "
                    "the data order from here on differs from the original run's")
    rngs = state["rng"]
    if len(rngs) == setup.dist.world_size:
        trainstate.restore_rng(rngs[setup.dist.rank], setup.mask_gen)
    pos = trainstate.Position(**state["position"])
    log.info("resumed from %s: epoch %d, batch %d, step %d", path, pos.epoch, pos.batch, pos.step)
    return pos, dict(state["counters"]), dict(state["best"])


# --------------------------------------------------------------------------- logging and outputs


class MetricsLog:
    """RUN/metrics.jsonl (rank 0), each row also given to the ``--log`` sinks (``kdpipe.runlog``).
    On resume, rows after the checkpoint's step are dropped, so the file continues exactly where
    the restored state was."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, sinks: Sequence[runlog.Sink] = ()) -> None:
        self.path, self.enabled, self.sinks = path, enabled, list(sinks)
        if enabled and resume_step is not None and path.exists():
            kept = [r for r in read_metrics(path) if r["step"] <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif enabled and resume_step is None:
            path.write_text("")

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            for sink in self.sinks:
                sink.write(row)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(run_dir: Path) -> Path | None:
    """RUN/curves.png: loss terms per step (left), validation R@1 and cosine (right); redrawn at each
    validation and at the end."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = read_metrics(run_dir / METRICS_FILE)
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    if not train:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in train]
    for name in ["loss"] + sorted({k for r in train for k in r.get("terms", {})}):
        ys = [r["loss"] if name == "loss" else r["terms"].get(name, float("nan")) for r in train]
        ax1.plot(steps, ys, label=name, lw=2 if name == "loss" else 1)
    ax1.set(xlabel="step", ylabel="loss", title="training loss")
    ax1.set_yscale("log") if all(y > 0 for y in [r["loss"] for r in train]) else None
    ax1.legend(fontsize=8)
    for name in ("val_i2t_R@1", "val_t2i_R@1", "val_cos"):
        if val:
            ax2.plot([r["step"] for r in val], [r[name] for r in val], marker="o", label=name)
    ax2.set(xlabel="step", title="validation (vs teacher)" if val else "no validation split", ylim=(0, 1))
    if val:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    path = run_dir / CURVES_FILE
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))  # refreshed while people look at it
    plt.close(fig)
    return path


def target_scale(loss_modules: nn.ModuleDict, default: float) -> float:
    """The teacher logit scale the losses used (calibrated for whitened targets)."""
    return next((loss.teacher_logit_scale for loss in loss_modules.values()), default)


def val_row(run_dir: Path, step: int) -> dict[str, Any] | None:
    """The validation figures logged at ``step`` (metrics.jsonl), None when there are none."""
    rows = [r for r in read_metrics(run_dir / METRICS_FILE) if r["kind"] == "val" and r["step"] == step]
    return {k: v for k, v in rows[-1].items() if k not in ("kind", "step", "epoch")} if rows else None


def save_best(setup: Setup, best: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """RUN/student-best.safetensors from best.pt, precise BN re-estimated; its student.json entry.

    When nothing was validated, or the best score is the final step's, "best" names the last
    weights. The students hold the last weights again afterwards.
    """
    if "step" not in best or best["step"] == last["step"]:
        return {**last, "same_as": "last", "note": NO_BEST if "step" not in best else "the best validation score "
                "is the last step's"}
    path = trainstate.ckpt_dir(setup.run_dir) / trainstate.BEST
    state = trainstate.read_checkpoint(path)
    if state["position"]["step"] != best["step"]:  # a run killed between writing latest.pt and best.pt
        note = (f"{path} holds step {state['position']['step']}, not the best validation score's step "
                f"{best['step']}: best = last")
        log.warning(note)
        return {**last, "same_as": "last", "note": note}
    last_state = {k: v.detach().clone() for k, v in setup.distiller.state_dict().items()}
    try:
        setup.distiller.load_state_dict(state["model"])
        refresh_bn(setup)
        name = save_weights(setup.run_dir, setup.image, setup.text, "best")
    finally:
        setup.distiller.load_state_dict(last_state)
    return {"file": name, "step": best["step"], "epoch": state["position"]["epoch"],
            "val": val_row(setup.run_dir, best["step"]), "score": best["score"]}


def labels_used(setup: Setup) -> dict[str, Any] | None:
    """The losses that trained on the cache's class labels (hinton's hard-label CE) and those classes,
    so eval reports accuracy on these classes as supervised, not zero-shot. None: no label was used."""
    supervised = losses.label_losses(setup.weights, setup.cfg.loss_options)
    if not supervised or setup.class_emb is None:  # the CE needs the class prompts of the labels
        return None
    return {"losses": supervised, "classnames": list(setup.cache.classnames)}


def finalize(setup: Setup, val: dict[str, float] | None, pos: trainstate.Position, best: dict[str, Any]) -> None:
    """RUN/student-last.safetensors (the final step) and student-best.safetensors (the best validation
    score), each after precise BN; then student.json, whitening and curves (rank 0)."""
    if not setup.dist.is_main:
        return
    if not trainstate.all_finite(setup.distiller):
        raise RuntimeError("the final weights are not finite; student not saved")
    refresh_bn(setup)
    last = {"file": save_weights(setup.run_dir, setup.image, setup.text, "last"), "step": pos.step, "epoch": pos.epoch,
            "val": val}
    checkpoints = {"best": save_best(setup, best, last), "last": last}
    meta = {
        "teacher": setup.teachers[0].fingerprint, "cache": str(Path(setup.cfg.cache).resolve()),
        "teachers": [t.record() for t in setup.teachers],
        "whitening": save_whitening(setup.run_dir, setup.targets),
        "losses": {"weights": setup.weights, "options": setup.cfg.loss_options}, "labels_used": labels_used(setup),
        "views_used": setup.cfg.views_used, "teacher_logit_scale": setup.teachers[0].logit_scale,
        "target_logit_scale": target_scale(setup.distiller.losses, setup.teachers[0].logit_scale),
    }
    write_spec(setup.run_dir, setup.image, setup.text, meta, checkpoints)
    if checkpoints["best"]["file"] != weights_file("best"):  # a resumed run's older best, named no more
        (setup.run_dir / weights_file("best")).unlink(missing_ok=True)
    plot_curves(setup.run_dir)


# --------------------------------------------------------------------------- the loop


@dataclass
class LoopState:
    pos: trainstate.Position
    counters: dict[str, int]
    best: dict[str, Any]
    last_val: dict[str, float] | None = None
    val_step: int | None = None
    consecutive_bad: int = 0
    ckpt_step: int | None = None  # the step of this session's last checkpoint
    stopped_by: str | None = None  # the stop signal that ended this session early (every rank agrees)


def on_step(setup: Setup, loop: LoopState, res: StepResult, batch: dict[str, Any], epoch: int,
            rate: float, mlog: MetricsLog) -> None:
    """Count non-finite steps (stop after too many in a row) and log the step's row."""
    if res.finite:
        loop.consecutive_bad = 0
    else:
        loop.counters["nonfinite"] += 1
        loop.consecutive_bad += 1
        bad = sorted(k for k, v in res.terms.items() if not math.isfinite(v))
        log.warning("step %d: non-finite loss (terms %s, grad norm %s); step skipped",
                                            loop.pos.step, bad or "none", res.grad_norm)
        if loop.consecutive_bad >= setup.cfg.max_nonfinite:
            raise CannotRun(f"{loop.consecutive_bad} non-finite steps in a row, the last at step {loop.pos.step} "
                            f"(non-finite terms: {bad or 'none'}; batch keys: {batch['keys'][:8]}); "
                            "stopping — the last checkpoint holds finite weights")
    loop.counters["data_errors"] += int(batch.get("data_errors", 0))
    if loop.pos.step % setup.cfg.log_every == 0 or not res.finite:
        mlog.write({"kind": "train", "step": loop.pos.step, "epoch": epoch, "lr": res.lr,
                   "loss": res.total, "terms": res.terms, "grad_norm": res.grad_norm,
                   "samples_per_s": rate, "nonfinite_skipped": loop.counters["nonfinite"],
                   "data_errors": loop.counters["data_errors"], **losses.logit_scales(setup.distiller.losses),
                   **({"teacher_terms": res.teacher_terms} if res.teacher_terms else {})})


def val_line(step: int, val: dict[str, float], best: dict[str, Any]) -> str:
    """'val step 120: R@1 i2t 0.412, t2i 0.398; cos 0.871; best 0.405 (step 80)' (score: mean R@1)."""
    text = f", text cos {val['val_txt_cos']:.3f}" if "val_txt_cos" in val else ""
    head = f"; head top-1 {val['val_top1']:.3f}" if "val_top1" in val else ""
    return (f"val step {step:,}: R@1 i2t {val['val_i2t_R@1']:.3f}, t2i {val['val_t2i_R@1']:.3f}; "
            f"cos {val['val_cos']:.3f}{text}{head}; best {best['score']:.3f} (step {best['step']:,})")


def run_validation(setup: Setup, loop: LoopState, mlog: MetricsLog) -> bool:
    """Validate on rank 0 (others wait); returns whether this is the best score so far."""
    is_best = False
    if setup.dist.is_main and VALIDATED_SPLIT in setup.cache.splits():
        loop.last_val = validate(setup)
        is_best = loop.last_val["val_score"] > loop.best.get("score", -math.inf)
        if is_best:
            loop.best = {"score": loop.last_val["val_score"], "step": loop.pos.step}
        mlog.write({"kind": "val", "step": loop.pos.step, "epoch": loop.pos.epoch, **loop.last_val})
        log.info(val_line(loop.pos.step, loop.last_val, loop.best))
        plot_curves(setup.run_dir)
    loop.val_step = loop.pos.step  # on every rank: they must agree on which collectives follow
    runtime.wait_for_all(setup.dist)  # however long rank 0 validates
    return bool(runtime.broadcast_object(is_best, setup.dist))


def train_loop(setup: Setup, loop: LoopState, mlog: MetricsLog, request: runtime.StopRequest) -> None:
    """Steps from ``loop.pos`` to the stop (``max_steps`` or the last epoch's end), or until ``request``."""
    cfg, spe = setup.cfg, setup.steps_per_epoch
    stop = min(cfg.max_steps or setup.total_steps, setup.total_steps)
    global_batch = cfg.batch_size * setup.dist.world_size
    # off a terminal, the lines below say what a bar would (and the loss terms and the lr): no bar there
    lines = StepLines("train", stop, cfg.print_every or line_every(stop, cfg.log_every), global_batch,
                      start=loop.pos.step, enabled=setup.dist.is_main and not interactive())
    with make_progress("samples", disable=not (cfg.progress and setup.dist.is_main and interactive())) as progress:
        task = progress.add_task("train", total=stop * global_batch, completed=loop.pos.step * global_batch, info="")
        while loop.pos.step < stop:
            epoch = loop.pos.epoch
            stream = replace(setup.stream, epoch=epoch, skip_batches=loop.pos.batch)
            tick = time.perf_counter()
            for batch in cachereader.epoch_batches(stream, spe, pin_memory=runtime.pin_memory(setup.device)):
                res = train_step(setup, batch)
                loop.pos.step += 1
                loop.pos.batch += 1
                seconds = time.perf_counter() - tick  # loading this batch and its step
                rate = global_batch / max(seconds, 1e-9)
                on_step(setup, loop, res, batch, epoch, rate, mlog)
                lines.add(loop.pos.step, seconds, res.total, res.terms, res.lr, epoch)
                epoch_end = loop.pos.batch >= spe
                if epoch_end:
                    loop.pos.epoch, loop.pos.batch = epoch + 1, 0
                progress.update(task, advance=global_batch, info=f"ep {epoch} loss {res.total:.4f}")
                events(setup, loop, mlog, epoch_end, stop)
                tick = time.perf_counter()  # a validation or checkpoint is not the next step's time
                if loop.pos.step < stop and preempted(setup, loop, request):
                    return
                if loop.pos.step >= stop or epoch_end:
                    break


def events(setup: Setup, loop: LoopState, mlog: MetricsLog, epoch_end: bool, stop: int) -> None:
    """Validation and checkpoints due after this step."""
    cfg, step = setup.cfg, loop.pos.step
    due_val = (cfg.val_every and step % cfg.val_every == 0) or (cfg.val_every is None and epoch_end)
    is_best = run_validation(setup, loop, mlog) if due_val else False
    due_ckpt = due_val or epoch_end or step >= stop or bool(cfg.ckpt_every and step % cfg.ckpt_every == 0)
    if due_ckpt:
        save_ckpt(setup, loop.pos, loop.counters, loop.best, is_best=is_best)
        loop.ckpt_step = step


def preempted(setup: Setup, loop: LoopState, request: runtime.StopRequest) -> bool:
    """At a step boundary: whether any rank was asked to stop; if so, this step is checkpointed (once).

    Every rank calls it after every step (one all_reduce), so all ranks stop after the same step.
    """
    if not runtime.any_rank(bool(request), setup.dist, setup.device):
        return False
    if loop.ckpt_step != loop.pos.step:
        save_ckpt(setup, loop.pos, loop.counters, loop.best)
        loop.ckpt_step = loop.pos.step
    loop.stopped_by = request.signal or "another rank's stop signal"
    return True


# --------------------------------------------------------------------------- entry point


def ensemble_note(teachers: Sequence[ensemble.Teacher]) -> str:
    """", ensemble a 0.50 + b 0.50" for several teachers, "" for one."""
    if len(teachers) == 1:
        return ""
    return ", ensemble " + " + ".join(f"{t.name} {t.weight:.2f}" for t in teachers)


def kept_after_failure(run_dir: Path) -> tuple[str, str]:
    """After a failed write (disk full, ...): the checkpoint that is intact, and how to continue from it."""
    kept, step = trainstate.describe_kept(run_dir)
    if step is None:
        return kept, "free some space, then re-run the same command: it starts the run again"
    return kept, f"free some space, then re-run the same command with --resume: it continues from step {step}"


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train a student from cfg.cache into cfg.out; returns the final validation metrics and paths.

    SIGTERM or SIGUSR1 (a scheduler's preemption notice) stops the run after the step in progress,
    with a checkpoint of that step and no student files: the result's ``stopped`` names the signal
    (None when the run went to its end) and ``resume="auto"`` continues it.
    """
    cfg = replace(cfg, resume=continues(cfg.resume, cfg.out))
    with runtime.stop_requests() as request:
        setup = build_setup(cfg)
        mlog = None
        try:
            prepare_run_dir(cfg, setup.dist)
            runtime.barrier(setup.dist)
            loop = LoopState(trainstate.Position(), {"nonfinite": 0, "data_errors": 0}, {})
            if cfg.resume:
                loop.pos, loop.counters, loop.best = restore(setup)
            resume_step = loop.pos.step if cfg.resume else None
            sinks = runlog.open_sinks(cfg.log, setup.run_dir, asdict(cfg), resume_step) if setup.dist.is_main else []
            mlog = MetricsLog(setup.run_dir / METRICS_FILE, setup.dist.is_main, resume_step, sinks)
            if setup.dist.is_main:
                console.print(f"train {cfg.student} on {setup.cache.root} "
                              f"(teacher {describe_teacher(setup.teachers[0].fingerprint)}, "
                              f"D={setup.teachers[0].embed_dim}{ensemble_note(setup.teachers)}): "
                              f"{setup.steps_per_epoch} steps/epoch x {cfg.epochs} epochs, "
                              f"batch {cfg.batch_size} x {setup.dist.world_size}, {setup.precision} on {setup.device}")
            with on_write_failure(lambda: kept_after_failure(setup.run_dir)):
                train_loop(setup, loop, mlog, request)
                if loop.stopped_by is None:
                    if loop.val_step != loop.pos.step:
                        run_validation(setup, loop, mlog)  # the final numbers, after the last step
                    finalize(setup, loop.last_val, loop.pos, loop.best)
            runtime.wait_for_all(setup.dist)  # rank 0 writes the student
            return {"run": str(setup.run_dir), "step": loop.pos.step, "val": loop.last_val, "best": loop.best,
                    "counters": loop.counters, "rank": setup.dist.rank, "stopped": loop.stopped_by}
        finally:
            if mlog is not None:
                mlog.close()  # the TensorBoard / W&B sinks: flushed even when the run stops on an error
            runtime.shutdown(setup.dist)
