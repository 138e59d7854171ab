"""The cache -> training batches data path: exact view replay, determinism, rank/worker split, resume skip."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from cache_factory import make_fake_cache, photo_coco, teacher_config
from kdpipe import store
from kdpipe import cachereader
from kdpipe.data import views as V
from kdpipe.store import open_cache

N_TRAIN = 160  # 4 shards of 40 with shard_size=40


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> store.Cache:
    root = make_fake_cache(tmp_path_factory.mktemp("fake") / "cache", n_train=N_TRAIN, n_val=20, views=3,
                           shard_size=40)
    return open_cache(root)


def _cfg(cache: store.Cache, split: str = "train", **kw) -> cachereader.StreamConfig:
    pre = cache.teacher["preprocess"]
    base = dict(batch_size=8, image_size=32, interpolation=pre["interpolation"], seed=3)
    return cachereader.stream_config(cache.shard_paths(split, "tar"), **{**base, **kw})


def _keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def _epoch(cfg: cachereader.StreamConfig, n_samples: int = N_TRAIN) -> list[dict]:
    return list(cachereader.epoch_batches(cfg, cachereader.steps_per_epoch(n_samples, cfg.batch_size, cfg.world)))


def test_batch_targets_are_the_cached_embeddings_of_the_drawn_view_and_caption(fake):
    train = fake.load_split("train")
    index = {k: i for i, k in enumerate(train.keys)}
    batch = _epoch(_cfg(fake))[0]
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["t_img"].shape == (8, fake.embed_dim) and batch["t_txt"].shape == (8, fake.embed_dim)
    for i, key in enumerate(batch["keys"]):
        n, v, c = index[key], int(batch["view"][i]), int(batch["caption_idx"][i])
        np.testing.assert_array_equal(batch["t_img"][i].numpy(), train.img[n, v].astype(np.float32))
        np.testing.assert_array_equal(batch["t_txt"][i].numpy(), train.txt[train.txt_offsets[n] + c].astype(np.float32))
        assert batch["captions"][i].endswith(f"caption {c}")
        assert int(batch["labels"][i]) == int(train.labels[n])


def test_epoch_is_a_function_of_seed_and_epoch_and_covers_every_sample_once(fake):
    a, b = _epoch(_cfg(fake, epoch=0)), _epoch(_cfg(fake, epoch=0))
    assert _keys(a) == _keys(b)
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["view"], y["view"]) for x, y in zip(a, b))
    assert len(_keys(a)) == len(set(_keys(a))) == N_TRAIN  # 4 even shards, one part: a permutation
    other = _epoch(_cfg(fake, epoch=1))
    assert sorted(_keys(other)) == sorted(_keys(a)) and _keys(other) != _keys(a)
    assert not torch.equal(torch.cat([x["view"] for x in a]), torch.cat([x["view"] for x in other]))


def test_views_used_zero_and_all(fake):
    only0 = torch.cat([b["view"] for b in _epoch(_cfg(fake, views_used="0"))])
    assert only0.eq(0).all()
    every = torch.cat([b["view"] for b in _epoch(_cfg(fake, views_used="all"))])
    assert set(every.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_skip_reproduces_the_rest_of_the_epoch(fake, workers):
    full = _epoch(_cfg(fake, workers=workers))
    for skip in (5, 7):  # 7 is odd: with 2 workers the resumed loader must rotate its workers
        rest = _epoch(_cfg(fake, workers=workers, skip_batches=skip))
        assert [b["keys"] for b in rest] == [b["keys"] for b in full[skip:]]
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(rest, full[skip:]))


def test_workers_do_not_change_the_batches(fake):
    assert [b["keys"] for b in _epoch(_cfg(fake, workers=2))] == [b["keys"] for b in _epoch(_cfg(fake, workers=2))]


def test_ranks_get_equal_batch_counts_and_disjoint_first_pass(fake, tmp_path):
    ranks = [_epoch(_cfg(fake, world=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == N_TRAIN // 16
    assert not set(_keys(ranks[0])) & set(_keys(ranks[1]))


def test_uneven_shards_still_give_every_rank_the_fixed_epoch_length(tmp_path):
    # 3 shards of 40 + one of 10: rank split by shard is uneven; ranks must still run equal steps.
    cache = open_cache(make_fake_cache(tmp_path / "c", n_train=130, n_val=8, shard_size=40))
    steps = cachereader.steps_per_epoch(130, 8, 2)
    for r in (0, 1):
        batches = list(cachereader.epoch_batches(_cfg(cache, world=2, rank=r), steps))
        assert len(batches) == steps == 8 and all(len(b["keys"]) == 8 for b in batches)


def test_fewer_shards_than_parts_splits_by_sample(tmp_path):
    cache = open_cache(make_fake_cache(tmp_path / "c", n_train=48, n_val=8, shard_size=64))  # one shard
    ranks = [list(cachereader.epoch_batches(_cfg(cache, world=2, rank=r), 3)) for r in (0, 1)]
    assert [len(b) for b in ranks] == [3, 3]
    assert not set(_keys(ranks[0])) & set(_keys(ranks[1]))


def test_eval_stream_is_one_ordered_pass_with_view0(fake):
    batches = list(cachereader.make_loader(_cfg(fake, split="val", train=False, batch_size=8)))
    assert _keys(batches) == fake.load_split("val").keys  # manifest order, last batch partial
    assert [len(b["keys"]) for b in batches] == [8, 8, 4]
    assert all(b["view"].eq(0).all() and b["caption_idx"].eq(0).all() for b in batches)


def test_bad_samples_are_counted_not_slept_on_and_pickles_never_read(tmp_path, fake, monkeypatch):
    good = next(iter(wds.WebDataset(str(fake.shard_paths("train", "tar")[0]), shardshuffle=False)))
    path = tmp_path / "bad.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(6):
            sample = {k: v for k, v in good.items() if not k.startswith("__")}
            sample["__key__"] = f"k{i}"
            if i == 1:
                sample["jpg"] = b"not a jpeg"
            if i == 2:
                del sample["img.npy"]
            if i == 3:
                sample["img.npy"] = b"garbage"
            sample["evil.pyd"] = b"\x80\x04cos\nsystem\n."  # a pickle member must never be decoded
            sink.write(sample)

    def boom(*args, **kwargs):
        raise AssertionError("pickle.loads called")

    monkeypatch.setattr("pickle.loads", boom)
    cfg = cachereader.stream_config([path], batch_size=3, image_size=32, interpolation="bicubic", train=False)
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)  # warn_and_continue would sleep 0.5 s per bad sample
    batches = list(cachereader.make_loader(cfg))  # workers=0: in this process
    assert sleeps == []
    assert _keys(batches) == ["k0", "k4", "k5"]
    assert sum(b["data_errors"] for b in batches) == 3


def test_uint8_images_normalise_exactly_like_the_teachers_to_tensor(fake):
    sample = next(iter(wds.WebDataset(str(fake.shard_paths("train", "tar")[0]), shardshuffle=False)))
    img = V.apply_view(V.decode_image(sample["jpg"]), V.View((0.1, 0.0, 0.9, 0.8), True), 32, "bicubic")
    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    ours = cachereader.normalize_images(cachereader.pil_to_uint8(img)[None], mean, std)[0]
    assert torch.equal(ours, V.to_tensor(img, mean, std))


def test_too_small_split_is_a_clear_error():
    with pytest.raises(ValueError, match="too few"):
        cachereader.steps_per_epoch(10, 8, 2)


def test_view0_loader_is_one_ordered_pass_of_view0_and_every_caption(fake):
    val = fake.load_split("val")
    batches = list(cachereader.view0_loader(fake.shard_paths("val", "tar"), image_size=16, interpolation="bicubic",
                                            batch_size=8, captions=True))
    assert _keys(batches) == val.keys and [len(b["keys"]) for b in batches] == [8, 8, 4]
    assert batches[0]["image"].shape == (8, 3, 16, 16) and batches[0]["image"].dtype == torch.uint8
    captions = [c for b in batches for c in b["captions"]]
    assert [len(c) for c in captions] == np.diff(val.txt_offsets).tolist()
    assert all(c.endswith(f"caption {i}") for caps in captions for i, c in enumerate(caps))
    # view 0 and the first of the trainer's eval stream are the same pixels
    trainer = list(cachereader.make_loader(_cfg(fake, split="val", train=False, batch_size=8, image_size=16)))
    assert torch.equal(torch.cat([b["image"] for b in batches]), torch.cat([b["image"] for b in trainer]))
    plain = list(cachereader.view0_loader(fake.shard_paths("val", "tar"), image_size=16, interpolation="bicubic",
                                          batch_size=8))
    assert all(c == [] for b in plain for c in b["captions"])


def test_view0_pass_never_reads_the_cached_targets(tmp_path, fake):
    """An evaluation pass reads only jpg, views.json and captions.json: broken npy members do not matter."""
    good = next(iter(wds.WebDataset(str(fake.shard_paths("train", "tar")[0]), shardshuffle=False)))
    path = tmp_path / "no_targets.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(3):
            sample = {k: v for k, v in good.items() if not k.startswith("__")}
            sample.update({"__key__": f"k{i}", "img.npy": b"garbage"})
            sink.write(sample)
    (batch,) = list(cachereader.view0_loader([path], image_size=32, interpolation="bicubic", batch_size=4))
    assert batch["keys"] == ["k0", "k1", "k2"] and batch["data_errors"] == 0
    training = cachereader.stream_config([path], batch_size=4, image_size=32, interpolation="bicubic", train=False)
    assert list(cachereader.make_loader(training)) == []  # the trainer's decoder needs them: every sample is bad


# --------------------------------------------------------------------------- real teacher: exact replay


@pytest.fixture(scope="module")
def real_cache(shapes_root, tmp_path_factory) -> tuple[store.Cache, Path]:
    """shapes world -> tiny-clip cache, the teacher's weights in a file so the test can reload them."""
    from kdpipe.extract import ExtractConfig, run
    from kdpipe.teachers import load_teacher

    root = tmp_path_factory.mktemp("real")
    weights = root / "tiny.pt"
    torch.manual_seed(0)
    torch.save(load_teacher("tiny-clip").model.state_dict(), weights)
    run(ExtractConfig(teacher="tiny-clip", pretrained=str(weights), data=str(shapes_root), out=str(root / "cache"),
                      views=3, batch_size=8, workers=0, device="cpu", shard_size=8, progress=False))
    return open_cache(root / "cache"), weights


def test_replayed_views_give_the_teachers_cached_embedding(real_cache):
    """The loader's pixels, fed to the same teacher, reproduce the cached embedding of that view."""
    from kdpipe.teachers import load_teacher

    cache, weights = real_cache
    teacher = load_teacher("tiny-clip", str(weights))
    pre = cache.teacher["preprocess"]
    cfg = _cfg(cache, batch_size=8, image_size=pre["size"])
    batches = _epoch(cfg, cache.count("train"))
    views = torch.cat([b["view"] for b in batches])
    assert (views > 0).any() and (views == 0).any()
    for b in batches:
        pixels = cachereader.normalize_images(b["image"], pre["mean"], pre["std"])
        feats = torch.nn.functional.normalize(teacher.encode_images(pixels), dim=-1)
        cos = (feats * b["t_img"]).sum(-1)
        assert cos.min() > 0.999, cos  # fp16 storage only; a wrong crop or flip gives far less
    # and a wrong view does not match: shift every crop -> the check above would fail. A random teacher
    # barely sees a flip of a near-symmetric image (0.0002-0.007 of cosine over one shard), so the flipped
    # view must fall clearly below the right one on some sample of the shard, not on its first.
    gaps = []
    for sample in wds.WebDataset(str(cache.shard_paths("train", "tar")[0]), shardshuffle=False):
        view = V.View.from_dict(json.loads(sample["views.json"])[1])
        stored = V.decode_image(sample["jpg"])
        right = V.to_tensor(V.apply_view(stored, view, pre["size"], pre["interpolation"]), pre["mean"], pre["std"])
        wrong = V.to_tensor(V.apply_view(stored, V.View(view.box, not view.flip), pre["size"], pre["interpolation"]),
                            pre["mean"], pre["std"])
        target = torch.from_numpy(np.load(io.BytesIO(sample["img.npy"]))[1].astype(np.float32))
        cos = torch.nn.functional.normalize(teacher.encode_images(torch.stack([right, wrong])), dim=-1) @ target
        assert cos[0] > 0.999
        gaps.append(float(cos[0] - cos[1]))
    assert max(gaps) > 1e-3, gaps


@pytest.mark.parametrize("resize_mode", ["squash", "longest"])
def test_trainer_replays_view0_as_the_teachers_open_clip_preprocess(resize_mode, tmp_path):
    """The loader's view-0 pixels (uint8, then normalised as the trainer does) are open_clip's eval
    preprocess of the stored JPEG bit for bit, whatever the teacher's resize_mode (not a centre crop)."""
    from open_clip.model import get_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from kdpipe.extract import ExtractConfig, run
    from kdpipe.teachers import load_teacher

    teacher_path = teacher_config(tmp_path / "open_clip_config.json", resize_mode)
    run(ExtractConfig(teacher=str(teacher_path), allow_random_init=True, data=str(photo_coco(tmp_path / "coco")),
                      out=str(tmp_path / "cache"), views=3, store_size=64, workers=0, device="cpu",
                      prompts=False, progress=False))
    cache = open_cache(tmp_path / "cache")
    teacher = load_teacher(str(teacher_path), allow_random_init=True)
    reference = image_transform_v2(PreprocessCfg(**get_model_preprocess_cfg(teacher.model)), is_train=False)
    jpgs = {s["__key__"]: s["jpg"] for s in wds.WebDataset(str(cache.shard_paths("train", "tar")[0]),
                                                          shardshuffle=False)}
    pre = cache.teacher["preprocess"]
    cfg = _cfg(cache, batch_size=3, image_size=pre["size"], train=False)  # train=False: view 0
    (batch,) = list(cachereader.make_loader(cfg))
    assert batch["view"].eq(0).all() and len(batch["keys"]) == 3
    pixels = cachereader.normalize_images(batch["image"], pre["mean"], pre["std"])
    for key, got in zip(batch["keys"], pixels):
        assert torch.equal(got, reference(V.decode_image(jpgs[key])))
