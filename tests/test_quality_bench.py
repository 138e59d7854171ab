"""The benchmarks' bookkeeping (quality.py, ensemble.py): runs, seeds, convergence, time shares, verdicts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("quality", Path(__file__).parents[1] / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(quality)

TEACHER = {"i2t_R@1": 0.4, "zeroshot/shapes/top1": 0.6}
GEOMETRY = ("geometry/modality_gap", "geometry/effective_rank_image")


def _fake_run(root: Path, student: str, recipe: str, seed: int, r1: float, zs: float,
              curve: list[float], epochs: int = 3) -> None:
    run = root / "runs" / f"{student}-{recipe}-s{seed}"
    run.mkdir(parents=True)
    metrics = {"i2t_R@1": {"student": r1, "teacher": TEACHER["i2t_R@1"], "ratio": r1 / TEACHER["i2t_R@1"]},
               "zeroshot/shapes/top1": {"student": zs, "teacher": TEACHER["zeroshot/shapes/top1"],
                                        "ratio": zs / TEACHER["zeroshot/shapes/top1"]}}
    metrics.update({g: {"student": 0.1, "teacher": 0.1, "ratio": 1.0} for g in GEOMETRY})
    (run / "eval.json").write_text(json.dumps({"metrics": metrics, "checkpoint": {"name": "last"}}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"kind": "val", "val_i2t_R@1": v}) for v in curve))
    (run / quality.RUN_JSON).write_text(json.dumps({"student": student, "recipe": recipe, "seed": seed,
                                                     "epochs": epochs, "seconds": 60.0}))


def test_epochs_to_fraction() -> None:
    assert quality.epochs_to_fraction([0.1, 0.3, 0.37, 0.4], 0.9) == 3  # 0.37 >= 0.9 * 0.4
    assert quality.epochs_to_fraction([0.4, 0.4], 0.9) == 1
    assert quality.epochs_to_fraction([], 0.9) is None
    assert quality.epochs_to_fraction([0.1, 0.0], 0.9) is None


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    for seed, (a, b) in enumerate([(0.37, 0.30), (0.38, 0.32), (0.39, 0.31)]):
        _fake_run(tmp_path, "small", "default", seed, a, 0.56, [0.2, 0.36 if seed else 0.3, a])
        _fake_run(tmp_path, "small", "+white-joint", seed, a + 0.05, 0.57, [0.4, a + 0.05, a + 0.05])
        _fake_run(tmp_path, "small", "no-teacher", seed, b, 0.40, [0.1, 0.2, b])
    _fake_run(tmp_path, "big", "default", 0, 0.2, 0.3, [0.1, 0.2])
    _fake_run(tmp_path, "big", "no-teacher", 0, 0.1, 0.2, [0.1, 0.1])
    _fake_run(tmp_path, "small", "fd", 0, 0.9, 0.9, [0.9], epochs=7)  # another schedule: left out
    return tmp_path


def test_finished_runs_groups_by_cell_in_recipe_order_and_keeps_one_schedule(root: Path) -> None:
    cells = quality.finished_runs(root, epochs=3)
    assert list(cells) == ["big/default", "big/no-teacher", "small/default", "small/+white-joint",
                           "small/no-teacher"]
    assert [r["seed"] for r in cells["small/default"]] == [0, 1, 2]


def test_aggregate_mean_std_ratio_and_convergence(root: Path) -> None:
    agg = quality.aggregate(quality.finished_runs(root, epochs=3)["small/default"])
    assert agg["i2t_R@1"]["mean"] == pytest.approx(0.38)
    assert agg["i2t_R@1"]["std"] == pytest.approx(0.01)  # the sample std (n - 1) of 0.37, 0.38, 0.39
    assert agg["i2t_R@1"]["ratio_mean"] == pytest.approx(0.95)
    assert agg["epochs_to_90"] == (pytest.approx(7 / 3), pytest.approx((1 / 3) ** 0.5))  # epochs 3, 2, 2
    assert agg["seeds"] == [0, 1, 2] and agg["minutes_per_run"] == 1.0


def test_verdicts_state_each_target(root: Path) -> None:
    summary = {k: quality.aggregate(rows) for k, rows in quality.finished_runs(root, epochs=3).items()}
    flops = {"small": (100, 20), "big": (100, 300)}
    for agg in summary.values():
        agg["time_share"] = 0.2
    notes = quality.verdicts(summary, flops)
    text = "\n".join(notes)
    # only "small" is <= 1/4 of the teacher; its best recipe (+white-joint: 0.43/0.4 > 0.9) ...
    assert ("small/+white-joint: I->T R@1 1.07x, zero-shot top-1 0.95x of the teacher, training time 0.20x the "
            "teacher's -> target (>= 0.9 both, in <= 1/4 of the time) MET") in text and "NOT MET" not in text
    summary["small/+white-joint"]["time_share"] = 0.3  # as good, but it took longer than 1/4 of the teacher's time
    assert "0.30x the teacher's -> target (>= 0.9 both, in <= 1/4 of the time) NOT MET" in "\n".join(
        quality.verdicts(summary, flops))
    assert "small/default vs the no-teacher baseline: beats it on I->T R@1 (0.380 vs 0.310); beats it on zero-shot" in text
    assert "big/default vs the no-teacher baseline: single seed, not judged: beats it on I->T R@1" in text
    assert "small: whitening joint helped (I->T R@1 +0.050" in text
    assert "epochs to 90% of final R@1 1.0 vs 2.3" in text


def test_verdict_not_met_and_no_small_student(root: Path) -> None:
    summary = {k: quality.aggregate(rows) for k, rows in quality.finished_runs(root, epochs=3).items()}
    only_small_kd = {k: v for k, v in summary.items() if k == "small/default"}
    only_small_kd["small/default"]["zeroshot/shapes/top1"]["ratio_mean"] = 0.5
    assert any("NOT MET" in n for n in quality.verdicts(only_small_kd, {"small": (100, 20)}))
    assert any("not measured" in n for n in quality.verdicts(summary, {"small": (100, 90), "big": (100, 300)}))


def test_a_supervised_figure_gets_its_own_column_and_verdict(tmp_path: Path) -> None:
    """hinton trains on the shapes labels: its shapes top-1 is supervised, never in the zero-shot column."""
    run = tmp_path / "runs" / "small-hinton-s0"
    _fake_run(tmp_path, "small", "hinton", 0, 0.01, 0.0, [0.01])
    ev = json.loads((run / "eval.json").read_text())
    del ev["metrics"]["zeroshot/shapes/top1"]
    ev["metrics"]["supervised/shapes/top1"] = {"student": 0.48, "teacher": None, "ratio": None}
    (run / "eval.json").write_text(json.dumps(ev))
    summary = {k: quality.aggregate(rows) for k, rows in quality.finished_runs(tmp_path, epochs=3).items()}
    lines = quality.table(summary, TEACHER).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    teacher, hinton = ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:4])
    zs, sup = head.index("zeroshot/shapes/top1"), head.index("supervised/shapes/top1")
    assert (teacher[zs], teacher[sup]) == ("0.600", "–")
    assert (hinton[zs], hinton[sup]) == ("–", "0.480")
    notes = "\n".join(quality.verdicts(summary, {"small": (100, 20)}))
    assert "small/hinton: shapes top-1 0.480 is supervised" in notes
    assert "zero-shot top-1 – of the teacher" in notes and "NOT MET" in notes


def test_time_share_comes_from_the_side_by_side_timing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last timeshare.jsonl record: s/step x (steps per epoch x epochs) / the teacher's seconds."""
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    assert quality.timeshare_shares(6) == {}  # not timed yet: "–", never a wall-clock guess
    old = {"teacher": {"seconds": 1.0}, "rows": [{"student": "small", "epochs": 6, "steps": 60, "s_per_step": 9.0}]}
    new = {"teacher": {"s_per_step": 0.8, "steps": 3000, "seconds": 2400.0},
           "rows": [{"student": "small", "epochs": 6, "steps": 468, "s_per_step": 0.5},
                    {"student": "small", "epochs": 24, "steps": 1872, "s_per_step": 0.5},
                    {"student": "big", "epochs": 6, "steps": 468, "s_per_step": 0.6}]}
    (tmp_path / "timeshare.jsonl").write_text(json.dumps(old) + "\n" + json.dumps(new) + "\n")
    shares = quality.timeshare_shares(16)
    assert shares == {"small": pytest.approx(0.5 * 78 * 16 / 2400), "big": pytest.approx(0.6 * 78 * 16 / 2400)}


ENS_SPEC = importlib.util.spec_from_file_location("ensemble_bench",
                                                  Path(__file__).parents[1] / "benchmarks" / "ensemble.py")
ensemble_bench = importlib.util.module_from_spec(ENS_SPEC)
ENS_SPEC.loader.exec_module(ensemble_bench)


def _cell(r1: list[float], zs: list[float]) -> dict:
    return ensemble_bench.summarise([{"seed": i, "metrics": {"i2t_R@1": {"student": a},
                                                             "zeroshot/shapes/top1": {"student": b}}}
                                     for i, (a, b) in enumerate(zip(r1, zs))])


def test_ensemble_verdict_needs_more_than_two_seed_std_over_the_better_single_teacher() -> None:
    a, b = _cell([0.40, 0.41, 0.42], [0.20, 0.20, 0.20]), _cell([0.44, 0.45, 0.46], [0.22, 0.22, 0.22])
    close = _cell([0.465, 0.475, 0.485], [0.22, 0.22, 0.22])  # +0.025 over B; the larger (sample) seed std is 0.010
    assert "I->T R@1: ensemble 0.475 vs the better single (B) 0.450, +0.025 (more than 2 seed std = 0.020)" in \
        ensemble_bench.verdict({"A": a, "B": b, "A+B": close})
    assert ensemble_bench.verdict({"A": a, "B": b, "A+B": close}).endswith("target MET")
    same = _cell([0.45, 0.46, 0.44], [0.22, 0.21, 0.23])
    v = ensemble_bench.verdict({"A": a, "B": b, "A+B": same})
    assert v.endswith("target NOT MET") and "(not more than 2 seed std" in v
    assert ensemble_bench.verdict({"A": a, "B": b}).startswith("not judged yet")


WS_SPEC = importlib.util.spec_from_file_location("whitening_study",
                                                 Path(__file__).parents[1] / "benchmarks" / "whitening_study.py")
whitening_study = importlib.util.module_from_spec(WS_SPEC)
WS_SPEC.loader.exec_module(whitening_study)


def _study_runs(root: Path, recipe: str, r1: list[float], curves: list[list[float]], gap: float | None,
                erank: float) -> dict[int, dict]:
    """Finished runs of one cell, read back as the study reads them; gap None: an eval.json from before eval
    measured the geometry."""
    for seed, (r, curve) in enumerate(zip(r1, curves)):
        run = whitening_study.run_dir(root, "small", recipe, 3, seed)
        run.parent.mkdir(parents=True, exist_ok=True)
        run.mkdir()
        metrics = {m: {"student": r if m == "i2t_R@1" else 0.3, "teacher": 0.9, "ratio": None}
                   for m in whitening_study.MAIN}
        if gap is not None:
            metrics["geometry/modality_gap"] = {"student": gap + 0.01 * seed, "teacher": 0.1, "ratio": None}
            metrics["geometry/effective_rank_image"] = {"student": erank, "teacher": 45.0, "ratio": None}
        (run / "eval.json").write_text(json.dumps({"metrics": metrics, "checkpoint": {"name": "last"}}))
        (run / "metrics.jsonl").write_text("\n".join(json.dumps({"kind": "val", "val_i2t_R@1": v}) for v in curve))
        (run / quality.RUN_JSON).write_text(json.dumps({"student": "small", "recipe": recipe, "seed": seed,
                                                         "epochs": 3, "seconds": 60.0}))
    return whitening_study.finished(root, "small", recipe, 3, [0, 1, 2])


def test_whitening_study_judges_speed_and_seed_noise_and_measures_the_students_geometry(tmp_path: Path) -> None:
    slow = [[0.1, 0.2, 0.4]] * 3  # 90% of 0.4 reached at epoch 3
    raw = _study_runs(tmp_path, "default", [0.40, 0.41, 0.42], slow, gap=0.12, erank=40.0)
    fast = _study_runs(tmp_path, "fast", [0.40, 0.41, 0.42], [[0.37, 0.4, 0.4]] * 3, gap=0.2, erank=80.0)
    c = whitening_study.compare(raw, fast, 3)
    assert c["speedup"] == pytest.approx(3.0) and c["target_met"]  # epoch 1 against epoch 3
    assert c["i2t_R@1"]["delta"] == pytest.approx(0.0) and not c["i2t_R@1"]["beats_by_2std"]
    assert c["geometry/modality_gap"] == {"raw": pytest.approx(0.13), "white": pytest.approx(0.21)}
    assert c["geometry/effective_rank_image"] == {"raw": pytest.approx(40.0), "white": pytest.approx(80.0)}
    row = whitening_study.verdict_table({"small/fast": c}, {}, 3).splitlines()[-1]
    assert "| 0.13 → 0.21 | 40 → 80 |" in row and row.endswith("| yes |")

    # better by 0.025 against a sample seed std of 0.010: more than 2 std; by 0.015: not
    better = _study_runs(tmp_path, "better", [0.425, 0.435, 0.445], slow, gap=0.12, erank=40.0)
    assert whitening_study.compare(raw, better, 3)["i2t_R@1"]["beats_by_2std"]
    close = _study_runs(tmp_path, "close", [0.415, 0.425, 0.435], slow, gap=0.12, erank=40.0)
    assert not whitening_study.compare(raw, close, 3)["target_met"]

    # a whitened run that never reaches 90% of the raw run's final R@1: no speed-up, "never"
    never = _study_runs(tmp_path, "never", [0.2, 0.2, 0.2], [[0.1, 0.2, 0.2]] * 3, gap=0.12, erank=40.0)
    c = whitening_study.compare(raw, never, 3)
    assert c["speedup"] is None and c["reached_90"] == "0/3" and not c["target_met"]



def test_a_run_judged_at_other_weights_or_without_geometry_is_evaluated_again_at_its_last(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training validates on the split eval scores, so the benchmarks judge every run at its last weights;
    an eval.json of best.pt, or from before eval measured the geometry, is redone once, then read."""
    evaluated = []

    def fake_eval(cfg) -> None:
        path = Path(cfg.run) / "eval.json"
        ev = json.loads(path.read_text())
        ev["checkpoint"] = {"name": cfg.checkpoint}
        ev["metrics"]["i2t_R@1"]["student"] = 0.5
        ev["metrics"].update({g: {"student": 0.3, "teacher": 0.1, "ratio": None} for g in GEOMETRY})
        path.write_text(json.dumps(ev))
        evaluated.append(Path(cfg.run).name)

    monkeypatch.setattr(quality.evaluate, "run", fake_eval)
    no_geometry = _study_runs(tmp_path, "old", [0.40, 0.41, 0.42], [[0.4]] * 3, gap=None, erank=0.0)
    assert sorted(evaluated) == ["small-old-e3-s0", "small-old-e3-s1", "small-old-e3-s2"]
    assert all(r["metrics"]["i2t_R@1"]["student"] == 0.5 for r in no_geometry.values())
    assert whitening_study.student_geometry(Path(no_geometry[0]["run"]))["geometry/modality_gap"] == 0.3
    at_best = whitening_study.run_dir(tmp_path, "small", "old", 3, 1) / "eval.json"
    at_best.write_text(json.dumps({**json.loads(at_best.read_text()), "checkpoint": {"name": "best"}}))
    whitening_study.finished(tmp_path, "small", "old", 3, [0, 1, 2])
    assert evaluated[3:] == ["small-old-e3-s1"]  # only the run judged at best.pt; the others are read
    whitening_study.finished(tmp_path, "small", "old", 3, [0, 1, 2])
    assert len(evaluated) == 4


@pytest.mark.slow
def test_the_ensemble_benchmark_builds_its_cache_beside_the_quality_cache_and_resumes(tmp_path: Path) -> None:
    """ensemble.py's stage 2 on a tiny world: a hard-linked copy of A's cache with B added and evaluated; A's
    cache is left as it was, and a second call changes nothing."""
    from safetensors.torch import save_file

    from cache_factory import teacher_b_config, tiny_extract, tiny_world
    from kdpipe.store import open_cache
    from kdpipe.teachers import load_teacher

    cache = tiny_extract(tiny_world(tmp_path / "world"), tmp_path / "root" / "cache")
    before = {p.relative_to(cache): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}
    b = tmp_path / "teacher-b"
    b.mkdir()
    config = teacher_b_config(b / "config.json")
    save_file(load_teacher(str(config), allow_random_init=True).model.state_dict(), str(b / "model.safetensors"))

    ens = ensemble_bench.ensemble_cache(tmp_path / "root", cache, b)
    c = open_cache(ens)
    assert list(c.teachers()) == [c.primary, ensemble_bench.B] and c.teacher_eval_path(ensemble_bench.B).exists()
    assert {p.relative_to(cache): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()} == before
    shard = next((cache / "train").glob("*.tar")).relative_to(cache)
    assert (ens / shard).samefile(cache / shard)  # hard-linked, not copied
    assert (ens / "manifest.json").read_bytes() != before[Path("manifest.json")]
    manifest = (ens / "manifest.json").read_bytes()
    ensemble_bench.ensemble_cache(tmp_path / "root", cache, b)
    assert (ens / "manifest.json").read_bytes() == manifest
