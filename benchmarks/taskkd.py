"""Task KD on a labelled shapes set: does a class head distilled from the teacher (hinton, T = 4,
α = 0.5, VLM_Distillation's recipe) beat the same head trained on the labels alone (CE), and how
does it compare with the teacher's own zero-shot?

The shapes world (``make_shapes``) is written as an image folder (ROOT/train/CLASS/*.jpg,
ROOT/val/CLASS/*.jpg, hard links to the world's files) and extracted through the ``imagefolder``
input kind with the given teacher (the output of ``kdpipe pretrain-teacher``). Then for each seed:

- ``hinton``: ``kdpipe train --labels --losses hinton=1`` (T = 4, α = 0.5: KD + CE);
- ``ce``: ``kdpipe train --labels --losses hinton=1 --loss-options hinton.alpha=0`` (the CE term alone: no teacher);

each evaluated on the val split with its *last* weights (the best checkpoint is picked on val, the
split scored here). The table gives the head's top-1 / top-5 (mean ± std over seeds) and the
teacher's zero-shot on the same images (prompt ensemble over the class names).

    .venv/bin/python benchmarks/taskkd.py --teacher data/quality/teacher [--root data/taskkd]
        [--seeds 0,1,2] [--student mobilenetv3_050] [--epochs 6] [--n-train 5000] [--n-val 1000]

Runs whose eval.json exists are skipped, so an interrupted benchmark resumes (a run killed while
training restarts from its checkpoint). Writes benchmarks/results/taskkd.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from quality import mean_std  # noqa: E402  (mean and sample std over seeds, as every benchmark reports them)

from kdpipe import evaluate, extract, train  # noqa: E402
from kdpipe.data.shapes import make_shapes  # noqa: E402
from kdpipe.rundir import CKPT_DIR, EVAL_JSON, SPEC_FILE  # noqa: E402

RESULTS = Path(__file__).parent / "results"
RECIPES: dict[str, dict[str, Any]] = {
    "hinton": {"losses": "hinton=1", "loss_options": {"hinton": {"T": 4.0, "alpha": 0.5}}},
    "ce": {"losses": "hinton=1", "loss_options": {"hinton": {"alpha": 0.0}}},
}
METRICS = ("head/top1", "head/top5")
RUN_JSON = "taskkd_run.json"  # what the benchmark asked for, and how long it took


def shapes_folder(world: Path, folder: Path) -> Path:
    """The shapes world (COCO layout + labels_*.json) as an image folder FOLDER/SPLIT/CLASS/IMAGE (hard links)."""
    for split in ("train", "val"):
        labels = json.loads((world / "annotations" / f"labels_{split}.json").read_text())
        captions = json.loads((world / "annotations" / f"captions_{split}.json").read_text())
        for image in captions["images"]:
            cls = labels["classnames"][labels["labels"][str(image["id"])]]
            target = folder / split / cls / image["file_name"]
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(world / split / image["file_name"], target)
    return folder


def prepare(root: Path, args: argparse.Namespace) -> Path:
    """World, image folder and cache (each reused when present)."""
    world, cache = root / "shapes", root / "cache"
    if not (world / "annotations" / "labels_val.json").exists():
        make_shapes(world, args.n_train, args.n_val, size=64, seed=0)
    folder = shapes_folder(world, root / "folder")
    teacher = Path(args.teacher)
    extract.run(extract.ExtractConfig(teacher=str(teacher / "config.json"), pretrained=str(teacher / "model.safetensors"),
                                      data=str(folder), out=str(cache), views=args.views, batch_size=64, workers=1,
                                      device="cpu", shard_size=500, progress=False))
    return cache


def train_and_eval(cache: Path, run_dir: Path, recipe: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    if not (run_dir / EVAL_JSON).exists():
        start, resumed = time.perf_counter(), (run_dir / CKPT_DIR).exists()
        if not (run_dir / SPEC_FILE).exists():  # student.json is written last
            result = train.run(train.TrainConfig(
                student=args.student, cache=str(cache), out=str(run_dir), epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, warmup_steps=20, image_size=64, workers=1, device="cpu",
                seed=seed, progress=False, labels=True, resume=resumed, **RECIPES[recipe]))
            if result.get("stopped"):  # SIGTERM/SIGUSR1: checkpointed; a re-run resumes it
                raise SystemExit(f"{run_dir.name}: stopped by a signal, checkpoint saved; re-run to resume")
        (run_dir / RUN_JSON).write_text(json.dumps({
            "student": args.student, "recipe": recipe, "seed": seed, "epochs": args.epochs, "lr": args.lr,
            "batch_size": args.batch_size, "seconds": round(time.perf_counter() - start, 1), "resumed": resumed}))
        evaluate.run(evaluate.EvalConfig(run=str(run_dir), checkpoint="last", device="cpu", progress=False))
    report = json.loads((run_dir / EVAL_JSON).read_text())
    return {**json.loads((run_dir / RUN_JSON).read_text()), "metrics": {m: report["metrics"][m] for m in METRICS}}


def table(rows: dict[str, list[dict[str, Any]]]) -> str:
    """| recipe | seeds | head top-1 | head top-5 | min/run |, the teacher's zero-shot first."""
    any_row = next(r for runs in rows.values() for r in runs)
    teacher = [f"{any_row['metrics'][m]['teacher']:.3f}" for m in METRICS]
    lines = ["| model | seeds | top-1 | top-5 | min/run |", "|---|---|---|---|---|",
             f"| teacher zero-shot (prompt ensemble) | – | {teacher[0]} | {teacher[1]} | – |"]
    for recipe, runs in rows.items():
        cells = []
        for m in METRICS:
            mean, std = mean_std([r["metrics"][m]["student"] for r in runs])
            cells.append(f"{mean:.3f} ± {std:.3f}" if len(runs) > 1 else f"{mean:.3f}")
        minutes = statistics.fmean(r["seconds"] for r in runs) / 60
        name = {"hinton": "student, hinton (T=4, α=0.5)", "ce": "student, CE only (no teacher)"}[recipe]
        lines.append(f"| {name} | {len(runs)} | {cells[0]} | {cells[1]} | {minutes:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="a `kdpipe pretrain-teacher` output folder")
    parser.add_argument("--root", default="data/taskkd")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--student", default="mobilenetv3_050")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-val", type=int, default=1000)
    args = parser.parse_args()
    root = Path(args.root)
    cache = prepare(root, args)
    rows: dict[str, list[dict[str, Any]]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for recipe in RECIPES:
            run_dir = root / "runs" / f"{args.student}-{recipe}-e{args.epochs}-s{seed}"
            row = train_and_eval(cache, run_dir, recipe, seed, args)
            rows.setdefault(recipe, []).append(row)
            print(f"{run_dir.name} ({row['seconds']:.0f} s): "
                  + ", ".join(f"{m} {row['metrics'][m]['student']:.3f}" for m in METRICS), flush=True)
    text = table(rows)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "taskkd.json").write_text(json.dumps({"args": vars(args), "runs": rows, "table": text}, indent=2))


if __name__ == "__main__":
    main()
