"""Stage 4: judge a student (or the teacher itself) on a cache's held-out split.

Flow for a student run: read RUN/student.json (how to rebuild it, its teacher, its cache,
its whitening), open the cache it was trained from, then

- images: stream the split's tar shards, replay view 0 (the teacher's eval crop) at the
  student's input size with the teacher's interpolation and the student's mean/std, run the
  student in eval mode, and line the embeddings up by key with the HDF5 order;
- texts: an image-only student is paired with the teacher's cached caption embeddings; a
  student with a text tower encodes the captions itself;
- the teacher's figures come from the cached view-0 and caption embeddings of the same
  split (no teacher forward), so every student figure has its ratio.

Metrics (``kdpipe.metrics``): Recall@1/5/10 both ways with every caption (CLIP_benchmark),
the class head's top-1/top-5 for a run trained with ``--labels`` (``head/``, beside the teacher's
zero-shot on the same images),
zero-shot top-1/top-5 with prompt ensembles (classifiers and the ``--zeroshot`` datasets:
``kdpipe.zeroshot``), and agreement with the teacher (mean cosine of
image embeddings, share of identical zero-shot top-1). ``evaluate_embeddings`` takes the
embeddings ready-made, so the teacher's numbers and a student's go through the same code.

A student is judged in the space of the teacher it learnt (student.json's ``teacher``; zero-shot with
that teacher's own prompts.h5). A run of several teachers (``kdpipe train --teachers A,B``) is judged
in its first teacher's space as above, and also against each teacher (``teachers/NAME/...``: retrieval
next to that teacher's own, the share of images whose top-1 caption is the same for both, each in its
own space, and zero-shot with the student's classifier next to that teacher's, from its prompts) and
against their weighted ensemble (``teachers/ensemble/...``: the weighted average similarity).

A student whose losses trained on class labels (hinton's hard-label CE) is not zero-shot on
those classes: its accuracy there is reported as ``supervised/{set}/top1`` (no teacher ratio),
never under ``zeroshot/``. The weights judged are the run's best by default (``checkpoint``:
best | last), and eval.json records which (name, file, step).

Whitened students (trained against whitened targets) output directions in the whitened
space; they are mapped back to the teacher's space exactly as `kdpipe train` does in its
validation (``kdpipe.targetspace.BackMap``: t̂ = normalise(r · ŝ W⁻¹ᵀ + μ)) before anything
is compared with teacher embeddings, and eval.json says so in ``space``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from . import cachereader, losses, metrics, prompts
from .progress import console, make_progress
from .runtime import resolve_device
from .atomic import atomic_write_json
from .errors import BadValue
from .metrics import Embeddings, ensemble_embeddings, teacher_rows, zeroshot_metrics
from .rundir import (EVAL_JSON, SPEC_FILE, RunSpec, check_checkpoint, describe_checkpoint, picked_on_split,
                     read_config, require_run)
from .store import ENSEMBLE, TEACHER_EVAL_JSON, Cache, CacheError, H5Shard, describe_teacher, open_cache
from .targetspace import RAW_SPACE, Space, student_space, whitening_mode
from .zeroshot import (ImagePrep, cache_classifiers, encode_text, external_zeroshot, open_zeroshot, parse_spec,
                       read_prompt_sets, text_classifier)

log = logging.getLogger("kdpipe")


@dataclass
class EvalConfig:
    run: str | Path | None = None  # RUN directory written by `kdpipe train`
    teacher: str | Path | None = None  # CACHE: evaluate the teacher from its cached embeddings instead
    teacher_name: str | None = None  # with `teacher`: which of the cache's teachers (default: the primary)
    cache: str | Path | None = None  # override the cache recorded in RUN/student.json
    checkpoint: str = "best"  # the run's weights to judge: best (validation) | last (final step)
    split: str = "val"
    zeroshot: list[str] = field(default_factory=list)  # extra datasets: folder:PATH, imagenet:PATH, cifar10:ROOT, ...
    batch_size: int = 64
    workers: int = 0  # DataLoader workers decoding images
    device: str = "auto"
    chunk: int = 1024  # queries per similarity block (bounded memory)
    out: str | Path | None = None  # default: RUN/eval.json, or CACHE/teacher_eval.json
    verify: str = "size"  # cache check: none | size | sha256
    progress: bool = True


EvalRow = dict[str, Any]  # {"student": float | None, "teacher": float | None, "ratio": float | None}


# --------------------------------------------------------------------------- metrics on embeddings


def split_metrics(e: Embeddings, txt_to_img: Tensor, labels: Tensor, chunk: int = 1024,
                  whose: str = "") -> dict[str, float]:
    """Retrieval R@1/5/10 both ways, zero-shot top-1/top-5 per classifier on the labelled images, and
    the geometry whitening is said to change: the modality gap (image vs text centroid) and the
    effective rank of the image embeddings (``metrics.modality_gap``, ``metrics.effective_rank``).

    txt_to_img [M] long, labels [N] long (−1: unknown). Keys: "i2t_R@1", ...,
    "zeroshot/{dataset}/top1", "geometry/modality_gap", "geometry/effective_rank_image". ``whose``
    (e.g. "val split: student") prefixes the error that refuses non-finite embeddings.
    """
    who = f"{whose} " if whose else ""
    out = metrics.retrieval_recall(e.img, e.txt, txt_to_img, chunk=chunk,
                                   img_name=f"{who}image embeddings", txt_name=f"{who}text embeddings")
    out["geometry/modality_gap"] = metrics.modality_gap(e.img, e.txt)  # finite: retrieval_recall checked
    out["geometry/effective_rank_image"] = metrics.effective_rank(e.img)
    out.update(zeroshot_metrics(e, labels))
    return out


def agreement_metrics(student: Embeddings, teacher: Embeddings) -> dict[str, float]:
    """Mean image cosine ("agreement/cosine") and, per shared classifier, the share of equal top-1."""
    out = {"agreement/cosine": metrics.agreement(student.img, teacher.img)["cosine"]}
    for name, classifier in student.classifiers.items():
        if name in teacher.classifiers:
            same = metrics.agreement(student.img, teacher.img, classifier, teacher.classifiers[name])
            out[f"agreement/{name}/top1"] = same["top1_agreement"]
    return out


def evaluate_embeddings(
    student: Embeddings, teacher: Embeddings, txt_to_img: Tensor, labels: Tensor, chunk: int = 1024,
    split: str = "",
) -> dict[str, EvalRow]:
    """Every metric of the student next to the teacher's and their ratio (``metrics.with_ratios``).

    Both sides go through the same functions; the teacher's agreement with itself is computed
    too (1 by construction), so feeding the teacher's embeddings as the "student" reproduces
    the teacher column exactly. ``split`` names the split in the non-finite error; the teacher
    is scored first, so a bad cache is blamed on it, not on a student borrowing its captions.
    """
    where = f"{split} split: " if split else ""
    t = {**split_metrics(teacher, txt_to_img, labels, chunk, f"{where}teacher"), **agreement_metrics(teacher, teacher)}
    s = {**split_metrics(student, txt_to_img, labels, chunk, f"{where}student"), **agreement_metrics(student, teacher)}
    return metrics.with_ratios(s, t)


# --------------------------------------------------------------------------- images: view 0 of the split


def split_batches(cache: Cache, split: str, prep: ImagePrep, batch_size: int, workers: int,
                  captions: bool) -> Iterable[tuple[list[str], Tensor, list[list[str]]]]:
    """Batches (keys, pixels [B, 3, S, S], captions per key or []) of the split's view 0, any order.

    Read by ``cachereader`` (the trainer's reader: same members, decoding and error counting);
    its uint8 pixels are normalised here with the student's mean/std, on the CPU as before.
    """
    loader = cachereader.view0_loader(cache.shard_paths(split, "tar"), image_size=prep.size,
                                      interpolation=prep.interpolation, batch_size=batch_size, workers=workers,
                                      captions=captions)
    for batch in loader:
        yield batch["keys"], cachereader.normalize_images(batch["image"], prep.mean, prep.std), batch["captions"]


def align(keys: list[str], rows: Tensor, wanted: list[str], what: str) -> Tensor:
    """Reorder rows [len(keys), ...] to the order of ``wanted``; every wanted key must be present."""
    index = {k: i for i, k in enumerate(keys)}
    missing = [k for k in wanted if k not in index]
    if missing:
        raise CacheError(f"{len(missing)} of {len(wanted)} {what} in the HDF5 shards are missing from the tar "
                         f"shards (first key {missing[0]!r}); the cache is inconsistent: re-run `kdpipe extract`")
    return rows[torch.tensor([index[k] for k in wanted], dtype=torch.long)]


def student_split_embeddings(
    image: nn.Module, text: nn.Module | None, cache: Cache, split: str, held: H5Shard, prep: ImagePrep,
    space: Space, cfg: EvalConfig, device: torch.device,
) -> tuple[Tensor, Tensor | None]:
    """Student image embeddings [N, D] (and its caption embeddings [M, D] when it has a text tower),
    unit rows in teacher space, in the HDF5 order of ``held``."""
    img, txt, _ = student_split_outputs(image, text, cache, split, held, prep, space, cfg, device)
    return img, txt


@torch.no_grad()
def student_split_outputs(
    image: nn.Module, text: nn.Module | None, cache: Cache, split: str, held: H5Shard, prep: ImagePrep,
    space: Space, cfg: EvalConfig, device: torch.device,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``student_split_embeddings`` and, for a student with a class head (``train --labels``), its
    logits [N, K] on the same images (from the raw embedding, as trained), in the same order."""
    head = getattr(image, "head", None)
    keys, img_rows, logit_rows, caps = [], [], [], {}
    with make_progress("images", disable=not cfg.progress) as progress:
        task = progress.add_task(f"eval  {split}", total=len(held.keys), info="")
        for batch_keys, pixels, batch_caps in split_batches(cache, split, prep, cfg.batch_size, cfg.workers,
                                                            captions=text is not None):
            raw = image(pixels.to(device))
            img_rows.append(space.image_out(raw.float().cpu()))
            if head is not None:
                logit_rows.append(head(raw).float().cpu())
            keys += batch_keys
            caps.update(zip(batch_keys, batch_caps))
            progress.update(task, advance=len(batch_keys))
    img = align(keys, torch.cat(img_rows), held.keys, "images")
    logits = align(keys, torch.cat(logit_rows), held.keys, "images") if logit_rows else None
    if text is None:
        return img, None, logits
    return img, space.text_out(encode_text(text, _captions_in_order(caps, held), cfg.batch_size, device)), logits


def _captions_in_order(caps: dict[str, list[str]], held: H5Shard) -> list[str]:
    """Captions concatenated in the HDF5 order; counts must match txt_offsets."""
    out = []
    for n, key in enumerate(held.keys):
        want = int(held.txt_offsets[n + 1] - held.txt_offsets[n])
        if len(caps[key]) != want:
            raise CacheError(f"sample {key!r} has {len(caps[key])} captions in its tar but {want} embeddings in "
                             "its HDF5 shard; the cache is inconsistent: re-run `kdpipe extract`")
        out += caps[key]
    return out


# --------------------------------------------------------------------------- supervised, not zero-shot


PICKED_ON_SPLIT_NOTE = ("best weights (step {step}) were picked by train's validation on this split's images, so "
                        "these figures are optimistic for them; `kdpipe eval --checkpoint last` judges the final "
                        "weights, which no choice was made on")


SUPERVISED_NOTE = ("supervised/{names}: the student was trained on these classes' labels ({losses}), so this is "
                   "supervised accuracy, not zero-shot; no teacher figure or ratio is given beside it (the "
                   "teacher's is zero-shot, in CACHE/teacher_eval.json)")


def trained_labels(spec: RunSpec, cache: Cache) -> dict[str, Any] | None:
    """{"losses", "classnames"} when the run's losses trained on class labels (student.json's
    ``labels_used``), else None.

    Runs saved before student.json recorded it: decided from their recorded losses and options
    (``losses.label_losses``) and the cache's classes.
    """
    if spec.labels_recorded:
        return spec.labels_used
    if not isinstance(spec.loss_weights, dict) or not cache.classnames:
        return None
    used = losses.label_losses(spec.loss_weights, spec.loss_options)
    return {"losses": used, "classnames": list(cache.classnames)} if used else None


def mark_supervised(rows: dict[str, EvalRow], classnames: dict[str, list[str]], trained: dict[str, Any] | None,
                    info: dict[str, dict], notes: list[str]) -> list[str]:
    """Move ``zeroshot/{name}/*`` to ``supervised/{name}/*`` for every classifier over the trained classes.

    classnames: {classifier name: its class names}. A supervised row keeps the student's value
    only: the teacher's figure on those classes is zero-shot, and a ratio would compare the two.
    Returns the names moved.
    """
    if not trained:
        return []
    moved = [n for n, names in classnames.items() if sorted(names) == sorted(trained["classnames"])]
    for name in moved:  # an ensemble's teachers/NAME/zeroshot/... rows too
        was, now = f"zeroshot/{name}/", f"supervised/{name}/"
        for key in [k for k in rows if k.startswith(was) or f"/{was}" in k]:
            rows[key.replace(was, now, 1)] = {"student": rows.pop(key)["student"], "teacher": None, "ratio": None}
        if name in info:
            info[name]["supervised"] = True
    if moved:
        notes.append(SUPERVISED_NOTE.format(names=", ".join(moved), losses=", ".join(trained["losses"])))
    return moved


HEAD_NOTE = ("head/: the class head trained with --labels on the cache's {k} classes (supervised); the teacher "
             "column is the teacher's zero-shot top-1/top-5 on the same images over the same classes' prompts")
HEAD_ENSEMBLE_NOTE = (f"head/ of a run of several teachers: its teacher column is the first teacher's zero-shot; "
                      f"the ensemble's, whose averaged probabilities the head learnt, is teachers/{ENSEMBLE}/zeroshot/")


def head_rows(logits: Tensor, teacher_img: Tensor, classifier: Tensor | None, labels: Tensor) -> dict[str, EvalRow]:
    """The class head's top-1/top-5 ("head/top1", "head/top5") next to the teacher's zero-shot on the same
    labelled images. logits [N, K], teacher_img [N, D] (cached view 0), classifier [D, K] or None, labels [N]."""
    known = labels >= 0
    if not known.any():
        raise BadValue("the split has no labelled image: the class head cannot be scored")
    if classifier is not None and classifier.shape[1] != logits.shape[1]:
        raise BadValue(f"the class head has {logits.shape[1]} classes, the cache's classifier {classifier.shape[1]}")
    student = metrics.topk_accuracy(logits[known], labels[known])
    teacher = {} if classifier is None else metrics.zero_shot_accuracy(teacher_img[known], classifier, labels[known])
    return metrics.with_ratios({f"head/{k}": v for k, v in student.items()},
                               {f"head/{k}": v for k, v in teacher.items()})


# --------------------------------------------------------------------------- the run directory


def cache_of(run: Path, spec: RunSpec, override: str | Path | None) -> Path:
    """The cache to evaluate on: --cache, else the one student.json (or config.toml) records."""
    if override is not None:
        return Path(override)
    found = spec.cache or (read_config(run) or {}).get("cache")
    if not found:
        raise BadValue(f"{run / SPEC_FILE} records no cache; pass --cache CACHE")
    return Path(found)


def teacher_of(spec: RunSpec, run: Path) -> dict[str, Any]:
    if spec.teacher is None:
        raise BadValue(f"{run / SPEC_FILE} records no teacher fingerprint; was it written by `kdpipe train`?")
    return spec.teacher


def image_prep(spec: RunSpec, teacher: dict[str, Any]) -> ImagePrep:
    """View 0 at the student's size, with the teacher's interpolation and the student's mean/std."""
    interpolation = spec.interpolation or teacher.get("preprocess", {}).get("interpolation", "bicubic")
    return ImagePrep(int(spec.image_size), interpolation, tuple(spec.mean), tuple(spec.std))


# --------------------------------------------------------------------------- reporting


def _fmt(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def print_table(report: dict[str, Any]) -> None:
    """metric | student | teacher | student/teacher (teacher evals: metric | teacher)."""
    from rich import box  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    student = report["kind"] == "student"
    title = f"{report['model'].get('image') or 'teacher'} on {report['dataset']['cache']} [{report['split']}]"
    if student:
        title += f", {describe_checkpoint(report.get('checkpoint')) or '?'} weights"
    table = Table(title=title, caption=f"space: {report['space']}", box=box.SIMPLE_HEAD)
    columns = ("metric", "student", "teacher", "ratio") if student else ("metric", "teacher")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for name, row in report["metrics"].items():
        cells = (row["student"], row["teacher"], row["ratio"]) if student else (row["teacher"],)
        table.add_row(name, *(_fmt(v) for v in cells))
    console.print(table)


def _dataset_info(cache: Cache, split: str, held: H5Shard) -> dict[str, Any]:
    return {"cache": str(cache.root), "source": cache.manifest.get("source", {}).get("spec"), "split": split,
            "images": len(held.keys), "captions": int(held.txt_offsets[-1]),
            "labelled": int((held.labels >= 0).sum()), "classnames": cache.classnames}


def _teacher_embeddings(held: H5Shard, classifiers: dict[str, Tensor]) -> Embeddings:
    """The teacher's cached view-0 image and caption embeddings (float32)."""
    img = torch.from_numpy(held.img[:, 0].astype(np.float32))
    return Embeddings(img, torch.from_numpy(held.txt.astype(np.float32)), classifiers)


def _write(report: dict[str, Any], path: Path) -> None:
    atomic_write_json(path, report)
    print_table(report)
    for note in report["notes"]:
        log.info(note)
    log.info("wrote %s", path)


def _config_dict(cfg: EvalConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


def _check(cfg: EvalConfig) -> None:
    if (cfg.run is None) == (cfg.teacher is None):
        raise BadValue("give a RUN directory to evaluate a student, or --teacher CACHE for the teacher (not both)")
    if cfg.run is not None:
        check_checkpoint(cfg.checkpoint)
    if cfg.teacher_name is not None and cfg.teacher is None:
        raise BadValue("--teacher-name picks one teacher of --teacher CACHE; give --teacher CACHE too")
    if cfg.batch_size < 1 or cfg.chunk < 1:
        raise BadValue("--batch-size and the similarity chunk must be at least 1")
    for spec in cfg.zeroshot:  # a typo fails before any image is read
        parse_spec(spec)


# --------------------------------------------------------------------------- run


def run_teacher(cfg: EvalConfig) -> dict[str, Any]:
    """The teacher's own figures on the split, from cached embeddings only; ``teacher_name``: which teacher of
    the cache (its embeddings and prompts; its report goes to ``Cache.teacher_eval_path``)."""
    if cfg.zeroshot:
        raise BadValue("--zeroshot datasets need image embeddings, and the teacher is evaluated from cached "
                       "embeddings only (no teacher forward): only the cache's own split is available")
    cache = open_cache(cfg.teacher, verify=cfg.verify)
    name = cfg.teacher_name or cache.primary
    fp = cache.teacher_entry(name)["fingerprint"]  # an unknown name is refused, listing the teachers
    held = cache.load_split(cfg.split, fields=("img", "txt"), teacher=name)
    notes: list[str] = []
    teacher = _teacher_embeddings(held, cache_classifiers(read_prompt_sets(cache, name), cache.classnames, notes))
    txt_to_img, labels = torch.from_numpy(held.txt_to_img), torch.from_numpy(held.labels)
    scores = {**split_metrics(teacher, txt_to_img, labels, cfg.chunk, f"{cfg.split} split: teacher"),
              **agreement_metrics(teacher, teacher)}
    report = {
        "kind": "teacher", "dataset": _dataset_info(cache, cfg.split, held), "split": cfg.split,
        "model": {"image": None, "text": None, "teacher": describe_teacher(fp)},
        "teacher": fp, "space": RAW_SPACE,
        "metrics": {k: {"student": None, "teacher": v, "ratio": None} for k, v in scores.items()},
        "zeroshot": {}, "notes": notes, "config": _config_dict(cfg),
    }
    _write(report, Path(cfg.out) if cfg.out else cache.teacher_eval_path(name))
    return report


@dataclass
class StudentRun:
    """A loaded run: its students (eval mode, on device), spec, the weights loaded, cache and how to feed / read it."""

    path: Path
    image: nn.Module
    text: nn.Module | None
    spec: RunSpec
    checkpoint: dict[str, Any]  # {"name": "best", "file", "step", ...}: the weights loaded (students.resolve_checkpoint)
    cache: Cache
    space: Space
    prep: ImagePrep
    device: torch.device


def open_student(cfg: EvalConfig) -> StudentRun:
    """RUN/student.json + the ``cfg.checkpoint`` weights, and the cache it was trained on (same teacher, checked)."""
    from .students import load_student  # noqa: PLC0415  (timm/torchvision: only student evals pay)

    run = require_run(cfg.run)
    device = resolve_device(cfg.device)
    image, text, loaded = load_student(run, device, checkpoint=cfg.checkpoint)
    spec = RunSpec.from_json(loaded)
    fp = teacher_of(spec, run)
    cache = open_cache(cache_of(run, spec, cfg.cache), verify=cfg.verify, expect_teacher=fp)
    return StudentRun(run, image, text, spec, loaded["checkpoint"], cache,
                      student_space(run, spec, cache, text is not None), image_prep(spec, fp), device)


def split_rows(s: StudentRun, held: H5Shard, sets: dict[str, prompts.PromptSet], cfg: EvalConfig,
               notes: list[str]) -> tuple[dict[str, EvalRow], dict[str, dict]]:
    """Student vs teacher on the cache split: metric rows and what each zero-shot classifier used."""
    t_cls = cache_classifiers(sets, s.cache.classnames, notes)
    s_cls = t_cls if s.text is None else {
        n: text_classifier(s.text, sets[n].classnames, sets[n].templates, s.space, cfg.batch_size, s.device)
        for n in t_cls}
    img, txt, logits = student_split_outputs(s.image, s.text, s.cache, cfg.split, held, s.prep, s.space, cfg,
                                             s.device)
    teacher = _teacher_embeddings(held, t_cls)
    student = Embeddings(img, teacher.txt if txt is None else txt, s_cls)
    labels = torch.from_numpy(held.labels)
    rows = evaluate_embeddings(student, teacher, torch.from_numpy(held.txt_to_img), labels, cfg.chunk, cfg.split)
    ensemble = ensemble_rows(s, student, cfg.split, torch.from_numpy(held.txt_to_img), labels, cfg.chunk)
    rows.update(ensemble)
    if logits is not None:
        rows.update(head_rows(logits, teacher.img, next(iter(t_cls.values()), None), labels))
        notes.append(HEAD_NOTE.format(k=logits.shape[1]))
        if ensemble:  # the head learnt the teachers' averaged probabilities
            notes.append(HEAD_ENSEMBLE_NOTE)
    source = "teacher prompts.h5" if s.text is None else "student text tower"
    info = {n: {"images": int((held.labels >= 0).sum()), "classes": c.shape[1], "class_embeddings": source}
            for n, c in s_cls.items()}
    return rows, info


# --------------------------------------------------------------------------- several teachers


def ensemble_rows(s: StudentRun, student: Embeddings, split: str, txt_to_img: Tensor, labels: Tensor,
                  chunk: int = 1024) -> dict[str, EvalRow]:
    """For a run of several teachers (student.json's ``teachers``): the student against each teacher
    (``teachers/NAME/...``, zero-shot with that teacher's own prompts.h5 for its column) and against
    their weighted ensemble (``teachers/ensemble/...``); {} for one."""
    recorded = s.spec.raw.get("teachers") or []
    if len(recorded) < 2:
        return {}
    members = []
    for t in recorded:
        held = s.cache.load_split(split, fields=("img", "txt"), teacher=t["name"])
        classifiers = cache_classifiers(read_prompt_sets(s.cache, t["name"]), s.cache.classnames, [])
        members.append((float(t["weight"]), _teacher_embeddings(held, classifiers)))
    rows: dict[str, EvalRow] = {}
    for t, (_, emb) in zip(recorded, members):
        rows.update(teacher_rows(student, emb, txt_to_img, labels, f"teachers/{t['name']}", chunk))
    rows.update(teacher_rows(student, ensemble_embeddings(members), txt_to_img, labels, f"teachers/{ENSEMBLE}", chunk))
    return rows


def run_student(cfg: EvalConfig) -> dict[str, Any]:
    """A student on the cache's split (+ any --zeroshot datasets); writes RUN/eval.json."""
    extra = [open_zeroshot(spec) for spec in cfg.zeroshot]  # a missing dataset fails before the slow part
    s = open_student(cfg)
    name = s.cache.find_teacher(s.spec.teacher)  # the teacher whose space the student learnt (open_cache checked it)
    held = s.cache.load_split(cfg.split, fields=("img", "txt"), teacher=name)
    notes: list[str] = []
    sets = read_prompt_sets(s.cache, name)  # the prompts of the teacher whose space the student learnt
    rows, zs_info = split_rows(s, held, sets, cfg, notes)
    ext_scores, ext_info = external_zeroshot(s.image, s.text, sets, s.prep, s.space, s.device, extra,
                                             batch_size=cfg.batch_size, workers=cfg.workers, progress=cfg.progress)
    rows.update(metrics.with_ratios(ext_scores, {}))
    if extra:
        notes.append("teacher figures on --zeroshot datasets are not computed (they would need a teacher forward)")
    notes += [note for data in extra for note in data.notes]
    zs_info = {**zs_info, **ext_info}
    classnames = {n: list(sets[n].classnames) for n in zs_info if n in sets}
    classnames.update({d.name: d.classnames for d in extra})
    mark_supervised(rows, classnames, trained_labels(s.spec, s.cache), zs_info, notes)
    if picked_on_split(s.checkpoint, cfg.split):
        notes.append(PICKED_ON_SPLIT_NOTE.format(step=s.checkpoint.get("step")))
    fp = s.spec.teacher
    report = {
        "kind": "student", "run": str(s.path), "dataset": _dataset_info(s.cache, cfg.split, held),
        "split": cfg.split,
        "model": {"image": s.spec.image_name, "text": s.spec.text_name,
                  "captions": "teacher (cached)" if s.text is None else "student text tower",
                  "teacher": describe_teacher(fp)},
        "checkpoint": {k: v for k, v in s.checkpoint.items() if k not in ("val", "score")},
        "teacher": fp, "space": s.space.description, "whitening": whitening_mode(s.spec),
        "labels_used": trained_labels(s.spec, s.cache),
        "metrics": rows, "zeroshot": zs_info, "notes": notes, "config": _config_dict(cfg),
    }
    _write(report, Path(cfg.out) if cfg.out else s.path / EVAL_JSON)
    return report


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate a student run (RUN/eval.json) or, with ``teacher``, the teacher from its cache."""
    _check(cfg)
    return run_teacher(cfg) if cfg.teacher is not None else run_student(cfg)
