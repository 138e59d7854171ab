"""Stage 3 (`kdpipe train`): outputs, never the teacher, exact resume, numerics, whitening, CLI, DDP."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cache_factory import fake_teacher, make_fake_cache
from kdpipe import losses as L
from kdpipe import runtime, trainstate
from kdpipe import train as T
from kdpipe.cli.main import app
from kdpipe.config import read_toml  # tomllib, or tomli on Python 3.10
from kdpipe.store import CacheError, open_cache
from kdpipe.students import load_student

DIM = 16
N_TRAIN, N_VAL, BATCH = 96, 24, 8  # 12 steps per epoch


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A fake cache (3 train shards, 1 val shard) with all three whitening modes fitted."""
    from kdpipe.whiten import WhitenConfig, run

    root = make_fake_cache(tmp_path_factory.mktemp("train") / "cache", n_train=N_TRAIN, n_val=N_VAL, dim=DIM,
                           views=2, captions=3, shard_size=32)
    run(WhitenConfig(cache=str(root), check_train=False, variants=["alpha=0.5"], progress=False))
    return root


def _cfg(cache: Path, out: Path, **kw) -> T.TrainConfig:
    base = dict(student="tiny", cache=str(cache), out=str(out), epochs=2, batch_size=BATCH, workers=0,
                log_every=1, bn_samples=16, val_samples=N_VAL, progress=False, lr=2e-3, warmup_steps=2,
                device="cpu", losses="fd=7.8,crd=1,icl=1")
    return T.TrainConfig(**{**base, **kw})


def _train_rows(run: Path) -> list[dict]:
    return [r for r in T.read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


# --------------------------------------------------------------------------- outputs


def test_run_writes_every_output_and_never_loads_the_teacher(cache_dir, tmp_path, monkeypatch):
    def no_teacher(*args, **kwargs):
        raise AssertionError("the trainer must never build a teacher")

    monkeypatch.setattr("kdpipe.teachers.load_teacher", no_teacher)
    monkeypatch.setattr("open_clip.create_model", no_teacher)
    out = tmp_path / "run"
    result = T.run(_cfg(cache_dir, out))
    assert result["step"] == 24 and result["counters"] == {"nonfinite": 0, "data_errors": 0}

    config = read_toml(out / "config.toml")
    assert config["student"] == "tiny" and config["batch_size"] == BATCH and config["cache"] == str(cache_dir)
    rows = T.read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 25))
    assert all(set(r["terms"]) == {"fd_img", "crd", "icl"} for r in train)
    assert all(math.isclose(r["loss"], sum(r["terms"].values()), rel_tol=1e-5) for r in train)
    assert all(r["samples_per_s"] > 0 and r["lr"] > 0 for r in train[:-1])
    assert train[1]["lr"] == pytest.approx(2e-3)  # end of the 2-step warmup
    val = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in val] == [12, 24]  # every epoch end
    assert all(0 <= r["val_i2t_R@1"] <= 1 and -1 <= r["val_cos"] <= 1 and r["val_images"] == N_VAL for r in val)

    ckpts = out / "checkpoints"
    assert {p.name for p in ckpts.iterdir()} == {"latest.pt", "previous.pt", "best.pt"}
    latest = trainstate.read_checkpoint(ckpts / "latest.pt")
    assert latest["position"] == {"epoch": 2, "batch": 0, "step": 24}
    assert latest["best"]["step"] in (12, 24)

    spec = json.loads((out / "student.json").read_text())
    assert spec["teacher"] == open_cache(cache_dir).teacher and spec["whitening"] is None
    assert spec["checkpoints"]["last"]["val"]["val_images"] == N_VAL and spec["checkpoints"]["last"]["step"] == 24
    assert spec["image"]["name"] == "tiny" and spec["embed_dim"] == DIM and spec["labels_used"] is None
    image, text, _ = load_student(out)
    assert text is None and image(torch.zeros(2, 3, 32, 32)).shape == (2, DIM)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- best and last weights


def _falling_scores(monkeypatch) -> None:
    """A stand-in validation (no precise BN, no val pass) whose score falls each time: the first is the best."""
    calls = iter(range(1000))

    def validate(s: T.Setup) -> dict[str, float]:
        return {"val_i2t_R@1": 0.0, "val_t2i_R@1": 0.0, "val_cos": 0.0, "val_score": -float(next(calls)),
                "val_images": 0}

    monkeypatch.setattr(T, "validate", validate)


def test_best_weights_are_the_best_step_s_with_precise_bn_and_eval_uses_them(cache_dir, tmp_path, monkeypatch):
    from kdpipe import evaluate as E

    _falling_scores(monkeypatch)
    out = tmp_path / "run"
    T.run(_cfg(cache_dir, out))  # validation at steps 12 and 24: the best is step 12
    spec = json.loads((out / "student.json").read_text())
    best, last = spec["checkpoints"]["best"], spec["checkpoints"]["last"]
    assert (best["file"], best["step"], best["epoch"]) == ("student-best.safetensors", 12, 1)
    assert (last["file"], last["step"]) == ("student-last.safetensors", 24)
    assert best["val"]["val_score"] == 0.0 and last["val"]["val_score"] == -1.0
    saved = {name: load_file(str(out / f"student-{name}.safetensors")) for name in ("best", "last")}

    # the best file = best.pt's weights (step 12), its BN statistics re-estimated by precise BN on them
    state = trainstate.read_checkpoint(out / "checkpoints/best.pt")
    assert state["position"]["step"] == 12
    setup = T.build_setup(_cfg(cache_dir, out))
    for k, _ in setup.image.named_parameters():
        torch.testing.assert_close(saved["best"][f"image.{k}"], state["model"][f"image.{k}"], rtol=0, atol=0, msg=k)
    bn_key = next(k for k in saved["best"] if k.endswith("running_mean"))
    assert not torch.equal(saved["best"][bn_key], state["model"][bn_key])  # the stand-in validation left them stale
    setup.distiller.load_state_dict(state["model"])
    T.refresh_bn(setup)
    assert saved["best"].keys() == {f"image.{k}" for k in setup.image.state_dict()}
    for k, v in setup.image.state_dict().items():
        torch.testing.assert_close(saved["best"][f"image.{k}"], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(saved["best"]["image.proj.weight"], saved["last"]["image.proj.weight"])
    latest = trainstate.read_checkpoint(out / "checkpoints/latest.pt")["model"]
    torch.testing.assert_close(saved["last"]["image.proj.weight"], latest["image.proj.weight"], rtol=0, atol=0)

    by_default = E.run(E.EvalConfig(run=out, device="cpu", progress=False))
    assert by_default["checkpoint"] == {"name": "best", "file": "student-best.safetensors", "step": 12, "epoch": 1}
    assert json.loads((out / "eval.json").read_text())["checkpoint"]["step"] == 12
    with_last = E.run(E.EvalConfig(run=out, checkpoint="last", out=tmp_path / "last.json", device="cpu",
                                   progress=False))
    assert with_last["checkpoint"]["name"] == "last" and with_last["checkpoint"]["step"] == 24
    cos = [r["metrics"]["agreement/cosine"]["student"] for r in (by_default, with_last)]
    assert cos[0] != cos[1]  # different weights judged
    # best.pt was picked on the val split eval scored: the report says so, and names the way out
    assert E.PICKED_ON_SPLIT_NOTE.format(step=12) in by_default["notes"]
    assert not any("picked by train's validation" in n for n in with_last["notes"])
    on_train = E.run(E.EvalConfig(run=out, split="train", out=tmp_path / "train.json", device="cpu", progress=False))
    assert not any("picked by train's validation" in n for n in on_train["notes"])


def test_without_validation_best_is_the_last_and_student_json_says_so(tmp_path):
    cache = make_fake_cache(tmp_path / "cache", n_train=32, n_val=0, dim=DIM, shard_size=32)
    out = tmp_path / "run"
    T.run(_cfg(cache, out, max_steps=2))
    spec = json.loads((out / "student.json").read_text())
    best, last = spec["checkpoints"]["best"], spec["checkpoints"]["last"]
    assert last == {"file": "student-last.safetensors", "step": 2, "epoch": 0, "val": None}
    assert best == {**last, "same_as": "last", "note": "no validation chose a best: best = last"}
    assert not (out / "student-best.safetensors").exists()
    _, _, loaded = load_student(out)
    assert loaded["checkpoint"]["file"] == "student-last.safetensors"


def test_a_run_trained_on_labels_is_judged_as_supervised_not_zero_shot(cache_dir, tmp_path):
    """hinton's hard-label CE uses the cache's class labels: accuracy on those classes is not zero-shot."""
    from kdpipe import evaluate as E

    recipes = {"hinton": ("hinton=1", {}), "hinton-soft": ("hinton=1", {"hinton": {"alpha": 1.0}}),
               "kd": ("fd=7.8,crd=1", {})}
    reports, specs = {}, {}
    for name, (losses, options) in recipes.items():
        out = tmp_path / name
        T.run(_cfg(cache_dir, out, losses=losses, loss_options=options, max_steps=2))
        specs[name] = json.loads((out / "student.json").read_text())
        reports[name] = E.run(E.EvalConfig(run=out, device="cpu", progress=False))
    classes = list(open_cache(cache_dir).classnames)
    assert specs["hinton"]["labels_used"] == {"losses": ["hinton"], "classnames": classes}
    assert specs["hinton-soft"]["labels_used"] is None and specs["kd"]["labels_used"] is None
    hinton = reports["hinton"]["metrics"]
    assert not [k for k in hinton if k.startswith("zeroshot/")]
    assert {"supervised/shapes/top1", "supervised/shapes/top5"} <= hinton.keys()
    assert hinton["supervised/shapes/top1"]["teacher"] is None and hinton["supervised/shapes/top1"]["ratio"] is None
    assert 0 <= hinton["supervised/shapes/top1"]["student"] <= 1
    assert reports["hinton"]["zeroshot"]["shapes"]["supervised"] is True
    assert any("supervised accuracy, not zero-shot" in n for n in reports["hinton"]["notes"])
    for name in ("hinton-soft", "kd"):
        rows = reports[name]["metrics"]
        assert "zeroshot/shapes/top1" in rows and not [k for k in rows if k.startswith("supervised/")], name


def test_training_reduces_the_loss(cache_dir, tmp_path):
    T.run(_cfg(cache_dir, tmp_path / "run", epochs=3, losses="fd=7.8", lr=5e-3))
    losses = [r["loss"] for r in _train_rows(tmp_path / "run")]
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6


@pytest.mark.slow
def test_student_learns_a_real_teacher_on_held_out_shapes(shapes_root, tmp_path):
    """shapes world -> tiny-clip cache -> the student's held-out cosine to the teacher climbs."""
    from kdpipe.extract import ExtractConfig, run

    cache = tmp_path / "cache"
    run(ExtractConfig(teacher="tiny-clip", data=str(shapes_root), out=str(cache), views=2, batch_size=12,
                      workers=0, device="cpu", shard_size=12, progress=False))
    T.run(_cfg(cache, tmp_path / "run", epochs=12, batch_size=6, val_every=8, lr=3e-3, warmup_steps=3,
               bn_samples=24, val_samples=100, losses="fd=7.8,crd=1,icl=1"))
    val = [r for r in T.read_metrics(tmp_path / "run/metrics.jsonl") if r["kind"] == "val"]
    assert len(val) == 6 and val[0]["val_images"] == 12
    assert val[-1]["val_cos"] > 0.85 and val[-1]["val_cos"] > val[0]["val_cos"] + 0.1, [r["val_cos"] for r in val]


# --------------------------------------------------------------------------- resume


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student-last.safetensors"))


def test_resume_continues_the_uninterrupted_run_exactly(cache_dir, tmp_path):
    """Stop at step 7 (mid-epoch), resume to 16 (across an epoch end with validation) == straight to 16."""
    kw = dict(epochs=3, losses="fd=7.8,crd=1,icl=1,mfd=2", text_student="text_tiny")
    T.run(_cfg(cache_dir, tmp_path / "a", max_steps=16, **kw))
    T.run(_cfg(cache_dir, tmp_path / "b", max_steps=7, **kw))
    assert trainstate.read_checkpoint(tmp_path / "b/checkpoints/latest.pt")["position"]["step"] == 7
    T.run(_cfg(cache_dir, tmp_path / "b", max_steps=16, resume=True, **kw))

    a, b = _train_rows(tmp_path / "a"), _train_rows(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 17))
    for ra, rb in zip(a, b):
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-9)
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6), ra["step"]
        assert rb["terms"] == pytest.approx(ra["terms"], rel=1e-5, abs=1e-6)
    val_a = [r for r in T.read_metrics(tmp_path / "a/metrics.jsonl") if r["kind"] == "val" and r["step"] == 12]
    val_b = [r for r in T.read_metrics(tmp_path / "b/metrics.jsonl") if r["kind"] == "val" and r["step"] == 12]
    assert val_a and val_b and val_b[0]["val_cos"] == pytest.approx(val_a[0]["val_cos"], abs=1e-6)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and any(k.startswith("text.") for k in wa)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


def test_truncated_latest_falls_back_to_the_previous_checkpoint(cache_dir, tmp_path, caplog):
    out = tmp_path / "run"
    T.run(_cfg(cache_dir, out, max_steps=4, ckpt_every=2))
    latest = out / "checkpoints/latest.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a killed write
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        result = T.run(_cfg(cache_dir, out, max_steps=6, ckpt_every=2, resume=True))
    assert "previous good checkpoint" in caplog.text and "step 2" in caplog.text
    assert result["step"] == 6
    assert [r["step"] for r in _train_rows(out)] == list(range(1, 7))  # rows 3-4 dropped, then redone


def test_resume_needs_a_checkpoint_and_a_fresh_run_needs_a_fresh_dir(cache_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        T.run(_cfg(cache_dir, tmp_path / "none", resume=True))
    T.run(_cfg(cache_dir, tmp_path / "run", max_steps=1))
    with pytest.raises(FileExistsError, match="--resume"):
        T.run(_cfg(cache_dir, tmp_path / "run", max_steps=1))


# --------------------------------------------------------------------------- numerics


def _nan_fd_on(monkeypatch, bad_calls) -> None:
    """Make the fd term NaN on the given (1-based) calls, i.e. training steps."""
    original = L.FeatureDistillation.forward
    calls = {"n": 0}

    def forward(self, batch):
        calls["n"] += 1
        terms = original(self, batch)
        if bad_calls(calls["n"]):
            terms["fd_img"] = terms["fd_img"] * float("nan")
        return terms

    monkeypatch.setattr(L.FeatureDistillation, "forward", forward)


def test_nonfinite_steps_are_skipped_and_counted(cache_dir, tmp_path, monkeypatch):
    _nan_fd_on(monkeypatch, lambda n: n in (3, 4))
    out = tmp_path / "run"
    result = T.run(_cfg(cache_dir, out, max_steps=6))
    assert result["counters"]["nonfinite"] == 2 and result["step"] == 6
    rows = _train_rows(out)
    assert [math.isnan(r["loss"]) for r in rows] == [False, False, True, True, False, False]
    assert rows[-1]["nonfinite_skipped"] == 2
    assert rows[2]["lr"] > rows[3]["lr"] > rows[4]["lr"]  # the schedule counts skipped steps too
    assert all(torch.isfinite(v).all() for v in _weights(out).values())


def test_the_cosine_reaches_its_floor_at_the_last_step_despite_skipped_steps(cache_dir, tmp_path, monkeypatch):
    _nan_fd_on(monkeypatch, lambda n: n in (5, 9, 10))
    out = tmp_path / "run"
    result = T.run(_cfg(cache_dir, out, lr=1e-2, min_lr_ratio=0.1))  # 2 epochs x 12 steps, to the end
    rows = _train_rows(out)
    assert result["step"] == 24 and result["counters"]["nonfinite"] == 3 and len(rows) == 24
    assert rows[-1]["lr"] == pytest.approx(1e-3, rel=1e-9)  # the last step ran at the floor
    assert rows[-2]["lr"] > 1e-3


def _fp16_scaler(monkeypatch, init_scale: float = 2.0**10) -> None:
    """fp16's loss scaling on CPU: the run's GradScaler enabled (autocast needs CUDA for fp16,
    but the scaler's unscale/step/update sequence is what breaks on a skipped step)."""
    build = T.build_setup

    def build_with_scaler(cfg):
        setup = build(cfg)
        setup.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        return setup

    monkeypatch.setattr(T, "build_setup", build_with_scaler)


def test_fp16_skips_nonfinite_steps_exactly_as_fp32_does(cache_dir, tmp_path, monkeypatch):
    _fp16_scaler(monkeypatch)
    _nan_fd_on(monkeypatch, lambda n: n in (3, 4))
    out = tmp_path / "run"
    result = T.run(_cfg(cache_dir, out, max_steps=6))  # used to raise "unscale_() has already been called"
    assert result["counters"]["nonfinite"] == 2 and result["step"] == 6
    rows = _train_rows(out)
    assert [math.isnan(r["loss"]) for r in rows] == [False, False, True, True, False, False]
    assert all(torch.isfinite(v).all() for v in _weights(out).values())
    scaler = trainstate.read_checkpoint(out / "checkpoints/latest.pt")["scaler"]
    assert scaler["scale"] == 2.0**8  # halved once per skipped step, as the scaler does on overflow


def test_fp16_training_with_a_scaler_matches_fp32_on_finite_steps(cache_dir, tmp_path, monkeypatch):
    T.run(_cfg(cache_dir, tmp_path / "fp32", max_steps=4))
    _fp16_scaler(monkeypatch)
    T.run(_cfg(cache_dir, tmp_path / "scaled", max_steps=4))
    for name, w in _weights(tmp_path / "fp32").items():
        torch.testing.assert_close(_weights(tmp_path / "scaled")[name], w, rtol=1e-4, atol=1e-5)


def test_repeated_nonfinite_steps_stop_the_run_with_step_and_keys(cache_dir, tmp_path, monkeypatch):
    _nan_fd_on(monkeypatch, lambda n: n >= 3)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"3 non-finite steps in a row, the last at step 5.*fd_img.*batch keys"):
        T.run(_cfg(cache_dir, out, max_steps=10, max_nonfinite=3, ckpt_every=2))
    state = trainstate.read_checkpoint(out / "checkpoints/latest.pt")
    assert state["position"]["step"] == 4  # saved after a skipped step: weights still finite
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "student.json").exists() and not (out / "student-last.safetensors").exists()


@pytest.mark.parametrize("side", ["image", "text"])
def test_non_finite_student_embeddings_stop_validation_naming_the_split(cache_dir, tmp_path, monkeypatch, side):
    embed_val = T.embed_val

    def broken(s):  # the real validation embeddings, 3 rows of one side turned NaN
        keys, img, txt = embed_val(s)
        bad = (img if side == "image" else torch.randn_like(img)).clone()
        bad[[0, 4, 9]] = float("nan")
        return (keys, bad, txt) if side == "image" else (keys, img, bad)

    monkeypatch.setattr(T, "embed_val", broken)
    with pytest.raises(ValueError, match=rf"^val split: student {side} embeddings have 3 non-finite rows of {N_VAL}$"):
        T.run(_cfg(cache_dir, tmp_path / "run", max_steps=2, val_every=2))


def test_a_text_student_is_validated_with_its_own_text_tower(cache_dir, tmp_path, monkeypatch):
    """A run with its own text tower (the no-teacher baseline) learns its own space: its val R@1 pairs its
    image and text embeddings, as eval does, not its images with the teacher's captions (which read ~0)."""
    embed_val = T.embed_val

    def own_space(s):  # the text tower's embedding of each image's first caption == the image's: R@1 is 1
        keys, img, txt = embed_val(s)
        assert txt is not None and txt.shape == img.shape
        return keys, img, img.clone()

    monkeypatch.setattr(T, "embed_val", own_space)
    T.run(_cfg(cache_dir, tmp_path / "text", max_steps=2, val_every=2, text_student="text_tiny"))
    val = [r for r in T.read_metrics(tmp_path / "text/metrics.jsonl") if r["kind"] == "val"]
    assert val and all(r["val_i2t_R@1"] == 1.0 and r["val_t2i_R@1"] == 1.0 for r in val)
    assert all(-1 <= r["val_txt_cos"] <= 1 for r in val)
    monkeypatch.setattr(T, "embed_val", embed_val)  # the image tower alone: scored against the teacher's captions
    T.run(_cfg(cache_dir, tmp_path / "image", max_steps=2, val_every=2))
    val = [r for r in T.read_metrics(tmp_path / "image/metrics.jsonl") if r["kind"] == "val"]
    assert val and all(r["val_i2t_R@1"] < 0.5 and "val_txt_cos" not in r for r in val)


# --------------------------------------------------------------------------- whitening


def test_whitened_training_saves_what_maps_the_student_back(cache_dir, tmp_path):
    out = tmp_path / "run"
    T.run(_cfg(cache_dir, out, whiten="joint", max_steps=3))
    spec = json.loads((out / "student.json").read_text())
    assert spec["whitening"]["mode"] == "joint" and spec["whitening"]["file"] == "whitening.safetensors"
    saved = load_file(str(out / "whitening.safetensors"))
    assert {"image.mu", "image.W", "image.W_inv", "image.scale", "text.W_inv"} <= saved.keys()
    # targets -> whitened -> (direction only) -> back: the map recovers the teacher embedding
    cache = open_cache(cache_dir)
    targets = T.load_targets(cache, "joint")
    t = torch.from_numpy(cache.load_split("val").img[:, 0].astype("float32"))
    z = targets.apply(t, "image")
    params = {k.split(".", 1)[1]: v for k, v in saved.items() if k.startswith("image.")}
    back = T.to_teacher_space(z, params)
    assert (back * t).sum(-1).mean() > 0.99
    assert (T.to_teacher_space(z, None) * t).sum(-1).mean() < 0.9  # without the map it is another space


def test_a_whitening_variant_trains_and_maps_back_through_its_own_transform(cache_dir, tmp_path):
    from kdpipe import targetspace

    out = tmp_path / "run"
    T.run(_cfg(cache_dir, out, whiten="joint@alpha=0.5", max_steps=1))
    spec = json.loads((out / "student.json").read_text())
    assert spec["whitening"]["mode"] == "joint@alpha=0.5"
    cache = open_cache(cache_dir)
    half, full = (targetspace.load_whitening(cache, g) for g in ("joint@alpha=0.5", "joint"))
    saved = load_file(str(out / "whitening.safetensors"))
    torch.testing.assert_close(saved["image.W"], torch.as_tensor(half.W, dtype=torch.float32))
    assert not torch.allclose(torch.as_tensor(half.W), torch.as_tensor(full.W))
    space = targetspace.student_space(out, spec, cache, text_tower=False)  # what eval uses
    torch.testing.assert_close(space.image.w_inv, torch.as_tensor(half.W_inv, dtype=torch.float32))
    with pytest.raises(ValueError, match="holds modes"):  # a variant that was not fitted
        T.run(_cfg(cache_dir, tmp_path / "run2", whiten="joint@alpha=0.25", max_steps=1))


def test_single_modality_whitening_warns_about_cross_modal_losses(cache_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        T.run(_cfg(cache_dir, tmp_path / "run", whiten="image", max_steps=1))
    assert "--whiten joint" in caplog.text
    # and, once, what the whitening study measured: whitened targets have not helped a student
    assert caplog.text.count("has not helped a student") == 1 and "--whiten image:" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        T.run(_cfg(cache_dir, tmp_path / "raw", max_steps=1))
    assert "has not helped" not in caplog.text
    assert set(load_file(str(tmp_path / "run/whitening.safetensors"))) == {
        "image.mu", "image.W", "image.W_inv", "image.scale"}


def test_separate_whitening_uses_each_modality_s_own_transform(cache_dir, tmp_path):
    T.run(_cfg(cache_dir, tmp_path / "run", whiten="separate", max_steps=1))
    saved = load_file(str(tmp_path / "run/whitening.safetensors"))
    cache = open_cache(cache_dir)
    from kdpipe.targetspace import load_whitening

    for modality in ("image", "text"):
        w = load_whitening(cache, modality)
        torch.testing.assert_close(saved[f"{modality}.W"], torch.as_tensor(w.W, dtype=torch.float32))
    assert not torch.allclose(saved["image.W"], saved["text.W"])


def test_whitened_targets_get_a_teacher_scale_as_sharp_as_the_raw_one(cache_dir, tmp_path):
    # τ_t = 100 is calibrated for raw cosines; on whitened (spread-out) targets it makes the
    # teacher's in-batch softmax far sharper than the teacher's own
    out = tmp_path / "run"
    T.run(_cfg(cache_dir, out, whiten="joint", losses="crd=1,hinton=1", max_steps=1))
    spec = json.loads((out / "student.json").read_text())
    tau = spec["target_logit_scale"]
    assert spec["teacher_logit_scale"] == 100.0 and tau != pytest.approx(100.0, rel=0.05)

    cache = open_cache(cache_dir)
    targets = T.load_targets(cache, "joint")
    t_img, t_txt = T.calibration_pairs(cache, 8 * BATCH)  # the 8 train batches it calibrates on
    assert t_img.shape == t_txt.shape == (8 * BATCH, DIM)

    def cos(img, txt):  # [8, B, B] in-batch cosines
        img, txt = (torch.nn.functional.normalize(x, dim=-1).view(8, BATCH, DIM) for x in (img, txt))
        return img @ txt.transpose(1, 2)

    def entropy(logits):  # CRD's softmaxes: rows (image->text) and columns (text->image)
        logp = logits.double().log_softmax(-1), logits.double().transpose(1, 2).log_softmax(-1)
        return float(sum(-(lp.exp() * lp).sum(-1).mean() for lp in logp)) / 2

    raw, white = cos(t_img, t_txt), cos(targets.apply(t_img, "image"), targets.apply(t_txt, "text"))
    assert entropy(tau * white) == pytest.approx(entropy(100.0 * raw), rel=1e-4)
    assert abs(entropy(100.0 * white) - entropy(100.0 * raw)) > 0.5 * entropy(100.0 * raw)  # what it fixes
    assert T.target_logit_scale(cache, T.Targets(), 100.0, BATCH) == 100.0  # raw targets keep τ_t


def test_whitening_fitted_for_another_teacher_is_refused_before_training(cache_dir, tmp_path):
    other_fp = {**fake_teacher(DIM), "name": "another-vit"}
    other = make_fake_cache(tmp_path / "other", n_train=40, n_val=8, dim=DIM, teacher=other_fp)
    shutil.copy(cache_dir / "whitening.h5", other / "whitening.h5")
    with pytest.raises(CacheError, match="another-vit"):
        T.run(_cfg(other, tmp_path / "run", whiten="joint"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- small pieces


def test_lr_schedule_warms_up_then_follows_the_cosine_to_the_floor():
    f = T.lr_lambda(total=12, warmup=2, floor=0.1)
    assert [f(0), f(1)] == [0.5, 1.0]
    after = [f(s) for s in range(2, 13)]
    assert after[0] == 1.0 and after[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_config_precedence_defaults_file_flags(tmp_path):
    (tmp_path / "c.toml").write_text('student = "resnet18"\nbatch-size = 16\nlr = 0.01\n')
    cfg = T.resolve_config({"batch_size": 32, "lr": None, "cache": "C", "out": "O"}, tmp_path / "c.toml")
    assert (cfg.student, cfg.batch_size, cfg.lr, cfg.epochs) == ("resnet18", 32, 0.01, 10)
    (tmp_path / "bad.toml").write_text("no_such_setting = 1\n")
    with pytest.raises(ValueError, match="no_such_setting"):
        T.resolve_config({}, tmp_path / "bad.toml")


# --------------------------------------------------------------------------- CLI


def test_cli_config_file_flags_resume_and_errors(cache_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    (tmp_path / "c.toml").write_text(
        'student = "tiny"\nbatch_size = 4\nepochs = 2\nworkers = 0\nlog_every = 1\nbn_samples = 8\n'
        'lr = 0.004\nlosses = "fd=7.8,icl=1"\nprogress = false\ndevice = "cpu"\n')
    args = ["train", "--cache", str(cache_dir), "--out", str(out), "--config", str(tmp_path / "c.toml")]
    res = runner.invoke(app, args + ["--batch-size", "8", "--max-steps", "2"])
    assert res.exit_code == 0, res.output
    saved = read_toml(out / "config.toml")
    assert (saved["batch_size"], saved["lr"], saved["max_steps"], saved["losses"]) == (8, 0.004, 2, "fd=7.8,icl=1")
    # --resume takes the run's own config.toml: only --out and what changes are needed
    res = runner.invoke(app, ["train", "--out", str(out), "--resume", "--max-steps", "3"])
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in _train_rows(out)] == [1, 2, 3] and _train_rows(out)[-1]["terms"].keys() == {"fd_img", "icl"}
    for bad, message in ((args, "--resume"), (["train", "--cache", str(cache_dir), "--out", str(tmp_path / "x"),
                                               "--student", "nope"], "unknown student"),
                         (["train", "--cache", str(tmp_path / "missing"), "--out", str(tmp_path / "y")], "no cache")):
        res = runner.invoke(app, bad)
        assert res.exit_code == 2 and message in res.output, res.output


# --------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        grads = _distiller_grads(runtime.DistInfo(rank, world, rank))
        torch.save(grads, Path(out_dir) / f"grads{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _distiller_grads(dist: runtime.DistInfo) -> dict[str, torch.Tensor]:
    """Gradients of fd+crd+icl+clip for a fixed global batch of 8, this rank holding its slice."""
    torch.manual_seed(0)
    image = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, DIM))
    losses = L.build_losses({"fd": 7.8, "crd": 1.0, "icl": 1.0, "clip": 0.5}, DIM, 50.0)
    distiller = T.Distiller(image, None, losses, dist)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(8, 3, 4, 4, generator=g), "t_img": torch.randn(8, DIM, generator=g),
             "t_txt": torch.randn(8, DIM, generator=g), "labels": torch.full((8,), -1)}
    per = 8 // dist.world_size
    local = {k: v[dist.rank * per:(dist.rank + 1) * per] for k, v in batch.items()}
    model = torch.nn.parallel.DistributedDataParallel(distiller) if dist.enabled else distiller
    T.backward_global(L.total_loss(model(local)), distiller, dist.world_size)
    return {n: p.grad.clone() for n, p in distiller.named_parameters() if p.grad is not None}


def test_ddp_gathered_gradients_equal_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children inherit the imported modules (spawn would re-import torch twice)
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    single = _distiller_grads(runtime.DistInfo())
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        assert grads.keys() == single.keys() and any("logit_scale" in k for k in grads)
        for k in single:
            torch.testing.assert_close(grads[k], single[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow
def test_torchrun_two_process_gloo_run(cache_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kdpipe.cli", "train", "--student", "tiny", "--cache", str(cache_dir), "--out", str(out),
           "--epochs", "2", "--batch-size", "4", "--workers", "0", "--log-every", "1", "--max-steps", "8",
           "--no-progress", "--device", "cpu", "--losses", "fd=7.8,crd=1,icl=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r["step"] for r in _train_rows(out)] == list(range(1, 9))  # rank 0 alone writes the log
    state = trainstate.read_checkpoint(out / "checkpoints/latest.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # both ranks' RNG states gathered
    assert not torch.equal(state["rng"][0]["mask"], state["rng"][1]["mask"])
    assert (out / "student-last.safetensors").exists() and proc.stderr.count("trained 8 steps") == 1
