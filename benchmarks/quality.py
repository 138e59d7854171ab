"""Quality on the shapes world: does distillation work, and does whitening help?

For each student and recipe (and seed), train from one cache, evaluate on the held-out split,
and compare with the teacher (same split, from its cached embeddings) and with a no-teacher
baseline of the same architecture (image + text student trained with the `clip` loss on the
captions alone). Prints a Markdown table (mean ± std over seeds), writes
benchmarks/results/quality.json, and checks the targets of the demo issue.

    .venv/bin/python benchmarks/quality.py [--root data/quality] [--seeds 0,1,2]
        [--students mobilenetv3_050,mobilenetv3,resnet18,vit_tiny] [--recipes fd,hinton] [--epochs 6] [--lr 6e-3]

Runs are reused when their eval.json exists, so an interrupted benchmark resumes; the table
and results/quality.json cover every finished run under --root with the same --epochs, so a
grid can be built up over several invocations (e.g. fewer seeds for the slow students). Other
schedules write results/quality-e<epochs>.json; --report-only rewrites them without training
(runs evaluated at other weights than their last are evaluated again first, in seconds).

Every run is scored at its **last** weights (``eval --checkpoint last``), not at best.pt: training
validates on the same held-out split that eval scores, so a checkpoint picked there would be picked
on the test images themselves.
A recipe whose loss trains on the shapes labels (hinton's hard-label CE) gets its shapes top-1 in
the "supervised" column: it is not zero-shot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from kdpipe import evaluate, extract, pretrain, runtime, train, whiten
from kdpipe.measure import flops_per_sample
from kdpipe.data.shapes import make_shapes
from kdpipe.trainconfig import DEFAULT_RECIPE
from kdpipe.rundir import CKPT_DIR, EVAL_JSON, METRICS_FILE, SPEC_FILE
from kdpipe.store import TEACHER_EVAL_JSON
from kdpipe.students import load_student
from kdpipe.teachers import load_teacher

RESULTS = Path(__file__).parent / "results"
KD = DEFAULT_RECIPE  # CLIP-KD's full recipe: clip (task) + crd + icl + fd (fd 2000 as MSE at D=512)
RECIPES: dict[str, dict[str, Any]] = {
    "default": {"losses": KD},
    "fd": {"losses": "fd=7.8125"},
    "+white-joint": {"losses": KD, "whiten": "joint"},
    "+white-separate": {"losses": KD, "whiten": "separate"},
    "hinton": {"losses": "hinton=1"},
    "no-teacher": {"losses": "clip=1", "text_student": "text_tiny"},
}
# "supervised/shapes/top1": accuracy on the shapes classes of a run whose losses trained on their labels
# (hinton's hard-label CE); eval.json files it apart from zero-shot, and so does the table
METRICS = ("i2t_R@1", "t2i_R@1", "zeroshot/shapes/top1", "supervised/shapes/top1", "agreement/cosine")


def prepare(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """World, teacher, cache and whitening (each reused when present)."""
    world, teacher, cache = root / "shapes", root / "teacher", root / "cache"
    if not (world / "annotations" / "captions_val.json").exists():
        make_shapes(world, args.n_train, args.n_val, size=64, seed=0)
    summary = pretrain.run(pretrain.PretrainConfig(data=str(world), out=str(teacher), steps=args.teacher_steps,
                                                   val_every=args.teacher_val_every or max(1, args.teacher_steps // 10),
                                                   device="cpu", progress=False))
    gain = summary.get("val_tail_gain")
    print(f"teacher: {summary['steps']} steps in {summary['seconds']:.0f} s; val I->T R@1 "
          + " ".join(f"{r['step']}:{r['i2t_R@1']:.3f}" for r in summary.get("val_curve", []))
          + ("" if gain is None else f"; last 20% of steps {gain:+.1%} ({'plateaued' if gain < 0.02 else 'still rising'})"),
          flush=True)
    extract.run(extract.ExtractConfig(teacher=str(teacher / "config.json"),
                                      pretrained=str(teacher / "model.safetensors"), data=str(world),
                                      out=str(cache), views=args.views, batch_size=64, workers=1,
                                      device="cpu", shard_size=500, progress=False))
    if not (cache / "whitening.json").exists():
        whiten.run(whiten.WhitenConfig(cache=str(cache), mode="all", progress=False))
    if not (cache / TEACHER_EVAL_JSON).exists():
        evaluate.run(evaluate.EvalConfig(teacher=str(cache), device="cpu", progress=False))
    return teacher, cache


RUN_JSON = "quality_run.json"  # what the benchmark asked for, and how long it took
JUDGED = "last"  # the weights every run is scored at: best.pt is picked on the split eval scores


def train_and_eval(cache: Path, run_dir: Path, student: str, recipe: str, seed: int,
                   args: argparse.Namespace) -> dict[str, Any]:
    """Train (or resume) one run and evaluate it; a SIGTERM/SIGUSR1 ends the benchmark with "re-run to resume"
    once the run is checkpointed (mid-run) or finished (when it came after the run's last step)."""
    with runtime.stop_requests() as stop:
        if not (run_dir / RUN_JSON).exists():
            start = time.perf_counter()
            resumed = (run_dir / CKPT_DIR).exists()  # then the time below is only the rest of the run
            if not (run_dir / SPEC_FILE).exists():  # student.json is written last
                cfg = train.TrainConfig(student=student, cache=str(cache), out=str(run_dir), epochs=args.epochs,
                                        batch_size=args.batch_size, lr=args.lr, warmup_steps=20, image_size=64,
                                        workers=1, device="cpu", seed=seed, progress=False,
                                        resume=resumed, **RECIPES[recipe])
                if train.run(cfg).get("stopped"):  # checkpointed; a re-run resumes it
                    raise SystemExit(f"{run_dir.name}: stopped by a signal, checkpoint saved; re-run to resume")
            evaluate.run(evaluate.EvalConfig(run=str(run_dir), checkpoint=JUDGED, device="cpu", progress=False))
            (run_dir / RUN_JSON).write_text(json.dumps({
                "student": student, "recipe": recipe, "seed": seed, "epochs": args.epochs, "lr": args.lr,
                "batch_size": args.batch_size, "seconds": round(time.perf_counter() - start, 1), "resumed": resumed}))
        if stop:
            raise SystemExit(f"{run_dir.name}: finished; stopped by {stop.signal} before the next run; "
                             "re-run to resume")
    return read_run(run_dir)


def read_run(run_dir: Path) -> dict[str, Any]:
    refresh_eval(run_dir)
    ev = json.loads((run_dir / EVAL_JSON).read_text())
    vals = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    curve = [r["val_i2t_R@1"] for r in vals if r.get("kind") == "val"]
    return {**json.loads((run_dir / RUN_JSON).read_text()), "run": str(run_dir),
            "metrics": {m: ev["metrics"][m] for m in METRICS if m in ev["metrics"]},
            "curve_i2t_R@1": curve, "epochs_to_90": epochs_to_fraction(curve, 0.9)}


def refresh_eval(run_dir: Path) -> None:
    """Evaluate a finished run again when its eval.json judged other weights than ``JUDGED`` (or predates
    eval naming them, or measuring the embeddings' geometry): eval takes seconds, training is not repeated."""
    path = run_dir / EVAL_JSON
    if not path.exists():
        return
    ev = json.loads(path.read_text())
    if (ev.get("checkpoint") or {}).get("name") != JUDGED or "geometry/modality_gap" not in ev["metrics"]:
        evaluate.run(evaluate.EvalConfig(run=str(run_dir), checkpoint=JUDGED, device="cpu", progress=False))


def finished_runs(root: Path, epochs: int) -> dict[str, list[dict[str, Any]]]:
    """Every finished run under root/runs with this schedule, grouped as "student/recipe"."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for run_dir in sorted((root / "runs").glob(f"*/{RUN_JSON}")):
        row = read_run(run_dir.parent)
        if row["epochs"] == epochs and row["recipe"] in RECIPES:
            cells.setdefault(f"{row['student']}/{row['recipe']}", []).append(row)
    order = list(RECIPES)
    return dict(sorted(cells.items(), key=lambda kv: (kv[0].split("/")[0], order.index(kv[0].split("/", 1)[1]))))


def epochs_to_fraction(curve: list[float], fraction: float) -> int | None:
    """First epoch (1-based) whose val R@1 reaches `fraction` of the final value."""
    if not curve or curve[-1] <= 0:
        return None
    return next(i + 1 for i, v in enumerate(curve) if v >= fraction * curve[-1])


def image_flops(teacher_dir: Path, run_dir: Path, size: int = 64) -> tuple[int, int]:
    teacher = load_teacher(str(teacher_dir / "config.json"), str(teacher_dir / "model.safetensors"))
    image, _, _ = load_student(run_dir)
    x = torch.randn(2, 3, size, size)
    return flops_per_sample(teacher.model.encode_image, x), flops_per_sample(image.eval(), x)


def timeshare_shares(epochs: int) -> dict[str, float]:
    """Each student's training time at ``epochs`` ÷ the teacher's, from the last results/timeshare.jsonl record.

    The grid's wall times come from runs spread over sessions under different loads, so the table's
    time share uses timeshare.py's per-step times, measured side by side on an idle machine. No record
    (or a student it did not time): no share, shown as "–".
    """
    path = RESULTS / "timeshare.jsonl"
    if not path.exists():
        return {}
    last = json.loads(path.read_text().splitlines()[-1])
    per_epoch = {r["steps"] // r["epochs"] for r in last["rows"]}
    if len(per_epoch) != 1:
        return {}
    steps = per_epoch.pop() * epochs
    return {r["student"]: r["s_per_step"] * steps / last["teacher"]["seconds"] for r in last["rows"]}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and *sample* standard deviation (n − 1) over seeds: the "±" of every table and the "seed std" of
    every verdict. With 3 seeds the population std would be 0.82× this, and "more than 2 seed std" easier to
    pass than it should be. One value: std 0."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in METRICS:
        students = [r["metrics"][m]["student"] for r in rows if m in r["metrics"]]
        ratios = [r["metrics"][m]["ratio"] for r in rows if m in r["metrics"] and r["metrics"][m]["ratio"]]
        if students:
            out[m] = {"mean": mean_std(students)[0], "std": mean_std(students)[1],
                      "ratio_mean": mean_std(ratios)[0] if ratios else None,
                      "teacher": rows[0]["metrics"][m]["teacher"]}
    e90 = [r["epochs_to_90"] for r in rows if r["epochs_to_90"] is not None]
    out["epochs_to_90"] = mean_std(e90) if e90 else None
    out["seeds"] = sorted(r["seed"] for r in rows)
    whole = [r["seconds"] for r in rows if not r.get("resumed")]  # a resumed run timed only its rest
    out["minutes_per_run"] = round(statistics.fmean(whole) / 60, 1) if whole else None
    return out


def fmt(cell: dict[str, Any] | None, seeds: int, digits: int = 3) -> str:
    if not cell:
        return "–"
    ratio = f" ({cell['ratio_mean']:.2f}×)" if cell.get("ratio_mean") is not None else ""
    spread = f" ± {cell['std']:.{digits}f}" if seeds > 1 else ""
    return f"{cell['mean']:.{digits}f}{spread}{ratio}"


def table(summary: dict[str, dict[str, Any]], teacher: dict[str, Any]) -> str:
    head = "| student | recipe | seeds | " + " | ".join(METRICS) + " | epochs to 90% R@1 | min/run (wall) | time ÷ teacher |"
    lines = [head, "|" + "---|" * (len(METRICS) + 6)]
    lines.append("| teacher | – | – | " + " | ".join("–" if teacher.get(m) is None else f"{teacher[m]:.3f}"
                                                   for m in METRICS) + " | – | – | 1 |")
    for key, agg in summary.items():
        student, recipe = key.split("/", 1)
        e90 = agg["epochs_to_90"]
        lines.append(f"| {student} | {recipe} | {len(agg['seeds'])} | " + " | ".join(fmt(agg.get(m), len(agg["seeds"])) for m in METRICS)
                     + f" | {'–' if e90 is None else fmt({'mean': e90[0], 'std': e90[1]}, len(agg['seeds']), 1)}"
                     + f" | {agg['minutes_per_run'] or '–'}"
                     + f" | {'–' if agg.get('time_share') is None else format(agg['time_share'], '.2f')} |")
    return "\n".join(lines)


def _noise(a: dict[str, Any], b: dict[str, Any], metric: str = "i2t_R@1") -> float | None:
    """The larger seed std of two cells; None when either has a single seed (no noise estimate)."""
    if min(len(a["seeds"]), len(b["seeds"])) < 2:
        return None
    return max(a[metric]["std"], b[metric]["std"])


def _compare(d: float, noise: float | None, up: str, down: str, same: str) -> str:
    if noise is None:
        return f"single seed, not judged: {'no difference' if d == 0 else up if d > 0 else down}"
    return same if abs(d) <= noise else (up if d > 0 else down)


def verdicts(summary: dict[str, dict[str, Any]], flops: dict[str, tuple[int, int]]) -> list[str]:
    """The issue's targets, each as one plain sentence."""
    out = [f"{s}: image tower {f / 1e6:.1f} MFLOPs = {f / t:.2f}x the teacher's ({t / 1e6:.1f})"
           for s, (t, f) in flops.items()]
    small = [k for k in summary if not k.endswith("/no-teacher") and flops[k.split("/")[0]][1] * 4 <= flops[k.split("/")[0]][0]]
    if small:
        best = max(small, key=lambda k: summary[k]["i2t_R@1"]["ratio_mean"] or 0)
        r1, zs = summary[best]["i2t_R@1"]["ratio_mean"], summary[best].get("zeroshot/shapes/top1", {}).get("ratio_mean")
        share = summary[best].get("time_share")
        ok = (r1 is not None and r1 >= 0.9 and zs is not None and zs >= 0.9
              and share is not None and share <= 0.25)
        out.append(f"best image-only student with <= 1/4 of the teacher's image FLOPs: {best}: I->T R@1 "
                   f"{r1:.2f}x, zero-shot top-1 {'–' if zs is None else f'{zs:.2f}x'} of the teacher, training "
                   f"time {'–' if share is None else f'{share:.2f}x'} the teacher's -> target "
                   "(>= 0.9 both, in <= 1/4 of the time) "
                   f"{'MET' if ok else 'NOT MET'}")
    else:
        out.append("no distilled student with <= 1/4 of the teacher's image FLOPs was run: target not measured")
    for student in sorted({k.split("/")[0] for k in summary}):
        base = summary.get(f"{student}/no-teacher")
        for k, agg in summary.items():
            if base and k.startswith(student + "/") and not k.endswith("no-teacher"):
                words = []
                for m, label in (("i2t_R@1", "I->T R@1"), ("zeroshot/shapes/top1", "zero-shot top-1")):
                    if m in agg and m in base:
                        d = agg[m]["mean"] - base[m]["mean"]
                        word = _compare(d, _noise(agg, base, m), "beats", "is BELOW", "is within seed noise of")
                        words.append(f"{word} it on {label} ({agg[m]['mean']:.3f} vs {base[m]['mean']:.3f})")
                out.append(f"{k} vs the no-teacher baseline: " + "; ".join(words))
        for k, agg in summary.items():
            if k.startswith(student + "/") and "supervised/shapes/top1" in agg:
                out.append(f"{k}: shapes top-1 {agg['supervised/shapes/top1']['mean']:.3f} is supervised (its loss "
                           "trained on these labels), not zero-shot: compare it with no zero-shot figure")
        kd = summary.get(f"{student}/default")
        for mode in ("+white-joint", "+white-separate"):
            white = summary.get(f"{student}/{mode}")
            if not (kd and white):
                continue
            d, noise = white["i2t_R@1"]["mean"] - kd["i2t_R@1"]["mean"], _noise(kd, white)
            verdict = _compare(d, noise, "helped", "hurt", "made no difference beyond seed noise")
            e_kd, e_w = kd["epochs_to_90"], white["epochs_to_90"]
            speed = f"; epochs to 90% of final R@1 {e_w[0]:.1f} vs {e_kd[0]:.1f}" if e_kd and e_w else ""
            std = "" if noise is None else f", seed std {noise:.3f}"
            out.append(f"{student}: whitening {mode[7:]} {verdict} (I->T R@1 {d:+.3f} vs default{std}{speed})")
    return out


def add_shared_arguments(ap: argparse.ArgumentParser, teacher_steps: int) -> None:
    """The settings every benchmark on this world shares: where it lives, the world, the teacher, the schedule."""
    ap.add_argument("--root", default="data/quality")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=6e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--teacher-steps", type=int, default=teacher_steps)
    ap.add_argument("--teacher-val-every", type=int, default=None, help="default: a tenth of --teacher-steps")
    ap.add_argument("--report-only", action="store_true", help="train nothing: summarise the finished runs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", default="mobilenetv3_050,mobilenetv3,resnet18,vit_tiny")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    add_shared_arguments(ap, teacher_steps=pretrain.DEFAULT_STEPS)
    args = ap.parse_args()
    root = Path(args.root)
    start = time.perf_counter()
    teacher_dir, cache = prepare(root, args)
    teacher_eval = json.loads((cache / TEACHER_EVAL_JSON).read_text())["metrics"]
    teacher_figures = {m: v["teacher"] for m, v in teacher_eval.items()}
    for student in [] if args.report_only else args.students.split(","):
        for recipe in args.recipes.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                run_dir = root / "runs" / f"{student}-{recipe}-e{args.epochs}-s{seed}"
                row = train_and_eval(cache, run_dir, student, recipe, seed, args)
                print(f"{run_dir.name} ({row['seconds']:.0f} s): " + ", ".join(
                    f"{m} {row['metrics'][m]['student']:.3f}" for m in METRICS if m in row["metrics"]), flush=True)
    for run_json in sorted((root / "runs").glob(f"*/{RUN_JSON}")):
        refresh_eval(run_json.parent)
    cells = finished_runs(root, args.epochs)
    summary = {key: aggregate(rows) for key, rows in cells.items()}
    teacher_train = json.loads((teacher_dir / "train.json").read_text())
    shares = timeshare_shares(args.epochs)
    for key, agg in summary.items():  # each student's training time as a share of the teacher's
        agg["time_share"] = shares.get(key.split("/")[0])
        agg["time_share_source"] = "timeshare.jsonl" if agg["time_share"] is not None else None
    flops = {}
    for key, rows in cells.items():
        if key.split("/")[0] not in flops:
            flops[key.split("/")[0]] = image_flops(teacher_dir, Path(rows[0]["run"]))
    md = table(summary, teacher_figures)
    notes = verdicts(summary, flops)
    print(md)
    print("\n".join(f"- {n}" for n in notes))
    out = RESULTS / ("quality.json" if args.epochs == 6 else f"quality-e{args.epochs}.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "command": "benchmarks/quality.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "minutes_this_invocation": round((time.perf_counter() - start) / 60, 1), "teacher": teacher_figures,
        "teacher_training": {k: teacher_train.get(k) for k in ("steps", "seconds", "val_curve", "val_tail_gain",
                                                                "train_images", "val_images")},
        "flops_image": {s: {"teacher": t, "student": f} for s, (t, f) in flops.items()},
        "summary": summary, "runs": {k: rows for k, rows in cells.items()}, "markdown": md, "verdicts": notes},
        indent=1))


if __name__ == "__main__":
    main()
