"""`kdpipe demo --quick` end to end: every stage on the shapes world, offline, CPU."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdpipe import evaluate
from kdpipe.cli.main import app
from kdpipe.students import build_student, load_student, save_student
from test_export import without_kdpipe


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output[-3000:]
    return out


def _random_init_copy(run: Path, dest: Path) -> Path:
    """The same student architecture and metadata as `run`, with untrained weights."""
    image, _, spec = load_student(run)
    fresh = build_student(spec["image"]["name"], spec["embed_dim"], spec["image_size"],
                          **spec["image"].get("kwargs", {}))
    dest.mkdir(parents=True)
    meta = {k: v for k, v in spec.items() if k not in ("image", "text", "embed_dim", "image_size", "mean", "std",
                                                        "format", "kdpipe_version", "checkpoints", "checkpoint")}
    save_student(dest, fresh, None, meta)
    if (run / "whitening.safetensors").exists():
        shutil.copy(run / "whitening.safetensors", dest / "whitening.safetensors")
    return dest


@pytest.mark.slow
@pytest.mark.timeout(900)  # the module fixture runs the whole quick demo (~2 min on 2 idle cores)
def test_every_stage_leaves_its_files(demo_dir):
    for rel in ("shapes/annotations/captions_train.json", "teacher/config.json", "teacher/model.safetensors",
                "teacher/train.json", "cache/manifest.json", "cache/prompts.h5", "cache/whitening.h5",
                "cache/whitening.json", "cache/teacher_eval.json", "report.md", "demo.json"):
        assert (demo_dir / rel).is_file(), rel
    runs = sorted((demo_dir / "runs").iterdir())
    assert {r.name for r in runs} == {"mobilenetv3_050-raw"}
    for run in runs:
        for rel in ("config.toml", "metrics.jsonl", "student-last.safetensors", "student.json", "curves.png",
                    "eval.json", "bench.json", "checkpoints/latest.pt"):
            assert (run / rel).is_file(), (run.name, rel)
        ev = json.loads((run / "eval.json").read_text())
        assert 0 <= ev["metrics"]["i2t_R@1"]["student"] <= 1 and ev["metrics"]["i2t_R@1"]["teacher"] > 0
    report = (demo_dir / "report.md").read_text()
    assert "mobilenetv3_050-raw" in report and "teacher" in report
    for rel in ("open_clip_config.json", "timm/config.json", "image_encoder.onnx", "README.md"):
        assert (demo_dir / "export" / rel).is_file(), rel  # the raw student, exported for use outside kdpipe
    vision = json.loads((demo_dir / "export" / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]
    assert vision["timm_model_name"] == "mobilenetv3_small_050"


@pytest.mark.slow
def test_the_demo_student_is_smaller_and_faster_than_its_teacher(demo_dir):
    bench = json.loads((demo_dir / "runs" / "mobilenetv3_050-raw" / "bench.json").read_text())
    student, teacher = bench["student"]["image"], bench["teacher"]["image"]
    for key in ("params", "size_fp16_bytes", "flops_per_sample"):
        assert student[key] < teacher[key], key
    assert student["flops_per_sample"] <= teacher["flops_per_sample"] / 4
    # timed as deployed: both towers exported to ONNX and run by onnxruntime, same threads and batch
    assert bench["onnx"]["ok"] and bench["teacher"]["onnx"]["ok"]
    assert bench["onnx"]["latency_b1_p50_ms"] < bench["teacher"]["onnx"]["latency_b1_p50_ms"]
    assert bench["ratios"]["image"]["onnx_latency_b1_p50_ms"] > 1
    assert "faster" in (demo_dir / "report.md").read_text()


@pytest.mark.slow
def test_distilled_student_beats_a_random_init_student(demo_dir, tmp_path):
    run = demo_dir / "runs" / "mobilenetv3_050-raw"
    trained = json.loads((run / "eval.json").read_text())["metrics"]
    fresh = _random_init_copy(run, tmp_path / "random")
    evaluate.run(evaluate.EvalConfig(run=str(fresh), device="cpu", progress=False))
    untrained = json.loads((fresh / "eval.json").read_text())["metrics"]
    assert trained["agreement/cosine"]["student"] > untrained["agreement/cosine"]["student"] + 0.3
    assert trained["i2t_R@1"]["student"] > untrained["i2t_R@1"]["student"]


@pytest.mark.slow
def test_rerun_reuses_every_stage(demo_dir):
    before = {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*.safetensors")}
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(demo_dir)])
    assert result.exit_code == 0, result.output[-3000:]
    assert "reused" in result.output
    assert {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*.safetensors")} == before


# Run by `without_kdpipe`: what a user of the exported folder can do with open_clip, timm, onnxruntime,
# h5py and the cache's tar shards alone. Computes eval's two headline figures on the held-out split.
EXPORTED_FIGURES_SCRIPT = """
import glob, io, tarfile
import h5py, onnxruntime, open_clip, timm
import torch.nn.functional as F
from PIL import Image

samples = {}  # key -> {member suffix: bytes}; a key is the member name up to its first dot
for path in sorted(glob.glob(DEMO + '/cache/val/shard-*.tar')):
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, suffix = m.name.partition('.')
            samples.setdefault(key, {})[suffix] = tar.extractfile(m).read()
keys = sorted(samples)
model, _, preprocess = open_clip.create_model_and_transforms('local-dir:' + DEMO + '/export')
model.eval()
tokenizer = open_clip.get_tokenizer('local-dir:' + DEMO + '/export')
x = torch.stack([preprocess(Image.open(io.BytesIO(samples[k]['jpg']))) for k in keys])  # [N, 3, S, S]
captions = [json.loads(samples[k]['captions.json']) for k in keys]
txt_to_img = torch.tensor([i for i, c in enumerate(captions) for _ in c])  # [M]
labels = torch.tensor([int(samples[k]['cls.txt']) for k in keys])  # [N], the cache's class order
with h5py.File(DEMO + '/cache/prompts.h5', 'r') as f:
    classnames = [c.decode() for c in f['shapes/classnames'][:]]
    templates = [t.decode() for t in f['shapes/templates'][:]]
with torch.no_grad():
    img = F.normalize(model.encode_image(x), dim=-1)  # [N, D]
    txt = F.normalize(model.encode_text(tokenizer([c for cs in captions for c in cs])), dim=-1)  # [M, D]
    prompts = tokenizer([t.format(c) for c in classnames for t in templates])
    per_class = F.normalize(model.encode_text(prompts), dim=-1).reshape(len(classnames), len(templates), -1)
    classifier = F.normalize(per_class.mean(dim=1), dim=-1).T  # [D, K]
    timm_img = timm.create_model('local-dir:' + DEMO + '/export/timm', pretrained=True).eval()(x)
session = onnxruntime.InferenceSession(DEMO + '/export/image_encoder.onnx', providers=['CPUExecutionProvider'])
onnx_img = torch.from_numpy(session.run(['image_embeds'], {'image': x.numpy()})[0])

# I->T R@1: an image's rank = the other images' captions scoring >= its best own caption (ties count against it)
sims = img @ txt.T  # [N, M]
own = txt_to_img[None, :] == torch.arange(len(keys))[:, None]
best = sims.masked_fill(~own, float('-inf')).amax(dim=1, keepdim=True)
rank = ((sims >= best) & ~own).sum(dim=1)
known = labels >= 0
cos = lambda a: float(F.cosine_similarity(a, img, dim=-1).min())
print(json.dumps({'n': len(keys), 'i2t_R@1': float((rank < 1).double().mean()),
                  'top1': float(((img[known] @ classifier).argmax(dim=1) == labels[known]).double().mean()),
                  'timm_cos': cos(timm_img), 'onnx_cos': cos(onnx_img), 'classes': len(classnames)}))
"""


def _replay_equals_open_clip_preprocess(demo: Path) -> None:
    """kdpipe eval's view 0 (the stored JPEG replayed with the teacher's resize mode, then the student's
    normalisation) is exactly what the exported open_clip preprocess makes of the stored JPEG."""
    import open_clip  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    from kdpipe import cachereader  # noqa: PLC0415
    from kdpipe.rundir import RunSpec  # noqa: PLC0415

    spec = RunSpec.from_json(json.loads((demo / "runs" / "mobilenetv3_050-raw" / "student.json").read_text()))
    prep = evaluate.image_prep(spec, spec.teacher)
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{demo / 'export'}")
    with tarfile.open(sorted((demo / "cache" / "val").glob("shard-*.tar"))[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted(n.split(".")[0] for n in members if n.endswith(".jpg"))[:8]
    for key in keys:
        view0 = json.loads(members[f"{key}.views.json"])[0]
        replayed = cachereader.replay_view(members[f"{key}.jpg"], view0, prep.size, prep.interpolation)
        ours = cachereader.normalize_images(replayed[None], prep.mean, prep.std)[0]
        theirs = preprocess(Image.open(io.BytesIO(members[f"{key}.jpg"])))
        assert view0["resize"] == spec.teacher["preprocess"]["resize_mode"] and not view0.get("flip"), view0
        assert torch.allclose(ours, theirs, atol=1e-6), (key, (ours - theirs).abs().max())


@pytest.mark.slow
def test_exported_student_reproduces_eval_figures_without_kdpipe(demo_dir):
    """The issue's "done when": the demo's export, loaded by open_clip / timm / onnxruntime in a fresh
    process, gives the figures `kdpipe eval` wrote for the run."""
    _replay_equals_open_clip_preprocess(demo_dir)
    got = without_kdpipe(EXPORTED_FIGURES_SCRIPT, DEMO=demo_dir)
    ev = json.loads((demo_dir / "runs" / "mobilenetv3_050-raw" / "eval.json").read_text())
    assert got["n"] == ev["dataset"]["images"] and got["classes"] == len(ev["dataset"]["classnames"])
    # Equal on the quick demo (0.19 and 0.16 of 100), but not bound to be: eval pairs the image-only
    # student with the teacher's CACHED caption and prompt embeddings (fp16, from the teacher's
    # trimmed-token forward) while open_clip encodes them here in fp32; differences of ~1e-3 can
    # reorder a near tie, so one sample either way is allowed.
    one = 1 / got["n"] + 1e-9
    assert got["i2t_R@1"] == pytest.approx(ev["metrics"]["i2t_R@1"]["student"], abs=one), got
    assert got["top1"] == pytest.approx(ev["metrics"]["zeroshot/shapes/top1"]["student"], abs=one), got
    assert got["timm_cos"] >= 0.9999 and got["onnx_cos"] >= 0.9999, got
