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


def _fake_run(root: Path, student: str, recipe: str, seed: int, r1: float, zs: float,
              curve: list[float], epochs: int = 3) -> None:
    run = root / "runs" / f"{student}-{recipe}-s{seed}"
    run.mkdir(parents=True)
    metrics = {"i2t_R@1": {"student": r1, "teacher": TEACHER["i2t_R@1"], "ratio": r1 / TEACHER["i2t_R@1"]},
               "zeroshot/shapes/top1": {"student": zs, "teacher": TEACHER["zeroshot/shapes/top1"],
                                        "ratio": zs / TEACHER["zeroshot/shapes/top1"]}}
    (run / "eval.json").write_text(json.dumps({"metrics": metrics}))
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
    assert agg["i2t_R@1"]["std"] == pytest.approx((2 / 3) ** 0.5 * 0.01)
    assert agg["i2t_R@1"]["ratio_mean"] == pytest.approx(0.95)
    assert agg["epochs_to_90"] == (pytest.approx(7 / 3), pytest.approx((2 / 9) ** 0.5))  # epochs 3, 2, 2
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
    close = _cell([0.46, 0.47, 0.48], [0.22, 0.22, 0.22])  # +0.020 over B; the larger seed std is 0.008
    assert "I->T R@1: ensemble 0.470 vs the better single (B) 0.450, +0.020 (more than 2 seed std = 0.016)" in \
        ensemble_bench.verdict({"A": a, "B": b, "A+B": close})
    assert ensemble_bench.verdict({"A": a, "B": b, "A+B": close}).endswith("target MET")
    same = _cell([0.45, 0.46, 0.44], [0.22, 0.21, 0.23])
    v = ensemble_bench.verdict({"A": a, "B": b, "A+B": same})
    assert v.endswith("target NOT MET") and "(not more than 2 seed std" in v
    assert ensemble_bench.verdict({"A": a, "B": b}).startswith("not judged yet")
