"""Fixture: a small, valid kdpipe cache of synthetic teacher embeddings (no teacher needed).

``make_fake_cache(tmp_path / "cache", n_train=200, n_val=60)`` writes shards with
``kdpipe.store.write_shard``, a manifest with a plausible teacher fingerprint, and
``prompts.h5`` with a "shapes" prompt set. Used by the whiten, train and eval tests.

The embeddings mimic a CLIP teacher's, in a D-dim space:
- every image has a class-dependent latent ``z = center[label] + noise``;
- an image view is ``A (z + small noise) + image_offset``, a caption ``A (z + larger noise)
  + text_offset``, then both are L2-normalised (A mixes axes with unequal scales, so the
  features are correlated and worth whitening; the offsets are the modality gap);
- a class prompt is ``A (center + small noise) + text_offset``.
So retrieval and zero-shot work from the raw embeddings, but not perfectly.

For real extraction runs: ``write_coco`` (a COCO-layout input from image bytes), ``photo_coco``
(three photo-like non-square images) and ``teacher_config`` (tiny-clip with an open_clip
``preprocess_cfg``, e.g. another ``resize_mode``); ``tiny_world`` / ``tiny_extract`` (a shapes world
and tiny-clip's cache of it: conftest's ``tiny_world`` and ``tiny_cache`` fixtures),
``teacher_b_config`` (a second teacher: tiny-clip at another input size and D) and ``add_teacher_b``
(``--add-teacher`` it as "b": conftest's ``two_teacher_cache``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from kdpipe import store
from kdpipe.prompts import PromptSet, write_prompts
from kdpipe.weights import CONFIG_DIR

DEFAULT_CLASSES = ("circle", "square", "triangle", "cross")
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a {} shape.")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")


def fake_teacher(dim: int = 16) -> dict:
    """A teacher fingerprint with every field a real one has but `label` (as before labels: shown by name)."""
    return {
        "name": "fake-vit",
        "pretrained": None,
        "checkpoint_sha256": "f" * 64,
        "open_clip_version": "3.3.0",
        "quickgelu": False,
        "preprocess": {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711],
                       "interpolation": "bicubic", "resize_mode": "shortest"},
        "embed_dim": dim,
        "logit_scale": 100.0,
        "context_length": 77,
    }


class _World:
    """The shared generative model of one fake cache."""

    def __init__(self, dim: int, n_classes: int, rng: np.random.Generator) -> None:
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        self.mix = q * np.linspace(1.0, 0.45, dim)  # correlated axes, unequal variances
        self.centers = rng.standard_normal((n_classes, dim))
        gap = rng.standard_normal((2, dim))
        self.img_offset, self.txt_offset = 1.2 * gap / np.linalg.norm(gap, axis=1, keepdims=True)
        self.rng = rng

    def embed(self, latent: np.ndarray, noise: float, offset: np.ndarray) -> np.ndarray:
        """latent [..., D] -> normalised fp16 features [..., D]."""
        x = (latent + noise * self.rng.standard_normal(latent.shape)) @ self.mix.T / np.sqrt(len(offset))
        x = x * 2.0 + offset
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16)


def _jpeg(colour: tuple[int, int, int], size: int, rng: np.random.Generator) -> bytes:
    pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 20, (size, size, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _views(n_views: int, rng: np.random.Generator) -> list[dict]:
    views = [{"box": [0.0, 0.0, 1.0, 1.0], "flip": False}]  # view 0: centred square crop
    for _ in range(n_views - 1):
        w, h = rng.uniform(0.6, 1.0, 2)
        x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        views.append({"box": [float(x0), float(y0), float(x0 + w), float(y0 + h)], "flip": bool(rng.random() < 0.5)})
    return views


def _samples(world: _World, split: str, n: int, views: int, captions: int,
             classnames: Sequence[str], image_size: int) -> list[store.CachedSample]:
    rng = world.rng
    labels = rng.integers(0, len(classnames), n)
    latent = world.centers[labels] + 0.7 * rng.standard_normal((n, world.centers.shape[1]))
    img = world.embed(np.repeat(latent[:, None], views, axis=1), 0.15, world.img_offset)  # [n, V, D]
    txt = world.embed(np.repeat(latent[:, None], captions, axis=1), 0.6, world.txt_offset)  # [n, C, D]
    out = []
    for i in range(n):
        colour = COLOURS[int(labels[i]) % len(COLOURS)]
        rgb = tuple(int(c) for c in rng.integers(0, 256, 3))
        out.append(store.CachedSample(
            key=f"{split}{i:06d}",
            jpg=_jpeg(rgb, image_size, rng),
            views=_views(views, rng),
            img=img[i], txt=txt[i],
            img_norms=rng.uniform(8, 12, views).astype(np.float32),
            txt_norms=rng.uniform(8, 12, captions).astype(np.float32),
            captions=[f"a {colour} {classnames[labels[i]]}, caption {c}" for c in range(captions)],
            label=int(labels[i]),
        ))
    return out


def _write_prompts(path: Path, world: _World, classnames: Sequence[str]) -> None:
    """CACHE/prompts.h5 with one "shapes" set: emb [K, T, D] fp16, normalised."""
    latent = np.repeat(world.centers[:, None], len(TEMPLATES), axis=1)  # [K, T, D]
    emb = world.embed(latent, 0.2, world.txt_offset)
    write_prompts(path, {"shapes": PromptSet(list(classnames), list(TEMPLATES), emb)})


def make_fake_cache(
    root: Path,
    n_train: int,
    n_val: int,
    dim: int = 16,
    views: int = 2,
    captions: int = 3,
    seed: int = 0,
    teacher: dict | None = None,
    classnames: Sequence[str] | None = None,
    shard_size: int = 64,
    image_size: int = 32,
    val_split: str = "val",
) -> Path:
    """Write a verified cache at ``root`` (train + ``val_split``) and return ``root``."""
    root = Path(root)
    classnames = list(classnames or DEFAULT_CLASSES)
    rng = np.random.default_rng(seed)
    world = _World(dim, len(classnames), rng)
    manifest = store.Manifest(root, {
        "format": store.FORMAT_VERSION, "kdpipe_version": "0.1.0",
        "teacher": teacher if teacher is not None else fake_teacher(dim),
        "embed_dim": dim, "logit_scale": 100.0, "dtype": "float16", "views": views,
        "view_policy": {"view0": "center-crop", "scale": [0.35, 1.0], "ratio": [0.75, 1.333],
                        "flip": 0.5, "store_size": image_size},
        "source": {"spec": "fake", "report": {}}, "classnames": classnames, "splits": {},
    })
    for split, n in (("train", n_train), (val_split, n_val)):
        samples = _samples(world, split, n, views, captions, classnames, image_size)
        for index, start in enumerate(range(0, n, shard_size)):
            entry = store.write_shard(root / split, index, samples[start:start + shard_size], dim)
            manifest.add_shard(split, entry)
    _write_prompts(root / store.PROMPTS, world, classnames)
    manifest.save()
    return root


# --------------------------------------------------------------------------- inputs for real extraction


def write_coco(root: Path, images: dict[str, bytes], captions: dict[str, list[str]]) -> None:
    """A COCO-layout train split at ``root``: image files + annotations/captions_train.json."""
    (root / "annotations").mkdir(parents=True)
    (root / "train").mkdir()
    info = {"images": [], "annotations": []}
    for i, (name, data) in enumerate(sorted(images.items()), start=1):
        (root / "train" / name).write_bytes(data)
        info["images"].append({"id": i, "file_name": name})
        info["annotations"] += [{"id": 100 * i + j, "image_id": i, "caption": c}
                                for j, c in enumerate(captions[name])]
    (root / "annotations" / "captions_train.json").write_text(json.dumps(info))


def photo_png(w: int, h: int, seed: int) -> bytes:
    """A photo-like (spatially smooth) RGB PNG, so resampling differences show."""
    coarse = np.random.default_rng(seed).integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()


def photo_coco(root: Path) -> Path:
    """Three non-square photos (wide, tall, large; shorter sides >= 70 px), one caption each."""
    sizes = {"wide.png": (150, 70), "tall.png": (70, 130), "big.png": (300, 200)}
    write_coco(root, {n: photo_png(*wh, seed=i) for i, (n, wh) in enumerate(sizes.items())},
               {n: [f"a picture {n}"] for n in sizes})
    return root


def teacher_config(path: Path, resize_mode: str, fill_color: int = 77, interpolation: str = "bilinear") -> Path:
    """tiny-clip's architecture with an open_clip ``preprocess_cfg`` (the open_clip_config.json wrapper)."""
    model_cfg = json.loads((CONFIG_DIR / "tiny-clip.json").read_text())
    pp = {"resize_mode": resize_mode, "fill_color": fill_color, "interpolation": interpolation}
    path.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pp}))
    return path


# --------------------------------------------------------------------------- real extractions

TINY_TRAIN, TINY_VAL = 20, 6  # images of ``tiny_world``: 3 train shards and 1 val shard of 8


def tiny_world(root: Path) -> Path:
    """A shapes world in COCO layout: 20 train + 6 val images at 64 px, seed 3."""
    from kdpipe.data.shapes import make_shapes  # noqa: PLC0415

    make_shapes(root, TINY_TRAIN, TINY_VAL, size=64, seed=3)
    return root


def tiny_extract_config(data: Path | str, out: Path, **kw):
    """``ExtractConfig`` of tiny-clip on CPU: 3 views, 8 images per batch and per shard, no decoding workers."""
    from kdpipe.extract import ExtractConfig  # noqa: PLC0415  (torch: only the tests that extract pay)

    base = dict(teacher="tiny-clip", data=str(data), out=str(out), views=3, batch_size=8, workers=0,
                device="cpu", shard_size=8, progress=False, allow_random_init=True)
    return ExtractConfig(**{**base, **kw})


def tiny_extract(data: Path, out: Path, **kw) -> Path:
    """tiny-clip's cache of ``data`` at ``out`` (with its prompts.h5 unless ``prompts=False``)."""
    from kdpipe.extract import run  # noqa: PLC0415

    run(tiny_extract_config(data, out, **kw))
    return out


def teacher_b_config(path: Path, embed_dim: int = 24, size: int = 48) -> Path:
    """tiny-clip's architecture at another input size and embedding width (a model-config JSON)."""
    cfg = json.loads((CONFIG_DIR / "tiny-clip.json").read_text())
    cfg["embed_dim"], cfg["vision_cfg"]["image_size"] = embed_dim, size
    path.write_text(json.dumps(cfg))
    return path


def add_teacher_b(out: Path, teacher: Path, **kw) -> dict:
    """``kdpipe extract --add-teacher`` of ``teacher`` into the cache ``out``, named "b" unless told
    (4 images per batch: several batches per shard; no prompts.h5 unless ``prompts=True``)."""
    from kdpipe.extract import run  # noqa: PLC0415

    base = {"batch_size": 4, "prompts": False, "teacher": str(teacher), "add_teacher": True, "teacher_name": "b"}
    return run(tiny_extract_config("", out, **{**base, **kw}))
