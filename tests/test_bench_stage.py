"""The bench stage: teacher and students measured in one run, bench.json fields and ratios,
ONNX check of the student image tower, plots, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cache_factory import fake_teacher, make_fake_cache
from kdpipe import bench
from kdpipe.cli.main import app
from kdpipe.students import build_student, build_text_student, save_student, save_weights, write_spec

DIM, SIZE = 32, 32  # tiny-clip's embedding dim and input size
TOWER_KEYS = {"name", "params", "size_fp32_bytes", "size_fp16_bytes", "flops_per_sample", "latency_b1_p50_ms",
              "latency_b1_p90_ms", "throughput", "batch_n", "threads", "device"}
FAST = dict(warmup=0, iters=2, throughput_iters=1, threads=1, batch_sizes=(1, 2, 4))


def tiny_clip_fp() -> dict:
    return {**fake_teacher(DIM), "name": "tiny-clip", "checkpoint_sha256": None}


def make_run(path: Path, text: bool = False, teacher: dict | None = None, eval_r1: float | None = None) -> Path:
    torch.manual_seed(0)
    image = build_student("tiny", DIM, SIZE)
    tower = build_text_student("text_tiny", DIM) if text else None
    save_student(path, image, tower, meta={"teacher": teacher or tiny_clip_fp(), "whitening": None})
    if eval_r1 is not None:
        (path / "eval.json").write_text(json.dumps({"metrics": {"i2t_R@1": {"student": eval_r1, "teacher": 0.5,
                                                                            "ratio": eval_r1 / 0.5}}}))
    return path


@pytest.fixture(scope="module")
def benched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One image-only run (with an eval.json) benched against tiny-clip, ONNX included."""
    run = make_run(tmp_path_factory.mktemp("bench") / "run", eval_r1=0.4)
    return run, bench.run(bench.BenchConfig(runs=[run], onnx=True, **FAST))


def test_bench_json_has_every_field(benched):
    run, result = benched
    saved = json.loads((run / "bench.json").read_text())
    assert {"device", "threads", "torch", "teacher", "student", "ratios", "onnx", "accuracy", "config"} <= set(saved)
    for side in ("teacher", "student"):
        for tower in ("image", "text", "total"):
            assert TOWER_KEYS <= set(saved[side][tower]), (side, tower)
    assert saved["device"] == "cpu" and saved["threads"] == 1
    assert saved["teacher"]["name"] == "tiny-clip" and "random init" in saved["teacher"]["weights"]
    assert saved["teacher"]["image"]["throughput_by_batch"].keys() == {"2", "4"}
    assert saved["teacher"]["image"]["batch_n"] == 4
    assert saved["accuracy"] == {"metric": "i2t_R@1", "student": 0.4, "teacher": 0.5, "checkpoint": None}
    assert saved["checkpoint"]["name"] == "best" and saved["checkpoint"]["file"] == "student-last.safetensors"
    assert (run / "bench.png").stat().st_size > 1000


def test_ratios_are_consistent(benched):
    run, result = benched
    saved = json.loads((run / "bench.json").read_text())
    t, s, r = saved["teacher"], saved["student"], saved["ratios"]
    for tower in ("image", "text", "total"):
        for key in ("params", "size_fp16_bytes", "flops_per_sample", "latency_b1_p50_ms"):
            assert r[tower][key] == pytest.approx(t[tower][key] / s[tower][key]), (tower, key)
        assert r[tower]["throughput"] == pytest.approx(s[tower]["throughput"] / t[tower]["throughput"])
    for side in (t, s):  # totals add the towers
        for key in ("params", "size_fp32_bytes", "flops_per_sample", "latency_b1_p50_ms"):
            assert side["total"][key] == pytest.approx(side["image"][key] + side["text"][key])
    # the student is its own image tower; its text side is the teacher's (image-only student)
    student = build_student("tiny", DIM, SIZE)
    assert s["image"]["params"] == bench.count_params(student)
    assert s["text"]["shared"] == "teacher text tower"
    assert s["text"]["params"] == t["text"]["params"] and r["text"]["params"] == 1.0
    assert s["text_tower"] == "teacher" and any("teacher's text tower" in n for n in saved["notes"])
    assert r["image"]["params"] > 1  # the tiny student is smaller than tiny-clip's ViT


def test_onnx_check_on_the_tiny_student(benched):
    run, _ = benched
    onnx = json.loads((run / "bench.json").read_text())["onnx"]
    assert onnx["ok"] and onnx["max_abs_diff"] < 1e-4
    assert Path(onnx["path"]) == run / bench.ONNX_FILE and (run / bench.ONNX_FILE).is_file()
    assert onnx["latency_b1_p50_ms"] > 0


def test_onnx_times_the_teacher_image_tower_the_same_way(benched):
    run, _ = benched
    saved = json.loads((run / "bench.json").read_text())
    teacher, student = saved["teacher"]["onnx"], saved["onnx"]
    assert teacher["ok"] and teacher["max_abs_diff"] < 1e-4 and teacher["latency_b1_p50_ms"] > 0
    assert saved["ratios"]["image"]["onnx_latency_b1_p50_ms"] == pytest.approx(
        teacher["latency_b1_p50_ms"] / student["latency_b1_p50_ms"])


def test_several_runs_text_student_and_teacher_from_a_cache(tmp_path):
    cache = make_fake_cache(tmp_path / "cache", n_train=4, n_val=2, dim=DIM, teacher=tiny_clip_fp())
    a = make_run(tmp_path / "a", eval_r1=0.3)
    b = make_run(tmp_path / "b", text=True, eval_r1=0.35)
    out = tmp_path / "cmp"
    result = bench.run(bench.BenchConfig(runs=[a, b], teacher=str(cache), out=out, **FAST))
    assert [r["student"]["text_tower"] for r in result["results"]] == ["teacher", "student"]
    text_b = result["results"][1]["student"]["text"]
    assert "shared" not in text_b and text_b["params"] == bench.count_params(build_text_student("text_tiny", DIM))
    both = json.loads((out / bench.COMPARE_JSON).read_text())
    assert [r["run"] for r in both["results"]] == [str(a), str(b)]
    assert (out / bench.COMPARE_PNG).is_file() and (a / bench.BENCH_JSON).is_file() and (b / bench.BENCH_PNG).is_file()


def test_teacher_mismatch_and_unbuildable_teacher(tmp_path):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", teacher={**tiny_clip_fp(), "pretrained": "other"})
    with pytest.raises(ValueError, match="another teacher"):
        bench.run(bench.BenchConfig(runs=[a, b], **FAST))
    c = make_run(tmp_path / "c", teacher=fake_teacher(DIM))  # "fake-vit": no such architecture
    with pytest.raises(FileNotFoundError, match="cannot rebuild teacher architecture 'fake-vit'"):
        bench.run(bench.BenchConfig(runs=[c], **FAST))


def test_no_eval_json_no_plot(tmp_path):
    run = make_run(tmp_path / "run")
    result = bench.run(bench.BenchConfig(runs=[run], teacher="tiny-clip", **FAST))
    assert result["results"][0]["accuracy"] is None and not (run / bench.BENCH_PNG).exists()


def test_bench_loads_the_best_weights_unless_told_last(tmp_path):
    run = tmp_path / "run"
    torch.manual_seed(0)
    best, last = build_student("tiny", DIM, SIZE), build_student("tiny", DIM, SIZE)
    files = {name: save_weights(run, model, None, name) for name, model in (("best", best), ("last", last))}
    write_spec(run, last, None, {"teacher": tiny_clip_fp(), "whitening": None},
               {"best": {"file": files["best"], "step": 3}, "last": {"file": files["last"], "step": 9}})
    (run / "eval.json").write_text(json.dumps({"checkpoint": {"name": "best", "step": 3}, "metrics": {
        "i2t_R@1": {"student": 0.4, "teacher": 0.5, "ratio": 0.8}}}))
    by_default = bench.run(bench.BenchConfig(runs=[run], **FAST))["results"][0]
    assert by_default["checkpoint"] == {"name": "best", "file": "student-best.safetensors", "step": 3}
    assert by_default["accuracy"]["checkpoint"] == "best" and len(by_default["notes"]) == 1  # the shared-text note
    with_last = bench.run(bench.BenchConfig(runs=[run], checkpoint="last", **FAST))["results"][0]
    assert with_last["checkpoint"]["step"] == 9
    assert any("judged the best weights; this bench loaded the last" in n for n in with_last["notes"])
    with pytest.raises(ValueError, match="unknown checkpoint 'final'"):
        bench.run(bench.BenchConfig(runs=[run], checkpoint="final", **FAST))


def flat(text: str) -> str:
    return " ".join(text.split())


def test_cli(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--help"])
    assert result.exit_code == 0 and "--onnx" in result.output
    result = runner.invoke(app, ["bench", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in flat(result.output)
    result = runner.invoke(app, ["bench", str(tmp_path), "--batch-sizes", "1,x"])
    assert result.exit_code == 2 and "comma-separated integers" in flat(result.output)
    run = make_run(tmp_path / "run")
    result = runner.invoke(app, ["bench", str(run), "--teacher", "tiny-clip", "--iters", "2", "--warmup", "0",
                                 "--throughput-iters", "1", "--batch-sizes", "1,2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "bench.json").read_text())["config"]["batch_sizes"] == [1, 2]
    result = runner.invoke(app, ["bench", str(run), "--checkpoint", "latest"])
    assert result.exit_code == 2 and "unknown checkpoint 'latest'; valid: best, last" in flat(result.output)
