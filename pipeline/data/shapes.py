"""The shapes world: a captioned synthetic dataset in COCO layout.

Each image has 1-2 coloured shapes on a plain, named background colour with a faint texture.
Every object has a shape (the class label is the shape of the largest object), a colour, one
of three quantised sizes (small/medium/large) and one of nine grid cells ("in the top left",
"at the top", ..., "in the centre"); two objects also have a spatial relation. Five or six
captions per image name different subsets of these attributes ("a red star in the top left
and a blue ring on the right", "a red star above a blue ring on a navy background"), each
subset rich enough that a caption almost never fits another image of a 500-image split
(``shared_caption_share``, printed by ``kdpipe make-shapes``): retrieval then has one right
answer, as on COCO, and R@1 means what it says. Images come in twins (``GROUP``) that share
everything but their shapes, so matching captions needs the shapes, not only the colours.

Image ``i`` of a split depends only on ``(seed, split, i)``: output is byte-identical across
runs, and growing ``n_train`` keeps the first images unchanged.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from ..errors import BadValue

log = logging.getLogger("kdpipe")

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring")
COLOURS = {
    "red": (215, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 220, 50),
    "green": (50, 170, 60),
    "blue": (45, 90, 225),
    "purple": (145, 60, 200),
    "white": (240, 240, 240),
}
BACKGROUNDS = {  # darker and duller than every object colour, so shapes stand out on all of them
    "black": (18, 18, 22),
    "grey": (100, 100, 100),
    "navy": (22, 32, 100),
    "teal": (15, 90, 90),
    "maroon": (100, 22, 45),
    "olive": (90, 90, 25),
}
POSITIONS = {  # 3x3 grid cell -> centre (relative x, y) and the phrase captions use
    "top left": ((0.22, 0.22), "in the top left"),
    "top": ((0.5, 0.22), "at the top"),
    "top right": ((0.78, 0.22), "in the top right"),
    "left": ((0.22, 0.5), "on the left"),
    "centre": ((0.5, 0.5), "in the centre"),
    "right": ((0.78, 0.5), "on the right"),
    "bottom left": ((0.22, 0.78), "in the bottom left"),
    "bottom": ((0.5, 0.78), "at the bottom"),
    "bottom right": ((0.78, 0.78), "in the bottom right"),
}
SIZES = {"small": 0.1, "medium": 0.145, "large": 0.2}  # radius relative to the image side, ~1.4x apart
SINGLE_SHARE = 0.3  # images with one object; the rest have two
JITTER = 0.02  # position and radius jitter (relative): small enough that the named cell and size stay exact
GROUP = 2  # images 2k and 2k+1 share a layout and differ in their shapes (see sample_layout)
SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges at small sizes
SPLIT_CODES = {"train": 0, "val": 1}


@dataclass(frozen=True)
class Obj:
    shape: int  # index into SHAPES
    colour: str  # key of COLOURS
    size: str  # key of SIZES
    radius: float  # relative to the image side
    x: float  # centre, relative
    y: float
    position: str  # key of POSITIONS (grid cell)
    angle: float  # degrees


@dataclass(frozen=True)
class Scene:
    objects: list[Obj]  # 1-2, the largest first (its shape is the label)
    background: str  # key of BACKGROUNDS


class Slot(NamedTuple):
    """An object's place in a layout: all its attributes but the shape."""

    colour: str  # key of COLOURS
    size: str  # key of SIZES
    cell: str  # key of POSITIONS


@dataclass(frozen=True)
class Layout:
    """What the images of one group share."""

    background: str  # key of BACKGROUNDS
    main: Slot  # the largest object
    second: Slot | None  # a size smaller, in another cell; None for a one-object scene
    main_shapes: tuple[int, ...]  # the main object's shape in each image of the group, all different


# ---------------------------------------------------------------- scene sampling


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[rng.integers(len(options))]


def _apart(a: Slot, b: Slot) -> bool:
    """Objects in these slots cannot touch, whatever their jitter."""
    (ax, ay), _ = POSITIONS[a.cell]
    (bx, by), _ = POSITIONS[b.cell]
    gap = math.hypot(ax - bx, ay - by) - 2 * math.sqrt(2) * JITTER
    return gap > (SIZES[a.size] + SIZES[b.size]) * (1 + JITTER) + 0.01


def sample_layout(rng: np.random.Generator) -> Layout:
    """Background, 1-2 slots and GROUP different main shapes.

    Why groups: each caption names enough to pick its image out, and colours, cells and
    background alone nearly do, so a contrastive model could match captions without ever
    reading a shape (measured: zero-shot at chance). An image whose twin differs only in its
    shapes is a negative that only the shape tells apart.
    """
    background = _pick(rng, list(BACKGROUNDS))
    cells = [str(c) for c in rng.permutation(list(POSITIONS))]
    shapes = tuple(int(s) for s in rng.permutation(len(SHAPES))[:GROUP])
    colours, sizes = list(COLOURS), list(SIZES)
    if rng.random() < SINGLE_SHARE:
        return Layout(background, Slot(_pick(rng, colours), _pick(rng, sizes), cells[0]), None, shapes)
    main = Slot(_pick(rng, colours), _pick(rng, sizes[1:]), cells[0])
    colour, size = _pick(rng, colours), _pick(rng, sizes[: sizes.index(main.size)])
    # a small second object always fits (at worst in a corner diagonal to a large centre one)
    free = [Slot(colour, sz, c) for sz in (size, "small") for c in cells[1:] if _apart(main, Slot(colour, sz, c))]
    return Layout(background, main, free[0], shapes)


def _object(rng: np.random.Generator, shape: int, slot: Slot) -> Obj:
    """An object of ``shape`` jittered around its slot's cell centre and size, inside the image."""
    radius = SIZES[slot.size] * (1 + rng.uniform(-JITTER, JITTER))
    (cx, cy), _ = POSITIONS[slot.cell]
    x, y = (float(np.clip(c + rng.uniform(-JITTER, JITTER), radius, 1 - radius)) for c in (cx, cy))
    return Obj(shape, slot.colour, slot.size, radius, x, y, slot.cell, float(rng.uniform(-15, 15)))


def sample_scene(layout: Layout, member: int, rng: np.random.Generator) -> Scene:
    """Image ``member`` of the layout's group: its main shape, a random second shape, its own jitter."""
    objects = [_object(rng, layout.main_shapes[member], layout.main)]
    if layout.second is not None:
        objects.append(_object(rng, int(rng.integers(len(SHAPES))), layout.second))
    return Scene(objects, layout.background)


def scene_at(seed: int, split: str, i: int) -> tuple[Scene, np.random.Generator]:
    """Image ``i`` of ``split``: its scene and the generator that goes on to its captions and pixels.

    Depends on ``(seed, split, i)`` only: the layout on the group ``i // GROUP``, the rest on ``i``.
    """
    code = SPLIT_CODES[split]
    layout = sample_layout(np.random.default_rng([seed, code, i // GROUP, 1]))
    rng = np.random.default_rng([seed, code, i, 0])
    return sample_scene(layout, i % GROUP, rng), rng


# ---------------------------------------------------------------- captions


def _relation(a: Obj, b: Obj) -> str:
    """Where ``a`` is relative to ``b``, from their grid cells (image y grows downwards)."""
    (ax, ay), _ = POSITIONS[a.position]
    (bx, by), _ = POSITIONS[b.position]
    dx, dy = ax - bx, ay - by
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _a(phrase: str) -> str:
    """The phrase with its indefinite article ("an orange star", "a large star")."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _name(o: Obj, size: bool = False) -> str:
    """"a red star", or with ``size`` "a large red star"."""
    return _a(f"{o.size} {o.colour} {SHAPES[o.shape]}" if size else f"{o.colour} {SHAPES[o.shape]}")


def _where(o: Obj) -> str:
    return POSITIONS[o.position][1]


def _pair_captions(a: Obj, b: Obj, bg: str) -> list[str]:
    """Captions of a two-object scene (``a`` the larger): every one names both shapes and colours,
    plus positions, sizes, relation or background, so that it rarely fits another image."""
    return [
        f"{_name(a, True)} {_where(a)} and {_name(b, True)} {_where(b)}",
        f"{_name(a)} {_relation(a, b)} {_name(b)} on {_a(bg)} background",
        f"a photo of {_name(a)} {_where(a)} and {_name(b)} {_where(b)}",
        f"two shapes on {_a(bg)} background: {_name(a, True)} and {_name(b, True)}",
        f"the biggest shape is {_name(a)} {_where(a)}, next to {_name(b)}",
        f"{_name(b, True)} {_relation(b, a)} {_name(a, True)}",
    ]


def _single_captions(a: Obj, bg: str) -> list[str]:
    """Captions of a one-object scene: with little else to tell, each names all five attributes."""
    shape = SHAPES[a.shape]
    return [
        f"{_name(a, True)} {_where(a)} on {_a(bg)} background",
        f"a photo of one {a.size} {a.colour} {shape} {_where(a)} on {bg}",
        f"{_a(bg)} background with {_name(a, True)} {_where(a)}",
        f"only one shape: {_name(a)}, {a.size}, {_where(a)} on {bg}",
        f"{_where(a)}: {_name(a, True)}, alone on {bg}",
        f"there is {_a(f'{a.size} {shape}')} {_where(a)}, {a.colour} on {bg}",
    ]


def make_captions(rng: np.random.Generator, scene: Scene) -> list[str]:
    """5-6 captions in different phrasings and levels of detail: the first five, and the sixth 30% of the time."""
    objs, bg = scene.objects, scene.background
    caps = _pair_captions(objs[0], objs[1], bg) if len(objs) == 2 else _single_captions(objs[0], bg)
    return caps if rng.random() < 0.3 else caps[:5]


def _normal_caption(caption: str) -> str:
    """Case, spacing and a final full stop do not make a caption different."""
    return " ".join(caption.lower().split()).rstrip(".")


def shared_caption_share(captions: Sequence[Sequence[str]]) -> float:
    """Share of all captions whose text is also a caption of another image of the same split.

    ``captions[n]`` are image n's captions. An ambiguous caption makes retrieval R@1 an
    underestimate (COCO's are nearly all unique; 0.0 means every caption picks out its image).
    Texts are compared after ``_normal_caption``; 0.0 when there are no captions.
    """
    owners: dict[str, set[int]] = defaultdict(set)
    for n, caps in enumerate(captions):
        for c in caps:
            owners[_normal_caption(c)].add(n)
    total = sum(len(caps) for caps in captions)
    shared = sum(len(owners[_normal_caption(c)]) > 1 for caps in captions for c in caps)
    return shared / total if total else 0.0


# ---------------------------------------------------------------- drawing


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of radius ``r`` centred at (cx, cy), rotated by ``angle`` degrees."""
    if shape == "square":
        pts = [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    elif shape == "diamond":  # taller than wide, so a rotated square cannot pass for one
        pts = [(0, -1.1), (0.72, 0), (0, 1.1), (-0.72, 0)]
    elif shape == "triangle":
        pts = [(math.cos(t), math.sin(t)) for t in np.radians([-90, 30, 150])]
        pts = [(1.1 * x, 1.1 * y + 0.15) for x, y in pts]
    elif shape == "hexagon":
        pts = [(math.cos(t), math.sin(t)) for t in np.radians(np.arange(0, 360, 60))]
    elif shape == "star":
        radii = np.tile([1.15, 0.48], 5)
        pts = [(rr * math.cos(t), rr * math.sin(t)) for rr, t in zip(radii, np.radians(np.arange(-90, 270, 36)))]
    elif shape == "cross":
        a, b = 0.33, 1.0
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    else:
        raise KeyError(f"{shape!r} is not a polygon shape")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _draw_object(draw: ImageDraw.ImageDraw, o: Obj, side: int, rng: np.random.Generator) -> None:
    jitter = rng.integers(-18, 19, size=3)
    fill = tuple(int(v) for v in np.clip(np.array(COLOURS[o.colour]) + jitter, 0, 255))
    cx, cy, r = o.x * side, o.y * side, o.radius * side
    shape = SHAPES[o.shape]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, round(0.34 * r)))
    else:
        draw.polygon(_polygon(shape, cx, cy, r, o.angle), fill=fill)


def _background(rng: np.random.Generator, colour: str, side: int) -> Image.Image:
    """The named background colour with a smooth random texture and a few faint lines: varied pixels,
    the same colour word."""
    base = np.array(BACKGROUNDS[colour], dtype=np.float64) + rng.uniform(-8, 8, size=3)
    coarse = np.clip(base + rng.normal(0, 8, size=(4, 4, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((side, side), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 4)):
        xy = [float(v) for v in rng.uniform(0, side, size=4)]
        tone = tuple(int(v) for v in np.clip(base + rng.uniform(-25, 25, size=3), 0, 255))
        draw.line(xy, fill=tone, width=int(rng.integers(1, 3)) * SUPERSAMPLE)
    return img


def render(rng: np.random.Generator, scene: Scene, size: int) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB image with pixel noise."""
    side = size * SUPERSAMPLE
    img = _background(rng, scene.background, side)
    draw = ImageDraw.Draw(img)
    for o in reversed(scene.objects):  # main object last, on top
        _draw_object(draw, o, side, rng)
    img = img.resize((size, size), Image.Resampling.BOX)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, size=(size, size, 3)).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- writing


def _encode(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _object_json(o: Obj) -> dict:
    """Ground truth for analysis: attributes plus the centre and radius relative to the image side."""
    return {"shape": SHAPES[o.shape], "colour": o.colour, "size": o.size, "position": o.position,
            "x": round(o.x, 4), "y": round(o.y, 4), "radius": round(o.radius, 4)}  # fmt: skip


def write_split(out: Path, split: str, first_id: int, n: int, size: int, seed: int) -> list[list[str]]:
    """Images and annotation files of one split; returns each image's captions."""
    (out / split).mkdir(parents=True, exist_ok=True)
    images, annotations, labels, per_image = [], [], {}, []
    for i in range(n):
        scene, rng = scene_at(seed, split, i)
        captions = make_captions(rng, scene)
        image_id, file_name = first_id + i, f"{first_id + i:012d}.jpg"
        (out / split / file_name).write_bytes(_encode(render(rng, scene, size)))
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size,
                       "background": scene.background,
                       "objects": [_object_json(o) for o in scene.objects]})  # fmt: skip
        annotations += [{"id": len(annotations) + k, "image_id": image_id, "caption": c} for k, c in enumerate(captions)]
        labels[str(image_id)] = scene.objects[0].shape
        per_image.append(captions)
    info = {"description": f"kdpipe shapes world ({split})", "seed": seed, "size": size}
    captions_json = {"info": info, "licenses": [], "images": images, "annotations": annotations}
    (out / "annotations" / f"captions_{split}.json").write_text(json.dumps(captions_json))
    (out / "annotations" / f"labels_{split}.json").write_text(json.dumps({"classnames": list(SHAPES), "labels": labels}))
    return per_image


def make_shapes(out: Path, n_train: int, n_val: int, size: int = 64, seed: int = 0) -> dict:
    """Write a shapes world in COCO layout under ``out`` and return a summary.

    Writes ``annotations/captions_{train,val}.json``, ``annotations/labels_{train,val}.json``,
    ``{train,val}/*.jpg`` and ``classnames.json``. Train ids are 0..n_train-1, val ids follow.
    The summary's ``shared_captions`` is each split's ``shared_caption_share``.
    """
    if n_train < 1 or n_val < 0:
        raise BadValue(f"need at least one train image and no negative counts, got train={n_train} val={n_val}")
    if size < 16:
        raise BadValue(f"image size {size} is too small to draw shapes; use 16 or more (64 is the default)")
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    splits = {"train": write_split(out, "train", 0, n_train, size, seed)}
    if n_val:
        splits["val"] = write_split(out, "val", n_train, n_val, size, seed)
    (out / "classnames.json").write_text(json.dumps(list(SHAPES)))
    seconds = time.perf_counter() - start
    shared = {split: round(shared_caption_share(caps), 4) for split, caps in splits.items()}
    log.info("shapes world: %d train + %d val images (%dpx) in %s, %.1fs; captions shared with another image: %s",
             n_train, n_val, size, out, seconds, shared)  # fmt: skip
    return {"root": str(out), "images": {"train": n_train, "val": n_val},
            "captions": {split: sum(map(len, caps)) for split, caps in splits.items()}, "shared_captions": shared,
            "classnames": list(SHAPES), "size": size, "seed": seed, "seconds": round(seconds, 3)}  # fmt: skip


@dataclass(frozen=True)
class ShapesConfig:
    out: Path
    n_train: int = 2000
    n_val: int = 500
    size: int = 64
    seed: int = 0


def run(cfg: ShapesConfig) -> dict:
    """Stage entry point for ``kdpipe make-shapes``."""
    return make_shapes(cfg.out, cfg.n_train, cfg.n_val, size=cfg.size, seed=cfg.seed)
