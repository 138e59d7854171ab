"""kdpipe export: the exported open_clip / timm / ONNX models compute the student's embeddings without kdpipe.

A run is made directly with ``students.save_student`` (random weights: the export must copy whatever
the weights are; training is tested elsewhere), with the tiny-clip teacher's real fingerprint. The
reference side is computed here with kdpipe; the exported files are loaded in a subprocess that
never imports kdpipe.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdpipe import export
from kdpipe.cli.main import app
from kdpipe.export import ExportConfig, ExportError
from kdpipe.students import build_student, build_text_student, save_student
from kdpipe.targetspace import Targets, save_whitening
from kdpipe.teachers import load_teacher

DIM, SIZE = 32, 32  # tiny-clip: 32-dim embeddings, 32 px input
CAPTIONS = ["a red circle", "two blue squares on a white background", "a photo of a cat."]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("tiny-clip", None)


def _randomise(module: torch.nn.Module) -> None:
    """Non-trivial weights and BN statistics, so a mis-copied tensor shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith("running_var") else torch.randn_like(t) * 0.1 + t)


def make_run(path: Path, teacher, image: str = "mobilenetv3_050", text: str | None = None, **meta) -> Path:
    student = build_student(image, DIM, SIZE, mean=teacher.preprocess.mean, std=teacher.preprocess.std)
    _randomise(student)
    text_student = build_text_student(text, DIM) if text else None
    if text_student is not None:
        _randomise(text_student)
    save_student(path, student.eval(), text_student, {"teacher": teacher.fingerprint, "cache": "unused", **meta})
    return path


def without_kdpipe(script: str, **files: Path) -> dict:
    """Run ``script`` in a fresh interpreter that must not import kdpipe; returns the JSON it prints."""
    prelude = "import json, sys, torch\n" + "".join(f"{k} = {str(v)!r}\n" for k, v in files.items())
    check = "\nassert 'kdpipe' not in sys.modules, 'kdpipe was imported'\n"
    done = subprocess.run([sys.executable, "-c", prelude + script + check], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


OPEN_CLIP_SCRIPT = """
import open_clip, timm
import torch.nn.functional as F
ref = torch.load(REF)
model, _, preprocess = open_clip.create_model_and_transforms('local-dir:' + OUT)
model.eval()
tokens = open_clip.get_tokenizer('local-dir:' + OUT)(ref['captions'])
with torch.no_grad():
    img, txt = model.encode_image(ref['x']), model.encode_text(tokens)
    tm = timm.create_model('local-dir:' + OUT + '/timm', pretrained=True).eval()
    t_img = tm(ref['x'])
cfg = timm.data.resolve_data_config({}, model=tm)
cos = lambda a, b: float(F.cosine_similarity(a, b, dim=-1).min())
print(json.dumps({'image': cos(img, ref['image']), 'text': cos(txt, ref['text']), 'timm': cos(t_img, ref['image']),
                  'image_abs': float((img - ref['image']).abs().max()), 'tokens_equal': bool((tokens == ref['tokens']).all()),
                  'logit_scale': float(model.logit_scale.exp()), 'size': list(preprocess.transforms[1].size),
                  'timm_input': list(cfg['input_size']), 'timm_mean': list(cfg['mean'])}))
"""


def _reference(tmp: Path, image: torch.Tensor, text: torch.Tensor, tokens: torch.Tensor, x: torch.Tensor) -> Path:
    ref = tmp / "ref.pt"
    torch.save({"x": x, "image": image, "text": text, "tokens": tokens, "captions": CAPTIONS}, ref)
    return ref


def test_open_clip_and_timm_match_the_student_and_teacher_without_kdpipe(teacher, tmp_path):
    run = make_run(tmp_path / "run", teacher)
    out = tmp_path / "export"
    result = export.run(ExportConfig(run=str(run), out=str(out), format="open_clip"))
    export.run(ExportConfig(run=str(run), out=str(out), format="timm"))
    assert {Path(f).name for f in result["files"]} == {"open_clip_config.json", "open_clip_model.safetensors", "README.md"}
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == "mobilenetv3_small_050"
    assert config["model_cfg"]["text_cfg"] == export.open_clip.get_model_config("tiny-clip")["text_cfg"]

    from kdpipe.students import load_student
    student, _, _ = load_student(run)
    x = torch.randn(3, 3, SIZE, SIZE)
    tokens = teacher.tokenize(CAPTIONS)
    with torch.no_grad():
        ref = _reference(tmp_path, student(x), teacher.encode_tokens(tokens, trim=False), tokens, x)
    got = without_kdpipe(OPEN_CLIP_SCRIPT, REF=ref, OUT=out)
    assert got["image"] >= 0.9999 and got["timm"] >= 0.9999 and got["text"] >= 0.9999, got
    assert got["image_abs"] < 1e-4 and got["tokens_equal"]
    assert got["logit_scale"] == pytest.approx(teacher.logit_scale, rel=1e-5)
    assert got["size"] == [SIZE, SIZE] and got["timm_input"] == [3, SIZE, SIZE]
    assert got["timm_mean"] == pytest.approx(list(teacher.preprocess.mean))


TEXT_SCRIPT = """
import open_clip
import torch.nn.functional as F
ref = torch.load(REF)
model, _, _ = open_clip.create_model_and_transforms('local-dir:' + OUT)
tokens = open_clip.get_tokenizer('local-dir:' + OUT)(ref['captions'])
with torch.no_grad():
    txt, img = model.eval().encode_text(tokens), model.encode_image(ref['x'])
print(json.dumps({'text': float(F.cosine_similarity(txt, ref['text'], dim=-1).min()),
                  'image': float(F.cosine_similarity(img, ref['image'], dim=-1).min())}))
"""


def test_text_student_is_the_exported_text_tower(teacher, tmp_path):
    run = make_run(tmp_path / "run", teacher, text="text_tiny")
    out = tmp_path / "export"
    export.run(ExportConfig(run=str(run), out=str(out), format="open_clip"))
    from kdpipe.students import load_student
    image, text, _ = load_student(run)
    x, tokens = torch.randn(2, 3, SIZE, SIZE), text.tokenize(CAPTIONS)
    with torch.no_grad():
        ref = _reference(tmp_path, image(x), text(tokens), tokens, x)
    got = without_kdpipe(TEXT_SCRIPT, REF=ref, OUT=out)
    assert got["text"] >= 0.9999 and got["image"] >= 0.9999, got


@pytest.mark.skipif(not (export.importlib.util.find_spec("onnxruntime") and export.importlib.util.find_spec("onnx")),
                    reason="needs kdpipe[onnx]")
def test_onnx_image_and_text_towers_have_documented_names(teacher, tmp_path):
    import onnxruntime as ort

    run = make_run(tmp_path / "run", teacher, text="text_tiny")
    files = export.run(ExportConfig(run=str(run), out=str(tmp_path / "out"), format="onnx"))["files"]
    names = {}
    for path in files[:-1]:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        names[Path(path).name] = (session.get_inputs()[0].name, session.get_outputs()[0].name)
    assert names == {"image_encoder.onnx": ("image", "image_embeds"), "text_encoder.onnx": ("text", "text_embeds")}


def test_non_timm_student_is_refused_with_what_works(teacher, tmp_path, monkeypatch):
    """Every shipped student is a timm tower; a registered plain nn.Module exports to ONNX only."""
    from kdpipe.students import STUDENTS, Backbone  # noqa: PLC0415

    def plain_conv(image_size: int) -> Backbone:
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        return Backbone(net, 8, mask_kind="block", patch_size=2)

    monkeypatch.setitem(STUDENTS._entries, "plain_conv", plain_conv)
    run = make_run(tmp_path / "run", teacher, image="plain_conv")
    with pytest.raises(ExportError, match="'plain_conv'.*not a timm model.*--format onnx"):
        export.run(ExportConfig(run=str(run), out=str(tmp_path / "out"), format="timm"))


def test_timm_arguments_open_clip_cannot_pass_are_refused(teacher, tmp_path):
    student = build_student("vit_tiny", DIM, SIZE, patch_size=8)
    save_student(tmp_path / "vit", student, None, {"teacher": teacher.fingerprint, "cache": "unused"})
    with pytest.raises(ExportError, match="patch_size.*--format timm"):
        export.run(ExportConfig(run=str(tmp_path / "vit"), out=str(tmp_path / "out"), format="open_clip"))


def test_whitened_run_is_refused_for_open_clip_and_timm(teacher, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    w = (torch.linalg.qr(torch.randn(DIM, DIM))[0] * 2).contiguous()
    targets = Targets("image", {"image": {"mu": torch.randn(DIM), "W": w, "W_inv": torch.linalg.inv(w).contiguous(),
                                          "scale": torch.tensor(3.0)}})
    whitening = save_whitening(run_dir, targets)
    make_run(run_dir, teacher, whitening=whitening)
    for fmt in ("open_clip", "timm", "all"):
        with pytest.raises(ExportError, match="whitened targets .image.*not linear.*--format onnx"):
            export.run(ExportConfig(run=str(run_dir), out=str(tmp_path / "out"), format=fmt))
    if export.importlib.util.find_spec("onnxruntime") is None:
        return
    import onnxruntime as ort  # ONNX holds the exact map back: its outputs are the evaluator's

    from kdpipe.students import load_student
    from kdpipe.targetspace import to_teacher_space
    export.run(ExportConfig(run=str(run_dir), out=str(tmp_path / "out"), format="onnx"))
    image, _, _ = load_student(run_dir)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        want = to_teacher_space(image(x), targets.params["image"])
    session = ort.InferenceSession(str(tmp_path / "out" / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    assert (got - want).abs().max() < 1e-4 and torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_teacher_from_a_local_file_needs_pretrained(teacher):
    fp = {**teacher.fingerprint, "checkpoint_sha256": "a" * 64}
    with pytest.raises(ExportError, match="tiny-clip.*local weights file.*--pretrained FILE"):
        export.teacher_for_text(fp, None, None)
    with pytest.raises(ExportError, match="model-config JSON.*--teacher-config"):
        export.teacher_for_text({**teacher.fingerprint, "name": "kdpipe-config-0123456789ab"}, None, None)


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "hub unreachable"])
def test_teacher_tag_not_cached_offline_names_the_tag_and_pretrained_file(teacher, tmp_path, monkeypatch, offline):
    """A run distilled from an open_clip tag whose weights are not on this machine: refused at once, nothing downloaded."""
    from kdpipe import weights  # noqa: PLC0415

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(weights, "_reachable", lambda url, timeout=3.0: False)
    downloads = []
    monkeypatch.setattr(weights.open_clip, "download_pretrained", lambda *a, **k: downloads.append(a))
    run = tmp_path / "run"
    save_student(run, build_student("mobilenetv3_050", DIM, SIZE), None, {
        "teacher": {**teacher.fingerprint, "name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}, "cache": "unused"})
    with pytest.raises(ExportError, match=r"teacher ViT-B-32 weights 'laion2b_s34b_b79k'.*--pretrained FILE"):
        export.run(ExportConfig(run=str(run), out=str(tmp_path / "out"), format="open_clip"))
    assert downloads == [] and not (tmp_path / "out" / export.OPEN_CLIP_WEIGHTS).exists()


def test_model_card_says_what_was_not_measured(teacher, tmp_path):
    run = make_run(tmp_path / "run", teacher)
    (run / "eval.json").write_text(json.dumps({"split": "val", "metrics": {"i2t/R@1": {"student": 0.25, "teacher": 0.5}}}))
    export.run(ExportConfig(run=str(run), out=str(tmp_path / "out"), format="timm", license="mit"))
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: open_clip\nlicense: mit\n")
    assert "| i2t/R@1 | 0.250 | 0.500 |" in card and "Not measured (run `kdpipe bench RUN`" in card
    assert teacher.fingerprint["name"] in card and "timm.create_model('local-dir:DIR/timm', pretrained=True)" in card


def test_cli_export_help_and_missing_run():
    runner = CliRunner()
    assert runner.invoke(app, ["export", "--help"]).exit_code == 0
    result = runner.invoke(app, ["export", "/nonexistent/run", "--out", "/tmp/x"])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_formats_all_one_or_a_comma_separated_list():
    assert export.formats_of("all") == list(export.FORMATS)
    assert export.formats_of("onnx") == ["onnx"]
    assert export.formats_of("timm, open_clip") == ["open_clip", "timm"]
    for bad in ("jpeg", "open_clip,jpeg", ","):
        with pytest.raises(ValueError, match="unknown export format"):
            export.formats_of(bad)


def _unique_students() -> list[str]:
    from kdpipe.students import STUDENTS  # noqa: PLC0415

    seen, names = set(), []
    for name in STUDENTS.names():
        if id(STUDENTS.get(name)) not in seen:
            seen.add(id(STUDENTS.get(name)))
            names.append(name)
    return names


HEAVY = {"resnet34", "resnet50"}  # tens of MB of weights written and read twice: in the slow set


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n
                                  for n in _unique_students()])
def test_every_registry_student_exports_to_timm_and_open_clip(name, teacher, tmp_path):
    """Each student's exported towers compute its embeddings (in-process here; the fresh-process checks are above)."""
    import open_clip  # noqa: PLC0415
    import timm  # noqa: PLC0415

    from kdpipe.students import load_student  # noqa: PLC0415

    run = make_run(tmp_path / "run", teacher, image=name)
    student = load_student(run)[0]
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch.nn.functional.normalize(student.eval()(x), dim=-1)
    out = tmp_path / "export"
    export.run(ExportConfig(run=str(run), out=str(out), format="timm"))
    tower = timm.create_model(f"local-dir:{out / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(tower(x), ref).min() > 0.9999
    if export.extra_timm_args(student.backbone):
        with pytest.raises(ExportError, match="--format timm"):
            export.run(ExportConfig(run=str(run), out=str(out), format="open_clip"))
        return
    export.run(ExportConfig(run=str(run), out=str(out), format="open_clip"))
    model = open_clip.create_model_and_transforms(f"local-dir:{out}")[0].eval()
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(model.encode_image(x), ref).min() > 0.9999
