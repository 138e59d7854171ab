"""The shapes world: a captioned synthetic dataset in COCO layout (DESIGN §7).

Each image has 1-2 coloured shapes on a textured, noisy background. Every object has a
shape (the class label is the shape of the largest object), a colour, a size word
(small/large) and a position (left/right/top/bottom/centre); two objects also have a spatial
relation. Five or six captions per image each mention a different subset of attributes
("a photo of a star", "red shape on the left", "a small red circle to the left of a blue
square"), so retrieval is learnable by a small model but not solvable from the shape alone.

Image ``i`` of a split depends only on ``(seed, split, i)``: output is byte-identical across
runs, and growing ``n_train`` keeps the first images unchanged.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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
POSITIONS = {  # region centre (relative x, y) and phrases
    "left": ((0.25, 0.5), ("on the left", "at the left")),
    "right": ((0.75, 0.5), ("on the right", "at the right")),
    "top": ((0.5, 0.25), ("at the top", "near the top")),
    "bottom": ((0.5, 0.75), ("at the bottom", "near the bottom")),
    "centre": ((0.5, 0.5), ("in the centre", "in the middle")),
}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
MAIN_RADIUS = {"small": (0.12, 0.155), "large": (0.19, 0.25)}  # relative to the image side
LARGE_FROM = 0.17  # radius from which an object is called large
SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges at small sizes
SPLIT_CODES = {"train": 0, "val": 1}


@dataclass(frozen=True)
class Obj:
    shape: int  # index into SHAPES
    colour: str
    radius: float  # relative to the image side
    x: float  # centre, relative
    y: float
    position: str  # region name
    angle: float  # degrees

    @property
    def size(self) -> str:
        return "large" if self.radius >= LARGE_FROM else "small"


# ---------------------------------------------------------------- scene sampling


def _place(rng: np.random.Generator, region: str, radius: float) -> tuple[float, float]:
    (cx, cy), _ = POSITIONS[region]
    x, y = cx + rng.uniform(-0.06, 0.06), cy + rng.uniform(-0.06, 0.06)
    return float(np.clip(x, radius, 1 - radius)), float(np.clip(y, radius, 1 - radius))


def _object(rng: np.random.Generator, region: str, radius: float) -> Obj:
    x, y = _place(rng, region, radius)
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    return Obj(int(rng.integers(len(SHAPES))), colour, radius, x, y, region, float(rng.uniform(-15, 15)))


def sample_scene(rng: np.random.Generator) -> list[Obj]:
    """1-2 objects; the first is the largest (its shape is the label) and they do not overlap."""
    large = rng.random() < 0.5
    radius = rng.uniform(*MAIN_RADIUS["large" if large else "small"])
    main = _object(rng, list(POSITIONS)[rng.integers(len(POSITIONS))], radius)
    if rng.random() < 0.4:
        return [main]
    radius = max(0.09, main.radius * rng.uniform(0.55, 0.8))
    for region in rng.permutation([p for p in POSITIONS if p != main.position]):
        second = _object(rng, str(region), radius)
        if math.hypot(second.x - main.x, second.y - main.y) > main.radius + radius + 0.02:
            return [main, second]
    return [main]


# ---------------------------------------------------------------- captions


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[rng.integers(len(options))]


def _relation(a: Obj, b: Obj) -> str:
    """Where ``a`` is relative to ``b`` (image y grows downwards)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _words(rng: np.random.Generator, o: Obj) -> tuple[str, str, str, str]:
    return _pick(rng, SIZE_WORDS[o.size]), o.colour, SHAPES[o.shape], _pick(rng, POSITIONS[o.position][1])


def _a(phrase: str) -> str:
    """The phrase with its indefinite article ("an orange star", "a large star")."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def make_captions(rng: np.random.Generator, objs: list[Obj]) -> list[str]:
    """5-6 captions, each naming a different subset of the attributes."""
    size, colour, shape, pos = _words(rng, objs[0])
    photo = _pick(rng, ("photo", "picture", "image"))
    caps = [
        f"{_a(f'{size} {colour} {shape}')} {pos}",
        f"{_a(photo)} of {_a(shape)}",
        _pick(rng, (f"{colour} shape {pos}", f"{_a(colour)} object {pos}", f"something {colour} {pos}")),
    ]
    if len(objs) == 2:
        size2, colour2, shape2, pos2 = _words(rng, objs[1])
        caps.append(f"{_a(f'{colour} {shape}')} {_relation(objs[0], objs[1])} {_a(f'{colour2} {shape2}')}")
        caps.append(
            _pick(rng, (f"two shapes: {_a(shape)} and {_a(shape2)}",
                        f"{_a(f'{size2} {colour2} {shape2}')} {pos2} and {_a(f'{colour} {shape}')}"))  # fmt: skip
        )
    else:
        caps.append(f"a single {colour} {shape} on a {_pick(rng, ('noisy', 'textured', 'dark'))} background")
        caps.append(_pick(rng, (f"one {size} {shape}", f"{_a(shape)} {pos}", f"only one shape: {_a(f'{colour} {shape}')}")))
    if rng.random() < 0.3:
        caps.append(f"there is {_a(f'{size} {shape}')} {pos}")
    return caps


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


def _background(rng: np.random.Generator, side: int) -> Image.Image:
    """Dark, low-saturation base with a smooth random texture and a few faint lines."""
    base = rng.uniform(25, 105) + rng.uniform(-15, 15, size=3)
    coarse = np.clip(base + rng.normal(0, 14, size=(4, 4, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((side, side), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 4)):
        xy = [float(v) for v in rng.uniform(0, side, size=4)]
        tone = tuple(int(v) for v in np.clip(base + rng.uniform(-30, 30, size=3), 0, 255))
        draw.line(xy, fill=tone, width=int(rng.integers(1, 3)) * SUPERSAMPLE)
    return img


def render(rng: np.random.Generator, objs: list[Obj], size: int) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB image with pixel noise."""
    side = size * SUPERSAMPLE
    img = _background(rng, side)
    draw = ImageDraw.Draw(img)
    for o in reversed(objs):  # main object last, on top
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


def write_split(out: Path, split: str, first_id: int, n: int, size: int, seed: int) -> int:
    """Images and annotation files of one split; returns the number of captions."""
    (out / split).mkdir(parents=True, exist_ok=True)
    images, annotations, labels = [], [], {}
    for i in range(n):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], i])
        objs = sample_scene(rng)
        captions = make_captions(rng, objs)
        image_id, file_name = first_id + i, f"{first_id + i:012d}.jpg"
        (out / split / file_name).write_bytes(_encode(render(rng, objs, size)))
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size,
                       "objects": [_object_json(o) for o in objs]})  # fmt: skip
        annotations += [{"id": len(annotations) + k, "image_id": image_id, "caption": c} for k, c in enumerate(captions)]
        labels[str(image_id)] = objs[0].shape
    info = {"description": f"kdpipe shapes world ({split})", "seed": seed, "size": size}
    captions_json = {"info": info, "licenses": [], "images": images, "annotations": annotations}
    (out / "annotations" / f"captions_{split}.json").write_text(json.dumps(captions_json))
    (out / "annotations" / f"labels_{split}.json").write_text(json.dumps({"classnames": list(SHAPES), "labels": labels}))
    return len(annotations)


def make_shapes(out: Path, n_train: int, n_val: int, size: int = 64, seed: int = 0) -> dict:
    """Write a shapes world in COCO layout under ``out`` and return a summary.

    Writes ``annotations/captions_{train,val}.json``, ``annotations/labels_{train,val}.json``,
    ``{train,val}/*.jpg`` and ``classnames.json``. Train ids are 0..n_train-1, val ids follow.
    """
    if n_train < 1 or n_val < 0:
        raise ValueError(f"need at least one train image and no negative counts, got train={n_train} val={n_val}")
    if size < 16:
        raise ValueError(f"image size {size} is too small to draw shapes; use 16 or more (64 is the default)")
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    captions = {"train": write_split(out, "train", 0, n_train, size, seed)}
    if n_val:
        captions["val"] = write_split(out, "val", n_train, n_val, size, seed)
    (out / "classnames.json").write_text(json.dumps(list(SHAPES)))
    seconds = time.perf_counter() - start
    log.info("shapes world: %d train + %d val images (%dpx) in %s, %.1fs", n_train, n_val, size, out, seconds)
    return {"root": str(out), "images": {"train": n_train, "val": n_val}, "captions": captions,
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
