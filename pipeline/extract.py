"""Stage 1: run the teacher once over a captioned image set and write the cache.

Flow: a Source lists ordered work units per split (unit i -> output shard i). DataLoader
workers decode images, store them at a bounded size, draw the views and cut the view
tensors; the main process runs the teacher on images and captions and writes each unit as
one crash-safe shard. Under torchrun every rank takes units i % world == rank, so any world
size writes the same files; rank 0 writes the manifest after a barrier. A disk that fills up
stops the run with a message that says which shards are complete; re-running the same command
resumes from them.

SIGTERM or SIGUSR1 (a scheduler's preemption notice) stops the run at the next batch: the shards
in flight are dropped (only finished shards are ever written, and listed in the manifest) and
re-running the same command resumes.

``--add-teacher`` (``add_teacher``) runs another teacher over an existing cache: it reads each
shard's stored JPEG and views (``cachereader.stored_samples``), replays every view at that
teacher's input size, mean and std (``cachereader.replay_views``: every teacher sees the same
pixel region, no image decoded from the source or view drawn again), encodes the captions and
writes ``SPLIT/teachers/NAME/`` shard by shard (``store.write_teacher_shard``), then its class-prompt
embeddings ``CACHE/teachers/NAME/prompts.h5``; a re-run resumes and nothing of the other teachers is
rewritten. Under torchrun the shards are split between ranks as above, and rank 0 lists them.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import __version__, runtime
from .atomic import sweep_orphans
from .cachereader import StoredSample, replay_views, stored_samples
from .data import Record, Source, open_source, views
from .data.views import STORE_SIZE  # the config default (in ExtractConfig the field `views` hides the module)
from .errors import AlreadyExists, BadValue, on_write_failure
from .progress import make_progress
from .store import (
    FORMAT_VERSION,
    MANIFEST,
    PROMPTS,
    CachedSample,
    CacheError,
    Manifest,
    check_teacher_name,
    default_teacher_name,
    describe_teacher,
    file_digest,
    open_cache,
    read_sidecar,
    same_fingerprint,
    teacher_dir,
    verify_shard,
    write_shard,
    write_teacher_shard,
)
from .teachers import Preprocess, Teacher, load_teacher

log = logging.getLogger("kdpipe")


@dataclass
class ExtractConfig:
    teacher: str  # registry name, open_clip model name, or model-config JSON path
    data: str  # COCO-layout root, shapes world, Flickr image folder, CSV/TSV file, or WebDataset tars
    out: str
    pretrained: str | None = None  # open_clip tag or local checkpoint file
    views: int = 4  # view 0 = the teacher's eval transform
    batch_size: int = 64  # images per teacher forward (x views)
    workers: int = 2
    device: str = "auto"
    dist_timeout: float = runtime.DEFAULT_DIST_TIMEOUT_MIN  # minutes a collective may wait (multi-process)
    precision: str = "auto"
    split_file: str | None = None  # Karpathy dataset_coco.json / dataset_flickr30k.json / dataset_flickr8k.json
    keep_leaky: bool = False  # keep Karpathy val/test images in train
    skip_missing: bool = False  # extract without the images a CSV or Flickr split file names but the disk lacks
    csv_img_key: str = "filepath"  # CSV input: open_clip's column names and separator
    csv_caption_key: str = "title"
    csv_separator: str | None = None  # None: tab for .tsv, comma for .csv
    val_data: str | None = None  # another input as the val split (CSV or tar input)
    val_fraction: float | None = None  # or this fraction of the input as val, by a hash of each key
    image_column: str | None = None  # Parquet / Hugging Face input: column names (None: the usual names)
    caption_column: str | None = None
    label_column: str | None = None
    overwrite: bool = False
    shard_size: int = 1000  # images per shard (directory sources)
    store_size: int = STORE_SIZE  # stored image's shorter side, at most (>= the teacher's input size)
    splits: list[str] | None = None  # default: every split the source has
    allow_random_init: bool = False  # a real open_clip name without weights
    prompts: bool = True  # write prompts.h5 (zero-shot class prompts); a re-run adds the sets it lacks
    prompt_sets: list[str] | None = None  # named sets beyond the defaults (e.g. imagenet, imagenet-simple)
    progress: bool = True
    add_teacher: bool = False  # run `teacher` over the existing cache `out` (its stored images and views)
    teacher_name: str | None = None  # the added teacher's name in the cache (default: its label, folder-safe)
    overwrite_teacher: str | None = None  # replace the added teacher of this name (another teacher's weights)
    extra_teachers: list[str] | None = None  # more teachers (--teacher again), added after the first one
    extra_pretrained: list[str] | None = None  # their weights, one each in order ("none": without weights)


# Settings of the add-teacher path, left out of the manifest's "config" so a single-teacher cache's
# manifest is what it always was.
ADD_TEACHER_SETTINGS = ("add_teacher", "teacher_name", "overwrite_teacher", "extra_teachers", "extra_pretrained")
NO_WEIGHTS = "none"  # an --pretrained entry of a teacher without weights, when several are paired


# --------------------------------------------------------------------------- workers: decode


@dataclass
class Prepared:
    """One decoded record, ready for the teacher."""

    key: str
    jpg: bytes
    views: list[dict]
    pixels: torch.Tensor  # [V, 3, S, S] normalised view tensors
    captions: list[str]
    label: int


def clean_captions(captions: tuple[str, ...] | list[str]) -> list[str]:
    """Strip whitespace and drop empty captions (the tokenizer would accept them)."""
    return [c.strip() for c in captions if c and c.strip()]


def prepare(record: Record, n_views: int, store_size: int, pre: Preprocess) -> Prepared | str:
    """Decode, store and cut the views of one record for a teacher preprocessing ``pre``;
    a skip reason (str) on bad input. View 0 is ``pre``'s own eval transform."""
    captions = clean_captions(record.captions)
    if not captions:
        return "no_caption"
    try:
        image = views.decode_image(record.path if record.data is None else record.data)
    except views.BadImage as bad:
        return bad.reason
    jpg, stored = views.store_image(image, store_size)
    drawn = views.sample_views(n_views, stored.width, stored.height, seed=record.key,
                               resize_mode=pre.resize_mode, fill=pre.fill_color)
    pixels = torch.stack([views.to_tensor(views.apply_view(stored, v, pre.size, pre.interpolation), pre.mean, pre.std)
                          for v in drawn])
    label = -1 if record.label is None else int(record.label)
    return Prepared(record.key, jpg, [v.to_dict() for v in drawn], pixels, captions, label)


@dataclass
class UnitDone:
    index: int
    skipped: dict[str, list[str]] = field(default_factory=dict)


class UnitStream(IterableDataset):
    """Yields (unit index, [Prepared]) batches and a UnitDone after each unit.

    Each DataLoader worker takes whole units, so a unit's batches are the same whatever the
    number of workers or ranks, and samples of one unit never mix with another's.
    """

    def __init__(self, units: list, batch_size: int, prep_kwargs: dict[str, Any]) -> None:
        self.units, self.batch_size, self.prep_kwargs = units, batch_size, prep_kwargs

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for unit in self.units[wid::nw]:
            yield from self._unit(unit)

    def _unit(self, unit: Any) -> Iterator[Any]:
        done, batch = UnitDone(unit.index), []
        for record in unit.records():
            item = prepare(record, **self.prep_kwargs)
            if isinstance(item, str):
                done.skipped.setdefault(item, []).append(record.key)
                log.warning("skipped %s: %s", record.key, item)
                continue
            batch.append(item)
            if len(batch) == self.batch_size:
                yield unit.index, batch
                batch = []
        if batch:
            yield unit.index, batch
        yield done


# --------------------------------------------------------------------------- main process: teacher


def _normalise(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] raw features -> (fp16 unit vectors, fp32 norms)."""
    feats = feats.float()
    norms = feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (feats / norms).cpu().numpy().astype(np.float16), norms.squeeze(-1).cpu().numpy()


@torch.no_grad()
def embed_batch(teacher: Teacher, batch: list[Prepared], precision: str) -> list[CachedSample]:
    """Teacher embeddings for every view and caption of a batch of prepared records."""
    n_views = batch[0].pixels.shape[0]
    pixels = torch.cat([p.pixels for p in batch]).to(teacher.device, non_blocking=True)
    captions = [c for p in batch for c in p.captions]
    with runtime.autocast(precision, teacher.device):
        img_feats = teacher.encode_images(pixels)
        txt_feats = teacher.encode_texts(captions, trim=True)
    img, img_norms = _normalise(img_feats)
    txt, txt_norms = _normalise(txt_feats)
    out, t0 = [], 0
    for i, p in enumerate(batch):
        t1 = t0 + len(p.captions)
        vs = slice(i * n_views, (i + 1) * n_views)
        out.append(CachedSample(p.key, p.jpg, p.views, img[vs], txt[t0:t1], img_norms[vs],
                                txt_norms[t0:t1], p.captions, p.label))
        t0 = t1
    return out


# --------------------------------------------------------------------------- cache bookkeeping


def manifest_header(cfg: ExtractConfig, teacher: Teacher, source: Source) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "kdpipe_version": __version__,
        "teacher": teacher.fingerprint,
        "embed_dim": teacher.embed_dim,
        "logit_scale": teacher.logit_scale,
        "dtype": "float16",
        "views": cfg.views,
        "view_policy": views.view_policy(cfg.store_size, teacher.preprocess.resize_mode),
        "source": {"spec": str(cfg.data), "kind": source.name, "report": source.report(),
                   "split_file": cfg.split_file, "keep_leaky": cfg.keep_leaky},
        "classnames": source.classnames(),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("progress", *ADD_TEACHER_SETTINGS)},
        "splits": {},
    }


# Settings that decide which image (and caption) goes into which shard of which split. A cache made
# before a setting existed could not have used it: absent there, it is not compared.
SPLIT_SETTINGS = ("split_file", "keep_leaky", "shard_size", "val_data", "val_fraction", "csv_img_key",
                  "csv_caption_key", "csv_separator", "image_column", "caption_column", "label_column")


def compatible(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why an existing cache can't be resumed with this config (None when it can)."""
    if not same_fingerprint(old.get("teacher", {}), new["teacher"]):
        return (f"it was made by teacher {describe_teacher(old.get('teacher', {}))}, "
                f"not {describe_teacher(new['teacher'])}")
    for key in ("views", "view_policy", "embed_dim"):
        if old.get(key) != new[key]:
            return f"its {key} is {old.get(key)!r}, this run asks for {new[key]!r}"
    made_with = old.get("config", {})
    for key in SPLIT_SETTINGS:  # a kept shard must hold the images this run would put in it
        was, asked = made_with.get(key), new["config"][key]
        if key in made_with and was != asked:
            return f"its --{key.replace('_', '-')} is {was!r}, this run asks for {asked!r}"
    return None


def prepare_out(root: Path, header: dict[str, Any], overwrite: bool) -> Manifest:
    """Open (resume) or create the cache directory; refuse another teacher's cache."""
    existing = Manifest.load(root) if root.exists() else None
    if existing is not None and not overwrite:
        problem = compatible(existing.data, header)
        if problem:
            raise CacheError(f"{root} already holds a cache, but {problem}; "
                             "pass --overwrite to replace it or choose another --out")
    elif root.exists() and any(root.iterdir()):
        if not overwrite:
            raise CacheError(f"{root} exists and is not a kdpipe cache; choose another --out or pass --overwrite")
    if overwrite and root.exists():
        log.warning("--overwrite: removing everything in %s", root)
        wipe_cache(root)
        existing = None
    root.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(root, {**header, "splits": {}})
    if existing is not None:  # resuming keeps the shards and the teachers added to the cache (format 2)
        manifest.data.update({k: existing.data[k] for k in ("splits", "teachers", "format") if k in existing.data})
    return manifest


def wipe_cache(root: Path) -> None:
    for child in root.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def finished_entry(split_dir: Path, index: int, full: bool = True) -> dict[str, Any] | None:
    """The shard's entry when its files are complete and match it (sha256 too when ``full``)."""
    entry = read_sidecar(split_dir, index)
    if entry is None or verify_shard(split_dir, entry, full=full) is not None:
        return None
    return entry


# --------------------------------------------------------------------------- the split loop


def extract_split(cfg: ExtractConfig, teacher: Teacher, source: Source, split: str,
                  manifest: Manifest, dist: runtime.DistInfo, precision: str, request: runtime.StopRequest) -> None:
    split_dir = Path(cfg.out) / split
    units = source.units(split)[dist.rank::dist.world_size]
    todo = []
    for unit in units:
        entry = finished_entry(split_dir, unit.index)
        if entry is None:
            todo.append(unit)
        elif not dist.enabled:
            manifest.add_shard(split, entry)
    with on_write_failure(lambda: kept_after_failure(cfg, source)):
        if not dist.enabled:
            manifest.save()
        log.info("%s: %d shards for this process, %d already done", split, len(units), len(units) - len(todo))
        if todo:
            run_units(cfg, teacher, split, split_dir, todo, manifest, dist, precision, request)


def run_units(cfg: ExtractConfig, teacher: Teacher, split: str, split_dir: Path, units: list,
              manifest: Manifest, dist: runtime.DistInfo, precision: str, request: runtime.StopRequest) -> None:
    """Embed and write ``units`` (one shard each) until done or ``request``: the shards in flight are then dropped."""
    stream = UnitStream(units, cfg.batch_size, dict(n_views=cfg.views, store_size=cfg.store_size,
                                                    pre=teacher.preprocess))
    loader = DataLoader(stream, batch_size=None, num_workers=min(cfg.workers, len(units)),
                        pin_memory=runtime.pin_memory(teacher.device), worker_init_fn=runtime.WorkerInit())
    pending: dict[int, list[CachedSample]] = {}
    sizes = [u.size for u in units]
    total = None if None in sizes else sum(sizes)
    with make_progress("img", disable=not cfg.progress) as progress:
        task = progress.add_task(f"extract {split}", total=total, info="")
        for item in loader:
            if request:
                return
            if isinstance(item, UnitDone):
                entry = write_shard(split_dir, item.index, pending.pop(item.index, []),
                                    teacher.embed_dim, item.skipped)
                if not dist.enabled:
                    manifest.add_shard(split, entry)
                    manifest.save()
                progress.update(task, advance=sum(entry["skipped"].values()),
                                info=f"shard {entry['name']}: {entry['count']} ok")
                continue
            index, batch = item
            pending.setdefault(index, []).extend(embed_batch(teacher, batch, precision))
            progress.update(task, advance=len(batch))


def collect_manifest(manifest: Manifest, source: Source, splits: list[str]) -> None:
    """Rank 0 after the barrier: record every finished shard; refuse if one is missing.

    Sizes only: every shard's sha256 was computed when it was written, or verified when a
    resumed run kept it, moments ago; re-hashing the whole cache here would read it twice.
    """
    for split in splits:
        split_dir = manifest.root / split
        for unit in source.units(split):
            entry = finished_entry(split_dir, unit.index, full=False)
            if entry is None:
                raise CacheError(f"shard {unit.index} of {split} is missing or corrupt after extraction")
            manifest.add_shard(split, entry)
    manifest.save()


def complete_shards(root: Path, source: Source, split: str) -> str:
    """'N of M shards of split S are complete and listed in ROOT/manifest.json', counted on disk."""
    units = source.units(split)
    done = sum(finished_entry(root / split, unit.index, full=False) is not None for unit in units)
    manifest = Manifest.load(root)
    listed = len(manifest.split(split)["shards"]) if manifest is not None else 0
    if listed == done:
        return f"{done} of {len(units)} shards of split {split} are complete and listed in {root / MANIFEST}"
    return (f"{done} of {len(units)} shards of split {split} are complete ({listed} listed in {root / MANIFEST} "
            "so far; a re-run lists the rest)")


def kept_after_failure(cfg: ExtractConfig, source: Source) -> tuple[str, str]:
    """After a failed write (disk full, ...): which shards are complete, and that a re-run resumes."""
    root = Path(cfg.out)
    kept = "; ".join(complete_shards(root, source, split) for split in cfg.splits or source.splits())
    return kept, "free some space, then re-run the same command: it keeps the complete shards and extracts the rest"


def check_prompt_sets(names: list[str] | None) -> None:
    """Unknown --prompt-set names fail before the teacher runs, listing the valid ones."""
    from . import prompts  # noqa: PLC0415  (keeps the import graph of extract small)

    for name in names or []:
        prompts.PROMPT_SETS.get(name)


def write_prompt_sets(root: Path, teacher: Teacher, classnames: list[str] | None,
                      extra: list[str] | None = None) -> None:
    """CACHE/prompts.h5: teacher embeddings of class prompts x templates (zero-shot eval).

    The default sets and ``extra``; sets already in the file are kept as they are, so a re-run
    with another --prompt-set encodes only that set (the data's own set is decided on the first write).
    """
    from . import prompts  # noqa: PLC0415  (keeps the import graph of extract small)

    path = root / PROMPTS
    have = prompts.read_prompts(path) if path.exists() else {}
    missing = [n for n in dict.fromkeys([*prompts.DEFAULT_SETS, *(extra or [])]) if n not in have]
    if have and not missing:
        return
    sets = prompts.build_prompt_sets(teacher, missing, extra_classnames=None if have else classnames)
    prompts.write_prompts(path, {**have, **sets})


# --------------------------------------------------------------------------- entry point


def check_store_size(store_size: int, size: int, n_views: int) -> None:
    """Refuse a stored size that upsamples view 0; warn when it upsamples random views.

    Below the teacher's input ``size`` even view 0 is enlarged, so the cached embeddings are
    not the teacher's eval embeddings of the image: refused. Random views are crops down to
    ``views.SCALE[0]`` of the area; upsampling them only blurs them (replay stays exact), a
    quality-for-disk trade the user may choose, so it is a warning with the size that avoids it.
    """
    if store_size < size:
        raise BadValue(f"--store-size {store_size} is below the teacher's input size {size}: view 0 would be "
                       f"upsampled, not the teacher's eval view of the image; pass --store-size >= {size}")
    enough, side = views.min_store_size(size), store_size * views.smallest_view_fraction()
    if n_views > 1 and store_size < enough:
        log.warning("--store-size %d: the smallest random views (%.0f%% of the area) are %.0f px on their shorter "
                    "side and are upsampled up to %.2fx to the teacher's %d px; pass --store-size >= %d to avoid it "
                    "(stored images then hold up to %.1fx the pixels)", store_size, 100 * views.SCALE[0], side,
                    size / side, size, enough, (enough / store_size) ** 2)


def summary(manifest: Manifest) -> dict[str, Any]:
    return {split: {k: info[k] for k in ("count", "captions", "skipped")} | {"shards": len(info["shards"])}
            for split, info in manifest.data["splits"].items()}


def run(cfg: ExtractConfig) -> dict[str, Any]:
    """Extract every split of cfg.data into the cache cfg.out (or, with ``add_teacher``, run cfg.teacher
    over the cache cfg.out); returns the split summary.

    Stopped by SIGTERM / SIGUSR1: returns ``{"stopped": signal name}`` instead (see the module docstring).
    """
    extra = extra_teacher_configs(cfg)
    if Path(cfg.out).is_dir():
        removed = sweep_orphans(cfg.out)  # a killed extract's half-written temporary files
        if removed:
            log.info("removed %d temporary file(s) of a killed extract under %s", len(removed), cfg.out)
    with runtime.stop_requests() as request:
        if cfg.add_teacher:
            return add_teacher(cfg, request)
        if cfg.teacher_name is not None or cfg.overwrite_teacher is not None:
            raise BadValue("--teacher-name and --overwrite-teacher go with --add-teacher (the first teacher of a "
                           "cache is named by its label)")
        result = extract_all(cfg, request)
        for more in extra:  # the first teacher as always, then each other one over its stored views
            if "stopped" in result:
                break
            added = add_teacher(more, request)
            if "stopped" in added:
                return added
            log.info("teacher %s added: %s", more.teacher, {k: v["count"] for k, v in added.items()})
        return result


def teacher_options(teachers: list[str] | None, pretrained: list[str] | None) -> dict[str, Any]:
    """--teacher and --pretrained, each given once or more, as ExtractConfig's fields (None: not given).

    One teacher takes at most one --pretrained; several take none or one each, in order.
    """
    teachers, pretrained = teachers or [], pretrained or []
    if len(teachers) > 1 and pretrained and len(pretrained) != len(teachers):
        raise BadValue(f"{len(teachers)} --teacher and {len(pretrained)} --pretrained: give one --pretrained per "
                       f"--teacher, in order ({NO_WEIGHTS!r} for a teacher without weights), or none")
    if len(teachers) <= 1 and len(pretrained) > 1:
        raise BadValue(f"{len(pretrained)} --pretrained for one --teacher")
    weights = [None if w == NO_WEIGHTS and len(teachers) > 1 else w for w in pretrained]
    return {"teacher": teachers[0] if teachers else None, "pretrained": weights[0] if weights else None,
            "extra_teachers": teachers[1:] or None, "extra_pretrained": weights[1:] or None}


def extra_teacher_configs(cfg: ExtractConfig) -> list[ExtractConfig]:
    """The add-teacher configs of ``cfg.extra_teachers``, checked before anything runs."""
    teachers, weights = cfg.extra_teachers or [], cfg.extra_pretrained
    if not teachers:
        if weights:
            raise BadValue("more --pretrained than --teacher")
        return []
    if cfg.add_teacher:
        raise BadValue("--add-teacher adds one --teacher at a time")
    if weights is not None and len(weights) != len(teachers):
        raise BadValue(f"{len(teachers)} extra teachers and {len(weights)} extra pretrained: give one each, in order "
                       f"({NO_WEIGHTS!r} for a teacher without weights)")
    pairs = zip(teachers, weights or [None] * len(teachers))
    return [replace(cfg, teacher=t, pretrained=None if w == NO_WEIGHTS else w, add_teacher=True,
                    extra_teachers=None, extra_pretrained=None) for t, w in pairs]


def extract_all(cfg: ExtractConfig, request: runtime.StopRequest) -> dict[str, Any]:
    """``run`` with the stop ``request`` it checks between batches."""
    if cfg.views < 1:
        raise BadValue("--views must be at least 1 (view 0 is the teacher's eval transform)")
    check_prompt_sets(cfg.prompt_sets)
    dist = runtime.init_distributed(cfg.device, cfg.dist_timeout)
    device = runtime.dist_device(dist, cfg.device)
    precision = runtime.resolve_precision(cfg.precision, device)
    source = open_source(cfg.data, shard_size=cfg.shard_size, split_file=cfg.split_file,
                         keep_leaky=cfg.keep_leaky, skip_missing=cfg.skip_missing, csv_img_key=cfg.csv_img_key,
                         csv_caption_key=cfg.csv_caption_key, csv_separator=cfg.csv_separator,
                         val_data=cfg.val_data, val_fraction=cfg.val_fraction,
                         image_column=cfg.image_column, caption_column=cfg.caption_column,
                         label_column=cfg.label_column)
    splits = cfg.splits or source.splits()
    missing = sorted(set(splits) - set(source.splits()))
    if missing:
        raise BadValue(f"split(s) {missing} not in {cfg.data}; it has {source.splits()}")
    teacher = load_teacher(cfg.teacher, cfg.pretrained, device=device,
                           allow_random_init=cfg.allow_random_init)
    check_store_size(cfg.store_size, teacher.preprocess.size, cfg.views)
    root = Path(cfg.out)
    header = manifest_header(cfg, teacher, source)
    manifest = prepare_out(root, header, cfg.overwrite) if dist.is_main else None
    runtime.barrier(dist)
    if manifest is None:
        manifest = Manifest(root, {**header, "splits": {}})
    if dist.is_main:
        manifest.save()
    seconds = {}
    for split in splits:
        start = time.perf_counter()
        extract_split(cfg, teacher, source, split, manifest, dist, precision, request)
        seconds[split] = time.perf_counter() - start
        if request:
            break
    stopped = stopped_on_any_rank(request, dist, device)
    if stopped:
        return stopped
    if dist.is_main:
        with on_write_failure(lambda: kept_after_failure(cfg, source)):
            collect_manifest(manifest, source, splits)
            if cfg.prompts:
                write_prompt_sets(root, teacher, source.classnames(), cfg.prompt_sets)
    runtime.wait_for_all(dist)
    result = summary(Manifest.load(root))
    for split, info in result.items():
        info["seconds"] = round(seconds.get(split, 0.0), 3)  # this process's time on the split
    return result


def stopped_on_any_rank(request: runtime.StopRequest, dist: runtime.DistInfo,
                        device: torch.device) -> dict[str, str] | None:
    """After the shards: every rank waits for the others (one with fewer shards finishes first), then
    they agree whether a stop signal reached any of them: {"stopped": signal} for all, or None."""
    runtime.wait_for_all(dist)
    if runtime.any_rank(bool(request), dist, device):
        return {"stopped": request.signal or "another rank's stop signal"}
    return None


# --------------------------------------------------------------------------- adding a teacher


def add_teacher(cfg: ExtractConfig, request: runtime.StopRequest) -> dict[str, Any]:
    """Run ``cfg.teacher`` over every shard of the cache ``cfg.out`` and write its own files (module docstring).

    Under torchrun / srun rank r takes the shards i % world == r of each split (the same files for any world
    size); rank 0 names the teacher before, and lists every rank's shards and writes its prompts after a barrier.
    """
    root = Path(cfg.out)
    if Manifest.load(root) is None:
        raise CacheError(f"--add-teacher needs an existing cache at {root}; create it with `kdpipe extract`")
    dist = runtime.init_distributed(cfg.device, cfg.dist_timeout)
    # rank 0 checks that the other teachers' files are intact (the others read the manifest it then writes)
    manifest = Manifest(root, open_cache(root, verify="size" if dist.is_main else "none").manifest)
    device = runtime.dist_device(dist, cfg.device)
    precision = runtime.resolve_precision(cfg.precision, device)
    teacher = load_teacher(cfg.teacher, cfg.pretrained, device=device, allow_random_init=cfg.allow_random_init)
    check_stored_size(manifest.data, teacher.preprocess)
    splits = cfg.splits or list(manifest.data["splits"])
    missing = sorted(set(splits) - set(manifest.data["splits"]))
    if missing:
        raise BadValue(f"split(s) {missing} not in the cache {root}; it has {sorted(manifest.data['splits'])}")
    name = claim_teacher(cfg, manifest, teacher, dist)
    seconds = {}
    with on_write_failure(lambda: kept_teacher_shards(manifest, name)):
        for split in splits:
            start = time.perf_counter()
            add_split(cfg, teacher, name, manifest, split, precision, request, dist)
            seconds[split] = time.perf_counter() - start
            if request:
                break
    stopped = stopped_on_any_rank(request, dist, device)
    if stopped:
        return stopped
    if dist.is_main:
        with on_write_failure(lambda: kept_teacher_shards(manifest, name)):
            if dist.enabled:
                collect_teacher_shards(manifest, name, splits)
            if cfg.prompts:
                add_teacher_prompts(manifest, name, teacher, cfg.prompt_sets)
    runtime.wait_for_all(dist)
    done = Manifest.load(root).teachers()[name]["splits"]
    empty = {"count": 0, "captions": 0, "shards": []}
    return {split: {"count": done.get(split, empty)["count"], "captions": done.get(split, empty)["captions"],
                    "skipped": {}, "shards": len(done.get(split, empty)["shards"]), "seconds": round(seconds[split], 3)}
            for split in splits}


def check_stored_size(manifest: dict[str, Any], pre: Preprocess) -> None:
    """Refuse a teacher whose input is larger than the stored images (view 0 would be upsampled)."""
    stored = int(manifest["view_policy"]["store_size"])
    if stored < pre.size:
        raise BadValue(f"this teacher's input is {pre.size} px but the cache stores images of at most {stored} px: "
                       f"view 0 would be upsampled; it needs a cache extracted with --store-size >= {pre.size}")


def claim_name(manifest: Manifest, fingerprint: dict[str, Any], wanted: str | None, overwrite: str | None) -> str:
    """The added teacher's name in the cache; a name held by other weights is refused unless ``overwrite``
    names it (its files are then removed). The same name and weights again: the add resumes."""
    name = check_teacher_name(wanted or default_teacher_name(fingerprint))
    teachers = manifest.teachers()
    if overwrite is not None and overwrite != name:
        raise BadValue(f"--overwrite-teacher {overwrite}: the teacher being added is named {name!r}")
    held = next((n for n, t in teachers.items() if same_fingerprint(t["fingerprint"], fingerprint)), None)
    if name not in teachers:
        if held is not None:
            raise AlreadyExists(f"teacher {describe_teacher(fingerprint)} is already in the cache as {held!r}")
        return name
    if teachers[name]["primary"]:
        first = describe_teacher(teachers[name]["fingerprint"])
        raise AlreadyExists(f"{name!r} is the cache's first teacher ({first}), whose embeddings are the shards "
                            "themselves; " + (
                                "it is already there" if held == name else
                                "name this one with --teacher-name, or re-extract with --overwrite"))
    if held == name and overwrite is None:
        return name  # resume
    if overwrite is None:
        raise AlreadyExists(f"the cache already has a teacher {name!r} with other weights "
                            f"({describe_teacher(teachers[name]['fingerprint'])}); pass --overwrite-teacher {name} "
                            "to replace it, or --teacher-name to add this one under another name")
    drop_teacher(manifest, name)
    return name


def drop_teacher(manifest: Manifest, name: str) -> None:
    """Forget an added teacher, then remove its files (the manifest never lists files that are gone)."""
    log.warning("--overwrite-teacher: removing teacher %r from %s", name, manifest.root)
    manifest.drop_teacher(name)
    manifest.save()
    for split in manifest.data["splits"]:
        shutil.rmtree(teacher_dir(manifest.root / split, name), ignore_errors=True)
    shutil.rmtree(teacher_dir(manifest.root, name), ignore_errors=True)  # its prompts, whitening, teacher_eval


def claim_teacher(cfg: ExtractConfig, manifest: Manifest, teacher: Teacher, dist: runtime.DistInfo) -> str:
    """The added teacher's name, recorded in the manifest by rank 0 (``claim_name``: refusals, resume,
    --overwrite-teacher); the other ranks then read it back from the manifest."""
    if dist.is_main:
        name = claim_name(manifest, teacher.fingerprint, cfg.teacher_name, cfg.overwrite_teacher)
        warn_other_view0(manifest.data, teacher.preprocess, name)
        if name not in manifest.teachers():
            manifest.add_teacher(name, teacher.fingerprint, teacher.embed_dim, teacher.logit_scale)
        manifest.save()
    runtime.barrier(dist)
    if not dist.is_main:
        manifest.data = Manifest.load(manifest.root).data
        name = next(n for n, t in manifest.teachers().items() if same_fingerprint(t["fingerprint"], teacher.fingerprint))
    return name


def collect_teacher_shards(manifest: Manifest, name: str, splits: list[str]) -> None:
    """Rank 0 after the barrier: list every rank's shards of the added teacher; refuse if one is missing.

    Sizes only, as ``collect_manifest``: each shard's sha256 was computed (or verified) moments ago.
    """
    for split in splits:
        for primary in manifest.split(split)["shards"]:
            entry = finished_teacher_entry(manifest.root / split, name, primary, full=False)
            if entry is None:
                raise CacheError(f"shard {primary['name']} of {split} of teacher {name!r} is missing or corrupt "
                                 "after extraction")
            manifest.add_teacher_shard(name, split, entry)
    manifest.save()


def warn_other_view0(manifest: dict[str, Any], pre: Preprocess, name: str) -> None:
    """View 0 is replayed as stored (the first teacher's eval resize), so every teacher sees the same pixels."""
    stored = manifest["view_policy"]["view0"]
    if stored != pre.resize_mode:
        log.warning("teacher %r resizes with %r for eval, but view 0 of this cache is %r (the first teacher's): "
                    "it sees view 0 as stored, the same pixels as every other teacher", name, pre.resize_mode, stored)


def add_split(cfg: ExtractConfig, teacher: Teacher, name: str, manifest: Manifest, split: str, precision: str,
              request: runtime.StopRequest, dist: runtime.DistInfo) -> None:
    """This rank's shards (i % world == rank) of the added teacher in one split, each skipped when already
    complete; stops at ``request``. One process lists each shard as it is written; ranks leave it to rank 0."""
    split_dir = manifest.root / split
    shards = manifest.split(split)["shards"][dist.rank::dist.world_size]
    todo = []
    for primary in shards:
        entry = finished_teacher_entry(split_dir, name, primary)
        if entry is None:
            todo.append(primary)
        elif not dist.enabled:
            manifest.add_teacher_shard(name, split, entry)
    if not dist.enabled:
        manifest.save()
    log.info("%s: teacher %r has %d of %d shards, adding the rest", split, name, len(shards) - len(todo), len(shards))
    if todo:
        add_shards(cfg, teacher, name, manifest, split, todo, precision, request, dist)


def add_shards(cfg: ExtractConfig, teacher: Teacher, name: str, manifest: Manifest, split: str,
               todo: list[dict[str, Any]], precision: str, request: runtime.StopRequest,
               dist: runtime.DistInfo) -> None:
    """Embed and write the teacher's shards for the primary entries ``todo``; at ``request`` the shards in
    flight are dropped."""
    split_dir = manifest.root / split
    stream = StoredStream([(p["index"], str(split_dir / f"{p['name']}.tar"), p["count"]) for p in todo],
                          cfg.batch_size, teacher.preprocess)
    loader = DataLoader(stream, batch_size=None, num_workers=min(cfg.workers, len(todo)),
                        pin_memory=runtime.pin_memory(teacher.device), worker_init_fn=runtime.WorkerInit())
    counts = {p["index"]: p["count"] for p in todo}
    pending: dict[int, list[CachedSample]] = {}
    with make_progress("img", disable=not cfg.progress) as progress:
        task = progress.add_task(f"add {name} {split}", total=sum(counts.values()), info="")
        for item in loader:
            if request:
                return
            if isinstance(item, UnitDone):
                samples = pending.pop(item.index, [])
                if len(samples) != counts[item.index]:
                    raise CacheError(f"{split} shard {item.index} holds {len(samples)} samples, its manifest entry "
                                     f"{counts[item.index]}; the cache is corrupt")
                entry = write_teacher_shard(split_dir, name, item.index, samples, teacher.embed_dim)
                if not dist.enabled:
                    manifest.add_teacher_shard(name, split, entry)
                    manifest.save()
                continue
            index, batch = item
            pending.setdefault(index, []).extend(embed_batch(teacher, batch, precision))
            progress.update(task, advance=len(batch))


def finished_teacher_entry(split_dir: Path, name: str, primary: dict[str, Any],
                           full: bool = True) -> dict[str, Any] | None:
    """The added teacher's entry of a shard when its files are complete (sha256 too when ``full``) and match
    the primary shard."""
    folder = teacher_dir(split_dir, name)
    entry = read_sidecar(folder, primary["index"])
    if entry is None or verify_shard(folder, entry, full=full, exts=("h5",)) is not None:
        return None
    return entry if (entry["count"], entry["captions"]) == (primary["count"], primary["captions"]) else None


class StoredStream(IterableDataset):
    """Yields (shard index, [Prepared]) batches of a cache's stored samples cut for a teacher ``pre``, and a
    UnitDone after each shard; each DataLoader worker takes whole shards (as ``UnitStream``)."""

    def __init__(self, shards: list[tuple[int, str, int]], batch_size: int, pre: Preprocess) -> None:
        self.shards, self.batch_size, self.pre = shards, batch_size, pre  # shards: (index, tar path, count)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for index, tar, count in self.shards[wid::nw]:
            stream = iter(stored_samples(tar) if count else ())  # webdataset refuses an empty tar
            while batch := [replayed(s, self.pre) for _, s in zip(range(self.batch_size), stream)]:
                yield index, batch
            yield UnitDone(index)


def replayed(stored: StoredSample, pre: Preprocess) -> Prepared:
    """A stored sample with its stored views cut for the teacher ``pre``: [V, 3, S, S] normalised pixels."""
    pixels = views.normalize_images(replay_views(stored.jpg, stored.views, pre.size, pre.interpolation),
                                    pre.mean, pre.std)
    return Prepared(stored.key, stored.jpg, stored.views, pixels, stored.captions, stored.label)


def add_teacher_prompts(manifest: Manifest, name: str, teacher: Teacher, extra: list[str] | None) -> None:
    """``CACHE/teachers/NAME/prompts.h5``: the added teacher's class-prompt embeddings, listed in its manifest
    entry (``files``). Sets already in the file are kept; while it is replaced it is unlisted, so the manifest
    never lists a file that does not match it (a re-run lists it again)."""
    from . import prompts  # noqa: PLC0415  (keeps the import graph of extract small)

    path = teacher_dir(manifest.root, name) / PROMPTS
    have = prompts.read_prompts(path) if path.exists() else {}
    sets = missing_prompt_sets(have, manifest.root / PROMPTS, teacher, manifest.data.get("classnames"), extra)
    if sets:
        manifest.list_teacher_file(name, PROMPTS, None)
        manifest.save()
        path.parent.mkdir(parents=True, exist_ok=True)
        prompts.write_prompts(path, {**have, **sets})
    manifest.list_teacher_file(name, PROMPTS, file_digest(path))
    manifest.save()


def missing_prompt_sets(have: dict[str, Any], primary: Path, teacher: Teacher, classnames: list[str] | None,
                        extra: list[str] | None) -> dict[str, Any]:
    """The prompt sets an added teacher's file lacks (``have``), encoded by it: the primary's sets first (the
    same class names and templates, so every teacher's zero-shot classifiers cover the same prompts), then
    the default sets and ``extra``; the data's own class names only when neither file has a set yet."""
    from . import prompts  # noqa: PLC0415

    like = {n: s for n, s in (prompts.read_prompts(primary) if primary.exists() else {}).items() if n not in have}
    named = [n for n in dict.fromkeys([*prompts.DEFAULT_SETS, *(extra or [])]) if n not in have and n not in like]
    own = None if have or like else classnames
    sets = prompts.encode_like(teacher, like)
    if named or own:
        sets.update(prompts.build_prompt_sets(teacher, named, extra_classnames=own))
    return sets


def kept_teacher_shards(manifest: Manifest, name: str) -> tuple[str, str]:
    """After a failed write: how many of the added teacher's shards are complete, and that a re-run resumes."""
    splits = manifest.teachers().get(name, {}).get("splits", {})
    done = sum(len(info["shards"]) for info in splits.values())
    total = sum(len(info["shards"]) for info in manifest.data["splits"].values())
    return (f"{done} of {total} shards of teacher {name!r} are complete and listed in {manifest.path}; "
            "the other teachers' files are untouched",
            "free some space, then re-run the same command: it keeps the complete shards and adds the rest")
