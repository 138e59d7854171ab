"""Whitening variants on the shapes world: does any of them help a small student?

Uses the teacher and cache of benchmarks/quality.py (same --root and teacher settings: they are
reused, not rebuilt) and its runs with the default recipe as the raw baseline (same cache,
schedule and seeds). Three stages, each resumable (a run with an eval.json is not repeated):

1. ceiling: ``fit-whitening`` with every variant (--variants), and the teacher's own I->T R@1,
   T->I R@1, zero-shot top-1, modality gap and effective rank in each space. A variant whose
   joint space costs the teacher more than --max-teacher-loss of its raw I->T R@1, or twice that
   of its zero-shot top-1 (8 classes, 500 images: a noisier figure), is not a candidate.
2. verdict: the default recipe (CLIP-KD's) trained on full joint ZCA and on each candidate's joint
   space, --students x --seeds at --epochs; per variant, Δ final I->T R@1 and zero-shot top-1 vs
   raw (± seed std), epochs to 90% of the raw run's final R@1 (same seed), and whether it meets the
   target: >= 1.5x faster convergence, or better than raw by more than 2 seed std.
3. --protocol: the claim's own protocol: mobilenetv3 and resnet18, raw vs joint ZCA, after 1 and
   after 5 epochs (separate runs, each with its own schedule), zero-shot top-1 and I->T R@1.

    .venv/bin/python benchmarks/whitening_study.py --root /root/kdpipe-quality --teacher-steps 3000 \\
        --teacher-val-every 300 [--students mobilenetv3_050,mobilenetv3] [--seeds 0,1,2] [--protocol]

Prints Markdown tables and writes benchmarks/results/whitening.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import quality  # noqa: E402  (the quality benchmark's teacher, cache, runs and helpers)

from kdpipe import whiten  # noqa: E402
from kdpipe.rundir import EVAL_JSON  # noqa: E402
from kdpipe.trainconfig import DEFAULT_RECIPE  # noqa: E402

VARIANTS = ("full", "shrink=0.01", "shrink=0.1", "shrink=1", "alpha=0.25", "alpha=0.5", "alpha=0.75",
            "top=0.9", "top=0.99")
SPACE = "joint"  # the space a student learns: one transform keeps image-text alignment
MAIN = ("i2t_R@1", "t2i_R@1", "zeroshot/shapes/top1")
# the mechanism the claim names ("mitigates the modality gap and prevents feature collapse"), measured on the
# student as eval reports it: its held-out image embeddings against the captions, in its teacher's space
GEOMETRY = ("geometry/modality_gap", "geometry/effective_rank_image")


def recipe_name(variant: str) -> str:
    """quality.py's recipe for the joint space of a variant: "+white-joint" (full) or "+white-joint@alpha=0.5"."""
    return "+white-joint" if variant == "full" else f"+white-joint@{variant}"


def register_recipe(variant: str) -> str:
    name = recipe_name(variant)
    quality.RECIPES.setdefault(name, {"losses": DEFAULT_RECIPE, "whiten": SPACE if variant == "full"
                                      else f"{SPACE}@{variant}"})
    return name


# --------------------------------------------------------------------------- 1. ceiling


def ceiling(cache: Path, variants: list[str]) -> dict[str, Any]:
    """Fit every variant (one pass over the cache) unless whitening.json already has them all."""
    path = cache / whiten.WHITENING_JSON
    wanted = [SPACE if v == "full" else f"{SPACE}@{v}" for v in variants]
    report = json.loads(path.read_text()) if path.exists() else None
    if report is None or not set(wanted) <= set(report["modes"]):
        report = whiten.run(whiten.WhitenConfig(cache=str(cache), mode="all",
                                                variants=[v for v in variants if v != "full"], progress=False))
    return report


def teacher_row(t: dict[str, Any]) -> dict[str, float]:
    return {"i2t_R@1": t["retrieval"]["i2t_R@1"], "t2i_R@1": t["retrieval"]["t2i_R@1"],
            "zeroshot/shapes/top1": t["zero_shot"]["shapes"]["top1"], "modality_gap": t["modality_gap"],
            "erank_image": t["effective_rank"]["image"], "erank_text": t["effective_rank"]["text"]}


def ceiling_table(report: dict[str, Any], variants: list[str], max_loss: float) -> tuple[str, dict, list[str]]:
    """Markdown rows: raw, then each variant's joint and separate spaces; -> (table, rows, candidates)."""
    raw = teacher_row(report["teacher_raw"])
    rows: dict[str, dict[str, float]] = {"raw": raw}
    lines = ["| space | variant | teacher I->T R@1 | T->I R@1 | zero-shot top-1 | modality gap | eff. rank img/txt | candidate |",
             "|---|---|---|---|---|---|---|---|",
             f"| raw | – | {raw['i2t_R@1']:.3f} | {raw['t2i_R@1']:.3f} | {raw['zeroshot/shapes/top1']:.3f} | "
             f"{raw['modality_gap']:.2f} | {raw['erank_image']:.0f}/{raw['erank_text']:.0f} | – |"]
    candidates = []
    for v in variants:
        for space, group in (("joint", SPACE), ("separate", "image")):
            key = group if v == "full" else f"{group}@{v}"
            if key not in report["modes"]:
                continue
            row = teacher_row(report["modes"][key]["teacher"])
            rows[f"{space}/{v}"] = row
            ok = (row["i2t_R@1"] >= (1 - max_loss) * raw["i2t_R@1"]
                  and row["zeroshot/shapes/top1"] >= (1 - 2 * max_loss) * raw["zeroshot/shapes/top1"])
            if space == "joint" and ok:
                candidates.append(v)
            ratio = row["i2t_R@1"] / raw["i2t_R@1"]
            lines.append(f"| {space} | {v} | {row['i2t_R@1']:.3f} ({ratio:.2f}x) | {row['t2i_R@1']:.3f} | "
                         f"{row['zeroshot/shapes/top1']:.3f} | {row['modality_gap']:.2f} | "
                         f"{row['erank_image']:.0f}/{row['erank_text']:.0f} | "
                         f"{'yes' if ok and space == 'joint' else 'no' if space == 'joint' else '–'} |")
    return "\n".join(lines), rows, candidates


# --------------------------------------------------------------------------- 2. verdict


def run_dir(root: Path, student: str, recipe: str, epochs: int, seed: int) -> Path:
    return root / "runs" / f"{student}-{recipe}-e{epochs}-s{seed}"


def train(cache: Path, root: Path, student: str, recipe: str, epochs: int, seed: int,
          args: argparse.Namespace) -> dict[str, Any]:
    run_args = argparse.Namespace(**{**vars(args), "epochs": epochs})
    out = run_dir(root, student, recipe, epochs, seed)
    row = quality.train_and_eval(cache, out, student, recipe, seed, run_args)
    print(f"{out.name} ({row['seconds']:.0f} s): " + ", ".join(
        f"{m} {row['metrics'][m]['student']:.3f}" for m in MAIN if m in row["metrics"]), flush=True)
    return row


def finished(root: Path, student: str, recipe: str, epochs: int, seeds: list[int]) -> dict[int, dict[str, Any]]:
    out = {}
    for seed in seeds:
        d = run_dir(root, student, recipe, epochs, seed)
        if (d / quality.RUN_JSON).exists():
            out[seed] = quality.read_run(d)
    return out


def student_geometry(run: Path) -> dict[str, float]:
    """The student's modality gap and image effective rank, from the eval.json ``quality.read_run`` refreshed."""
    ev = json.loads((run / EVAL_JSON).read_text())["metrics"]
    return {g: ev[g]["student"] for g in GEOMETRY}


def epochs_to(curve: list[float], target: float) -> int | None:
    """First epoch (1-based) whose val I->T R@1 reaches ``target``; None if it never does."""
    return next((i + 1 for i, v in enumerate(curve) if v >= target), None)


def compare(raw: dict[int, dict], white: dict[int, dict], epochs: int) -> dict[str, Any] | None:
    """Δ vs raw (paired by seed), epochs to 90% of the raw run's final R@1, and the target's verdict."""
    seeds = sorted(set(raw) & set(white))
    if not seeds:
        return None
    out: dict[str, Any] = {"seeds": seeds}
    for m in MAIN:
        r = [raw[s]["metrics"][m]["student"] for s in seeds]
        w = [white[s]["metrics"][m]["student"] for s in seeds]
        (rm, rs), (wm, ws) = quality.mean_std(r), quality.mean_std(w)
        out[m] = {"raw": rm, "raw_std": rs, "white": wm, "white_std": ws, "delta": wm - rm,
                  "noise": max(rs, ws), "beats_by_2std": len(seeds) > 1 and wm - rm > 2 * max(rs, ws)}
    for g in GEOMETRY:
        out[g] = {side: quality.mean_std([student_geometry(Path(runs[s]["run"]))[g] for s in seeds])[0]
                  for side, runs in (("raw", raw), ("white", white))}
    e_raw, e_white = [], []
    for s in seeds:
        target = 0.9 * raw[s]["curve_i2t_R@1"][-1]
        e_raw.append(epochs_to(raw[s]["curve_i2t_R@1"], target))
        e_white.append(epochs_to(white[s]["curve_i2t_R@1"], target))
    reached = [e for e in e_white if e is not None]
    out["epochs_to_90_raw"] = quality.mean_std([e for e in e_raw if e is not None])
    out["epochs_to_90_white"] = quality.mean_std(reached) if reached else None
    out["reached_90"] = f"{len(reached)}/{len(seeds)}"
    speedup = (out["epochs_to_90_raw"][0] / out["epochs_to_90_white"][0]
               if out["epochs_to_90_white"] and len(reached) == len(seeds) else None)
    out["speedup"] = speedup
    out["target_met"] = bool((speedup is not None and speedup >= 1.5)
                             or out["i2t_R@1"]["beats_by_2std"] or out["zeroshot/shapes/top1"]["beats_by_2std"])
    return out


def geometry(cell: dict[str, Any], key: str, digits: int) -> str:
    g = cell.get(key)
    return "–" if g is None else f"{g['raw']:.{digits}f} → {g['white']:.{digits}f}"


def verdict_table(cells: dict[str, dict[str, Any]], ceiling_rows: dict[str, dict], epochs: int) -> str:
    lines = ["| student | variant (joint) | seeds | Δ I->T R@1 vs raw | Δ zero-shot vs raw | epochs to 90% of raw's "
             f"final R@1 (raw → white; {epochs} epochs) | student's modality gap (raw → white) | student's eff. rank "
             "(raw → white) | teacher's I->T / zero-shot in that space | target met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, c in cells.items():
        student, variant = key.split("/", 1)
        d1, dz = c["i2t_R@1"], c["zeroshot/shapes/top1"]
        e_raw, e_white = c["epochs_to_90_raw"], c["epochs_to_90_white"]
        speed = (f"{e_raw[0]:.1f} → " + ("never" if e_white is None else f"{e_white[0]:.1f}")
                 + (f" (reached {c['reached_90']})" if c["reached_90"] != f"{len(c['seeds'])}/{len(c['seeds'])}" else ""))
        t = ceiling_rows.get(f"joint/{variant}", {})
        lines.append(f"| {student} | {variant} | {len(c['seeds'])} | {d1['delta']:+.3f} (raw {d1['raw']:.3f} ± {d1['raw_std']:.3f}, "
                     f"white {d1['white']:.3f} ± {d1['white_std']:.3f}) | {dz['delta']:+.3f} (± {dz['noise']:.3f}) | "
                     f"{speed} | {geometry(c, GEOMETRY[0], 2)} | {geometry(c, GEOMETRY[1], 0)} | {t.get('i2t_R@1', float('nan')):.3f} / {t.get('zeroshot/shapes/top1', float('nan')):.3f} | "
                     f"{'yes' if c['target_met'] else 'no'} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- 3. the claim's protocol


def protocol_table(root: Path, students: list[str], seeds: list[int]) -> tuple[str, dict[str, Any]]:
    lines = ["| student | space | epochs | seeds | I->T R@1 | zero-shot top-1 | student's modality gap | "
             "student's eff. rank |", "|---|---|---|---|---|---|---|---|"]
    out: dict[str, Any] = {}
    for student in students:
        for epochs in (1, 5):
            for recipe, space in (("default", "raw"), ("+white-joint", "joint ZCA")):
                runs = finished(root, student, recipe, epochs, seeds)
                if not runs:
                    continue
                cells = {m: quality.mean_std([r["metrics"][m]["student"] for r in runs.values()]) for m in MAIN}
                geo = [student_geometry(Path(r["run"])) for r in runs.values()]
                cells.update({g: quality.mean_std([x[g] for x in geo]) for g in GEOMETRY})
                out[f"{student}/{space}/e{epochs}"] = {"seeds": sorted(runs), **cells}
                spread = (lambda m: f" ± {cells[m][1]:.3f}") if len(runs) > 1 else (lambda m: "")  # noqa: E731
                lines.append(f"| {student} | {space} | {epochs} | {len(runs)} | "
                             f"{cells['i2t_R@1'][0]:.3f}{spread('i2t_R@1')} | "
                             f"{cells['zeroshot/shapes/top1'][0]:.3f}{spread('zeroshot/shapes/top1')} | "
                             f"{cells[GEOMETRY[0]][0]:.2f} | {cells[GEOMETRY[1]][0]:.0f} |")
    return "\n".join(lines), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", default="mobilenetv3_050,mobilenetv3")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="';'-separated when a variant has a comma")
    ap.add_argument("--max-teacher-loss", type=float, default=0.05,
                    help="share of the teacher's raw I->T R@1 a candidate may lose (twice that of zero-shot)")
    ap.add_argument("--protocol", action="store_true", help="also run the claim's protocol (1 and 5 epochs)")
    ap.add_argument("--protocol-students", default="mobilenetv3,resnet18")
    quality.add_shared_arguments(ap, teacher_steps=3000)
    args = ap.parse_args()
    root, start = Path(args.root), time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(";") if ";" in args.variants else args.variants.split(",")
    _, cache = quality.prepare(root, args)
    report = ceiling(cache, variants)
    c_md, c_rows, candidates = ceiling_table(report, variants, args.max_teacher_loss)
    print(c_md, flush=True)
    print(f"candidates (joint space, teacher within {args.max_teacher_loss:.0%} of raw I->T R@1 and "
          f"{2 * args.max_teacher_loss:.0%} of zero-shot): {', '.join(candidates) or 'none'}", flush=True)
    studied = ["full"] + [v for v in candidates if v != "full"]  # full ZCA: what --whiten joint ships
    students = args.students.split(",")
    for student in [] if args.report_only else students:
        for variant in studied:
            for seed in seeds:
                train(cache, root, student, "default", args.epochs, seed, args)
                train(cache, root, student, register_recipe(variant), args.epochs, seed, args)
    cells = {}
    for student in students:
        raw = finished(root, student, "default", args.epochs, seeds)
        for variant in studied:
            c = compare(raw, finished(root, student, register_recipe(variant), args.epochs, seeds), args.epochs)
            if c:
                cells[f"{student}/{variant}"] = c
    v_md = verdict_table(cells, c_rows, args.epochs)
    print(v_md)
    p_md, p_cells = "", {}
    if args.protocol:
        p_students = args.protocol_students.split(",")
        for student in [] if args.report_only else p_students:
            for epochs in (1, 5):
                for seed in seeds:
                    train(cache, root, student, "default", epochs, seed, args)
                    train(cache, root, student, register_recipe("full"), epochs, seed, args)
        p_md, p_cells = protocol_table(root, p_students, seeds)
        print(p_md)
    met = [k for k, c in cells.items() if c["target_met"]]
    print(f"target met by: {', '.join(met)}" if met else
          "target met by: none of the measured cells" if cells else "no whitened run has finished yet")
    out = quality.RESULTS / "whitening.json"
    out.write_text(json.dumps({
        "command": "benchmarks/whitening_study.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "minutes_this_invocation": round((time.perf_counter() - start) / 60, 1), "ceiling": c_rows,
        "candidates": candidates, "verdict": cells, "protocol": p_cells, "target_met_by": met,
        "markdown": {"ceiling": c_md, "verdict": v_md, "protocol": p_md}}, indent=1))


if __name__ == "__main__":
    main()
