"""The one reader of the cache's tar shards: training batches, validation and evaluation passes.

Streams a split's WebDataset tar shards, replays a stored view (``views.View``: a crop box +
flip, or view 0's eval resize — shortest, squash or longest — as the teacher's open_clip
preprocess made it) on the stored JPEG so the pixels are exactly those the teacher embedded
(at another ``image_size``, the same view cut at that size), and pairs them with the
cached targets: ``t_img = img.npy[v]`` for the drawn view ``v`` and ``t_txt = txt.npy[c]``
for one drawn caption ``c``. Every reader of the shards goes through here, so the pixels a
student is trained on, validated on and evaluated on come from one decoding path:

* training and validation: ``make_loader`` / ``epoch_batches`` over ``stream_config(...)``
  (batches of ``decode_sample``: pixels, cached targets, caption, label);
* evaluation: ``view0_loader`` (one ordered pass of view 0 and every caption, no cached
  targets; ``decode_view0``);
* adding a teacher to a cache: ``stored_samples`` (one shard in order: stored image, views,
  captions, label) and ``replay_views`` (every stored view of a sample at the new teacher's size).

How the stream is split and why (DDP ranks must never hang on uneven shards):

* Each epoch has a fixed length per rank: ``steps_per_epoch = count // (world · batch)``
  batches. Every rank runs exactly that many steps, whatever its shards hold.
* The shard order of epoch ``e`` is a permutation drawn from ``(seed, e, pass)``. The
  stream has ``P = world · workers`` *parts* (rank ``r``, worker ``w`` -> part ``r·W + w``).
  With at least ``P`` shards, part ``p`` reads shards ``order[p::P]``; with fewer, every part
  reads every shard and keeps the samples ``i ≡ p (mod P)`` (small caches only).
  Each part cycles through passes until the epoch's batches are taken, so a part holding a
  short shard repeats some samples rather than run dry (as ``resampled=True`` +
  ``with_epoch`` would, but deterministically). This is webdataset's node/worker split done
  explicitly, so it can be a pure function of ``(seed, epoch)``.
* A shuffle buffer (seeded by ``(seed, epoch, part, pass)``, flushed at the end of each pass
  so one epoch never repeats a sample it has not exhausted) mixes samples within a part, and
  the view / caption of a sample are drawn from ``(seed, epoch, key)``, so nothing depends on
  timing, process ids or the global RNG.
* Images leave the workers as uint8 ``[B, 3, S, S]``; ``normalize_images`` turns them into
  the student's float input on the device (4x fewer bytes through worker IPC and transfers).

Resume: since an epoch's batch sequence is a function of ``(seed, epoch, world, workers,
batch)``, resuming at ``(epoch, step)`` rebuilds the epoch's stream and skips the batches
already done. The skip happens on raw samples *before* image decoding (cheap: tar reads
only). DataLoader serves workers round-robin, so batch ``i`` comes from worker
``i mod W``; a resumed loader rotates the worker -> part mapping by ``step mod W`` so its
first batch comes from the part that would have served it. (A sample that fails to decode
shifts the skip by one sample; such samples are counted and reported.)

Only the expected tar members are read (``select_files``: ``WANTED``, or ``VIEW0_MEMBERS`` for
an evaluation pass), ``.npy`` members are loaded with ``allow_pickle=False``, and a bad sample
is counted, logged and skipped (``data.records.ErrorCounter``) — never webdataset's
``warn_and_continue``, which sleeps 0.5 s per error.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from itertools import count
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .data import views
from .data.records import ErrorCounter
from .errors import BadValue
from .runtime import WorkerInit
from .store import read_h5_shard

# Tar members the trainer reads; anything else in a shard (e.g. a stray .pyd) is never opened.
WANTED = ("jpg", "views.json", "img.npy", "txt.npy", "captions.json", "cls.txt")
VIEW0_MEMBERS = ("jpg", "views.json", "captions.json")  # an evaluation pass: no cached targets
STORED_MEMBERS = ("jpg", "views.json", "captions.json", "cls.txt")  # what another teacher needs: no targets


@dataclass(frozen=True)
class StreamConfig:
    """Everything a DataLoader worker needs to produce its batches (picklable, no tensors)."""

    shards: tuple[str, ...]  # tar paths of the split, in manifest order
    batch_size: int
    image_size: int
    interpolation: str  # the teacher's (from the fingerprint), so replayed pixels match
    seed: int = 0
    epoch: int = 0
    rank: int = 0
    world: int = 1
    train: bool = True  # False: one ordered pass, view 0, caption 0, last batch partial
    views_used: str = "all"  # "all": a random stored view per sample; "0": view 0 only
    shuffle_buffer: int = 1000
    skip_batches: int = 0  # batches this rank already consumed in this epoch (resume)
    workers: int = 0  # the DataLoader's num_workers (0 = in process)
    teachers: tuple["TeacherShards", ...] = ()  # added teachers whose targets join each sample (``join_teachers``)


@dataclass(frozen=True)
class TeacherShards:
    """An added teacher's h5 files, one per tar of ``StreamConfig.shards`` in the same order
    (``Cache.teacher_h5_paths``): same keys, same order, the teacher's own D."""

    name: str
    h5: tuple[str, ...]


# --------------------------------------------------------------------------- errors


def cache_errors() -> ErrorCounter:
    """The handler of one stream (it lives in each worker).

    Batches carry how many errors happened since the previous batch (``batch["data_errors"]``)
    so the trainer can count them across workers.
    """
    return ErrorCounter("cache sample", log_first=5, max_consecutive=1000)


# --------------------------------------------------------------------------- per-sample work


def _rng(*parts: int | str) -> np.random.Generator:
    """A generator seeded by a tuple of ints/strings (stable across runs and machines)."""
    return np.random.default_rng([views.stable_seed(p) if isinstance(p, str) else int(p) & (2**63 - 1)
                                  for p in parts])


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def pick_view_caption(cfg: StreamConfig, key: str, n_views: int, n_captions: int) -> tuple[int, int]:
    """(view index, caption index) for one sample of one epoch; a pure function of its inputs."""
    if not cfg.train:
        return 0, 0
    rng = _rng(cfg.seed, cfg.epoch, key)
    view = int(rng.integers(n_views)) if cfg.views_used == "all" else 0
    return view, int(rng.integers(n_captions))


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.asarray(views.to_rgb(img), dtype=np.uint8).copy()).permute(2, 0, 1)


normalize_images = views.normalize_images  # uint8 batches are normalised on the device: one formula for every path


def replay_view(jpg: bytes, view: dict[str, Any], size: int, interpolation: str) -> torch.Tensor:
    """The stored JPEG's pixels in one stored view (a views.json entry) at ``size``: uint8 [3, size, size]."""
    return replay_views(jpg, [view], size, interpolation)[0]


def replay_views(jpg: bytes, view_dicts: list[dict[str, Any]], size: int, interpolation: str) -> torch.Tensor:
    """Every stored view of one sample at ``size`` (the JPEG decoded once): uint8 [V, 3, size, size]."""
    stored = views.to_rgb(views.decode_image(jpg))
    return torch.stack([pil_to_uint8(views.apply_view(stored, views.View.from_dict(v), size, interpolation))
                        for v in view_dicts])


@dataclass(frozen=True)
class StoredSample:
    """What a cached sample holds apart from any teacher's embeddings."""

    key: str
    jpg: bytes
    views: list[dict[str, Any]]  # views.json
    captions: list[str]
    label: int  # -1 unknown


def stored_samples(tar: Path | str) -> Iterator[StoredSample]:
    """One shard's samples in their stored order, without cached targets (adding a teacher).

    A sample that cannot be read raises: the shard passed its size check, so it is corrupt, and a
    teacher added with a sample missing would no longer line up with the primary's shard.
    """
    def wanted(fname: str) -> bool:
        return fname.split(".", 1)[-1].lower() in STORED_MEMBERS

    for s in wds.tarfile_samples([{"url": str(tar)}], handler=wds.reraise_exception, select_files=wanted):
        label = int(s["cls.txt"].decode()) if "cls.txt" in s else -1
        yield StoredSample(s["__key__"], s["jpg"], json.loads(s["views.json"]), json.loads(s["captions.json"]), label)


def decode_sample(cfg: StreamConfig, sample: dict[str, Any]) -> dict[str, Any]:
    """A raw tar sample -> {image uint8 [3,S,S], t_img [D], t_txt [D], caption, label, key, view}.

    Raises (caught by the counting handler) when a member is missing or malformed.
    """
    key = sample["__key__"]
    img, txt = _load_npy(sample["img.npy"]), _load_npy(sample["txt.npy"])  # [V, D], [C, D] fp16
    view_dicts = json.loads(sample["views.json"])
    captions = json.loads(sample["captions.json"])
    if img.ndim != 2 or txt.ndim != 2 or len(view_dicts) != img.shape[0] or len(captions) != txt.shape[0]:
        raise ValueError(f"sample {key}: img {img.shape}, txt {txt.shape}, "
                         f"{len(view_dicts)} views, {len(captions)} captions do not agree")
    v, c = pick_view_caption(cfg, key, img.shape[0], txt.shape[0])
    label = int(sample["cls.txt"].decode()) if "cls.txt" in sample else -1
    out = {
        "image": replay_view(sample["jpg"], view_dicts[v], cfg.image_size, cfg.interpolation),
        "t_img": torch.from_numpy(img[v].astype(np.float32)),
        "t_txt": torch.from_numpy(txt[c].astype(np.float32)),
        "caption": captions[c], "label": label, "key": key, "view": v, "caption_idx": c,
    }
    if cfg.teachers:
        out["teachers"] = join_teachers(cfg, sample.get("__url__", ""), key, v, c)
    return out


# --------------------------------------------------------------------------- added teachers' targets


@dataclass(frozen=True)
class TeacherRows:
    """One added teacher's shard in memory with its key -> row map (``teacher_rows``)."""

    row: dict[str, int]
    img: np.ndarray  # [N, V, D] float16
    txt: np.ndarray  # [M, D] float16
    txt_offsets: np.ndarray  # [N + 1] int64


@lru_cache(maxsize=4)
def teacher_rows(h5_path: str) -> TeacherRows:
    """An added teacher's h5 shard, loaded once per process (each DataLoader worker has its own).

    A few shards stay loaded: the shuffle buffer mixes the tail of one shard with the head of the next.
    """
    shard = read_h5_shard(Path(h5_path), fields=("img", "txt"))
    return TeacherRows({k: i for i, k in enumerate(shard.keys)}, shard.img, shard.txt, shard.txt_offsets)


def join_teachers(cfg: StreamConfig, url: str, key: str, view: int, caption: int) -> dict[str, dict[str, torch.Tensor]]:
    """Each added teacher's targets of one sample: {name: {t_img [D_k], t_txt [D_k]}}.

    The row is found by key in the teacher's h5 of the same shard; ``view`` and ``caption`` are the
    ones the sample drew for the primary's targets, so every teacher saw the same pixels and text.
    """
    index = cfg.shards.index(url)
    out = {}
    for t in cfg.teachers:
        rows = teacher_rows(t.h5[index])
        if key not in rows.row:
            raise ValueError(f"sample {key} of {url} is not in teacher {t.name!r}'s {t.h5[index]}")
        i = rows.row[key]
        n_views, first, end = rows.img.shape[1], int(rows.txt_offsets[i]), int(rows.txt_offsets[i + 1])
        if view >= n_views or caption >= end - first:
            raise ValueError(f"sample {key}: teacher {t.name!r} has {n_views} views and {end - first} captions "
                             f"in {t.h5[index]}, the tar more")
        out[t.name] = {"t_img": torch.from_numpy(rows.img[i, view].astype(np.float32)),
                       "t_txt": torch.from_numpy(rows.txt[first + caption].astype(np.float32))}
    return out


def collate(samples: list[dict[str, Any]], errors: int) -> dict[str, Any]:
    """Stack decoded samples into a batch dict (tensors + lists of captions and keys).

    With added teachers in the stream, ``teachers`` = {name: {t_img [B, D_k], t_txt [B, D_k]}}.
    """
    batch = {
        "image": torch.stack([s["image"] for s in samples]),  # [B, 3, S, S] uint8: see normalize_images
        "t_img": torch.stack([s["t_img"] for s in samples]),  # [B, D] float32, unit norm
        "t_txt": torch.stack([s["t_txt"] for s in samples]),  # [B, D]
        "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),  # -1 = unknown
        "view": torch.tensor([s["view"] for s in samples], dtype=torch.long),
        "caption_idx": torch.tensor([s["caption_idx"] for s in samples], dtype=torch.long),
        "captions": [s["caption"] for s in samples],
        "keys": [s["key"] for s in samples],
        "data_errors": errors,
    }
    if "teachers" in samples[0]:
        batch["teachers"] = {name: {side: torch.stack([s["teachers"][name][side] for s in samples])
                                    for side in ("t_img", "t_txt")} for name in samples[0]["teachers"]}
    return batch


def decode_view0(cfg: StreamConfig, sample: dict[str, Any], captions: bool) -> dict[str, Any]:
    """A raw tar sample -> {key, image uint8 [3,S,S] of view 0, captions: all of them, or [] unless asked}."""
    view0 = json.loads(sample["views.json"])[0]
    return {"key": sample["__key__"], "image": replay_view(sample["jpg"], view0, cfg.image_size, cfg.interpolation),
            "captions": json.loads(sample["captions.json"]) if captions else []}


def collate_view0(samples: list[dict[str, Any]], errors: int) -> dict[str, Any]:
    """Stack ``decode_view0`` samples: {keys, image uint8 [B,3,S,S], captions [B lists], data_errors}."""
    return {"keys": [s["key"] for s in samples], "image": torch.stack([s["image"] for s in samples]),
            "captions": [s["captions"] for s in samples], "data_errors": errors}


@dataclass(frozen=True)
class SampleDecoder:
    """What a stream reads of each sample and how it decodes and batches it (picklable)."""

    members: tuple[str, ...]  # tar member suffixes read; every other member is skipped unopened
    decode: Callable[[StreamConfig, dict[str, Any]], dict[str, Any]]
    collate: Callable[[list[dict[str, Any]], int], dict[str, Any]]

    def wanted(self, fname: str) -> bool:
        return fname.split(".", 1)[-1].lower() in self.members


TRAINING = SampleDecoder(WANTED, decode_sample, collate)


def view0_decoder(captions: bool) -> SampleDecoder:
    """An evaluation pass: view 0 and (when asked) every caption; the npy targets are never read."""
    members = VIEW0_MEMBERS if captions else tuple(m for m in VIEW0_MEMBERS if m != "captions.json")
    return SampleDecoder(members, partial(decode_view0, captions=captions), collate_view0)


# --------------------------------------------------------------------------- the stream


def part_of(cfg: StreamConfig) -> tuple[int, int]:
    """(part, parts) of this process: the DataLoader worker id rotated by the resume offset."""
    info = get_worker_info()
    wid, n_workers = (info.id, info.num_workers) if info else (0, 1)
    logical = (wid + cfg.skip_batches) % n_workers  # see the module docstring (resume)
    return cfg.rank * n_workers + logical, cfg.world * n_workers


def skipped_samples(cfg: StreamConfig, logical_worker: int, n_workers: int) -> int:
    """Raw samples this worker must drop to resume after ``cfg.skip_batches`` batches."""
    done = cfg.skip_batches
    batches = (done - logical_worker + n_workers - 1) // n_workers if done > logical_worker else 0
    return batches * cfg.batch_size


class ShardSource:
    """The shard order of one part: a permutation per (seed, epoch, pass); endless when training."""

    def __init__(self, cfg: StreamConfig, part: int, parts: int, wanted: Callable[[str], bool]) -> None:
        self.cfg, self.part, self.parts, self.wanted = cfg, part, parts, wanted

    @property
    def strided(self) -> bool:
        """Fewer shards than parts: every part reads all shards and keeps every P-th sample."""
        return len(self.cfg.shards) < self.parts

    def passes(self) -> Iterator[list[str]]:
        shards = list(self.cfg.shards)
        for n in count() if self.cfg.train else range(1):
            order = shards
            if self.cfg.train:
                order = [shards[i] for i in _rng(self.cfg.seed, self.cfg.epoch, n).permutation(len(shards))]
            yield order if self.strided else order[self.part::self.parts]

    def samples(self, counter: ErrorCounter) -> Iterator[dict[str, Any]]:
        """Raw tar samples of this part, pass after pass (only the ``wanted`` members are read)."""
        for n, urls in enumerate(self.passes()):
            found = 0
            for sample in self._shuffled(self._read(urls, counter), n):
                found += 1
                yield sample
            if found == 0 and self.cfg.train:  # an endless stream of nothing would hang the run
                raise RuntimeError(f"cache stream part {self.part}/{self.parts} found no samples in {urls}")

    def _read(self, urls: list[str], counter: ErrorCounter) -> Iterator[dict[str, Any]]:
        samples = wds.tarfile_samples([{"url": u} for u in urls], handler=counter, select_files=self.wanted)
        for index, sample in enumerate(samples):
            if not self.strided or index % self.parts == self.part:
                yield sample

    def _shuffled(self, samples: Iterator[dict[str, Any]], n_pass: int) -> Iterator[dict[str, Any]]:
        """Shuffle within one pass (a buffer spanning passes would repeat samples within an epoch)."""
        if not self.cfg.train:
            return samples
        seed = views.stable_seed(f"{self.cfg.seed}/{self.cfg.epoch}/{self.part}/{n_pass}")
        buf = self.cfg.shuffle_buffer
        return wds.shuffle(buf, initial=buf, rng=random.Random(seed))(samples)


class CacheStream(IterableDataset):
    """Batches of one rank for one epoch (training: endless; the trainer takes a fixed count)."""

    def __init__(self, cfg: StreamConfig, decoder: SampleDecoder = TRAINING) -> None:
        super().__init__()
        self.cfg, self.decoder = cfg, decoder

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        part, parts = part_of(cfg)
        n_workers = parts // cfg.world
        counter = cache_errors()
        source = ShardSource(cfg, part, parts, self.decoder.wanted)
        stages: list[Any] = [lambda: source.samples(counter)]
        skip = skipped_samples(cfg, part % n_workers, n_workers)
        if skip:
            stages.append(wds.slice(skip, None))
        stages.append(wds.map(counter.watch(partial(self.decoder.decode, cfg)), handler=counter))
        samples = iter(wds.DataPipeline(*stages))
        yield from _batches(samples, cfg.batch_size, not cfg.train, counter, self.decoder.collate)


def _batches(samples: Iterator[dict], size: int, last_partial: bool, counter: ErrorCounter,
             collate_fn: Callable[[list[dict], int], dict]) -> Iterator[dict]:
    batch: list[dict] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield collate_fn(batch, counter.take())
            batch = []
    if batch and last_partial:
        yield collate_fn(batch, counter.take())


# --------------------------------------------------------------------------- loaders


def make_loader(cfg: StreamConfig, pin_memory: bool = False, decoder: SampleDecoder = TRAINING) -> DataLoader:
    """A DataLoader over ``CacheStream(cfg, decoder)`` (batching happens in the workers)."""
    workers = cfg.workers
    if not cfg.train:
        workers = min(workers, len(cfg.shards))  # an ordered pass: one shard per worker at least
    # A private generator: DataLoader draws its base seed from it, not from the global torch RNG
    # (which training owns and checkpoints); nothing in the stream uses the seed anyway.
    return DataLoader(CacheStream(replace(cfg, workers=workers), decoder), batch_size=None, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=False, generator=torch.Generator().manual_seed(0),
                      worker_init_fn=WorkerInit())


def steps_per_epoch(n_samples: int, batch_size: int, world: int) -> int:
    """Batches every rank runs per epoch: floor(n / (world · batch))."""
    steps = n_samples // (world * batch_size)
    if steps < 1:
        raise BadValue(f"the train split has {n_samples} samples: too few for batch size {batch_size} "
                       f"x {world} process(es); lower --batch-size")
    return steps


def epoch_batches(cfg: StreamConfig, n_steps: int, pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    """The batches ``cfg.skip_batches .. n_steps - 1`` of ``cfg.epoch`` for this rank."""
    if cfg.skip_batches >= n_steps:
        return
    loader = make_loader(cfg, pin_memory)
    it = iter(loader)
    try:
        for _ in range(cfg.skip_batches, n_steps):
            yield next(it)
    finally:
        del it  # shuts the workers down (the training stream is endless)


def stream_config(shards: Sequence[Path | str], **kw: Any) -> StreamConfig:
    """A StreamConfig over the given tar paths (``Cache.shard_paths(split, "tar")``)."""
    return StreamConfig(shards=tuple(str(s) for s in shards), **kw)


def view0_loader(shards: Sequence[Path | str], *, image_size: int, interpolation: str, batch_size: int,
                 workers: int = 0, captions: bool = False) -> DataLoader:
    """One ordered pass over the shards for evaluation: batches of ``collate_view0``.

    The same reader as training (members, decoding, error counting), with view 0 replayed at
    ``image_size`` with ``interpolation``; the cached targets are never read. With workers the
    batches interleave shard by shard (line them up by key).
    """
    cfg = stream_config(shards, batch_size=batch_size, image_size=image_size, interpolation=interpolation,
                        train=False, workers=workers)
    return make_loader(cfg, decoder=view0_decoder(captions))
