"""Stage 1 end to end on the tiny teacher and a generated shapes world."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from open_clip.model import get_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from typer.testing import CliRunner

from cache_factory import TINY_VAL, photo_coco, teacher_config, tiny_extract_config, write_coco
from test_data_sources import captioned_csv, write_csv, write_images, write_tar
from kdpipe import extract as extract_mod
from kdpipe import store
from kdpipe.cli.main import app
from kdpipe.data import views as V
from kdpipe.data.heldout import in_held_out
from kdpipe.extract import run
from kdpipe.teachers import load_teacher


_cfg = tiny_extract_config  # the shared cache's settings (conftest's tiny_cache)


@pytest.fixture(scope="module")
def world(tiny_world) -> Path:
    return tiny_world


@pytest.fixture(scope="module")
def cache(tiny_cache) -> Path:
    """tiny-clip's cache of ``world`` (shared by the session: read-only)."""
    return tiny_cache


def _tar_samples(cache_dir: Path, split: str) -> dict[str, dict]:
    samples = {}
    for path in store.open_cache(cache_dir).shard_paths(split, "tar"):
        for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
            assert s["__key__"] not in samples, "duplicate key"
            samples[s["__key__"]] = s
    return samples


def _npy(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def test_manifest_verifies_and_counts(cache, world):
    c = store.open_cache(cache, verify="sha256")
    m = c.manifest
    assert m["views"] == 3 and m["embed_dim"] == c.embed_dim
    assert m["splits"]["train"]["count"] == 20 and m["splits"]["val"]["count"] == TINY_VAL
    assert len(m["splits"]["train"]["shards"]) == 3  # 20 images / 8 per shard
    assert m["teacher"]["name"] == "tiny-clip" and m["teacher"]["preprocess"]["size"] > 0
    assert (cache / "prompts.h5").exists()


def test_round_trip_tar_h5_and_teacher(cache):
    """tar embeddings == h5 embeddings == the teacher recomputed on the replayed view."""
    c = store.open_cache(cache)
    tars = _tar_samples(cache, "val")
    h5 = c.load_split("val")
    assert sorted(tars) == sorted(h5.keys)
    teacher = load_teacher("tiny-clip", None, device=torch.device("cpu"))
    pre = teacher.preprocess
    for n, key in enumerate(h5.keys[:4]):
        s = tars[key]
        img = _npy(s["img.npy"])
        np.testing.assert_array_equal(img, h5.img[n])
        txt = _npy(s["txt.npy"])
        np.testing.assert_array_equal(txt, h5.txt[h5.txt_offsets[n]:h5.txt_offsets[n + 1]])
        assert img.dtype == np.float16 and np.allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1, atol=2e-3)
        stored = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
        for v, view in enumerate(json.loads(s["views.json"])):
            x = V.to_tensor(V.apply_view(stored, V.View.from_dict(view), pre.size, pre.interpolation),
                            pre.mean, pre.std)[None]
            feat = torch.nn.functional.normalize(teacher.encode_images(x).float(), dim=-1)[0]
            cos = float(feat @ torch.from_numpy(img[v].astype(np.float32)))
            assert cos >= 0.999, (key, v, cos)
        captions = json.loads(s["captions.json"])
        ref = torch.nn.functional.normalize(teacher.encode_texts(captions, trim=False).float(), dim=-1)
        cos_t = (ref * torch.from_numpy(txt.astype(np.float32))).sum(-1)
        assert float(cos_t.min()) >= 0.999


def test_rerun_is_a_noop_and_keeps_files(cache, world):
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (cache / "train").glob("*.tar")}
    run(_cfg(world, cache))
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (cache / "train").glob("*.tar")}
    assert before == after


def test_resume_after_crash(world, tmp_path, monkeypatch):
    """Killed after two shards (with a half-written shard left behind): a re-run completes it."""
    ref = tmp_path / "ref"
    run(_cfg(world, ref, splits=["train"]))
    out = tmp_path / "crash"
    real_write, calls = store.write_shard, {"n": 0}

    def crashing(split_dir, index, samples, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # leave a truncated tar without sidecar, as a SIGKILL would
            (split_dir / f"{store.shard_name(index)}.tar").write_bytes(b"\0" * 100)
            raise KeyboardInterrupt
        return real_write(split_dir, index, samples, *a, **kw)

    monkeypatch.setattr(extract_mod, "write_shard", crashing)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(world, out, splits=["train"]))
    first = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("shard-00000[01].tar")}
    assert len(first) == 2
    monkeypatch.setattr(extract_mod, "write_shard", real_write)
    run(_cfg(world, out, splits=["train"]))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("shard-00000[01].tar")} == first
    got, want = _tar_samples(out, "train"), _tar_samples(ref, "train")
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(_npy(got[key]["img.npy"]), _npy(want[key]["img.npy"]))
    assert not list((out / "train").glob(".*.tmp"))


def test_corrupted_shard_is_detected(cache, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(cache, copy)
    tar = copy / "train" / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # same size, different bytes
    tar.write_bytes(bytes(data))
    store.open_cache(copy, verify="size")  # sizes still match
    with pytest.raises(store.CacheError, match="sha256"):
        store.open_cache(copy, verify="sha256")
    (copy / "train" / "shard-000002.h5").write_bytes(b"x")
    with pytest.raises(store.CacheError, match="bytes"):
        store.open_cache(copy)


def test_other_teacher_refused_unless_overwrite(cache, world, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(cache, copy)
    with pytest.raises(store.CacheError, match="views"):
        run(_cfg(world, copy, views=2))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["teacher"]["checkpoint_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(store.CacheError, match="teacher"):
        run(_cfg(world, copy, splits=["val"]))
    summary = run(_cfg(world, copy, splits=["val"], overwrite=True))
    assert summary["val"]["count"] == TINY_VAL and not (copy / "train").exists()


def _encoded(mode: str, fmt: str = "PNG", size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    img = Image.new(mode, size)
    if mode == "P":
        img.putpalette([i % 256 for i in range(768)])
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_bad_inputs_are_skipped_and_counted(tmp_path):
    good = _encoded("RGB", "JPEG")
    truncated = good[: len(good) // 2]
    images = {
        "a_ok.jpg": good, "b_cmyk.jpg": _encoded("CMYK", "JPEG"), "c_gray.png": _encoded("L"),
        "d_palette.png": _encoded("P"), "e_alpha.png": _encoded("RGBA"),
        "f_empty.jpg": b"", "g_trunc.jpg": truncated, "h_text.jpg": b"not an image at all",
        "i_nocap.jpg": good, "j_blank.jpg": good,
    }
    captions = {name: ["a picture", "  ", ""] for name in images}
    captions["i_nocap.jpg"] = []
    captions["j_blank.jpg"] = ["   ", ""]
    write_coco(tmp_path / "coco", images, captions)
    summary = run(_cfg(tmp_path / "coco", tmp_path / "out", shard_size=4))
    info = summary["train"]
    assert info["count"] == 5  # ok, cmyk, gray, palette, alpha
    assert info["captions"] == 5  # the blank captions were dropped
    assert sum(info["skipped"].values()) == 5
    assert info["skipped"].get("no_caption") == 2
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    skipped_keys = {k for s in manifest["splits"]["train"]["shards"] for ks in s["skipped_keys"].values() for k in ks}
    assert len(skipped_keys) == 5
    for s in _tar_samples(tmp_path / "out", "train").values():
        assert Image.open(io.BytesIO(s["jpg"])).mode == "RGB"


def test_leakage_guard_reported(tmp_path):
    images = {f"{i}.jpg": _encoded("RGB", "JPEG") for i in range(6)}
    write_coco(tmp_path / "coco", images, {n: ["a cat"] for n in images})
    # Karpathy test images that are also in the annotation train split (as val2014 in train2017)
    karpathy = {"images": [
        {"cocoid": i + 1, "filepath": "train", "filename": f"{i}.jpg",
         "split": "test", "sentences": [{"raw": "a cat"}]} for i in range(2)]}
    (tmp_path / "split.json").write_text(json.dumps(karpathy))
    summary = run(_cfg(tmp_path / "coco", tmp_path / "out", split_file=str(tmp_path / "split.json")))
    assert summary["train"]["count"] == 4 and summary["test"]["count"] == 2
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["report"]["leakage_removed"] == 2


def test_cli_help_and_bad_flags(world, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["extract", "--help"])
    assert result.exit_code == 0 and "--teacher" in result.output and "--views" in result.output
    result = runner.invoke(app, ["extract", "--teacher", "tiny-clip", "--bogus"])
    assert result.exit_code != 0 and "bogus" in result.output
    result = runner.invoke(app, ["extract", "--teacher", "no-such-teacher", "--data", str(world),
                                 "--out", str(tmp_path / "x"), "--device", "cpu"])
    assert result.exit_code == 2 and "tiny-clip" in result.output
    result = runner.invoke(app, ["extract", "--teacher", "tiny-clip", "--data", str(tmp_path / "missing"),
                                 "--out", str(tmp_path / "x"), "--device", "cpu"])
    assert result.exit_code == 2 and "missing" in result.output


def test_rerun_with_a_prompt_set_adds_it_and_keeps_the_rest(cache, world, tmp_path, monkeypatch):
    """`--prompt-set NAME` on a finished cache: its shards stay, prompts.h5 keeps its sets byte for byte
    and gains NAME, encoded by the teacher (a tiny stand-in for imagenet's 80k prompts)."""
    from kdpipe import prompts

    monkeypatch.setitem(prompts.PROMPT_SETS._entries, "tiny-test", lambda: (["tench", "goldfish"], ["a {}."]))
    copy = tmp_path / "c"
    shutil.copytree(cache, copy)
    before = prompts.read_prompts(copy / "prompts.h5")
    shards = {p.name: p.stat().st_mtime_ns for p in (copy / "train").glob("*.tar")}
    run(_cfg(world, copy, prompt_sets=["tiny-test"]))
    after = prompts.read_prompts(copy / "prompts.h5")
    assert set(after) == set(before) | {"tiny-test"}
    for name, s in before.items():
        assert np.array_equal(after[name].emb, s.emb) and after[name].classnames == s.classnames
    want = prompts.encode_prompts(load_teacher("tiny-clip"), ["tench", "goldfish"], ["a {}."])
    assert after["tiny-test"].emb.shape == (2, 1, want.shape[-1])
    np.testing.assert_allclose(after["tiny-test"].emb.astype(np.float32), want.astype(np.float32), atol=2e-3)
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "train").glob("*.tar")} == shards
    mtime = (copy / "prompts.h5").stat().st_mtime_ns
    run(_cfg(world, copy, prompt_sets=["tiny-test"]))  # nothing missing: the file is not rewritten
    assert (copy / "prompts.h5").stat().st_mtime_ns == mtime


def test_unknown_prompt_set_fails_before_the_teacher_runs(world, tmp_path):
    result = CliRunner().invoke(app, ["extract", "--teacher", "tiny-clip", "--data", str(world), "--out",
                                      str(tmp_path / "x"), "--device", "cpu", "--prompt-set", "imagenet-21k"])
    assert result.exit_code == 2
    assert "unknown prompt set 'imagenet-21k'; valid: cifar10, cifar100, imagenet, imagenet-simple, shapes" in \
        " ".join(result.output.split())
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
def test_view0_is_the_teachers_own_open_clip_preprocess(resize_mode, tmp_path, monkeypatch):
    """The pixels fed to the teacher for view 0, and view 0 replayed from views.json, are open_clip's
    eval preprocess (create_model_and_transforms') of the decoded stored JPEG, bit for bit."""
    photo_coco(tmp_path / "coco")
    teacher_path = teacher_config(tmp_path / "open_clip_config.json", resize_mode)
    fed: dict[str, torch.Tensor] = {}
    real_embed = extract_mod.embed_batch

    def spy(teacher, batch, precision):  # records exactly what the teacher is given
        fed.update({p.key: p.pixels[0] for p in batch})
        return real_embed(teacher, batch, precision)

    monkeypatch.setattr(extract_mod, "embed_batch", spy)
    run(_cfg(tmp_path / "coco", tmp_path / "out", teacher=str(teacher_path), allow_random_init=True,
             store_size=64, views=2, prompts=False))
    teacher = load_teacher(str(teacher_path), allow_random_init=True)
    pre = teacher.preprocess
    # open_clip's own eval transform for this model, as create_model_and_transforms builds it
    reference = image_transform_v2(PreprocessCfg(**get_model_preprocess_cfg(teacher.model)), is_train=False)
    samples = _tar_samples(tmp_path / "out", "train")
    assert len(samples) == len(fed) == 3
    for key, s in samples.items():
        stored = V.decode_image(s["jpg"])
        assert min(stored.size) == 64 and stored.width != stored.height
        expected = reference(stored)
        assert torch.equal(fed[key], expected)
        view0 = V.View.from_dict(json.loads(s["views.json"])[0])
        replayed = V.to_tensor(V.apply_view(stored, view0, pre.size, pre.interpolation), pre.mean, pre.std)
        assert torch.equal(replayed, expected)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["view_policy"]["view0"] == resize_mode == manifest["teacher"]["preprocess"]["resize_mode"]


def test_store_size_below_the_teachers_input_is_refused(world, tmp_path):
    with pytest.raises(ValueError, match=r"input size 32.*pass --store-size >= 32"):
        run(_cfg(world, tmp_path / "out", store_size=31))
    assert not (tmp_path / "out").exists()  # refused before anything was written
    result = CliRunner().invoke(app, ["extract", "--teacher", "shapes-vit", "--data", str(world), "--out",
                                      str(tmp_path / "cli"), "--device", "cpu", "--store-size", "48"])
    assert result.exit_code == 2 and "--store-size >= 64" in " ".join(result.output.split())


def test_store_size_that_upsamples_random_views_warns_with_the_fix(caplog):
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        extract_mod.check_store_size(256, 224, n_views=4)  # the default store size, a 224 px teacher
    assert "pass --store-size >= 438" in caplog.text and "131 px" in caplog.text and "1.71x" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        extract_mod.check_store_size(438, 224, n_views=4)  # big enough
        extract_mod.check_store_size(256, 224, n_views=1)  # view 0 only: no random views to upsample
        extract_mod.check_store_size(256, 64, n_views=4)  # shapes-vit at the default store size
    assert caplog.text == ""


def test_extract_warns_about_upsampled_random_views(world, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        run(_cfg(world, tmp_path / "out", store_size=48, splits=["val"], prompts=False))
    assert "--store-size 48" in caplog.text and "pass --store-size >= 63" in caplog.text


def test_tar_input_with_val_fraction_writes_shard_i_of_both_splits_from_tar_i(tmp_path):
    """--val-fraction: val shard i holds exactly tar i's samples whose key hashes below the fraction."""
    for shard in range(2):
        write_tar(tmp_path / f"in-{shard}.tar", 10 * shard, 8)
    spec = str(tmp_path / "in-{0..1}.tar")
    summary = run(_cfg(spec, tmp_path / "out", val_fraction=0.5, prompts=False))
    assert summary["train"]["shards"] == summary["val"]["shards"] == 2
    for split in ("train", "val"):
        for shard in store.open_cache(tmp_path / "out").manifest["splits"][split]["shards"]:
            first = 10 * shard["index"]
            with_image = [f"{i:09d}" for i in range(first, first + 8) if i % 5 != 4]  # write_tar leaves these out
            expected = [k for k in with_image if in_held_out(k, 0.5) == (split == "val")]
            h5 = store.read_h5_shard(tmp_path / "out" / split / f"{shard['name']}.h5")
            assert h5.keys == expected
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["report"]["val_fraction"] == 0.5


def test_resume_refuses_settings_that_move_images_between_shards(world, tmp_path):
    """Kept shards must hold what this run would write: another --shard-size (or split definition)
    is refused instead of mixing old and new shard boundaries (duplicate images)."""
    out = tmp_path / "out"
    run(_cfg(world, out, splits=["val"], prompts=False))
    with pytest.raises(store.CacheError, match="--shard-size is 8, this run asks for 4"):
        run(_cfg(world, out, splits=["val"], prompts=False, shard_size=4))
    csv_spec = captioned_csv(tmp_path / "csv", "t.csv", 6)
    run(_cfg(csv_spec, tmp_path / "c", val_fraction=0.5, prompts=False))
    with pytest.raises(store.CacheError, match="--val-fraction is 0.5, this run asks for 0.25"):
        run(_cfg(csv_spec, tmp_path / "c", val_fraction=0.25, prompts=False))


def test_cli_input_errors_come_before_the_teacher(tmp_path):
    """A CSV that names missing images, or lacks a column, is one line naming the file, before any
    teacher work (here the teacher does not even exist)."""
    spec = write_csv(tmp_path / "d" / "t.csv", [("gone.jpg", "a"), ("also-gone.jpg", "b"), ("x.jpg", "c")])
    write_images(tmp_path / "d", ["x.jpg"])
    base = ["extract", "--teacher", "no-such-teacher", "--data", str(spec), "--out", str(tmp_path / "o"),
            "--device", "cpu"]
    result = CliRunner().invoke(app, base)
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "t.csv names 2 of 3 images not found (gone.jpg (line 2), also-gone.jpg (line 3))" in text
    assert "--skip-missing" in text and "no-such-teacher" not in text
    result = CliRunner().invoke(app, [*base, "--csv-caption-key", "caption"])
    expected = "no column 'caption' (--csv-caption-key); its columns: 'filepath', 'title', 'url'"
    assert result.exit_code == 2 and expected in " ".join(result.output.split())
    result = CliRunner().invoke(app, [*base, "--skip-missing"])  # then the teacher is the problem
    assert result.exit_code == 2 and "no-such-teacher" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_process_gloo_equals_one_process(world, cache, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "kdpipe.cli", "extract", "--teacher", "tiny-clip", "--data", str(world), "--out", str(out),
           "--views", "3", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--shard-size", "8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store.open_cache(out, verify="sha256")
    for split in ("train", "val"):
        got, want = _tar_samples(out, split), _tar_samples(cache, split)
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_allclose(_npy(got[key]["img.npy"]).astype(np.float32),
                                       _npy(want[key]["img.npy"]).astype(np.float32), atol=2e-3)
            np.testing.assert_allclose(_npy(got[key]["txt.npy"]).astype(np.float32),
                                       _npy(want[key]["txt.npy"]).astype(np.float32), atol=2e-3)
