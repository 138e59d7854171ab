"""Pretraining a teacher from scratch: augmentation math, exact text trimming, training, files, reuse, CLI."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdpipe import pretrain, trainstate
from kdpipe.pretrain import PretrainConfig

STEPS = 80


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and much faster on a machine shared with other jobs."""
    from kdpipe.runtime import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kdpipe.data.shapes import make_shapes

    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, 32, 16, size=32, seed=0)
    return root


def tiny_cfg(world: Path, out: Path, **kw) -> PretrainConfig:
    args = dict(data=str(world), out=str(out), arch="tiny-clip", steps=STEPS, batch_size=16, lr=2e-3,
                device="cpu", log_every=5, progress=False)
    return PretrainConfig(**{**args, **kw})


@pytest.fixture(scope="module")
def trained(world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return pretrain.run(tiny_cfg(world, tmp_path_factory.mktemp("teacher") / "T"))


# ------------------------------------------------------------------ pure pieces


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    factors = [pretrain.lr_factor(s, 10, 100) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[55] == pytest.approx(0.5, abs=0.02) and pretrain.lr_factor(100, 10, 100) == pytest.approx(0.0)


def test_boxes_inside_image_with_area_in_scale() -> None:
    boxes = pretrain.sample_boxes(2000, (0.5, 1.0), torch.Generator().manual_seed(0))
    x0, y0, x1, y1 = boxes.unbind(1)
    assert bool((x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 1 + 1e-6).all() and (y1 <= 1 + 1e-6).all())
    area = (x1 - x0) * (y1 - y0)
    assert area.max() <= 1.0 + 1e-6 and area.min() >= 0.5 * 0.85  # clipping to the image only shrinks a little
    assert 0.65 < area.mean() < 0.8


def test_crop_resize_full_box_is_identity_and_half_box_zooms() -> None:
    images = torch.rand(2, 3, 8, 8)
    full = pretrain.crop_resize(images, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2))
    assert torch.allclose(full, images, atol=1e-5)
    left = pretrain.crop_resize(images, torch.tensor([[0.0, 0.0, 0.5, 1.0]] * 2))
    # the left half stretched 2x horizontally: output column 2k+1 sits between input columns k and k+1
    assert torch.allclose(left[..., 1:7:2], 0.75 * images[..., 0:3] + 0.25 * images[..., 1:4], atol=1e-5)


def test_trimmed_text_equals_open_clip_forward() -> None:
    built = pretrain.build_model("tiny-clip", torch.device("cpu"))
    tokens = built.tokenizer(["a red circle on the left", "a photo of a star", "two shapes: a ring and a small cross"])
    built.model.eval()
    with torch.no_grad():
        full = built.model.encode_text(tokens, normalize=True)
        trimmed = pretrain.encode_text(built.model, tokens)
    assert torch.allclose(trimmed, full, atol=1e-5)


def test_batches_distinct_images_and_their_own_captions(world: Path) -> None:
    built = pretrain.build_model("tiny-clip", torch.device("cpu"))
    from kdpipe.data import open_source

    data = pretrain.load_split(open_source(str(world)), "train", 32, "bicubic", built.tokenizer)
    assert data.images.shape == (32, 3, 32, 32) and data.images.dtype == torch.uint8
    owner = data.caption_owner()
    feed = pretrain.batches(data, 16, torch.Generator().manual_seed(0))
    for _ in range(5):
        idx, rows = next(feed)
        assert len(set(idx.tolist())) == 16 and torch.equal(owner[rows], idx)


def test_unreadable_images_are_skipped_and_counted(world: Path, tmp_path: Path, caplog) -> None:
    import shutil

    from kdpipe.data import open_source

    copy = tmp_path / "w"
    shutil.copytree(world, copy)
    victim = sorted((copy / "train").iterdir())[3]
    victim.write_bytes(b"not an image")
    built = pretrain.build_model("tiny-clip", torch.device("cpu"))
    data = pretrain.load_split(open_source(str(copy)), "train", 32, "bicubic", built.tokenizer)
    assert len(data) == 31 and data.offsets[-1] == data.tokens.shape[0]
    assert "unreadable" in caplog.text


# ------------------------------------------------------------------ training and files


def test_loss_goes_down_and_metrics_are_reported(trained: dict) -> None:
    curve = trained["loss_curve"]
    assert len(curve) == STEPS // 5 and curve[-1]["step"] == STEPS
    # in-batch contrastive over 16 pairs: chance is ln 16 = 2.77; it first collapses there, then learns
    assert curve[0]["loss"] == pytest.approx(math.log(16), rel=0.2)
    assert curve[-1]["loss"] < 0.7 * curve[0]["loss"] and curve[-1]["loss"] < math.log(16) - 0.5, curve
    val = trained["val"]
    for key in ("i2t_R@1", "t2i_R@1", "i2t_R@5", "zeroshot_top1", "zeroshot_top5"):
        assert 0.0 <= val[key] <= 1.0
    assert val["zeroshot_chance"] == pytest.approx(1 / 8)
    assert trained["train_images"] == 32 and trained["val_images"] == 16 and not trained["reused"]


def test_val_curve_every_n_steps_and_its_tail_gain(world: Path, tmp_path: Path) -> None:
    summary = pretrain.run(tiny_cfg(world, tmp_path / "T", val_every=10))
    curve = summary["val_curve"]
    assert [r["step"] for r in curve] == list(range(10, STEPS, 10)) + [STEPS]
    assert curve[-1] == {"step": STEPS, **summary["val"]}  # the last point is the final evaluation
    v0 = next(r for r in reversed(curve[:-1]) if r["step"] <= 0.8 * STEPS)["i2t_R@1"]
    expected = None if v0 == 0 else (curve[-1]["i2t_R@1"] - v0) / v0
    assert summary["val_tail_gain"] == (pytest.approx(expected) if expected is not None else None)


def test_tail_gain_reads_the_last_fifth_of_the_steps() -> None:
    curve = [{"step": s, "i2t_R@1": v} for s, v in ((100, 0.1), (400, 0.30), (800, 0.40), (900, 0.405), (1000, 0.41))]
    assert pretrain.tail_gain(curve) == pytest.approx(0.41 / 0.40 - 1)  # from step 800 (= 80% of 1000)
    assert pretrain.tail_gain(curve[:2]) == pytest.approx(0.30 / 0.1 - 1)
    assert pretrain.tail_gain(curve[-1:]) is None


def test_files_written_and_load_teacher_gives_the_saved_model(trained: dict, world: Path) -> None:
    from kdpipe.data import open_source
    from kdpipe.teachers import load_teacher

    out = Path(trained["config"]).parent
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "open_clip_config.json",
                                                     "train.json"]
    config = json.loads((out / "config.json").read_text())
    assert set(config) == {"name", "model_cfg", "preprocess_cfg"} and config["model_cfg"]["embed_dim"] == 32
    assert config["name"] == "tiny-clip"  # the architecture trained: the teacher's name in kdpipe's output
    assert json.loads((out / "open_clip_config.json").read_text()) == config
    assert json.loads((out / "train.json").read_text())["val"] == trained["val"]

    teacher = load_teacher(str(out / "config.json"), str(out / "model.safetensors"), device="cpu")
    assert teacher.preprocess.size == 32 and teacher.fingerprint["checkpoint_sha256"]
    # the loaded weights reproduce the val metrics the run reported from its in-memory model
    val = pretrain.load_split(open_source(str(world)), "val", 32, "bicubic", teacher.tokenizer)
    metrics = pretrain.evaluate(teacher.model, teacher.tokenizer, val, open_source(str(world)).classnames(),
                                teacher.preprocess.mean, teacher.preprocess.std, torch.device("cpu"), "fp32", 64)
    assert metrics == pytest.approx(trained["val"], abs=1e-9)


def test_save_then_load_teacher_round_trip_is_exact(world: Path, tmp_path: Path) -> None:
    from kdpipe.teachers import load_teacher

    cfg = tiny_cfg(world, tmp_path / "T", steps=3)
    torch.manual_seed(0)
    built = pretrain.build_model(cfg.arch, torch.device("cpu"))
    pretrain.fit(cfg, built, torch.device("cpu"), "fp32")
    pretrain.save_teacher(tmp_path, built.model, built.model_cfg, built.preprocess)
    teacher = load_teacher(str(tmp_path / "config.json"), str(tmp_path / "model.safetensors"), device="cpu")

    x = torch.randn(4, 3, 32, 32)
    captions = ["a red circle on the left", "a photo of a star"]
    built.model.eval()
    with torch.no_grad():
        assert torch.equal(teacher.encode_images(x), built.model.encode_image(x))
        assert torch.allclose(teacher.encode_texts(captions), built.model.encode_text(built.tokenizer(captions)),
                              atol=1e-6)
    assert teacher.logit_scale == pytest.approx(float(built.model.logit_scale.detach().exp()))


def test_reuse_skips_training_and_other_settings_are_refused(trained: dict, world: Path) -> None:
    out = Path(trained["config"]).parent
    before = (out / "model.safetensors").stat().st_mtime_ns
    again = pretrain.run(tiny_cfg(world, out))
    assert again["reused"] and again["val"] == trained["val"]
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="steps"):
        pretrain.run(tiny_cfg(world, out, steps=STEPS + 1))


def test_a_moved_world_is_the_same_world(trained: dict, world: Path, tmp_path: Path) -> None:
    """Identity is the world's content (data_sha256), not where it lies."""
    import shutil

    moved = shutil.copytree(world, tmp_path / "elsewhere")
    again = pretrain.run(tiny_cfg(moved, Path(trained["config"]).parent))
    assert again["reused"] and again["request"]["data_sha256"] == trained["request"]["data_sha256"]


def test_overwrite_retrains(world: Path, tmp_path: Path) -> None:
    first = pretrain.run(tiny_cfg(world, tmp_path / "T", steps=2))
    second = pretrain.run(tiny_cfg(world, tmp_path / "T", steps=3, overwrite=True))
    assert not second["reused"] and second["steps"] == 3 and first["steps"] == 2
    assert json.loads((tmp_path / "T" / "train.json").read_text())["steps"] == 3


# ------------------------------------------------------------------ open_clip's local-dir layout

# Runs in a fresh interpreter that never imports kdpipe: the teacher folder must stand on its own.
OPEN_CLIP_ALONE = """
import json, sys
import open_clip, torch

folder, io = sys.argv[1], sys.argv[2]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
inputs = torch.load(io + "/inputs.pt")
model.eval()
with torch.no_grad():
    tokens = tokenizer(inputs["captions"])
    out = {"image": model.encode_image(inputs["images"]), "text": model.encode_text(tokens), "tokens": tokens,
           "logit_scale": model.logit_scale.exp(), "kdpipe_imported": any(m.startswith("kdpipe") for m in sys.modules)}
crop, norm = preprocess.transforms[1], preprocess.transforms[-1]
out["preprocess"] = {"size": list(crop.size), "mean": list(norm.mean), "std": list(norm.std)}
torch.save(out, io + "/outputs.pt")
"""


def test_teacher_folder_is_an_open_clip_local_dir_model(trained: dict, tmp_path: Path) -> None:
    """open_clip alone (no kdpipe) loads the folder and encodes exactly as kdpipe's load_teacher does."""
    import subprocess
    import sys

    from kdpipe.teachers import load_teacher

    out = Path(trained["config"]).parent
    inputs = {"images": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
              "captions": ["a red circle on the left", "a photo of a star", "two shapes: a ring and a small cross"]}
    torch.save(inputs, tmp_path / "inputs.pt")
    script = tmp_path / "alone.py"
    script.write_text(OPEN_CLIP_ALONE)
    done = subprocess.run([sys.executable, str(script), str(out), str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    theirs = torch.load(tmp_path / "outputs.pt")
    assert theirs["kdpipe_imported"] is False

    ours = load_teacher(str(out / "config.json"), str(out / "model.safetensors"), device="cpu")
    assert torch.equal(theirs["tokens"], ours.tokenize(inputs["captions"]))
    assert (theirs["image"] - ours.encode_images(inputs["images"])).abs().max() <= 1e-5
    assert (theirs["text"] - ours.encode_texts(inputs["captions"])).abs().max() <= 1e-5
    # random weights would agree on tokens but not on these: the trained ones were loaded
    assert float(theirs["logit_scale"]) == pytest.approx(trained["logit_scale"], rel=1e-6)
    assert theirs["preprocess"] == {"size": [32, 32], "mean": pytest.approx(list(ours.preprocess.mean)),
                                    "std": pytest.approx(list(ours.preprocess.std))}


def test_reuse_adds_open_clip_config_to_an_older_teacher(trained: dict, world: Path, tmp_path: Path) -> None:
    """A teacher pretrained before the local-dir layout existed is reused and completed, not retrained."""
    import shutil

    older = Path(shutil.copytree(Path(trained["config"]).parent, tmp_path / "T"))
    (older / "open_clip_config.json").unlink()
    before = (older / "model.safetensors").stat().st_mtime_ns
    again = pretrain.run(tiny_cfg(world, older))
    assert again["reused"] and (older / "model.safetensors").stat().st_mtime_ns == before
    assert json.loads((older / "open_clip_config.json").read_text()) == json.loads((older / "config.json").read_text())


def test_local_dir_teacher_is_the_same_teacher_as_config_and_weights(trained: dict) -> None:
    """``--teacher local-dir:T`` = ``--teacher T/config.json --pretrained T/model.safetensors``: same
    fingerprint (so the caches of one serve the other), same embeddings."""
    from kdpipe.teachers import load_teacher

    out = Path(trained["config"]).parent
    by_files = load_teacher(str(out / "config.json"), str(out / "model.safetensors"), device="cpu")
    by_dir = load_teacher(f"local-dir:{out}", device="cpu")
    assert by_dir.fingerprint == by_files.fingerprint and by_dir.fingerprint["checkpoint_sha256"]
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(by_dir.encode_images(x), by_files.encode_images(x))


def test_a_pretrained_teacher_is_called_by_its_architecture(trained: dict, tmp_path: Path) -> None:
    """config.json records the architecture trained, the name kdpipe shows for the teacher (not the
    kdpipe-config-DIGEST it is registered as); a teacher folder written before has its folder's name,
    and is the same teacher."""
    import shutil

    from kdpipe.store import describe_teacher, same_fingerprint
    from kdpipe.teachers import load_teacher

    out = Path(trained["config"]).parent
    assert json.loads((out / "config.json").read_text())["name"] == "tiny-clip"
    fp = load_teacher(f"local-dir:{out}", device="cpu").fingerprint
    digest, sha = fp["name"].removeprefix("kdpipe-config-"), fp["checkpoint_sha256"]
    assert len(digest) == 12 and describe_teacher(fp) == f"tiny-clip (config {digest}, weights {sha[:12]})"
    older = Path(shutil.copytree(out, tmp_path / "old-teacher"))
    for name in ("config.json", "open_clip_config.json"):
        (older / name).write_text(json.dumps({k: v for k, v in json.loads((out / name).read_text()).items()
                                              if k != "name"}))
    old = load_teacher(str(older / "config.json"), str(older / "model.safetensors"), device="cpu").fingerprint
    assert old["label"] == "old-teacher" and same_fingerprint(old, fp)


def test_local_dir_teacher_refuses_other_weights_and_needs_open_clip_config(trained: dict, tmp_path: Path) -> None:
    from kdpipe.teachers import load_teacher

    out = Path(trained["config"]).parent
    with pytest.raises(ValueError, match="brings its own weights"):
        load_teacher(f"local-dir:{out}", str(out / "model.safetensors"), device="cpu")
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_teacher(f"local-dir:{tmp_path}", device="cpu")


# ------------------------------------------------------------------ CLI


def test_cli_help_and_reuse_message(trained: dict, world: Path) -> None:
    from kdpipe.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["pretrain-teacher", "--help"])
    assert result.exit_code == 0 and "--steps" in result.output and "--arch" in result.output
    out = Path(trained["config"]).parent
    result = runner.invoke(app, ["pretrain-teacher", "--data", str(world), "--out", str(out), "--arch", "tiny-clip",
                                 "--steps", str(STEPS), "--batch-size", "16", "--lr", "2e-3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "reused" in result.output and "R@1" in result.output and "--pretrained" in result.output


def test_cli_defaults_match_the_config_defaults() -> None:
    import inspect

    from kdpipe.cli.cmd_demo import pretrain_teacher

    options = {name: p.default.default for name, p in inspect.signature(pretrain_teacher).parameters.items()
               if p.default is not p.empty}  # not the click context
    defaults = PretrainConfig(data="d", out="o")
    for name in ("arch", "batch_size", "lr", "seed", "device"):
        assert options[name] == getattr(defaults, name), name
    assert options["steps"] is None and defaults.steps == pretrain.DEFAULT_STEPS


def test_cli_bad_arch_lists_valid_names(world: Path, tmp_path: Path) -> None:
    from kdpipe.cli.main import app

    result = CliRunner().invoke(app, ["pretrain-teacher", "--data", str(world), "--out", str(tmp_path / "T"),
                                      "--arch", "no-such-arch"])
    assert result.exit_code == 2
    assert "no-such-arch" in result.output and "shapes-vit" in result.output and "tiny-clip" in result.output
    assert not (tmp_path / "T").exists()


def test_lr_factor_is_the_cosine_to_zero_at_total() -> None:
    """The shared schedule keeps pretraining's own end point: zero at step ``total``, one past the last."""
    warmup, total = 10, 100
    expected = [(s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
                for s in range(total + 1)]
    assert [pretrain.lr_factor(s, warmup, total) for s in range(total + 1)] == pytest.approx(expected, abs=1e-15)
    assert pretrain.lr_factor(total - 1, warmup, total) > 0  # the last step still learns


def test_optimizer_decays_only_matrices() -> None:
    built = pretrain.build_model("tiny-clip", torch.device("cpu"))
    opt = pretrain.make_optimizer(built.model, 1e-3, 0.1)
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    params = dict(built.model.named_parameters())
    assert by_decay[0.1] == {id(p) for p in params.values() if p.ndim >= 2}
    assert id(params["logit_scale"]) in by_decay[0.0] and id(params["ln_final.weight"]) in by_decay[0.0]


# ------------------------------------------------------------------ resume

# val and checkpoints every 8 steps; the loss curve every 5, so a checkpoint holds a partial window; batches of 10
# of 32 images: 3 an epoch, so the checkpoints fall inside an epoch (its permutation must be kept)
RESUME_STEPS = 24


def resume_cfg(world: Path, out: Path, **kw) -> PretrainConfig:
    return tiny_cfg(world, out, steps=RESUME_STEPS, val_every=8, batch_size=10, **kw)


def count_steps(monkeypatch: pytest.MonkeyPatch, stop_at: int | None = None) -> list[int]:
    """Count ``Trainer.step`` calls; the call number ``stop_at`` is killed before it runs."""
    calls, real = [], pretrain.Trainer.step

    def step(self, images, tokens):
        if len(calls) + 1 == stop_at:
            raise KeyboardInterrupt(f"killed before step {stop_at}")
        calls.append(1)
        return real(self, images, tokens)

    monkeypatch.setattr(pretrain.Trainer, "step", step)
    return calls


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("whole") / "T"
    return pretrain.run(resume_cfg(world, out)), out


@pytest.fixture(scope="module")
def interrupted(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher folder whose run was killed during step 20: checkpoints at steps 8 (previous) and 16 (latest)."""
    out = tmp_path_factory.mktemp("killed") / "T"
    with pytest.MonkeyPatch.context() as mp:
        count_steps(mp, stop_at=20)
        with pytest.raises(KeyboardInterrupt):
            pretrain.run(resume_cfg(world, out))
    return out


def copy_of(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "T"))


def test_batches_resume_from_their_state(world: Path) -> None:
    """A feed rebuilt from a checkpoint's position, permutation and generator state draws the same batches."""
    from kdpipe.data import open_source

    built = pretrain.build_model("tiny-clip", torch.device("cpu"))
    data = pretrain.load_split(open_source(str(world)), "train", 32, "bicubic", built.tokenizer)
    feed = pretrain.Batches(data, 12, torch.Generator().manual_seed(0))  # 2 batches an epoch, 8 images dropped
    for _ in range(3):  # mid-epoch 1
        next(feed)
    order, epoch, batch, rng = feed.order.clone(), feed.epoch, feed.batch, feed.generator.get_state()
    assert (epoch, batch) == (1, 1)
    expected = [next(feed) for _ in range(5)]
    again = pretrain.Batches(data, 12, torch.Generator().manual_seed(123))
    again.generator.set_state(rng)
    again.order, again.epoch, again.batch = order, epoch, batch
    for (idx, rows), (idx2, rows2) in zip(expected, [next(again) for _ in range(5)]):
        assert torch.equal(idx, idx2) and torch.equal(rows, rows2)
    assert again.epoch == 3


def test_killed_run_leaves_checkpoints_and_no_train_json(interrupted: Path) -> None:
    assert not (interrupted / "train.json").exists()
    state = torch.load(interrupted / "checkpoints" / "latest.pt", weights_only=True)
    previous = torch.load(interrupted / "checkpoints" / "previous.pt", weights_only=True)
    assert state["position"] == {"epoch": 5, "batch": 1, "step": 16} and previous["position"]["step"] == 8
    assert [r["step"] for r in state["loop"]["val_curve"]] == [8, 16]
    assert [r["step"] for r in state["loop"]["curve"]] == [5, 10, 15] and len(state["loop"]["window"]) == 1


def test_resumed_run_equals_the_uninterrupted_one(uninterrupted: tuple[dict, Path], interrupted: Path,
                                                  world: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    whole, whole_dir = uninterrupted
    out = copy_of(interrupted, tmp_path)
    calls = count_steps(monkeypatch)
    with caplog.at_level("INFO", logger="kdpipe"):
        resumed = pretrain.run(resume_cfg(world, out))
    assert len(calls) == RESUME_STEPS - 16 and "resuming from step 16 of 24" in caplog.text
    assert resumed["resumed_from"] == 16 and whole["resumed_from"] is None
    ours, theirs = weights(out), weights(whole_dir)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert resumed["loss_curve"] == whole["loss_curve"] and resumed["val_curve"] == whole["val_curve"]
    assert resumed["val"] == whole["val"] and resumed["logit_scale"] == whole["logit_scale"]
    # complete: the checkpoints are gone, and the teacher is reused as before
    assert not (out / "checkpoints").exists() and not (whole_dir / "checkpoints").exists()
    assert pretrain.run(resume_cfg(world, out))["reused"] and len(calls) == RESUME_STEPS - 16


def test_sigusr1_checkpoints_the_step_and_rerunning_the_command_ends_like_an_uninterrupted_run(
        uninterrupted: tuple[dict, Path], world: Path, tmp_path: Path, monkeypatch) -> None:
    """SIGUSR1 (a scheduler's early notice) during step 11: checkpoint at 11, exit 0, the same command resumes."""
    from kdpipe.cli.main import app

    whole, whole_dir = uninterrupted
    out = tmp_path / "T"
    args = ["pretrain-teacher", "--data", str(world), "--out", str(out), "--arch", "tiny-clip", "--steps",
            str(RESUME_STEPS), "--batch-size", "10", "--lr", "0.002", "--val-every", "8", "--device", "cpu"]
    calls, real = [], pretrain.Trainer.step

    def step(self, images, tokens):
        calls.append(1)
        if len(calls) == 11:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(self, images, tokens)

    with monkeypatch.context() as mp:
        mp.setattr(pretrain.Trainer, "step", step)
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and len(calls) == 11, result.output
    assert (f"stopped by SIGUSR1 after step 11 of {RESUME_STEPS}, checkpoint saved in {out / 'checkpoints'}; "
            "re-run the same command to resume") in result.output
    assert trainstate.read_checkpoint(out / "checkpoints" / "latest.pt")["position"]["step"] == 11
    assert trainstate.read_checkpoint(out / "checkpoints" / "previous.pt")["position"]["step"] == 8
    assert not (out / "train.json").exists() and not (out / "model.safetensors").exists()

    calls = count_steps(monkeypatch)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and len(calls) == RESUME_STEPS - 11, result.output
    summary = json.loads((out / "train.json").read_text())
    assert summary["resumed_from"] == 11 and summary["val"] == whole["val"]
    ours, theirs = weights(out), weights(whole_dir)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_unreadable_latest_checkpoint_resumes_from_the_previous_one(uninterrupted: tuple[dict, Path],
                                                                     interrupted: Path, world: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    out = copy_of(interrupted, tmp_path)
    latest = out / "checkpoints" / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # killed while writing it (rename makes this unlikely, not impossible)
    calls = count_steps(monkeypatch)
    resumed = pretrain.run(resume_cfg(world, out))
    assert len(calls) == RESUME_STEPS - 8 and resumed["resumed_from"] == 8
    whole, whole_dir = uninterrupted
    assert all(torch.equal(a, b) for a, b in zip(weights(out).values(), weights(whole_dir).values()))
    assert resumed["loss_curve"] == whole["loss_curve"] and resumed["val_curve"] == whole["val_curve"]


def test_other_request_on_an_unfinished_teacher_is_refused_until_overwrite(interrupted: Path, world: Path,
                                                                         tmp_path: Path, monkeypatch) -> None:
    out = copy_of(interrupted, tmp_path)
    with pytest.raises(FileExistsError, match=r"unfinished.*\(lr, seed differ\).*--overwrite to start over"):
        pretrain.run(resume_cfg(world, out, lr=1e-3, seed=1))
    assert (out / "checkpoints" / "latest.pt").exists()  # refused: nothing touched
    calls = count_steps(monkeypatch)
    summary = pretrain.run(tiny_cfg(world, out, steps=3, overwrite=True))
    assert len(calls) == 3 and summary["resumed_from"] is None and summary["steps"] == 3
    assert not (out / "checkpoints").exists()


def test_interrupted_overwrite_leaves_a_resumable_run_not_the_old_teacher(trained: dict, world: Path,
                                                                          tmp_path: Path, monkeypatch) -> None:
    """Once an --overwrite run has checkpointed, the folder is that run's: re-running it resumes."""
    out = copy_of(Path(trained["config"]).parent, tmp_path)
    with monkeypatch.context() as mp:
        count_steps(mp, stop_at=10)
        with pytest.raises(KeyboardInterrupt):
            pretrain.run(resume_cfg(world, out, overwrite=True))
    assert not (out / "train.json").exists()
    calls = count_steps(monkeypatch)
    assert pretrain.run(resume_cfg(world, out))["resumed_from"] == 8 and len(calls) == RESUME_STEPS - 8


def test_checkpoint_every_defaults_and_zero_disables(world: Path, tmp_path: Path, monkeypatch) -> None:
    assert pretrain.checkpoint_steps(PretrainConfig(data="d", out="o", steps=3000)) == 300
    assert pretrain.checkpoint_steps(PretrainConfig(data="d", out="o", steps=3000, val_every=250)) == 250
    assert pretrain.checkpoint_steps(PretrainConfig(data="d", out="o", val_every=250, checkpoint_every=100)) == 100
    count_steps(monkeypatch, stop_at=20)
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(resume_cfg(world, tmp_path / "T", checkpoint_every=0))
    assert not (tmp_path / "T" / "checkpoints").exists()
