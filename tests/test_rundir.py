"""kdpipe.rundir: the run directory's file names, the one "is this a run?" check, student.json typed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cache_factory import fake_teacher
from kdpipe import bench, evaluate, report, rundir, store, students, train, trainstate
from kdpipe.rundir import RunSpec, describe_checkpoint, read_config, read_json, read_spec, require_run

TEACHER = fake_teacher(16)


# --------------------------------------------------------------------------- names


def test_weights_and_checkpoint_names():
    assert rundir.weights_file("best") == "student-best.safetensors"
    assert rundir.weights_file("last") == "student-last.safetensors"
    with pytest.raises(ValueError, match="unknown checkpoint 'final'; valid: best, last"):
        rundir.weights_file("final")
    assert rundir.check_checkpoint("last") == "last"


def test_the_stages_use_rundirs_names():
    """One spelling of each file: the names the stages use are rundir's (the same objects)."""
    assert students.SPEC_FILE is rundir.SPEC_FILE == "student.json"
    assert students.weights_file is rundir.weights_file and students.check_checkpoint is rundir.check_checkpoint
    assert evaluate.EVAL_JSON is rundir.EVAL_JSON == "eval.json"
    assert evaluate.TEACHER_EVAL_JSON is store.TEACHER_EVAL_JSON == "teacher_eval.json"  # a cache file, not a run's
    assert (bench.BENCH_JSON, bench.BENCH_PNG, bench.ONNX_FILE) == (rundir.BENCH_JSON, rundir.BENCH_PNG, rundir.ONNX_FILE)
    assert (train.CONFIG_FILE, train.METRICS_FILE, train.WHITENING_FILE) == (
        rundir.CONFIG_FILE, rundir.METRICS_FILE, rundir.WHITENING_FILE)
    assert trainstate.ckpt_dir("RUN") == Path("RUN") / rundir.CKPT_DIR == Path("RUN/checkpoints")


def test_save_student_writes_the_names_rundir_gives(tmp_path):
    image = students.build_student("tiny", embed_dim=8, image_size=32)
    students.save_student(tmp_path, image, None, {"teacher": TEACHER})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([rundir.SPEC_FILE, rundir.weights_file("last")])


def test_describe_checkpoint():
    assert describe_checkpoint({"name": "best", "step": 12, "file": "x"}) == "best (step 12)"
    assert describe_checkpoint({"name": "last"}) == "last"
    for older in (None, {}, {"step": 3}, "best"):  # eval.json / bench.json that record no weights
        assert describe_checkpoint(older) is None


# --------------------------------------------------------------------------- is this a run?


def test_require_run_accepts_a_finished_run(tmp_path):
    (tmp_path / rundir.SPEC_FILE).write_text("{}")
    assert require_run(str(tmp_path)) == tmp_path


def test_require_run_errors_name_what_is_missing_and_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run directory .*nope does not exist; pass the --out folder"):
        require_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds no student\.json: not a kdpipe run; pass the --out"):
        require_run(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"holds no student\.json, eval\.json or bench\.json: not a kdpipe run"):
        require_run(tmp_path / "empty", any_of=(rundir.SPEC_FILE, rundir.EVAL_JSON, rundir.BENCH_JSON))


def test_a_run_with_only_an_eval_is_enough_for_a_report_not_for_a_student(tmp_path):
    (tmp_path / rundir.EVAL_JSON).write_text("{}")
    assert require_run(tmp_path, any_of=(rundir.SPEC_FILE, rundir.EVAL_JSON)) == tmp_path
    with pytest.raises(FileNotFoundError, match="holds no student.json"):
        require_run(tmp_path)


def test_every_stage_refuses_a_non_run_with_the_same_message(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    expected = f"{empty} holds no student.json: not a kdpipe run; {rundir.TRAIN_HINT}"
    calls = {
        "load_student": lambda: students.load_student(empty),
        "eval": lambda: evaluate.run(evaluate.EvalConfig(run=empty, device="cpu", progress=False)),
        "bench": lambda: bench.run(bench.BenchConfig(runs=[empty])),
    }
    for name, call in calls.items():
        with pytest.raises(FileNotFoundError) as err:
            call()
        assert str(err.value) == expected, name
    with pytest.raises(FileNotFoundError, match="holds no student.json, eval.json or bench.json: not a kdpipe run"):
        report.run(report.ReportConfig(runs=[empty], out=tmp_path / "r.md"))


# --------------------------------------------------------------------------- reading files


def test_read_json_and_config(tmp_path):
    assert read_json(tmp_path / "absent.json") is None and read_config(tmp_path) is None
    (tmp_path / "x.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"x\.json is not valid JSON"):
        read_json(tmp_path / "x.json")
    (tmp_path / rundir.CONFIG_FILE).write_text('cache = "CACHE"\nepochs = 3\n')
    assert read_config(tmp_path) == {"cache": "CACHE", "epochs": 3}
    (tmp_path / rundir.CONFIG_FILE).write_text("cache = ")
    with pytest.raises(ValueError, match=r"config\.toml is not valid TOML"):
        read_config(tmp_path)


def test_run_config_is_read_where_only_the_tomli_backport_exists(tmp_path):
    """Python 3.10 (requires-python >= 3.10) has no tomllib: RUN/config.toml is read through
    ``config.read_toml``, which falls back to tomli, so the run's readers import and read there too."""
    (tmp_path / rundir.CONFIG_FILE).write_text('cache = "CACHE"\nepochs = 3\n')
    script = ("import sys, tomllib; sys.modules['tomli'] = tomllib; sys.modules['tomllib'] = None  # as on 3.10\n"
              "from pathlib import Path\nfrom kdpipe import report, rundir\n"
              f"print(rundir.read_config(Path({str(tmp_path)!r})))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "{'cache': 'CACHE', 'epochs': 3}"


# --------------------------------------------------------------------------- student.json, typed


def test_run_spec_round_trip_through_save_student(tmp_path):
    image = students.build_student("tiny", embed_dim=8, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    text = students.build_text_student("text_tiny", 8)
    labels = {"losses": ["hinton"], "classnames": ["circle", "square"]}
    meta = {"teacher": TEACHER, "cache": "/data/cache", "interpolation": "bilinear",
            "whitening": {"mode": "joint", "file": rundir.WHITENING_FILE},
            "losses": {"weights": {"fd": 7.8125, "hinton": 1.0}, "options": {"hinton": {"t": 2}}},
            "labels_used": labels}
    students.save_student(tmp_path, image, text, meta)
    spec = read_spec(tmp_path)
    assert (spec.image_name, spec.text_name, spec.teacher, spec.cache) == ("tiny", "text_tiny", TEACHER, "/data/cache")
    assert (spec.whitening, spec.whitening_file) == ("joint", "whitening.safetensors")
    assert spec.loss_weights == {"fd": 7.8125, "hinton": 1.0} and spec.loss_options == {"hinton": {"t": 2}}
    assert spec.labels_recorded and spec.labels_used == labels
    assert (spec.image_size, spec.mean, spec.std, spec.interpolation) == (32, (0.5,) * 3, (0.25,) * 3, "bilinear")
    assert spec.raw == json.loads((tmp_path / rundir.SPEC_FILE).read_text())


def test_run_spec_of_an_old_student_json_missing_optional_fields():
    """A run saved before labels_used, the whitening file, interpolation and checkpoints were recorded."""
    old = {"format": 1, "image": {"name": "mobilenetv3", "kwargs": {}}, "text": None, "embed_dim": 16,
           "image_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "teacher": TEACHER,
           "whitening": "image", "losses": "fd=7.8,crd=1", "step": 40}
    spec = RunSpec.from_json(old)
    assert (spec.image_name, spec.text_name, spec.teacher) == ("mobilenetv3", None, TEACHER)
    assert (spec.whitening, spec.whitening_file) == ("image", None)
    assert spec.loss_weights == "fd=7.8,crd=1" and spec.loss_options is None
    assert not spec.labels_recorded and spec.labels_used is None
    assert spec.cache is None and spec.interpolation is None and spec.mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("whitening", [None, "none", False, {"mode": "none"}, {"mode": None, "file": None}])
def test_run_spec_reads_every_spelling_of_not_whitened(whitening):
    assert RunSpec.from_json({"whitening": whitening}).whitening is None


def test_run_spec_reads_fields_of_the_wrong_kind_as_absent():
    spec = RunSpec.from_json({"image": None, "text": "text_tiny", "teacher": "ViT-B-32", "labels_used": None})
    assert spec.image_name is None and spec.text_name is None and spec.teacher is None
    assert spec.labels_recorded and spec.labels_used is None  # recorded as "no labels used"
    assert RunSpec.from_json({}) == RunSpec(raw={})
