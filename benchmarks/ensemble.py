"""Ensemble distillation on the shapes world: does a student of two teachers beat a student of either?

Uses the world, teacher ("A") and cache of benchmarks/quality.py (same --root and teacher settings:
they are reused, not rebuilt). Each stage resumes (a finished one is skipped):

1. teacher B: the same architecture and schedule as A, another seed (``pretrain-teacher --seed``);
2. the ensemble cache ROOT/cache-ens: a hard-link copy of A's cache (no shard is rewritten by an add,
   and the manifest is replaced, not edited, so A's cache is left as it was), then
   ``extract --add-teacher`` of B on its stored views (every teacher sees the same pixels), and
   B's teacher_eval.json;
3. --student x --seeds at --epochs with the default recipe (CLIP-KD's), three arms, same schedule:
   A alone (``--teachers A``), B alone (``--teachers B``) and the ensemble (``--teachers A,B``, equal
   weights). All three run on cache-ens.

The student's held-out I->T / T->I R@1 score its image tower against the captions as its teacher's
text tower embeds them, so each arm is scored in its own (first) teacher's space, as eval reports it;
zero-shot top-1 likewise uses that teacher's prompts. The target: the ensemble's student beats the
better single-teacher student on I->T R@1 or zero-shot top-1 by more than 2 seed std.

    .venv/bin/python benchmarks/ensemble.py --root /root/kdpipe-quality --teacher-steps 3000 \\
        --teacher-val-every 300 [--student mobilenetv3_050] [--seeds 0,1,2] [--epochs 6]

Prints a Markdown table and writes benchmarks/results/ensemble.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import quality  # noqa: E402  (the quality benchmark's teacher, cache, runs and helpers)

from kdpipe import evaluate, extract, pretrain  # noqa: E402
from kdpipe.store import MANIFEST, open_cache  # noqa: E402
from kdpipe.trainconfig import DEFAULT_RECIPE  # noqa: E402

B = "seed1"  # teacher B's name in the ensemble cache
MAIN = ("i2t_R@1", "t2i_R@1", "zeroshot/shapes/top1")


def teacher_b(root: Path, args: argparse.Namespace) -> Path:
    out = root / "teacher-seed1"
    summary = pretrain.run(pretrain.PretrainConfig(data=str(root / "shapes"), out=str(out), steps=args.teacher_steps,
                                                   val_every=args.teacher_val_every or max(1, args.teacher_steps // 10),
                                                   seed=1, device="cpu", progress=False))
    if "stopped" in summary:
        raise SystemExit(f"teacher B stopped by {summary['stopped']} at step {summary['step']}; re-run to resume")
    print(f"teacher B: {summary['steps']} steps in {summary['seconds']:.0f} s; val I->T R@1 "
          + " ".join(f"{r['step']}:{r['i2t_R@1']:.3f}" for r in summary.get("val_curve", [])), flush=True)
    return out


def ensemble_cache(root: Path, cache: Path, teacher: Path) -> Path:
    """cache-ens: A's cache, hard-linked, with B added (both steps resume)."""
    ens = root / "cache-ens"
    if not (ens / MANIFEST).exists():
        tmp = root / ".cache-ens.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(cache, tmp, copy_function=os.link)
        tmp.rename(ens)
    summary = extract.run(extract.ExtractConfig(teacher=str(teacher / "config.json"),
                                                pretrained=str(teacher / "model.safetensors"), data="", out=str(ens),
                                                add_teacher=True, teacher_name=B, batch_size=64, workers=1,
                                                device="cpu", progress=False))
    if "stopped" in summary:
        raise SystemExit(f"extract --add-teacher stopped by {summary['stopped']}; re-run to resume")
    c = open_cache(ens)
    if not c.teacher_eval_path(B).exists():
        evaluate.run(evaluate.EvalConfig(teacher=str(ens), teacher_name=B, device="cpu", progress=False))
    return ens


def arms(primary: str) -> dict[str, dict[str, Any]]:
    """Recipe name -> TrainConfig settings (registered with quality.RECIPES, whose runner takes them)."""
    return {"A": {"losses": DEFAULT_RECIPE, "teachers": [primary]},
            "B": {"losses": DEFAULT_RECIPE, "teachers": [B]},
            "A+B": {"losses": DEFAULT_RECIPE, "teachers": [primary, B], "teacher_weights": [1.0, 1.0]}}


def teacher_figures(path: Path) -> dict[str, float]:
    ev = json.loads(path.read_text())["metrics"]
    return {m: ev[m]["teacher"] for m in MAIN if m in ev}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": sorted(r["seed"] for r in rows)}
    for m in MAIN:
        vals = [r["metrics"][m]["student"] for r in rows if m in r["metrics"]]
        if vals:
            out[m] = dict(zip(("mean", "std"), quality.mean_std(vals)))
    return out


def verdict(cells: dict[str, dict[str, Any]]) -> str:
    if not all(k in cells and len(cells[k]["seeds"]) > 1 for k in ("A", "B", "A+B")):
        return "not judged yet: every arm needs at least 2 finished seeds"
    words, met = [], False
    for m, label in (("i2t_R@1", "I->T R@1"), ("zeroshot/shapes/top1", "zero-shot top-1")):
        best = max(("A", "B"), key=lambda k: cells[k][m]["mean"])
        d = cells["A+B"][m]["mean"] - cells[best][m]["mean"]
        noise = max(cells["A+B"][m]["std"], cells[best][m]["std"])
        met = met or d > 2 * noise
        words.append(f"{label}: ensemble {cells['A+B'][m]['mean']:.3f} vs the better single ({best}) "
                     f"{cells[best][m]['mean']:.3f}, {d:+.3f} ({'more' if d > 2 * noise else 'not more'} than "
                     f"2 seed std = {2 * noise:.3f})")
    return "; ".join(words) + f" -> target {'MET' if met else 'NOT MET'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="mobilenetv3_050")
    ap.add_argument("--arms", default="A,B,A+B", help="the arms to train (all finished runs are reported): "
                    "e.g. two processes on two cores, one with --arms A,B and one with --arms A+B, once "
                    "cache-ens exists (two --add-teacher on one cache are not safe)")
    quality.add_shared_arguments(ap, teacher_steps=3000)
    args = ap.parse_args()
    root, start = Path(args.root), time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    _, cache = quality.prepare(root, args)
    ens = ensemble_cache(root, cache, teacher_b(root, args))
    c = open_cache(ens)
    recipes = arms(c.primary)
    quality.RECIPES.update(recipes)
    runs = root / "runs-ens"
    cells, rows_of = {}, {}
    for arm in recipes:
        for seed in seeds:
            run_dir = runs / f"{args.student}-{arm}-e{args.epochs}-s{seed}"
            if not args.report_only and arm in args.arms.split(","):
                row = quality.train_and_eval(ens, run_dir, args.student, arm, seed, args)
                print(f"{run_dir.name}: " + ", ".join(f"{m} {row['metrics'][m]['student']:.3f}" for m in MAIN
                                                       if m in row["metrics"]), flush=True)
            if (run_dir / quality.RUN_JSON).exists():
                rows_of.setdefault(arm, []).append(quality.read_run(run_dir))
        if arm in rows_of:
            cells[arm] = summarise(rows_of[arm])
    teachers = {"A": teacher_figures(c.teacher_eval_path()), "B": teacher_figures(c.teacher_eval_path(B))}
    lines = ["| arm | teacher(s) | seeds | " + " | ".join(MAIN) + " |", "|" + "---|" * (len(MAIN) + 3)]
    for k, t in teachers.items():
        lines.append(f"| teacher {k} itself | – | – | " + " | ".join(f"{t[m]:.3f}" for m in MAIN) + " |")
    for arm, cell in cells.items():
        lines.append(f"| student of {arm} | {', '.join(recipes[arm]['teachers'])} | {len(cell['seeds'])} | "
                     + " | ".join(f"{cell[m]['mean']:.3f} ± {cell[m]['std']:.3f}" if m in cell else "–"
                                  for m in MAIN)
                     + " |")
    md, v = "\n".join(lines), verdict(cells)
    print(md)
    print(v)
    out = quality.RESULTS / "ensemble.json"
    out.write_text(json.dumps({
        "command": "benchmarks/ensemble.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "minutes_this_invocation": round((time.perf_counter() - start) / 60, 1), "teachers": teachers,
        "cells": cells, "runs": rows_of, "markdown": md, "verdict": v}, indent=1))


if __name__ == "__main__":
    main()
