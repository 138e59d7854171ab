"""Student registries: every entry builds, runs forward/backward, round-trips through save/load."""

from __future__ import annotations

import json
import logging

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from kdpipe.students import (
    STUDENTS,
    TEXT_STUDENTS,
    ImageStudent,
    build_student,
    build_text_student,
    load_student,
    precise_bn,
    save_student,
    save_weights,
    write_spec,
)

D = 24  # teacher embed dim used throughout (small, not a multiple of any backbone width)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread


def _unique(registry) -> list[str]:
    """One name per builder (aliases such as mobilenetv3_small share mobilenetv3's builder)."""
    seen, names = set(), []
    for name in registry.names():
        builder = registry.get(name)
        if builder not in seen:
            seen.add(builder)
            names.append(name)
    return names


IMAGE_NAMES = _unique(STUDENTS)
TEXT_NAMES = _unique(TEXT_STUDENTS)
HEAVY = {"resnet50", "efficientnet_b0", "mobilevit_s", "resnet34", "mobilenetv3_large"}


def _images(name: str, size: int = 64, seed: int = 0) -> torch.Tensor:
    batch = 2 if name in HEAVY else 4
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_registries_hold_the_designed_students():
    expected = {"mobilenetv3", "mobilenetv3_small", "mobilenetv3_large", "resnet18", "resnet34", "resnet50",
                "efficientnet_b0", "vit_tiny", "mobilevit_s", "tiny", "mobilenetv3_050"}
    assert expected <= set(STUDENTS.names())
    assert STUDENTS.get("mobilenetv3") is STUDENTS.get("mobilenetv3_small")
    assert {"text_tiny", "text_small"} <= set(TEXT_STUDENTS.names())


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_image_student_forward_backward_every_param_gets_grad(name):
    torch.manual_seed(0)
    student = build_student(name, embed_dim=D, image_size=64).train()
    x = _images(name)
    out = student(x)
    assert out.shape == (x.shape[0], D)
    assert torch.isfinite(out).all()
    out.pow(2).sum().backward()
    no_grad = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []  # no exceptions needed: every parameter of every entry is used
    bad = [n for n, p in student.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert bad == []
    assert student.mask_kind == ("patch" if name == "vit_tiny" else "block")
    assert student.patch_size > 0


@pytest.mark.parametrize("name", TEXT_NAMES)
def test_text_student_forward_backward_every_param_gets_grad(name):
    torch.manual_seed(0)
    student = build_text_student(name, embed_dim=D)
    tokens = student.tokenize(["a red circle at the top left", "two small blue squares"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    out = student(tokens)
    assert out.shape == (2, D) and torch.isfinite(out).all()
    out.pow(2).sum().backward()
    assert [n for n, p in student.named_parameters() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())


def test_text_trimming_matches_the_full_open_clip_tower():
    torch.manual_seed(0)
    student = build_text_student("text_tiny", embed_dim=D).eval()
    # "!" is a real token mid-caption; trimming must follow EOT, not the non-zero count
    tokens = student.tokenize(["wow! a big green triangle!", "a dot", "one two three four five six seven"])
    with torch.no_grad():
        trimmed = student(tokens)
        full = student.tower(tokens)  # open_clip's own forward over all 77 positions
        one_by_one = torch.cat([student(t[None]) for t in tokens])
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_by_one, full, atol=1e-5, rtol=1e-5)


def test_text_context_length_is_a_builder_kwarg():
    student = build_text_student("text_tiny", embed_dim=D, context_length=16)
    tokens = student.tokenize(["a " * 40])
    assert tokens.shape == (1, 16) and tokens[0, -1] == tokens.max()  # truncated, EOT kept
    assert student(tokens).shape == (1, D)


def test_vit_tiny_dynamic_size_and_patch_size():
    student = build_student("vit_tiny", embed_dim=D, image_size=32, patch_size=8)
    assert student.patch_size == 8
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, D)
    assert student(torch.randn(2, 3, 48, 48)).shape == (2, D)  # position embeddings interpolated


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_save_load_round_trip_gives_identical_outputs(tmp_path, name):
    torch.manual_seed(0)
    image = build_student(name, embed_dim=D, image_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    text = build_text_student("text_tiny", embed_dim=D) if name == "tiny" else None
    x = _images(name)
    image.train()(x)  # move BN running stats off their initial values so buffers are tested too
    image.eval()
    meta = {"teacher": {"name": "ViT-T", "embed_dim": D}, "whitening": None}
    save_student(tmp_path, image, text, meta)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["student-last.safetensors", "student.json"]
    spec = json.loads((tmp_path / "student.json").read_text())
    assert spec["image"]["name"] == name and spec["embed_dim"] == D and spec["image_size"] == 64
    assert spec["mean"] == [0.5] * 3 and spec["teacher"] == meta["teacher"]
    assert spec["checkpoints"]["last"]["file"] == spec["checkpoints"]["best"]["file"] == "student-last.safetensors"
    assert spec["checkpoints"]["best"]["same_as"] == "last"  # nothing chose a best: said so

    image2, text2, meta2 = load_student(tmp_path)
    assert not image2.training and image2.mean == (0.5, 0.5, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(image2(x), image(x), rtol=0, atol=0)
    assert meta2["teacher"] == meta["teacher"]
    if text is None:
        assert text2 is None
    else:
        tokens = text.tokenize(["a red circle"])
        with torch.no_grad():
            torch.testing.assert_close(text2(tokens), text(tokens), rtol=0, atol=0)


def test_save_load_keeps_builder_kwargs(tmp_path):
    image = build_student("vit_tiny", embed_dim=D, image_size=32, patch_size=8)
    save_student(tmp_path, image, None, {})
    image2, _, _ = load_student(tmp_path)
    assert image2.patch_size == 8 and image2.image_size == 32


def test_save_student_refuses_meta_that_overrides_its_keys(tmp_path):
    with pytest.raises(ValueError, match="embed_dim"):
        save_student(tmp_path, build_student("tiny", embed_dim=D, image_size=32), None, {"embed_dim": 3})


def _constant_student(value: float) -> ImageStudent:
    image = build_student("tiny", embed_dim=D, image_size=32)
    with torch.no_grad():
        for p in image.parameters():
            p.fill_(value)
    return image.eval()


def test_best_and_last_weights_load_by_name(tmp_path):
    best, last = _constant_student(0.5), _constant_student(-0.25)
    files = {"best": save_weights(tmp_path, best, None, "best"), "last": save_weights(tmp_path, last, None, "last")}
    assert files == {"best": "student-best.safetensors", "last": "student-last.safetensors"}
    write_spec(tmp_path, last, None, {}, {"best": {"file": files["best"], "step": 3},
                                          "last": {"file": files["last"], "step": 9}})
    x = torch.randn(2, 3, 32, 32)
    default, _, spec = load_student(tmp_path)
    assert spec["checkpoint"] == {"name": "best", "file": "student-best.safetensors", "step": 3}
    with torch.no_grad():
        torch.testing.assert_close(default(x), best(x), rtol=0, atol=0)
        loaded_last, _, spec = load_student(tmp_path, checkpoint="last")
        torch.testing.assert_close(loaded_last(x), last(x), rtol=0, atol=0)
    assert spec["checkpoint"]["step"] == 9
    with pytest.raises(ValueError, match="unknown checkpoint 'final'; valid: best, last"):
        load_student(tmp_path, checkpoint="final")
    (tmp_path / files["best"]).unlink()
    with pytest.raises(FileNotFoundError, match="student-best.safetensors"):
        load_student(tmp_path)


def test_a_legacy_run_with_one_weights_file_loads_as_last_with_a_warning(tmp_path, caplog):
    image = _constant_student(0.5)
    save_student(tmp_path, image, None, {})
    spec = json.loads((tmp_path / "student.json").read_text())
    del spec["checkpoints"]
    spec["step"] = 7
    (tmp_path / "student.json").write_text(json.dumps(spec))
    (tmp_path / "student-last.safetensors").rename(tmp_path / "student.safetensors")
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        loaded, _, spec = load_student(tmp_path)
    assert "last weights" in caplog.text
    assert spec["checkpoint"]["file"] == "student.safetensors" and spec["checkpoint"]["step"] == 7
    assert spec["checkpoint"]["same_as"] == "last"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), image(x), rtol=0, atol=0)


def test_load_student_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="student.json"):
        load_student(tmp_path)


def test_bad_names_list_the_valid_ones():
    with pytest.raises(KeyError, match="resnet18"):
        build_student("resnet19", embed_dim=D, image_size=64)
    with pytest.raises(KeyError, match="text_tiny"):
        build_text_student("text_huge", embed_dim=D)


# --------------------------------------------------------------------------- init checkpoints


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_init_checkpoint_loads_backbone_and_reports_leftovers(tmp_path, fmt, caplog):
    torch.manual_seed(1)
    source = build_student("tiny", embed_dim=D, image_size=32)
    state = {k: v.clone() for k, v in source.backbone.state_dict().items()}
    state["classifier.weight"] = torch.randn(10, 64)  # an ImageNet head: expected, skipped
    path = tmp_path / f"imagenet.{fmt}"
    if fmt == "pt":
        torch.save({"state_dict": state}, path)
    else:
        save_file(state, str(path))
    torch.manual_seed(2)
    with caplog.at_level(logging.INFO, logger="kdpipe"):
        student = build_student("tiny", embed_dim=D, image_size=32, init_checkpoint=str(path))
    for k, v in source.backbone.state_dict().items():
        torch.testing.assert_close(student.backbone.state_dict()[k], v)
    assert "unexpected 1" in caplog.text and "classifier.weight" in caplog.text


def test_init_checkpoint_matching_nothing_is_an_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="matches no parameter"):
        build_student("tiny", embed_dim=D, image_size=32, init_checkpoint=str(path))
    with pytest.raises(FileNotFoundError):
        build_student("tiny", embed_dim=D, image_size=32, init_checkpoint=str(tmp_path / "absent.pt"))


# --------------------------------------------------------------------------- precise BN


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# tolerance: running_var is the unbiased variance, the train-mode forward divides by the biased
# one; with n = 2·2·32 values per channel in MobileNetV3's last layers at 64 px that differs by
# ~0.8% per layer and compounds over 34 BN layers (measured on timm's mobilenetv3_small_100:
# 0.148 at batch 32; torchvision's gave 0.09; tiny = timm test_efficientnet, 13 BN layers: 0.054
# from two half-batches, 0.027 whole). test_precise_bn_is_exact_up_to_the_unbiased_variance
# shows that this is the whole difference.
@pytest.mark.parametrize("name, halves, tol", [("tiny", 2, 0.08), ("mobilenetv3", 1, 0.2)])
def test_precise_bn_makes_eval_outputs_match_batch_statistics(name, halves, tol):
    torch.manual_seed(0)
    student = build_student(name, embed_dim=D, image_size=64)
    # inputs far from the initial running stats (mean 0, var 1), like real data after training
    x = 3.0 * torch.rand(32, 3, 64, 64) + 1.0
    with torch.no_grad():
        batch_stats = student.train()(x)
        before = student.eval()(x)
    assert _rel_err(before, batch_stats) > 3 * tol  # stale running stats: eval output is off

    momenta = [m.momentum for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    student.train()
    used = precise_bn(student, list(x.chunk(halves)), max_samples=32)
    assert used == 32
    assert student.training  # mode restored
    assert [m.momentum for m in student.modules() if isinstance(m, nn.BatchNorm2d)] == momenta
    with torch.no_grad():
        after = student.eval()(x)
    # equal up to BN's unbiased-vs-biased variance (and, for tiny, the half-batches' averaging;
    # deep nets compound per-batch differences, so mobilenetv3 is fed the batch whole)
    assert _rel_err(after, batch_stats) < tol
    first_bn = next(m for m in student.modules() if isinstance(m, nn.BatchNorm2d))
    first_conv = next(m for m in student.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        torch.testing.assert_close(first_bn.running_mean, first_conv(x).mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_precise_bn_is_exact_up_to_the_unbiased_variance():
    torch.manual_seed(0)
    student = build_student("mobilenetv3", embed_dim=D, image_size=64)
    x = 3.0 * torch.rand(32, 3, 64, 64) + 1.0
    with torch.no_grad():
        batch_stats = student.train()(x)
    precise_bn(student, [x], max_samples=32)
    values_per_channel = {}  # n = B·H·W at each BN: running_var holds var·n/(n-1)

    def record(bn: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        values_per_channel[bn] = inputs[0].numel() // inputs[0].shape[1]

    hooks = [bn.register_forward_hook(record) for bn in student.modules() if isinstance(bn, nn.BatchNorm2d)]
    with torch.no_grad():
        student.eval()(x)
        for bn, n in values_per_channel.items():
            bn.running_var.mul_((n - 1) / n)
        biased = student(x)
    for hook in hooks:
        hook.remove()
    assert _rel_err(biased, batch_stats) < 1e-4


def test_precise_bn_respects_max_samples_and_no_bn_models():
    student = build_student("tiny", embed_dim=D, image_size=32)
    batches = (torch.randn(8, 3, 32, 32) for _ in range(100))  # a long stream: must stop early
    assert precise_bn(student, batches, max_samples=20) == 20
    bn = next(m for m in student.modules() if isinstance(m, nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 3  # 8 + 8 + 4
    vit = build_student("vit_tiny", embed_dim=D, image_size=32)
    assert precise_bn(vit, [torch.randn(2, 3, 32, 32)]) == 0


def test_precise_bn_without_batches_keeps_old_stats():
    student = build_student("tiny", embed_dim=D, image_size=32)
    student.train()(torch.rand(4, 3, 32, 32) + 2)
    bn = next(m for m in student.modules() if isinstance(m, nn.BatchNorm2d))
    old = bn.running_mean.clone()
    with pytest.raises(ValueError, match="no batches"):
        precise_bn(student, [])
    torch.testing.assert_close(bn.running_mean, old)


# --------------------------------------------------------------------------- timm towers


def _as_timm_classifier(image: ImageStudent, **create_kwargs) -> nn.Module:
    """The student rebuilt from its timm description: its projection becomes the timm classifier."""
    model = timm.create_model(image.timm_name, pretrained=False, num_classes=image.embed_dim,
                              global_pool=image.global_pool, **image.timm_kwargs, **create_kwargs)
    classifier = model.pretrained_cfg["classifier"]
    state = {k.removeprefix("backbone."): v for k, v in image.state_dict().items() if k.startswith("backbone.")}
    state.update({f"{classifier}.{k.removeprefix('proj.')}": v for k, v in image.state_dict().items()
                  if k.startswith("proj.")})
    model.load_state_dict(state)  # strict: the names and shapes must all fit
    return model.eval()


@pytest.mark.parametrize("name", [n for n in IMAGE_NAMES if n not in HEAVY])
def test_every_student_is_a_timm_model_with_its_projection_as_classifier(name):
    torch.manual_seed(0)
    image = build_student(name, embed_dim=D, image_size=64)
    image.train()(_images(name))  # BN running stats off their initial values
    image.eval()
    assert image.timm_name is not None and image.global_pool in ("avg", "token")
    x = _images(name, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(_as_timm_classifier(image)(x), image(x), rtol=1e-5, atol=1e-5)


def test_backbone_describes_its_timm_build():
    vit = build_student("vit_tiny", embed_dim=D, image_size=32, patch_size=8)
    assert (vit.timm_name, vit.global_pool) == ("vit_tiny_patch16_224", "token")
    assert vit.timm_kwargs == {"img_size": 32, "patch_size": 8, "dynamic_img_size": True}
    mobilenet = build_student("mobilenetv3", embed_dim=D, image_size=64)
    assert (mobilenet.timm_name, mobilenet.timm_kwargs, mobilenet.global_pool) == ("mobilenetv3_small_100", {}, "avg")
    assert mobilenet.feature_dim == 1024  # timm keeps MobileNetV3's conv_head: 576 pooled -> 1024


def test_any_timm_model_is_a_student_and_round_trips(tmp_path):
    torch.manual_seed(0)
    # kwargs go to timm.create_model; without a dynamic size, test_vit's 160 px input is fixed:
    # the student is built at the run's image size
    image = build_student("timm:test_vit", embed_dim=D, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3,
                          dynamic_img_size=False)
    assert (image.mask_kind, image.patch_size, image.timm_name) == ("patch", 16, "test_vit")
    assert image.timm_kwargs == {"dynamic_img_size": False, "img_size": 32}
    x = torch.randn(2, 3, 32, 32)
    out = image.eval()(x)
    assert out.shape == (2, D) and torch.isfinite(out).all()
    save_student(tmp_path, image, None, {})
    spec = json.loads((tmp_path / "student.json").read_text())
    assert spec["image"]["name"] == "timm:test_vit" and spec["image"]["kwargs"] == {"dynamic_img_size": False}
    assert spec["image"]["timm"] == {"name": "test_vit", "kwargs": image.timm_kwargs, "global_pool": "token"}
    loaded, _, _ = load_student(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), image(x), rtol=0, atol=0)
    cnn = build_student("timm:test_resnet", embed_dim=D, image_size=32)
    assert (cnn.mask_kind, cnn.patch_size, cnn.feature_dim) == ("block", 32, 96)


def test_unknown_timm_model_says_how_to_find_names():
    with pytest.raises(KeyError) as err:
        build_student("timm:mobilenetv9", embed_dim=D, image_size=64)
    assert err.value.args[0].startswith("unknown timm model 'mobilenetv9'")
    assert "timm.list_models('*mobilenet*')" in err.value.args[0]
    with pytest.raises(KeyError) as err:  # a registry miss points at the timm prefix too
        build_student("mobilenetv9", embed_dim=D, image_size=64)
    assert "resnet18" in err.value.args[0] and "timm:NAME" in err.value.args[0]


def test_init_checkpoint_of_a_timm_imagenet_model(tmp_path, caplog):
    torch.manual_seed(1)
    imagenet = timm.create_model("test_efficientnet", pretrained=False, num_classes=10)  # with its classifier
    path = tmp_path / "imagenet.safetensors"
    save_file(imagenet.state_dict(), str(path))
    torch.manual_seed(2)
    with caplog.at_level(logging.INFO, logger="kdpipe"):
        student = build_student("timm:test_efficientnet", embed_dim=D, image_size=32, init_checkpoint=str(path))
    own = student.backbone.state_dict()
    assert set(own) == set(imagenet.state_dict()) - {"classifier.weight", "classifier.bias"}
    for k, v in own.items():
        torch.testing.assert_close(v, imagenet.state_dict()[k], rtol=0, atol=0)
    assert "unexpected 2" in caplog.text and "classifier.weight" in caplog.text


def test_a_run_from_before_the_timm_students_is_refused_with_what_to_do(tmp_path):
    """student.json without "image.timm" and torchvision-shaped weights: a message, not a state-dict dump."""
    import torchvision  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    student = build_student("mobilenetv3", 16, 32)
    save_student(tmp_path, student, None, {})
    spec = json.loads((tmp_path / "student.json").read_text())
    del spec["image"]["timm"]
    (tmp_path / "student.json").write_text(json.dumps(spec))
    old = torchvision.models.mobilenet_v3_small(weights=None)
    old.classifier = nn.Identity()
    weights = {f"image.backbone.{k}": v for k, v in old.state_dict().items()}
    weights.update({k: v for k, v in load_file(str(tmp_path / spec["checkpoints"]["last"]["file"])).items()
                    if k.startswith("image.proj")})
    for entry in spec["checkpoints"].values():
        save_file(weights, str(tmp_path / entry["file"]))
    with pytest.raises(ValueError, match="older kdpipe.*torchvision.*Retrain"):
        load_student(tmp_path)
