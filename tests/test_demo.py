"""`kdpipe demo --quick` end to end: every stage on the shapes world, offline, CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdpipe import evaluate
from kdpipe.cli.main import app
from kdpipe.students import build_student, load_student, save_student


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
    assert {r.name for r in runs} == {"mobilenetv3_050-raw", "mobilenetv3_050-white-joint"}
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
