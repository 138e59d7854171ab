"""Training time of each student as a share of its teacher's, measured side by side.

The quality table's wall times come from runs spread over sessions and machines under
different loads, so their ratio says little. Here the teacher's pretraining step and each
student's distillation step are timed in the same process, alternately (teacher, students,
students, teacher: drift cancels), with the same torch threads, through the stages' own code
(``pretrain.run`` and ``train.run``) at their benchmark settings. Each side runs a short and a
long job; seconds per step = (t_long − t_short) / (steps_long − steps_short), so set-up, data
loading start and the final evaluation cancel. The share of a schedule is then

    (student steps × student s/step) ÷ (teacher steps × teacher s/step)

    .venv/bin/python benchmarks/timeshare.py --root /root/kdpipe-quality \\
        [--students mobilenetv3_050,mobilenetv3] [--epochs 6,24] [--short 20 --long 100] [--rounds 1]

Needs the teacher and cache of benchmarks/quality.py under --root; appends to
benchmarks/results/timeshare.jsonl. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import quality  # noqa: E402

from kdpipe import cachereader, pretrain, train  # noqa: E402
from kdpipe.store import open_cache  # noqa: E402


def time_teacher(root: Path, steps: int, tmp: Path) -> float:
    """Wall seconds of a fresh ``pretrain-teacher`` of ``steps`` steps at the quality teacher's settings."""
    request = json.loads((root / "teacher" / "train.json").read_text())["request"]
    out = tmp / f"teacher-{steps}-{time.monotonic_ns()}"
    start = time.perf_counter()
    pretrain.run(pretrain.PretrainConfig(data=str(root / "shapes"), out=str(out), arch=json.loads((root / "teacher" / "train.json").read_text())["arch"],
                                         steps=steps, batch_size=request["batch_size"], lr=request["lr"],
                                         warmup=min(steps, 10), device="cpu", checkpoint_every=0, progress=False))
    return time.perf_counter() - start


def time_student(root: Path, student: str, steps: int, tmp: Path, args: argparse.Namespace) -> float:
    """Wall seconds of a fresh ``train`` of ``steps`` steps with the quality benchmark's settings."""
    out = tmp / f"{student}-{steps}-{time.monotonic_ns()}"
    start = time.perf_counter()
    train.run(train.TrainConfig(student=student, cache=str(root / "cache"), out=str(out), epochs=args.ref_epochs,
                                batch_size=args.batch_size, lr=args.lr, warmup_steps=min(steps, 20), image_size=64,
                                workers=1, device="cpu", seed=0, progress=False, max_steps=steps,
                                **quality.RECIPES["default"]))
    return time.perf_counter() - start


def per_step(short: list[float], long: list[float], n_short: int, n_long: int) -> float:
    return (statistics.median(long) - statistics.median(short)) / (n_long - n_short)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/quality")
    ap.add_argument("--students", default="mobilenetv3_050,mobilenetv3")
    ap.add_argument("--epochs", default="6,24", help="student schedules to express as a share")
    ap.add_argument("--short", type=int, default=20)
    ap.add_argument("--long", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=1, help="each round times every side short and long once")
    ap.add_argument("--lr", type=float, default=6e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ref-epochs", type=int, default=6, help="the schedule the timed student steps belong to")
    args = ap.parse_args()
    root = Path(args.root)
    students = args.students.split(",")
    times: dict[str, dict[int, list[float]]] = {s: {args.short: [], args.long: []} for s in ["teacher", *students]}
    with tempfile.TemporaryDirectory(prefix="kdpipe-timeshare-") as tmp_name:
        tmp = Path(tmp_name)
        for r in range(args.rounds):
            order = ["teacher", *students] if r % 2 == 0 else [*students, "teacher"]
            for side in order:
                for n in (args.short, args.long):
                    t = time_teacher(root, n, tmp) if side == "teacher" else time_student(root, side, n, tmp, args)
                    times[side][n].append(t)
                    print(f"round {r}: {side} {n} steps {t:.1f} s", flush=True)
    s_step = {side: per_step(t[args.short], t[args.long], args.short, args.long) for side, t in times.items()}
    teacher_summary = json.loads((root / "teacher" / "train.json").read_text())
    teacher_steps = int(teacher_summary["steps"])
    teacher_s = teacher_steps * s_step["teacher"]
    n_train = open_cache(root / "cache").manifest["splits"]["train"]["count"]
    steps_per_epoch = cachereader.steps_per_epoch(n_train, args.batch_size, 1)  # the trainer's (one process)
    rows = []
    print(f"teacher: {s_step['teacher']:.3f} s/step x {teacher_steps} steps = {teacher_s:.0f} s "
          f"(batch {teacher_summary['request']['batch_size']}), threads {torch.get_num_threads()}")
    for student in students:
        for epochs in (int(e) for e in args.epochs.split(",")):
            steps = steps_per_epoch * epochs
            share = steps * s_step[student] / teacher_s
            rows.append({"student": student, "epochs": epochs, "steps": steps, "s_per_step": s_step[student],
                         "seconds": steps * s_step[student], "share_of_teacher": share})
            print(f"{student} e{epochs}: {s_step[student]:.3f} s/step x {steps} steps = {steps * s_step[student]:.0f} s "
                  f"= {share:.3f} of the teacher's training time")
    out = quality.RESULTS / "timeshare.jsonl"
    with out.open("a") as f:
        f.write(json.dumps({"command": "benchmarks/timeshare.py " + " ".join(sys.argv[1:]), "threads": torch.get_num_threads(),
                            "teacher": {"s_per_step": s_step["teacher"], "steps": teacher_steps, "seconds": teacher_s},
                            "raw_times": times, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
