"""Stored images, bad-image detection and exactly replayable views."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from kdpipe.data.views import (
    BAD_IMAGE_REASONS,
    RESIZE_MODES,
    BadImage,
    View,
    apply_view,
    center_view,
    decode_image,
    eval_view,
    min_store_size,
    pixel_box,
    sample_views,
    stable_seed,
    store_image,
    smallest_view_fraction,
    stored_size,
    to_tensor,
)

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP


def smooth_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """Random but photo-like (spatially correlated) RGB image."""
    coarse = np.random.default_rng(seed).integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------- stored image


@pytest.mark.parametrize("size,expected", [((600, 400), (384, 256)), ((300, 900), (256, 768)), ((100, 80), (100, 80))])
def test_store_image_bounds_shorter_side(size, expected) -> None:
    data, decoded = store_image(smooth_image(*size))
    assert stored_size(*size) == expected == decoded.size
    assert decoded.mode == "RGB" and data[:2] == b"\xff\xd8"  # JPEG
    again = Image.open(io.BytesIO(data))
    assert np.array_equal(np.asarray(again), np.asarray(decoded))
    assert store_image(smooth_image(*size))[0] == data  # deterministic bytes


def rgb_pixel(img: Image.Image) -> np.ndarray:
    _, decoded = store_image(img)
    assert decoded.mode == "RGB"
    return np.asarray(decoded, dtype=np.int32)[8, 8]


def test_store_image_converts_modes_to_rgb() -> None:
    assert np.abs(rgb_pixel(Image.new("L", (16, 16), 100)) - 100).max() <= 2
    assert np.abs(rgb_pixel(Image.new("CMYK", (16, 16), (0, 255, 255, 0))) - (255, 0, 0)).max() <= 3
    assert np.abs(rgb_pixel(Image.new("RGB", (16, 16), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)) - (10, 200, 30)).max() <= 8
    # Transparent pixels become white, not black.
    assert np.abs(rgb_pixel(Image.new("RGBA", (16, 16), (255, 0, 0, 0))) - 255).max() <= 2
    assert np.abs(rgb_pixel(Image.new("RGBA", (16, 16), (255, 0, 0, 255))) - (255, 0, 0)).max() <= 3
    assert np.abs(rgb_pixel(Image.new("LA", (16, 16), (0, 0))) - 255).max() <= 2
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert np.abs(rgb_pixel(palette) - 255).max() <= 2
    sixteen = Image.fromarray(np.full((16, 16), 257 * 200, dtype=np.uint16))
    assert np.abs(rgb_pixel(sixteen) - 200).max() <= 2


# ---------------------------------------------------------------- decoding bad input


def bad_reason(data, **kw) -> str:
    with pytest.raises(BadImage) as info:
        decode_image(data, **kw)
    assert info.value.reason in BAD_IMAGE_REASONS
    return info.value.reason


def test_decode_valid(tmp_path: Path) -> None:
    data = encode(smooth_image(40, 30), "PNG")
    (tmp_path / "a.png").write_bytes(data)
    for source in (data, tmp_path / "a.png", str(tmp_path / "a.png")):
        img = decode_image(source)
        assert img.size == (40, 30) and img.format == "PNG"


def test_decode_bad_kinds(tmp_path: Path) -> None:
    jpeg = encode(smooth_image(120, 90))
    assert bad_reason(b"") == "empty"
    (tmp_path / "zero.jpg").write_bytes(b"")
    assert bad_reason(tmp_path / "zero.jpg") == "empty"
    assert bad_reason(tmp_path / "absent.jpg") == "missing"
    assert bad_reason(None) == "missing"
    assert bad_reason(jpeg[: len(jpeg) // 2]) == "truncated"
    assert bad_reason(encode(smooth_image(120, 90), "PNG")[:-200]) == "truncated"
    assert bad_reason(np.random.default_rng(0).bytes(2000)) == "unreadable"
    (tmp_path / "notes.jpg").write_text("not an image at all")
    assert bad_reason(tmp_path / "notes.jpg") == "unreadable"
    assert bad_reason(jpeg[:200]) in ("truncated", "corrupt")


def test_decompression_bombs_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    png = encode(Image.new("RGB", (300, 200)), "PNG")
    assert bad_reason(png, max_pixels=300 * 200 - 1) == "decompression_bomb"
    assert decode_image(png, max_pixels=300 * 200).size == (300, 200)
    # PIL itself only *warns* between MAX_IMAGE_PIXELS and twice that: that must raise too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)
    assert bad_reason(png, max_pixels=10**9) == "decompression_bomb"  # 60k: PIL's warning range
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    assert bad_reason(png, max_pixels=10**9) == "decompression_bomb"  # 60k > 2x: PIL's error range


# ---------------------------------------------------------------- views


def test_center_view_boxes() -> None:
    assert center_view(320, 240) == View((40 / 320, 0.0, 280 / 320, 1.0), False)
    assert center_view(240, 320).box == (0.0, 40 / 320, 1.0, 280 / 320)
    assert center_view(256, 256).box == (0.0, 0.0, 1.0, 1.0)
    assert pixel_box(center_view(241, 333), 241, 333) == (0, 46, 241, 287)


def test_sample_views_deterministic_and_in_policy() -> None:
    w, h = 341, 256
    views = sample_views(8, w, h, "000000391895")
    assert views == sample_views(8, w, h, "000000391895")
    assert views != sample_views(8, w, h, "000000391896")
    assert views[0] == eval_view(w, h) == View(center_view(w, h).box, False, "shortest")
    assert sample_views(1, w, h, "k") == [eval_view(w, h)]
    assert sample_views(2, w, h, "k", resize_mode="squash")[0] == View((0.0, 0.0, 1.0, 1.0), False, "squash")
    assert sample_views(2, w, h, "k", resize_mode="longest", fill=9)[0] == View((0, 0, 1, 1), False, "longest", 9)
    assert sample_views(3, w, h, "k", resize_mode="squash")[1:] == sample_views(3, w, h, "k")[1:]
    assert all(v.resize == "crop" for v in views[1:])
    for v in views[1:]:
        x0, y0, x1, y1 = pixel_box(v, w, h)
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        area, aspect = (x1 - x0) * (y1 - y0) / (w * h), (x1 - x0) / (y1 - y0)
        assert 0.34 <= area <= 1.0 and 0.74 <= aspect <= 1.34
    flips = [v.flip for key in range(200) for v in sample_views(2, w, h, key)[1:]]
    assert 70 <= sum(flips) <= 130
    assert stable_seed("abc") == 7696372005097339066  # sha256-based: identical on every machine and run


def test_sample_views_leave_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    sample_views(4, 100, 80, "key")
    assert torch.equal(torch.rand(3), expected)


def test_views_replay_exactly_from_stored_bytes() -> None:
    data, decoded = store_image(smooth_image(500, 375, seed=3))
    views = sample_views(4, *decoded.size, seed="img-7")
    # What a trainer does: views from views.json, pixels from the stored JPEG.
    replayed_views = [View.from_dict(d) for d in json.loads(json.dumps([v.to_dict() for v in views]))]
    reloaded = decode_image(data).convert("RGB")
    for v, r in zip(views, replayed_views):
        a, b = apply_view(decoded, v, 64), apply_view(reloaded, r, 64)
        assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b))
    flipped = View(views[1].box, not views[1].flip)
    mirrored = np.asarray(apply_view(decoded, views[1], 64))[:, ::-1]
    assert np.array_equal(np.asarray(apply_view(decoded, flipped, 64)), mirrored)
    with pytest.raises(ValueError, match="bicubic"):
        apply_view(decoded, views[0], 64, interpolation="cubic-ish")


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [(500, 333), (241, 333), (97, 40)])
def test_view0_equals_open_clip_eval_preprocess(size, interpolation, mode) -> None:
    """View 0 is the teacher's own eval transform, bit for bit: the same PIL resizes in the
    same order (no tolerance needed), for every open_clip resize_mode."""
    _, stored = store_image(smooth_image(*size, seed=1))
    fill = 77  # a pad colour that shows: "longest" pads the short side of these non-square images
    expected = image_transform(224, is_train=False, mean=MEAN, std=STD, resize_mode=mode,
                               interpolation=interpolation, fill_color=fill)(stored)
    view = View.from_dict(json.loads(json.dumps(eval_view(*stored.size, mode, fill).to_dict())))  # via views.json
    got = to_tensor(apply_view(stored, view, 224, interpolation), MEAN, STD)
    assert got.shape == expected.shape == (3, 224, 224)
    assert torch.equal(got, expected)
    if mode != "shortest":  # squash / pad differ from a centre crop on a non-square image
        crop = to_tensor(apply_view(stored, View(center_view(*stored.size).box, False), 224, interpolation), MEAN, STD)
        assert ((crop - expected) * torch.tensor(STD).view(3, 1, 1)).abs().mean() > 0.05


def test_view_dicts_round_trip_and_old_dicts_are_crops() -> None:
    for view in (View((0.1, 0.2, 0.9, 1.0), True), eval_view(30, 20, "squash"), eval_view(30, 20, "longest", 255)):
        assert View.from_dict(json.loads(json.dumps(view.to_dict()))) == view
    assert eval_view(30, 20, "longest", 255).to_dict() == {"box": [0.0, 0.0, 1.0, 1.0], "flip": False,
                                                           "resize": "longest", "fill": 255}
    # views.json written before View.resize existed: a box to crop, which is how their view 0 was made
    old = View.from_dict({"box": [0.125, 0.0, 0.875, 1.0], "flip": False})
    assert old == View((0.125, 0.0, 0.875, 1.0), False, "crop") == center_view(320, 240)
    img = smooth_image(320, 240)
    expected = img.crop((40, 0, 280, 240)).resize((64, 64), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(apply_view(img, old, 64)), np.asarray(expected))
    with pytest.raises(ValueError, match="shortest, squash, longest"):
        View((0, 0, 1, 1), False, "letterbox")
    with pytest.raises(ValueError, match="shortest, squash, longest"):
        eval_view(30, 20, "crop")


def test_min_store_size_is_where_the_smallest_random_view_reaches_the_input_size() -> None:
    assert smallest_view_fraction() == pytest.approx((0.35 * 0.75) ** 0.5)  # 0.512: area 35 %, aspect 3:4
    assert min_store_size(224) == 438 and min_store_size(32) == 63 and min_store_size(224, scale=(1.0, 1.0)) == 259
    # RandomResizedCrop itself never draws a box whose shorter side is below that fraction (square image:
    # the worst case), and does draw boxes close to it.
    s, shortest = 400, []
    torch.manual_seed(0)
    for _ in range(4000):
        _, _, ch, cw = RandomResizedCrop.get_params(torch.empty(1, s, s), [0.35, 1.0], [3 / 4, 4 / 3])
        shortest.append(min(ch, cw) / s)
    assert smallest_view_fraction() - 1 / s <= min(shortest) < smallest_view_fraction() + 0.03


def test_to_tensor_normalises() -> None:
    img = Image.new("RGB", (4, 4), (255, 0, 128))
    x = to_tensor(img, MEAN, STD)
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    expected = [(1 - MEAN[0]) / STD[0], (0 - MEAN[1]) / STD[1], (128 / 255 - MEAN[2]) / STD[2]]
    assert torch.allclose(x[:, 2, 3], torch.tensor(expected))


def test_normalize_images_is_the_one_pixel_normalisation():
    from kdpipe.data.views import normalize_images, to_tensor

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 5, 7), generator=gen, dtype=torch.uint8)
    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    out = normalize_images(x, mean, std)
    assert out.dtype == torch.float32 and torch.equal(out, (x.float() / 255.0 - m) / s)  # bit for bit
    img = Image.fromarray(x[0].permute(1, 2, 0).numpy())
    assert torch.equal(to_tensor(img, mean, std), out[0])  # the teacher's input is the same arithmetic
    floats = x.float()
    before = floats.clone()
    assert torch.equal(normalize_images(floats, mean, std), out)
    assert torch.equal(floats, before)  # a float input is not modified in place
