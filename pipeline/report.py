"""Stage 5b: one Markdown table comparing runs (`kdpipe report RUN [RUN ...]`).

Reads what the other stages left in each run directory — ``student.json`` (student, whitening,
teacher), ``config.toml`` (losses), ``eval.json`` (retrieval, zero-shot, agreement, with the
teacher's values) and ``bench.json`` (size, latency, ratios) — and writes one row per run
below a teacher row. Accuracy on classes whose labels a run trained on (``supervised/…`` in
eval.json) gets its own column, apart from zero-shot, and so does a ``--labels`` run's class head
(``head/top1``; its teacher cell is the teacher's zero-shot on the same images). Anything a run
lacks shows as "–", so a report can be made at any stage.
Knows files, not math: every number is read, none recomputed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .atomic import atomic_write_bytes
from .errors import BadValue
from .rundir import (BENCH_JSON, EVAL_JSON, SPEC_FILE, RunSpec, describe_checkpoint, picked_on_split, read_config,
                     read_json, require_run)
from .store import describe_teacher

log = logging.getLogger("kdpipe")

MISSING = "–"
LABEL_COLUMNS = 4  # run, student, losses, whitening


@dataclass
class ReportConfig:
    runs: list[str | Path]
    out: str | Path = "report.md"


# --------------------------------------------------------------------------- reading a run


@dataclass
class RunFiles:
    """What one run directory holds (None where a stage has not written its file)."""

    path: Path
    student: RunSpec | None
    config: dict[str, Any] | None
    eval: dict[str, Any] | None
    bench: dict[str, Any] | None


def read_run(path: str | Path) -> RunFiles:
    """Every file a report reads; a run need only have reached one of train, eval or bench."""
    path = require_run(path, any_of=(SPEC_FILE, EVAL_JSON, BENCH_JSON))
    spec = read_json(path / SPEC_FILE)
    return RunFiles(path, None if spec is None else RunSpec.from_json(spec), read_config(path),
                    read_json(path / EVAL_JSON), read_json(path / BENCH_JSON))


def _recipe(value: Any) -> str | None:
    """{"fd": 7.8, "crd": 1} or "fd=7.8,crd=1" -> "fd 7.8 + crd 1"; None when unrecognised."""
    if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
        return " + ".join(f"{k} {v:g}" for k, v in value.items())
    if isinstance(value, str) and value.strip():
        return " + ".join(part.strip().replace("=", " ").replace(":", " ") for part in value.split(","))
    return None


def losses_of(spec: RunSpec | None, config: dict[str, Any] | None) -> str:
    """The loss recipe: student.json's resolved weights, else config.toml's ``losses``; "–" when neither."""
    recipe = _recipe(spec.loss_weights if spec is not None else None)
    return recipe or _recipe((config or {}).get("losses")) or MISSING


def student_name(spec: RunSpec | None, ev: dict[str, Any] | None) -> str:
    """"tiny" for an image-only student, "tiny + text_tiny" with a text tower."""
    if spec is not None:
        image, text = spec.image_name, spec.text_name
    elif ev:
        image, text = ev.get("model", {}).get("image"), ev.get("model", {}).get("text")
    else:
        return MISSING
    return f"{image} + {text}" if text else str(image)


def whitening_of(spec: RunSpec | None, ev: dict[str, Any] | None) -> str:
    """student.json's whitening mode, else eval.json's (which evaluate copied from it); "none" when not whitened."""
    if spec is None and ev is None:
        return MISSING
    if spec is None:  # eval.json records it as student.json does: read by the same lenient parser
        spec = RunSpec.from_json({"whitening": ev.get("whitening")})
    return "none" if spec.whitening is None else str(spec.whitening)


def teacher_of(files: RunFiles) -> dict[str, Any] | None:
    if files.student is not None and files.student.teacher is not None:
        return files.student.teacher
    fp = (files.eval or {}).get("teacher")
    return fp if isinstance(fp, dict) else None


# --------------------------------------------------------------------------- cells


def _num(v: float | None, digits: int = 3) -> str:
    return MISSING if v is None else f"{v:.{digits}f}"


def _metric(ev: dict[str, Any] | None, name: str, who: str) -> float | None:
    row = (ev or {}).get("metrics", {}).get(name)
    return row.get(who) if isinstance(row, dict) else None


def accuracy_cell(ev: dict[str, Any] | None, name: str) -> str:
    """"0.512 (0.93×)": the student's value and its ratio to the teacher's."""
    value, ratio = _metric(ev, name, "student"), _metric(ev, name, "ratio")
    if value is None:
        return MISSING
    return f"{value:.3f}" + ("" if ratio is None else f" ({ratio:.2f}×)")


def _tower(bench: dict[str, Any] | None, who: str, tower: str = "image") -> dict[str, Any]:
    if not bench:
        return {}
    side = bench.get("teacher") if who == "teacher" else bench.get("student")
    return (side or {}).get(tower) or {}


def _image_cell(bench: dict[str, Any] | None, who: str, key: str, fmt: Callable[[float], str],
                better: str, worse: str) -> str:
    """An image-tower figure; for a student also "N× <better>" (or "N× <worse>") than the teacher's.

    ``ratios`` hold teacher ÷ student, so < 1 means the student is the bigger / slower one.
    """
    row = _tower(bench, who)
    if key not in row:
        return MISSING
    ratio = (bench.get("ratios", {}).get("image") or {}).get(key) if who == "student" else None
    if ratio is None or ratio <= 0:
        return fmt(row[key])
    return fmt(row[key]) + (f" ({ratio:.3g}× {better})" if ratio >= 1 else f" ({1 / ratio:.3g}× {worse})")


def size_cell(bench: dict[str, Any] | None, who: str = "student") -> str:
    """Image tower, fp16 MB."""
    return _image_cell(bench, who, "size_fp16_bytes", lambda b: f"{b / 2**20:.3g} MB", "smaller", "larger")


def latency_cell(bench: dict[str, Any] | None, who: str = "student") -> str:
    """Image tower, batch 1, p50 ms."""
    return _image_cell(bench, who, "latency_b1_p50_ms", lambda ms: f"{ms:.3g} ms", "faster", "slower")


def onnx_latency_cell(bench: dict[str, Any] | None, who: str = "student") -> str:
    """Image tower in ONNX Runtime (``kdpipe bench --onnx``), batch 1, p50 ms; for a student also
    "N× faster/slower" than the teacher's tower exported and timed the same way."""
    onnx = ((bench or {}).get("teacher") or {}).get("onnx") if who == "teacher" else (bench or {}).get("onnx")
    if not onnx:
        return MISSING
    ratio = ((bench or {}).get("ratios", {}).get("image") or {}).get("onnx_latency_b1_p50_ms") if who == "student" else None
    cell = f"{onnx['latency_b1_p50_ms']:.3g} ms"
    if ratio is None or ratio <= 0:
        return cell
    return cell + (f" ({ratio:.3g}× faster)" if ratio >= 1 else f" ({1 / ratio:.3g}× slower)")


def zeroshot_names(runs: list[RunFiles], kind: str = "zeroshot") -> list[str]:
    """Datasets with a ``{kind}/{name}/top1`` in any eval.json, first-seen order. ``kind`` "supervised":
    class sets whose labels a run's losses trained on (its accuracy there is not zero-shot)."""
    names: list[str] = []
    for r in runs:
        for metric in (r.eval or {}).get("metrics", {}):
            parts = metric.split("/")
            if len(parts) == 3 and parts[0] == kind and parts[2] == "top1" and parts[1] not in names:
                names.append(parts[1])
    return names


# --------------------------------------------------------------------------- table


HEAD_TOP1 = "head/top1"  # eval.json's class-head accuracy of a run trained with --labels


def has_head(runs: list[RunFiles]) -> bool:
    return any(HEAD_TOP1 in (r.eval or {}).get("metrics", {}) for r in runs)


def columns(zeroshot: list[str], supervised: list[str] = (), head: bool = False) -> list[str]:
    return (["run", "student", "losses", "whitening", "i2t R@1", "t2i R@1"]
            + [f"zero-shot {n} top-1" for n in zeroshot]
            + [f"supervised {n} top-1" for n in supervised]
            + ["class head top-1"] * head
            + ["agreement (cos)", "image size fp16", "image latency b1 p50", "image latency b1 p50 onnxruntime"])


def student_row(r: RunFiles, zeroshot: list[str], supervised: list[str] = (), head: bool = False) -> list[str]:
    ev = r.eval
    return ([r.path.name, student_name(r.student, ev), losses_of(r.student, r.config), whitening_of(r.student, ev),
             accuracy_cell(ev, "i2t_R@1"), accuracy_cell(ev, "t2i_R@1")]
            + [accuracy_cell(ev, f"zeroshot/{n}/top1") for n in zeroshot]
            + [accuracy_cell(ev, f"supervised/{n}/top1") for n in supervised]
            + [accuracy_cell(ev, HEAD_TOP1)] * head
            + [_num(_metric(ev, "agreement/cosine", "student")), size_cell(r.bench), latency_cell(r.bench),
               onnx_latency_cell(r.bench)])


def teacher_row(runs: list[RunFiles], zeroshot: list[str], supervised: list[str] = (), head: bool = False) -> list[str]:
    """The teacher's figures from the first run that has each (its eval.json / bench.json); under "class head
    top-1", its zero-shot on the head's images (from the first run with a head)."""
    ev = next((r.eval for r in runs if r.eval), None)
    bench = next((r.bench for r in runs if r.bench), None)
    fp = next((fp for fp in map(teacher_of, runs) if fp), None)
    name = f"teacher: {describe_teacher(fp)}" if fp else "teacher"
    t = lambda m: _num(_metric(ev, m, "teacher"))  # noqa: E731
    return ([name, MISSING, MISSING, "none", t("i2t_R@1"), t("t2i_R@1")]
            + [t(f"zeroshot/{n}/top1") for n in zeroshot]
            + [MISSING for _ in supervised]  # the teacher never saw labels: its figure is in the zero-shot column
            + [_num(next((_metric(r.eval, HEAD_TOP1, "teacher") for r in runs
                          if HEAD_TOP1 in (r.eval or {}).get("metrics", {})), None))] * head
            + ["1.000" if ev else MISSING, size_cell(bench, "teacher"), latency_cell(bench, "teacher"),
               onnx_latency_cell(bench, "teacher")])


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def markdown(runs: list[RunFiles]) -> str:
    """The report: title, one table (teacher row first), and notes on what is compared."""
    zeroshot, supervised, with_head = zeroshot_names(runs), zeroshot_names(runs, "supervised"), has_head(runs)
    head = columns(zeroshot, supervised, with_head)
    align = ["---"] * LABEL_COLUMNS + ["---:"] * (len(head) - LABEL_COLUMNS)  # labels left, numbers right
    lines = ["# kdpipe report", "", _md_row(head), "|" + "|".join(align) + "|",
             _md_row(teacher_row(runs, zeroshot, supervised, with_head))]
    lines += [_md_row(student_row(r, zeroshot, supervised, with_head)) for r in runs]
    lines += ["", *notes(runs)]
    return "\n".join(lines) + "\n"


def notes(runs: list[RunFiles]) -> list[str]:
    out = ["Accuracy cells: student value (student / teacher). Size and latency: the image tower, and how "
           "many times smaller/faster (or larger/slower) it is than the teacher's, in PyTorch (eager) and in "
           "ONNX Runtime (both towers exported and timed the same way; `kdpipe bench --onnx`). At batch 1 on a "
           "CPU, PyTorch's per-operator overhead can outweigh a small tower's arithmetic, so a student with far "
           "fewer FLOPs can still be slower there; full per-tower figures are in each RUN/bench.json. \"–\": not measured yet "
           "(run `kdpipe eval` / `kdpipe bench`)."]
    splits = {(r.eval or {}).get("split") for r in runs if r.eval}
    spaces = {(r.eval or {}).get("space") for r in runs if r.eval}
    if splits:
        out.append(f"Evaluated on split(s): {', '.join(sorted(map(str, splits)))}; "
                   f"embedding space(s): {'; '.join(sorted(map(str, spaces)))}.")
    judged = [f"{r.path.name} {c}" for r in runs if (c := describe_checkpoint((r.eval or {}).get("checkpoint")))]
    if judged:
        out.append(f"Weights evaluated: {', '.join(judged)}.")
    picked = [r.path.name for r in runs if r.eval and picked_on_split(r.eval.get("checkpoint"), r.eval.get("split"))]
    if picked:
        out.append(f"Warning: the best weights of {', '.join(picked)} were picked by train's validation on the split "
                   "they are scored on, so their accuracy is optimistic; `kdpipe eval RUN --checkpoint last` scores "
                   "the final weights.")
    if zeroshot_names(runs, "supervised"):
        out.append("\"supervised\" columns: the run's losses trained on these classes' labels (e.g. hinton's "
                   "hard-label CE), so its accuracy there is supervised, not zero-shot; it has no teacher ratio "
                   "and must not be compared with the zero-shot columns.")
    if has_head(runs):
        out.append("\"class head top-1\": the class head of a run trained with --labels (task KD, or CE alone), "
                   "next to (÷) the teacher's zero-shot top-1 on the same images, the teacher row's figure.")
    fps = {json.dumps(fp, sort_keys=True) for fp in map(teacher_of, runs) if fp}
    if len(fps) > 1:
        out.append("Warning: these runs were distilled from different teachers; each ratio is to its own "
                   "teacher, the teacher row shows the first.")
    devices = {(r.bench or {}).get("device") for r in runs if r.bench}
    if len(devices) > 1:
        out.append(f"Warning: latencies were measured on different devices ({', '.join(sorted(map(str, devices)))}).")
    return [f"- {n}" for n in out]


def run(cfg: ReportConfig) -> dict[str, Any]:
    """Write the Markdown report to cfg.out; returns {"path", "markdown"}."""
    if not cfg.runs:
        raise BadValue("give at least one RUN directory")
    runs = [read_run(r) for r in cfg.runs]
    text = markdown(runs)
    out = Path(cfg.out)
    atomic_write_bytes(out, text.encode())
    log.info("wrote %s", out)
    return {"path": str(out), "markdown": text}
