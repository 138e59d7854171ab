"""Bounded stored images and the views the teacher saw, replayable pixel for pixel.

The stored image is the original converted to RGB, shrunk so its shorter side is at most
``store_size`` and JPEG-encoded (quality 95). Everything downstream works from the *decoded
stored JPEG* (``store_image`` returns it), so the trainer sees exactly the teacher's pixels.

A ``View`` says how one view's pixels are cut from the stored image, so a reader can replay
them. View 0 is the teacher's own eval transform of the whole stored image, whichever
``resize_mode`` open_clip gives the teacher (``View.resize``): ``shortest`` (shorter side to S,
centre crop), ``squash`` (both sides to S, aspect not kept) or ``longest`` (longer side to S,
centred and padded with the fill colour). Views 1..K-1 (``resize="crop"``) are
RandomResizedCrop boxes + flips drawn from an RNG seeded by the record key; their box is
cropped and resized to S x S. Views written before ``View.resize`` existed read as ``"crop"``,
which is how their view 0 (the centred square box) was made.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from open_clip.transform import CenterCropOrPad, ResizeKeepRatio
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

SCALE = (0.35, 1.0)
RATIO = (3 / 4, 4 / 3)
FLIP_P = 0.5
STORE_SIZE = 256
JPEG_QUALITY = 95
INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
CROP = "crop"  # View.resize of a random view: the box, resized to S x S
RESIZE_MODES = ("shortest", "squash", "longest")  # open_clip's eval resize modes (PreprocessCfg.resize_mode)
FULL_BOX = (0.0, 0.0, 1.0, 1.0)
BAD_IMAGE_REASONS = ("missing", "empty", "unreadable", "truncated", "corrupt", "decompression_bomb")


class BadImage(Exception):
    """An input image that cannot be used; ``reason`` is one of ``BAD_IMAGE_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class View:
    """One view of a stored image, as written to views.json.

    ``resize`` is ``"crop"`` (crop ``box``, resize it to S x S) or one of ``RESIZE_MODES`` (the
    teacher's eval transform of the whole image; ``box`` then only records the part of the
    image the view shows). ``fill`` is the pad colour of ``"longest"``.
    """

    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) relative to the stored image, in [0, 1]
    flip: bool
    resize: str = CROP
    fill: int = 0

    def __post_init__(self) -> None:
        if self.resize != CROP and self.resize not in RESIZE_MODES:
            raise ValueError(f"unknown view resize {self.resize!r}; valid: {CROP}, {', '.join(RESIZE_MODES)}")

    def to_dict(self) -> dict:
        d = {"box": list(self.box), "flip": self.flip, "resize": self.resize}
        return {**d, "fill": self.fill} if self.resize == "longest" else d

    @classmethod
    def from_dict(cls, d: dict) -> View:
        """Inverse of ``to_dict``; a dict without ``resize`` (caches before it existed) is a crop."""
        box = tuple(float(v) for v in d["box"])
        return cls(box, bool(d["flip"]), str(d.get("resize", CROP)), int(d.get("fill", 0)))  # type: ignore[arg-type]


# ---------------------------------------------------------------- decoding and storing


def decode_image(data: bytes | str | Path | None, max_pixels: int = 64_000_000) -> Image.Image:
    """Open and fully decode an image (bytes or a path), or raise ``BadImage``.

    ``load()`` runs here so a truncated file fails now, not later. Images over ``max_pixels``
    (or over PIL's own ``MAX_IMAGE_PIXELS``) raise ``BadImage("decompression_bomb")`` before
    their pixels are decoded. EXIF orientation is not applied (as in open_clip's loaders).
    """
    if data is None:
        raise BadImage("missing", "record has neither image bytes nor a path")
    if isinstance(data, (str, Path)):
        try:
            data = Path(data).read_bytes()
        except FileNotFoundError as err:
            raise BadImage("missing", str(data)) from err
        except OSError as err:
            raise BadImage("unreadable", f"{data}: {err}") from err
    if len(data) == 0:
        raise BadImage("empty", "zero bytes")
    with warnings.catch_warnings():
        # PIL only *warns* between MAX_IMAGE_PIXELS and twice that; a bomb must never pass.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise BadImage("decompression_bomb", str(err)) from err
        except UnidentifiedImageError as err:
            raise BadImage("unreadable", "not a recognised image format") from err
        except Exception as err:  # noqa: BLE001  (PIL raises many types on corrupt headers)
            raise BadImage(_failure_reason(err), f"{type(err).__name__}: {err}") from err
        w, h = img.size
        # PIL's own limit applies too, so a bomb is refused even if the warning filter races (threads).
        limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
        if w * h > limit:
            raise BadImage("decompression_bomb", f"{w}x{h} pixels > limit {limit}")
        if w == 0 or h == 0:
            raise BadImage("corrupt", f"size {w}x{h}")
        return _load(img)


def _failure_reason(err: Exception) -> str:
    message = str(err).lower()
    return "truncated" if "truncated" in message or "broken data stream" in message else "corrupt"


def _load(img: Image.Image) -> Image.Image:
    try:
        img.load()
    except Exception as err:  # noqa: BLE001  (decoders raise OSError, ValueError, SyntaxError, ...)
        raise BadImage(_failure_reason(err), f"{type(err).__name__}: {err}") from err
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, compositing any transparency over white (CMYK, L, P, LA, RGBA, 16-bit, ...)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0  # 16-bit range -> 8-bit
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def stored_size(w: int, h: int, store_size: int = STORE_SIZE) -> tuple[int, int]:
    """(w, h) with the shorter side shrunk to ``store_size``; never enlarged."""
    short = min(w, h)
    if short <= store_size:
        return w, h
    scale = store_size / short
    return (store_size, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), store_size)


def store_image(img: Image.Image, store_size: int = STORE_SIZE) -> tuple[bytes, Image.Image]:
    """Encode the stored copy of ``img``: RGB, shorter side <= ``store_size``, JPEG q95.

    Returns the JPEG bytes and the image decoded back from them; use the latter for
    everything downstream (teacher views, checks), since that is what the trainer will load.
    """
    rgb = to_rgb(img)
    size = stored_size(*rgb.size, store_size=store_size)
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=JPEG_QUALITY)
    data = buf.getvalue()
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    return data, decoded


# ---------------------------------------------------------------- views


def view_policy(store_size: int = STORE_SIZE, resize_mode: str = "shortest") -> dict:
    """How views are made, for the cache manifest (caches before ``View.resize``: view0 "center-crop")."""
    return {"view0": resize_mode, "scale": list(SCALE), "ratio": [round(r, 3) for r in RATIO], "flip": FLIP_P,
            "store_size": store_size}  # fmt: skip


def center_view(w: int, h: int) -> View:
    """The centred square crop of a ``w`` x ``h`` image (torchvision CenterCrop's rounding)."""
    side = min(w, h)
    x0, y0 = int(round((w - side) / 2.0)), int(round((h - side) / 2.0))
    return View((x0 / w, y0 / h, (x0 + side) / w, (y0 + side) / h), False)


def eval_view(w: int, h: int, resize_mode: str = "shortest", fill: int = 0) -> View:
    """View 0 of a ``w`` x ``h`` stored image: the teacher's eval transform (open_clip ``resize_mode``).

    The box is what the view shows: the centred square for ``shortest``, the whole image otherwise.
    """
    _check_resize_mode(resize_mode)
    box = center_view(w, h).box if resize_mode == "shortest" else FULL_BOX
    return View(box, False, resize_mode, fill if resize_mode == "longest" else 0)


def stable_seed(seed: int | str) -> int:
    """A 63-bit seed from any int or string, identical across runs and machines (not ``hash()``)."""
    return int.from_bytes(hashlib.sha256(str(seed).encode()).digest()[:8], "little") & (2**63 - 1)


def sample_views(
    k: int, w: int, h: int, seed: int | str, resize_mode: str = "shortest", fill: int = 0,
    scale: Sequence[float] = SCALE, ratio: Sequence[float] = RATIO,
) -> list[View]:
    """``k`` views of a ``w`` x ``h`` stored image: view 0 the teacher's eval transform
    (``eval_view``), then RandomResizedCrop + flip.

    ``seed`` is typically the record key (optionally prefixed with a run seed), so views do
    not depend on processing order, rank or batch.
    """
    views = [eval_view(w, h, resize_mode, fill)][:k]
    shape_only = torch.empty(1, 1, 1).expand(1, h, w)  # get_params only reads the size
    # get_params draws from the global torch RNG: fork it so callers' RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stable_seed(seed))
        for _ in range(k - 1):
            i, j, ch, cw = RandomResizedCrop.get_params(shape_only, list(scale), list(ratio))
            flip = bool(torch.rand(1).item() < FLIP_P)
            views.append(View((j / w, i / h, (j + cw) / w, (i + ch) / h), flip))
    return views


def pixel_box(view: View, w: int, h: int) -> tuple[int, int, int, int]:
    """The view's box in pixels of a ``w`` x ``h`` image, rounded, at least 1 pixel wide."""
    x0, y0, x1, y1 = view.box
    px0, py0 = round(x0 * w), round(y0 * h)
    px1, py1 = max(px0 + 1, round(x1 * w)), max(py0 + 1, round(y1 * h))
    return px0, py0, min(px1, w), min(py1, h)


def apply_view(img: Image.Image, view: View, size: int, interpolation: str = "bicubic") -> Image.Image:
    """The view's ``size`` x ``size`` pixels: crop the box and resize (``"crop"``), or the eval
    transform of ``view.resize`` (``eval_resize``); then flip. Deterministic."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
    if view.resize == CROP:
        out = img.crop(pixel_box(view, *img.size)).resize((size, size), INTERPOLATIONS[interpolation])
    else:
        out = eval_resize(img, size, view.resize, interpolation, view.fill)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if view.flip else out


def eval_resize(img: Image.Image, size: int, resize_mode: str, interpolation: str, fill: int = 0) -> Image.Image:
    """The geometric steps of open_clip's eval ``image_transform`` (no ToTensor / Normalize).

    Built from the same torchvision / open_clip pieces in the same order, so with
    ``to_tensor`` the result equals open_clip's preprocess of ``img`` bit for bit (tested).
    """
    _check_resize_mode(resize_mode)
    mode = InterpolationMode(interpolation)
    if resize_mode == "squash":
        return TF.resize(img, [size, size], mode)
    if resize_mode == "longest":
        return CenterCropOrPad(size, fill=fill)(ResizeKeepRatio(size, longest=1, interpolation=mode)(img))
    return TF.center_crop(TF.resize(img, size, mode), [size, size])  # shortest


def _check_resize_mode(resize_mode: str) -> None:
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize_mode {resize_mode!r}; open_clip's are {', '.join(RESIZE_MODES)}")


def smallest_view_fraction(scale: Sequence[float] = SCALE, ratio: Sequence[float] = RATIO) -> float:
    """Shorter side of the smallest random view / shorter side of the stored image.

    RandomResizedCrop's smallest box has area ``scale[0]`` of the image at the most extreme
    aspect; on a square image (the worst case: a longer image gives larger boxes) its shorter
    side is ``sqrt(scale[0] * min(ratio[0], 1 / ratio[1]))`` of the image's (0.51 for the defaults).
    """
    return math.sqrt(scale[0] * min(ratio[0], 1 / ratio[1]))


def min_store_size(size: int, scale: Sequence[float] = SCALE, ratio: Sequence[float] = RATIO) -> int:
    """The smallest stored shorter side at which no random view is upsampled to ``size``."""
    return math.ceil(size / smallest_view_fraction(scale, ratio))


def normalize_images(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (or [0, 255] float) images [B, 3, S, S] -> float32 (x/255 − mean)/std, on x's device.

    The one normalisation of pixels: the teacher's input (``to_tensor``), the trainer's batches
    (normalised after they reach the device: workers ship uint8, 4x fewer bytes) and pretraining.
    ``x`` itself is never modified, even when it is already float32.
    """
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.float().div(255.0).sub_(m).div_(s)


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised float tensor [3, H, W] from an RGB image."""
    x = torch.from_numpy(np.asarray(to_rgb(img), dtype=np.uint8).copy()).permute(2, 0, 1)
    return normalize_images(x[None], mean, std)[0]


__all__ = [
    "BAD_IMAGE_REASONS",
    "RESIZE_MODES",
    "BadImage",
    "View",
    "apply_view",
    "center_view",
    "decode_image",
    "eval_resize",
    "eval_view",
    "min_store_size",
    "normalize_images",
    "pixel_box",
    "sample_views",
    "smallest_view_fraction",
    "stable_seed",
    "store_image",
    "stored_size",
    "to_rgb",
    "to_tensor",
    "view_policy",
]
