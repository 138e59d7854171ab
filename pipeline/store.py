"""The cache on disk: shard writer, manifest and readers (docs/ARCHITECTURE.md, "Cache layout").

Knows files, not math. A shard is three files written in this order, each under a temporary
name, fsynced and renamed: ``shard-NNNNNN.tar`` (WebDataset), ``shard-NNNNNN.h5`` (the same
embeddings, contiguous) and ``shard-NNNNNN.json`` (the sidecar: its manifest entry). The
sidecar is written last, so a shard with a sidecar is complete; the manifest lists a shard
only after its sidecar exists, and every reader checks sizes (and on request sha256) against it.
A disk that fills up while a shard is written raises ``errors.WriteFailed`` with the shard's size;
the shard's temporary files are removed and the shards before it stay complete.

Several teachers (ensemble distillation): the first teacher (the *primary*) owns the tar and h5
members above, exactly as in a single-teacher cache. Each teacher added later has its own files,
``SPLIT/teachers/NAME/shard-NNNNNN.h5`` (the primary h5's layout, same keys in the same order)
and its sidecar ``shard-NNNNNN.json``, written in that order, so adding a teacher never rewrites
a byte of another teacher's files. The manifest's ``teachers`` table lists every teacher by name
(``Manifest.teachers``); a cache without it is a single-teacher cache (format 1). A teacher's
cache-level files (prompts.h5, whitening, teacher_eval.json) are at the cache root for the primary
and in ``CACHE/teachers/NAME/`` for an added one (``Cache.teacher_folder``); the manifest lists an
added teacher's prompts.h5 in its entry (``files``), verified as its shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import webdataset as wds

from .atomic import atomic_write, atomic_write_json
from .errors import BadValue, CannotRun, WriteFailed

log = logging.getLogger("kdpipe")

MANIFEST = "manifest.json"
PROMPTS = "prompts.h5"
TEACHER_EVAL_JSON = "teacher_eval.json"  # the teacher's own figures (`kdpipe eval --teacher CACHE`)
FORMAT_VERSION = 1  # a single-teacher cache; adding a teacher makes it FORMAT_TEACHERS
FORMAT_TEACHERS = 2  # the manifest has a ``teachers`` table (readers of format 1 still read the primary)
TEACHERS_DIR = "teachers"  # SPLIT/teachers/NAME/: an added teacher's shards
TEACHER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class CacheError(CannotRun):
    """The cache is missing, incomplete, corrupt or from another teacher."""


# --------------------------------------------------------------------------- files


def file_digest(path: Path) -> dict[str, Any]:
    """{'bytes': size, 'sha256': hex} of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


# --------------------------------------------------------------------------- samples and shards


@dataclass
class CachedSample:
    """One image's cache entry. Embeddings are L2-normalised float16."""

    key: str
    jpg: bytes
    views: list[dict]  # [{"box": [x0, y0, x1, y1], "flip": bool}] relative to the stored image
    img: np.ndarray  # [V, D] float16
    txt: np.ndarray  # [C, D] float16
    img_norms: np.ndarray  # [V] float32, norms before normalisation
    txt_norms: np.ndarray  # [C] float32
    captions: list[str]
    label: int = -1


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _tar_sample(s: CachedSample) -> dict[str, Any]:
    sample = {
        "__key__": s.key,
        "jpg": s.jpg,
        "views.json": json.dumps(s.views).encode(),
        "img.npy": _npy_bytes(s.img.astype(np.float16)),
        "txt.npy": _npy_bytes(s.txt.astype(np.float16)),
        "norms.npy": _npy_bytes(np.concatenate([s.img_norms, s.txt_norms]).astype(np.float32)),
        "captions.json": json.dumps(s.captions).encode(),
    }
    if s.label >= 0:
        sample["cls.txt"] = str(s.label).encode()
    return sample


def _write_tar(path: Path, samples: list[CachedSample]) -> None:
    with open(path, "wb") as f:
        with wds.TarWriter(f) as sink:
            for s in samples:
                sink.write(_tar_sample(s))


def _write_h5(path: Path, samples: list[CachedSample], embed_dim: int) -> None:
    n_views = samples[0].img.shape[0] if samples else 0
    counts = [len(s.captions) for s in samples]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    with h5py.File(path, "w") as f:
        f.attrs["embed_dim"] = embed_dim
        f.create_dataset("keys", data=np.array([s.key for s in samples], dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("img", data=_stack([s.img for s in samples], (0, n_views, embed_dim)))
        f.create_dataset("txt", data=_concat([s.txt for s in samples], (0, embed_dim)))
        f.create_dataset("txt_offsets", data=offsets)
        f.create_dataset("img_norms", data=_stack([s.img_norms for s in samples], (0, n_views), np.float32))
        f.create_dataset("txt_norms", data=_concat([s.txt_norms for s in samples], (0,), np.float32))
        f.create_dataset("labels", data=np.array([s.label for s in samples], dtype=np.int64))


def _stack(arrays: list[np.ndarray], empty: tuple, dtype=np.float16) -> np.ndarray:
    return np.stack(arrays).astype(dtype) if arrays else np.zeros(empty, dtype)


def _concat(arrays: list[np.ndarray], empty: tuple, dtype=np.float16) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(empty, dtype)


def shard_bytes(samples: list[CachedSample]) -> int:
    """About what a shard takes on disk (tar + h5), for the message of a failed write; it serializes the
    samples again, so it is meant for that moment only.

    The tar: webdataset writes PAX members (a PAX header, its data and the member header: three 512-byte
    blocks) with their content padded to 512 bytes, then the end blocks, rounded up to tarfile's 10240-byte
    record. The h5: its arrays plus about 8 kB of HDF5 metadata.
    """
    block, record = 512, 10240
    members = [len(v) for s in samples for k, v in _tar_sample(s).items() if k != "__key__"]
    tar = sum(3 * block + -(-n // block) * block for n in members) + 2 * block
    arrays = sum(s.img.size * 2 + s.txt.size * 2 + (s.img_norms.size + s.txt_norms.size) * 4 + 32 for s in samples)
    return -(-tar // record) * record + arrays + 8192


def write_shard(
    split_dir: Path,
    index: int,
    samples: list[CachedSample],
    embed_dim: int,
    skipped: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Write one shard (tar, h5, sidecar) crash-safely and return its manifest entry.

    ``skipped`` maps a reason ("corrupt", "no_caption", ...) to the keys skipped for it.
    """
    split_dir.mkdir(parents=True, exist_ok=True)
    name = shard_name(index)
    files = {ext: split_dir / f"{name}.{ext}" for ext in ("tar", "h5")}
    try:
        atomic_write(files["tar"], lambda tmp: _write_tar(tmp, samples))
        atomic_write(files["h5"], lambda tmp: _write_h5(tmp, samples, embed_dim))
        entry = _shard_entry(name, index, samples, files, skipped or {})
        atomic_write_json(split_dir / f"{name}.json", entry)
    except WriteFailed as err:
        _unfinished(files.values(), err, shard_bytes(samples), f"{name} (tar + h5)")
        raise
    return entry


def _unfinished(files: Any, err: WriteFailed, needed: int, what: str) -> None:
    """A shard without its sidecar is unfinished: give its space back; the error says what it needed."""
    for path in files:
        path.unlink(missing_ok=True)
    err.needed, err.needed_for = needed, what


def teacher_dir(split_dir: Path, name: str) -> Path:
    """Where an added teacher's shards of one split live: ``SPLIT/teachers/NAME``."""
    return split_dir / TEACHERS_DIR / name


ENSEMBLE = "ensemble"  # eval's teachers/ensemble/ and validation's val_teachers/ensemble/ rows: not a teacher's name


def check_teacher_name(name: str) -> str:
    """A teacher name is a folder name: letters, digits, ``.``, ``_``, ``-`` (at most 64), and not ``ENSEMBLE``."""
    if not TEACHER_NAME.fullmatch(name):
        raise BadValue(f"teacher name {name!r} is not usable as a folder name; use letters, digits, '.', '_' "
                       "and '-' (at most 64, starting with a letter or digit), e.g. --teacher-name vitb32")
    if name.lower() == ENSEMBLE:
        raise BadValue(f"teacher name {name!r} is reserved: eval and validation report the teachers' ensemble "
                       f"under teachers/{ENSEMBLE}/; choose another, e.g. --teacher-name vitb32")
    return name


def default_teacher_name(fp: dict[str, Any]) -> str:
    """The name a teacher gets in a cache unless one is given: its label (else its open_clip name), made
    folder-safe ("ViT-B-32", "shapes-vit", "hf-hub_org_model")."""
    raw = str(fp.get("label") or fp.get("name") or "teacher")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._-") or "teacher"
    return safe[:64] if safe.lower() != ENSEMBLE else f"{safe}-teacher"


def write_teacher_shard(split_dir: Path, teacher: str, index: int, samples: list[CachedSample],
                        embed_dim: int) -> dict[str, Any]:
    """Write an added teacher's shard (h5, then sidecar) crash-safely; return its manifest entry.

    ``samples`` are the primary shard's samples in its order, with this teacher's embeddings; only
    the embeddings, norms, keys and labels are written (the images and views stay in the primary tar).
    """
    folder = teacher_dir(split_dir, teacher)
    folder.mkdir(parents=True, exist_ok=True)
    name = shard_name(index)
    h5 = folder / f"{name}.h5"
    try:
        atomic_write(h5, lambda tmp: _write_h5(tmp, samples, embed_dim))
        entry = {"name": name, "index": index, "count": len(samples),
                 "captions": int(sum(len(s.captions) for s in samples)), "h5": file_digest(h5)}
        atomic_write_json(folder / f"{name}.json", entry)
    except WriteFailed as err:
        arrays = sum(s.img.size * 2 + s.txt.size * 2 + (s.img_norms.size + s.txt_norms.size) * 4 + 32 for s in samples)
        _unfinished([h5], err, arrays + 8192, f"{teacher}/{name}.h5")
        raise
    return entry


def _shard_entry(name: str, index: int, samples: list[CachedSample], files: dict[str, Path],
                 skipped: dict[str, list[str]]) -> dict[str, Any]:
    return {
        "name": name,
        "index": index,
        "count": len(samples),
        "captions": int(sum(len(s.captions) for s in samples)),
        "tar": file_digest(files["tar"]),
        "h5": file_digest(files["h5"]),
        "skipped": {reason: len(keys) for reason, keys in sorted(skipped.items()) if keys},
        "skipped_keys": {reason: list(keys) for reason, keys in sorted(skipped.items()) if keys},
    }


def verify_shard(split_dir: Path, entry: dict[str, Any], full: bool = True,
                 exts: tuple[str, ...] = ("tar", "h5")) -> str | None:
    """None when the shard's files match its entry, else a reason. ``full`` checks sha256.

    ``exts``: the files of the shard; an added teacher's shard (in its ``teacher_dir``) is ``("h5",)``.
    """
    for ext in exts:
        problem = verify_file(split_dir / f"{entry['name']}.{ext}", entry[ext], full)
        if problem:
            return problem
    return None


def verify_file(path: Path, digest: dict[str, Any], full: bool) -> str | None:
    """None when ``path`` has the {"bytes", "sha256"} the manifest lists (sha256 only when ``full``), else a reason."""
    if not path.exists():
        return f"{path} is missing"
    if path.stat().st_size != digest["bytes"]:
        return f"{path} has {path.stat().st_size} bytes, the manifest says {digest['bytes']}"
    if full and file_digest(path)["sha256"] != digest["sha256"]:
        return f"{path} does not match its sha256 in the manifest"
    return None


def read_sidecar(split_dir: Path, index: int) -> dict[str, Any] | None:
    path = split_dir / f"{shard_name(index)}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None


# --------------------------------------------------------------------------- manifest


@dataclass
class Manifest:
    """``CACHE/manifest.json``; always rewritten atomically."""

    root: Path
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.root / MANIFEST

    @classmethod
    def load(cls, root: Path) -> "Manifest | None":
        path = Path(root) / MANIFEST
        if not path.exists():
            return None
        try:
            return cls(Path(root), json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise CacheError(f"{path} is not valid JSON ({err}); re-run extract with --overwrite") from None

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def split(self, name: str) -> dict[str, Any]:
        return self.data.setdefault("splits", {}).setdefault(
            name, {"count": 0, "captions": 0, "skipped": {}, "shards": []})

    def add_shard(self, split: str, entry: dict[str, Any]) -> None:
        """Record (or replace) a shard entry and recompute the split's totals."""
        info = self.split(split)
        shards = [s for s in info["shards"] if s["name"] != entry["name"]] + [entry]
        shards.sort(key=lambda s: s["name"])
        info["shards"] = shards
        info["count"] = sum(s["count"] for s in shards)
        info["captions"] = sum(s["captions"] for s in shards)
        skipped: dict[str, int] = {}
        for s in shards:
            for reason, n in s["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
        info["skipped"] = dict(sorted(skipped.items()))

    # ----------------------------------------------------------------- teachers

    def teachers(self) -> dict[str, dict[str, Any]]:
        """name -> {"fingerprint", "embed_dim", "logit_scale", "primary": bool[, "splits"]}, the primary first.

        A single-teacher cache (no ``teachers`` table) has one, named by ``default_teacher_name``.
        An added teacher's ``splits`` maps a split to {"count", "captions", "shards": [sidecar entries]}.
        """
        if "teachers" in self.data:
            return self.data["teachers"]
        return {default_teacher_name(self.data["teacher"]): {
            "fingerprint": self.data["teacher"], "embed_dim": self.data["embed_dim"],
            "logit_scale": self.data["logit_scale"], "primary": True}}

    def add_teacher(self, name: str, fingerprint: dict[str, Any], embed_dim: int, logit_scale: float) -> None:
        """Record an added teacher (no shards yet); the cache becomes format 2."""
        table = self.teachers()
        table[name] = {"fingerprint": fingerprint, "embed_dim": embed_dim, "logit_scale": logit_scale,
                       "primary": False, "splits": {}}
        self.data["teachers"] = table
        self.data["format"] = FORMAT_TEACHERS

    def drop_teacher(self, name: str) -> None:
        """Forget an added teacher (its files are the caller's to remove)."""
        self.data.get("teachers", {}).pop(name, None)

    def list_teacher_file(self, name: str, file: str, digest: dict[str, Any] | None) -> None:
        """List one of an added teacher's cache-level files (``CACHE/teachers/NAME/FILE``, e.g. prompts.h5)
        with its {"bytes", "sha256"}, or unlist it (``digest`` None) while it is being replaced."""
        files = self.teachers()[name].setdefault("files", {})
        if digest is None:
            files.pop(file, None)
        else:
            files[file] = digest

    def add_teacher_shard(self, name: str, split: str, entry: dict[str, Any]) -> None:
        """Record (or replace) an added teacher's shard entry and recompute its split totals."""
        info = self.teachers()[name]["splits"].setdefault(split, {"count": 0, "captions": 0, "shards": []})
        shards = sorted([s for s in info["shards"] if s["name"] != entry["name"]] + [entry], key=lambda s: s["name"])
        info.update(shards=shards, count=sum(s["count"] for s in shards), captions=sum(s["captions"] for s in shards))


# --------------------------------------------------------------------------- reading


@dataclass
class H5Shard:
    """One HDF5 shard loaded in memory (see docs/ARCHITECTURE.md for shapes)."""

    path: Path
    keys: list[str]
    img: np.ndarray  # [N, V, D] float16
    txt: np.ndarray  # [M, D] float16
    txt_offsets: np.ndarray  # [N + 1] int64
    img_norms: np.ndarray  # [N, V] float32
    txt_norms: np.ndarray  # [M] float32
    labels: np.ndarray  # [N] int64, -1 unknown

    @property
    def txt_to_img(self) -> np.ndarray:
        """[M] index of each caption's image within this shard."""
        return np.repeat(np.arange(len(self.keys)), np.diff(self.txt_offsets))


def read_h5_shard(path: Path, fields: tuple[str, ...] | None = None) -> H5Shard:
    """Load a shard's arrays; ``fields`` limits which embedding arrays are read (others empty)."""
    wanted = fields or ("img", "txt", "img_norms", "txt_norms")
    with h5py.File(path, "r") as f:
        arrays = {k: (f[k][()] if k in wanted else np.zeros((0,), np.float16))
                  for k in ("img", "txt", "img_norms", "txt_norms")}
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in f["keys"][()]]
        return H5Shard(path, keys, txt_offsets=f["txt_offsets"][()], labels=f["labels"][()], **arrays)


@dataclass
class Cache:
    """A verified cache directory. ``open_cache`` builds it."""

    root: Path
    manifest: dict[str, Any]

    @property
    def teacher(self) -> dict[str, Any]:
        return self.manifest["teacher"]

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def views(self) -> int:
        return int(self.manifest["views"])

    @property
    def classnames(self) -> list[str] | None:
        return self.manifest.get("classnames")

    def splits(self) -> list[str]:
        return list(self.manifest.get("splits", {}))

    def require_split(self, split: str) -> dict[str, Any]:
        splits = self.manifest.get("splits", {})
        if split not in splits or not splits[split]["shards"]:
            raise CacheError(f"cache {self.root} has no shards for split {split!r}; it has {sorted(splits)}")
        return splits[split]

    def shard_paths(self, split: str, ext: str) -> list[Path]:
        """Paths of the split's ``tar`` or ``h5`` files, in shard order.

        Shards whose every input was skipped (count 0) are left out: WebDataset refuses empty
        tars, and they hold nothing to read.
        """
        info = self.require_split(split)
        return [self.root / split / f"{s['name']}.{ext}" for s in info["shards"] if s["count"]]

    def count(self, split: str) -> int:
        return int(self.require_split(split)["count"])

    def iter_h5(self, split: str, fields: tuple[str, ...] | None = None,
                teacher: str | None = None) -> Iterator[H5Shard]:
        """Shards of a split one at a time (memory: one shard); ``teacher``: whose embeddings (default: the primary)."""
        paths = self.shard_paths(split, "h5") if teacher is None else self.teacher_h5_paths(split, teacher)
        for path in paths:
            yield read_h5_shard(path, fields)

    def load_split(self, split: str, fields: tuple[str, ...] | None = None, teacher: str | None = None) -> H5Shard:
        """All shards of a split concatenated in memory (val/test eval and analysis)."""
        shards = list(self.iter_h5(split, fields, teacher))
        offsets = [np.zeros(1, np.int64)]
        base = 0
        for s in shards:
            offsets.append(s.txt_offsets[1:] + base)
            base += int(s.txt_offsets[-1])
        cat = lambda name: np.concatenate([getattr(s, name) for s in shards])  # noqa: E731
        return H5Shard(self.root / split, [k for s in shards for k in s.keys], cat("img"), cat("txt"),
                       np.concatenate(offsets), cat("img_norms"), cat("txt_norms"), cat("labels"))

    @property
    def prompts_path(self) -> Path:
        """The primary teacher's prompts.h5 (``teacher_prompts_path`` for any teacher)."""
        return self.root / PROMPTS

    # ----------------------------------------------------------------- teachers

    def teachers(self) -> dict[str, dict[str, Any]]:
        """Every teacher by name, the primary first (``Manifest.teachers``)."""
        return Manifest(self.root, self.manifest).teachers()

    @property
    def primary(self) -> str:
        """The name of the teacher whose embeddings are the tar and h5 members."""
        return next(iter(self.teachers()))

    def teacher_entry(self, name: str) -> dict[str, Any]:
        teachers = self.teachers()
        if name not in teachers:
            raise CacheError(f"cache {self.root} has no teacher {name!r}; it has {', '.join(teachers)}")
        return teachers[name]

    def find_teacher(self, fingerprint: dict[str, Any]) -> str | None:
        """The name under which this teacher (``same_fingerprint``) is in the cache, or None."""
        return next((n for n, t in self.teachers().items() if same_fingerprint(t["fingerprint"], fingerprint)), None)

    def teacher_folder(self, teacher: str | None = None) -> Path:
        """Where a teacher's cache-level files live (prompts.h5, teacher_eval.json, whitening.h5 / .json).

        The primary's (``teacher`` None or its name) are at the cache root, as in a single-teacher
        cache; an added teacher's in ``CACHE/teachers/NAME``. An unknown name is refused, listing the
        cache's teachers.
        """
        if teacher is None or self.teacher_entry(teacher)["primary"]:
            return self.root
        return teacher_dir(self.root, teacher)

    def teacher_prompts_path(self, teacher: str | None = None) -> Path:
        """A teacher's class-prompt embeddings (the primary's: ``prompts_path``); same layout for every teacher."""
        return self.teacher_folder(teacher) / PROMPTS

    def teacher_eval_path(self, teacher: str | None = None) -> Path:
        """A teacher's own figures on a held-out split (``kdpipe eval --teacher CACHE``)."""
        return self.teacher_folder(teacher) / TEACHER_EVAL_JSON

    def teacher_h5_paths(self, split: str, teacher: str) -> list[Path]:
        """A teacher's h5 files of a split, in shard order (non-empty shards, as ``shard_paths``).

        Refuses a teacher whose extraction has not covered the split yet.
        """
        entry = self.teacher_entry(teacher)
        if entry["primary"]:
            return self.shard_paths(split, "h5")
        names = [s["name"] for s in self.require_split(split)["shards"] if s["count"]]
        done = {s["name"] for s in entry["splits"].get(split, {}).get("shards", [])}
        missing = [n for n in names if n not in done]
        if missing:
            raise CacheError(f"teacher {teacher!r} of cache {self.root} lacks {len(missing)} of {len(names)} "
                             f"shards of split {split!r}; re-run `kdpipe extract --add-teacher` with that teacher "
                             "to finish it")
        return [teacher_dir(self.root / split, teacher) / f"{n}.h5" for n in names]

    def teacher_shard(self, split: str, shard: str, teacher: str,
                      fields: tuple[str, ...] | None = None) -> H5Shard:
        """One teacher's embeddings of one shard (by shard name, e.g. "shard-000003"); same layout as the primary's."""
        paths = [p for p in self.teacher_h5_paths(split, teacher) if p.stem == shard]
        if not paths:
            raise CacheError(f"cache {self.root} has no non-empty shard {shard!r} in split {split!r}")
        return read_h5_shard(paths[0], fields)


def open_cache(root: str | Path, *, verify: str = "size", expect_teacher: dict | None = None) -> Cache:
    """Open a cache and check it against its manifest.

    verify: "none", "size" (every file exists with the recorded size; cheap) or "sha256".
    expect_teacher: refuse a cache none of whose teachers has this fingerprint (a student trained on
    an added teacher or an ensemble records the teacher whose space it lives in: any of the cache's).
    """
    root = Path(root)
    if not root.is_dir():
        raise CacheError(f"no cache at {root}; create one with `kdpipe extract --out {root}`")
    manifest = Manifest.load(root)
    if manifest is None or "teacher" not in manifest.data:
        raise CacheError(f"{root} has no {MANIFEST}; it is not a finished kdpipe cache (run `kdpipe extract`)")
    cache = Cache(root, manifest.data)
    if expect_teacher is not None and cache.find_teacher(expect_teacher) is None:
        others = [describe_teacher(t["fingerprint"]) for t in list(cache.teachers().values())[1:]]
        raise CacheError(
            f"cache {root} was made by teacher {describe_teacher(cache.teacher)}"
            f"{' (with ' + ', '.join(others) + ' added)' if others else ''}, not {describe_teacher(expect_teacher)}")
    if verify != "none":
        for split, info in cache.manifest.get("splits", {}).items():
            for entry in info["shards"]:
                problem = verify_shard(root / split, entry, full=verify == "sha256")
                if problem:
                    raise CacheError(f"cache {root} is corrupt: {problem}; re-run the same "
                                     "`kdpipe extract` command to rewrite that shard")
        for name in list(cache.teachers())[1:]:
            verify_teacher(cache, name, full=verify == "sha256")
    return cache


def verify_teacher(cache: Cache, name: str, full: bool) -> None:
    """An added teacher's listed shards and files (its prompts.h5): files match their entries, shards
    hold the primary shard's samples.

    A shard not listed yet (an add in progress) is no error here; ``Cache.teacher_h5_paths`` refuses it.
    """
    primary = {split: {s["name"]: s for s in info["shards"]} for split, info in cache.manifest["splits"].items()}
    teacher = cache.teacher_entry(name)
    for file, digest in teacher.get("files", {}).items():
        problem = verify_file(teacher_dir(cache.root, name) / file, digest, full)
        if problem:
            raise CacheError(f"cache {cache.root} is corrupt: {problem}; re-run `kdpipe extract --add-teacher` with "
                             f"teacher {name!r} (and --overwrite-teacher {name} if that does not fix it)")
    for split, info in teacher.get("splits", {}).items():
        for entry in info["shards"]:
            own = primary.get(split, {}).get(entry["name"])
            problem = verify_shard(teacher_dir(cache.root / split, name), entry, full, exts=("h5",))
            if own is None or (own["count"], own["captions"]) != (entry["count"], entry["captions"]):
                problem = f"{split}/{entry['name']} of teacher {name!r} does not match the cache's shard"
            if problem:
                raise CacheError(f"cache {cache.root} is corrupt: {problem}; re-run `kdpipe extract --add-teacher` "
                                 f"with teacher {name!r} (and --overwrite-teacher {name} if that does not fix it)")


# Fingerprint keys that describe a teacher without identifying it: the open_clip version changes no
# numbers, the label is the name the user happened to give (``weights.TeacherArch.label``).
NOT_IDENTITY = ("open_clip_version", "label")


def same_fingerprint(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Fingerprints match, ignoring the keys in ``NOT_IDENTITY``."""
    strip = lambda d: {k: v for k, v in d.items() if k not in NOT_IDENTITY}  # noqa: E731
    return json.loads(json.dumps(strip(a))) == json.loads(json.dumps(strip(b)))


def describe_teacher(fp: dict[str, Any]) -> str:
    """The teacher as the user named it, then what pins it down.

    "shapes-vit (config d370a4ef650b, weights 28f4034c9abd)", "ViT-B-32 (openai)", "tiny-clip (random
    init)". A config JSON is registered as kdpipe-STEM-DIGEST (``weights``): its digest is shown.
    Fingerprints written before the label was recorded show their name in its place.
    """
    name = str(fp.get("name"))
    label = fp.get("label") or name
    sha = fp.get("checkpoint_sha256")
    details = [f"config {name.rsplit('-', 1)[-1]}"] if name.startswith("kdpipe-") and label != name else []
    details.append(fp.get("pretrained") or (f"weights {sha[:12]}" if sha else "random init"))
    return f"{label} ({', '.join(details)})"
