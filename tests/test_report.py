"""`kdpipe report`: one Markdown table from what each run directory holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cache_factory import fake_teacher
from kdpipe import report
from kdpipe.cli.main import app

TEACHER = fake_teacher(16)


def _row(student: float, teacher: float) -> dict:
    return {"student": student, "teacher": teacher, "ratio": student / teacher}


def write_run(path: Path, *, text: str | None = None, whitening: dict | None = None, losses: dict | None = None,
              config: str | None = None, evaluated: bool = True, benched: bool = True,
              teacher: dict = TEACHER) -> Path:
    """A run directory with hand-written student.json / config.toml / eval.json / bench.json."""
    path.mkdir(parents=True)
    spec = {"image": {"name": "mobilenetv3"}, "text": {"name": text} if text else None, "teacher": teacher,
            "whitening": whitening}
    if losses is not None:
        spec["losses"] = {"weights": losses, "options": {}}
    (path / "student.json").write_text(json.dumps(spec))
    if config is not None:
        (path / "config.toml").write_text(config)
    if evaluated:
        (path / "eval.json").write_text(json.dumps({
            "split": "val", "space": "teacher", "metrics": {
                "i2t_R@1": _row(0.4, 0.5), "t2i_R@1": _row(0.3, 0.6), "zeroshot/shapes/top1": _row(0.45, 0.9),
                "zeroshot/shapes/top5": _row(0.9, 1.0), "agreement/cosine": _row(0.875, 1.0)}}))
    if benched:
        image = {"size_fp16_bytes": 2 * 2**20, "latency_b1_p50_ms": 4.0}
        (path / "bench.json").write_text(json.dumps({  # eager: the student is slower; onnxruntime: faster
            "device": "cpu", "teacher": {"image": {"size_fp16_bytes": 10 * 2**20, "latency_b1_p50_ms": 2.0},
                                         "onnx": {"latency_b1_p50_ms": 8.0}},
            "student": {"image": image}, "onnx": {"latency_b1_p50_ms": 1.0},
            "ratios": {"image": {"size_fp16_bytes": 5.0, "latency_b1_p50_ms": 0.5, "onnx_latency_b1_p50_ms": 8.0}}}))
    return path


def table_rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]


def test_report_table(tmp_path):
    a = write_run(tmp_path / "a", losses={"fd": 7.8125, "crd": 1.0}, whitening={"mode": "joint", "file": "w"})
    b = write_run(tmp_path / "b", text="text_tiny", config='losses = "fd=2,icl=1"\n', benched=False)
    c = write_run(tmp_path / "c", evaluated=False, benched=False)
    out = tmp_path / "out" / "report.md"
    result = report.run(report.ReportConfig(runs=[a, b, c], out=out))
    assert out.read_text() == result["markdown"]
    head, teacher, ra, rb, rc = table_rows(result["markdown"])
    assert head == ["run", "student", "losses", "whitening", "i2t R@1", "t2i R@1", "zero-shot shapes top-1",
                    "agreement (cos)", "image size fp16", "image latency b1 p50", "image latency b1 p50 onnxruntime"]
    assert teacher == ["teacher: fake-vit (weights ffffffffffff)", "–", "–", "none", "0.500", "0.600", "0.900",
                       "1.000", "10 MB", "2 ms", "8 ms"]
    assert ra == ["a", "mobilenetv3", "fd 7.8125 + crd 1", "joint", "0.400 (0.80×)", "0.300 (0.50×)",
                  "0.450 (0.50×)", "0.875", "2 MB (5× smaller)", "4 ms (2× slower)", "1 ms (8× faster)"]
    assert rb[:4] == ["b", "mobilenetv3 + text_tiny", "fd 2 + icl 1", "none"] and rb[-3:] == ["–", "–", "–"]
    assert rc == ["c", "mobilenetv3", "–", "none", "–", "–", "–", "–", "–", "–", "–"]


@pytest.mark.parametrize("label, shown", [
    ("shapes-vit", "shapes-vit (config d370a4ef650b, weights 28f4034c9abd)"),
    (None, "kdpipe-config-d370a4ef650b (weights 28f4034c9abd)"),  # a fingerprint from before labels
])
def test_report_names_a_config_teacher_as_the_user_did(tmp_path, label, shown):
    """A model-config teacher (the demo's) is registered as kdpipe-config-DIGEST; the report shows its label."""
    fp = {**TEACHER, "name": "kdpipe-config-d370a4ef650b", "checkpoint_sha256": "28f4034c9abd" + "0" * 52}
    fp = {k: v for k, v in fp.items() if k != "label"} | ({"label": label} if label else {})
    md = report.run(report.ReportConfig(runs=[write_run(tmp_path / "a", teacher=fp)], out=tmp_path / "r.md"))
    assert table_rows(md["markdown"])[1][0] == f"teacher: {shown}"


def test_supervised_accuracy_has_its_own_column_apart_from_zero_shot(tmp_path):
    kd = write_run(tmp_path / "kd")
    hinton = write_run(tmp_path / "hinton")
    ev = json.loads((hinton / "eval.json").read_text())
    del ev["metrics"]["zeroshot/shapes/top1"], ev["metrics"]["zeroshot/shapes/top5"]
    ev["metrics"]["supervised/shapes/top1"] = {"student": 0.8, "teacher": None, "ratio": None}
    ev["checkpoint"] = {"name": "best", "file": "student-best.safetensors", "step": 12}
    (hinton / "eval.json").write_text(json.dumps(ev))
    md = report.run(report.ReportConfig(runs=[kd, hinton], out=tmp_path / "r.md"))["markdown"]
    head, teacher, row_kd, row_hinton = table_rows(md)
    zs, sup = head.index("zero-shot shapes top-1"), head.index("supervised shapes top-1")
    assert (teacher[zs], teacher[sup]) == ("0.900", "–")  # the teacher's figure is zero-shot only
    assert (row_kd[zs], row_kd[sup]) == ("0.450 (0.50×)", "–")
    assert (row_hinton[zs], row_hinton[sup]) == ("–", "0.800")  # no ratio to a zero-shot figure
    assert "must not be compared with the zero-shot columns" in md
    assert "Weights evaluated: hinton best (step 12)." in md


def test_best_weights_picked_on_the_scored_split_are_flagged(tmp_path):
    """best weights scored on the split train validated on are optimistic; last, best == last, or another
    split are not flagged."""
    cases = {"best": ({"name": "best", "step": 12}, "val"), "last": ({"name": "last", "step": 24}, "val"),
             "same": ({"name": "best", "step": 24, "same_as": "last"}, "val"),
             "test": ({"name": "best", "step": 12}, "test")}
    runs = []
    for name, (checkpoint, split) in cases.items():
        run = write_run(tmp_path / name)
        ev = json.loads((run / "eval.json").read_text())
        (run / "eval.json").write_text(json.dumps({**ev, "checkpoint": checkpoint, "split": split}))
        runs.append(run)
    md = report.run(report.ReportConfig(runs=runs, out=tmp_path / "r.md"))["markdown"]
    assert "- Warning: the best weights of best were picked by train's validation on the split they are scored" in md
    md = report.run(report.ReportConfig(runs=runs[1:], out=tmp_path / "r2.md"))["markdown"]
    assert "picked by train's validation" not in md


def test_a_class_head_has_its_own_column_beside_the_teachers_zero_shot(tmp_path):
    kd, taskkd = write_run(tmp_path / "kd"), write_run(tmp_path / "taskkd")
    ev = json.loads((taskkd / "eval.json").read_text())
    ev["metrics"]["head/top1"] = {"student": 0.6, "teacher": 0.4, "ratio": 1.5}
    (taskkd / "eval.json").write_text(json.dumps(ev))
    md = report.run(report.ReportConfig(runs=[kd, taskkd], out=tmp_path / "r.md"))["markdown"]
    head, teacher, row_kd, row_taskkd = table_rows(md)
    col = head.index("class head top-1")
    assert (teacher[col], row_kd[col], row_taskkd[col]) == ("0.400", "–", "0.600 (1.50×)")
    assert "the class head of a run trained with --labels" in md
    plain = report.run(report.ReportConfig(runs=[kd], out=tmp_path / "p.md"))["markdown"]
    assert "class head" not in plain  # no column without a head


def test_a_student_bigger_or_slower_than_its_teacher_says_so():
    bench = {"student": {"image": {"size_fp16_bytes": 2 * 2**20, "latency_b1_p50_ms": 4.0}},
             "ratios": {"image": {"size_fp16_bytes": 0.5, "latency_b1_p50_ms": 0.25}}}  # teacher ÷ student
    assert report.size_cell(bench) == "2 MB (2× larger)"
    assert report.latency_cell(bench) == "4 ms (4× slower)"


def test_report_warns_about_mixed_teachers(tmp_path):
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b")
    spec = json.loads((b / "student.json").read_text())
    spec["teacher"] = {**TEACHER, "name": "other"}
    (b / "student.json").write_text(json.dumps(spec))
    md = report.run(report.ReportConfig(runs=[a, b], out=tmp_path / "r.md"))["markdown"]
    assert "different teachers" in md


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report.run(report.ReportConfig(runs=[tmp_path / "nope"], out=tmp_path / "r.md"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a kdpipe run"):
        report.run(report.ReportConfig(runs=[tmp_path / "empty"], out=tmp_path / "r.md"))
    bad = write_run(tmp_path / "bad", evaluated=False)
    (bad / "eval.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        report.run(report.ReportConfig(runs=[bad], out=tmp_path / "r.md"))


def test_cli(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["report", "--help"])
    assert result.exit_code == 0 and "Markdown" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in " ".join(result.output.split())
    run = write_run(tmp_path / "run")
    out = tmp_path / "r.md"
    result = runner.invoke(app, ["report", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| run | student |" in result.output and out.read_text() in result.output
