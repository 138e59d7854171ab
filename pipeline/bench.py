"""The bench stage (``BenchConfig``, ``run(cfg)``): `kdpipe bench RUN [RUN ...]`.

The teacher and every run's student are measured in one process, on the same device and
threads, by the measuring functions of ``kdpipe.measure``. The teacher is rebuilt from its
architecture with random weights (speed does not depend on them). Each tower's callable
returns its output on the host as float32 (as a service would hand it back), teacher and
student alike. Writes JSON for machines (RUN/bench.json), a rich table for people and an
accuracy-vs-latency PNG.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from rich.table import Table
from torch import Tensor, nn

from .atomic import atomic_write_json
from .errors import BadValue, MissingInput
from .measure import Fn, check_onnx, export_onnx, measure_tower, onnx_latency, ratio_table, throughput
from .measure import count_params  # noqa: F401  (kept importable as kdpipe.bench.count_params)
from .rundir import (BENCH_JSON, BENCH_PNG, COMPARE_JSON, COMPARE_PNG, EVAL_JSON, ONNX_FILE, SPEC_FILE, RunSpec,
                     check_checkpoint, read_json, read_spec)
from .store import Manifest, same_fingerprint

log = logging.getLogger("kdpipe")


@dataclass
class BenchConfig:
    runs: list[str | Path]
    teacher: str | None = None  # a model name, model-config JSON or CACHE dir; default: the runs' teacher
    device: str = "cpu"
    batch_sizes: tuple[int, ...] = (1, 64)  # latency at batch 1; throughput at every size > 1
    warmup: int = 5
    iters: int = 30  # timed batch-1 calls per tower (p50 / p90)
    throughput_iters: int = 10  # back-to-back calls at batch N
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    checkpoint: str = "best"  # each run's weights: best | last (timings do not depend on them; ONNX does)
    onnx: bool = False  # export the student image tower, check it against PyTorch, time it
    onnx_tol: float = 1e-4  # of the largest PyTorch output (float32 round-off at the output's scale)
    caption: str = "a photo of a small red circle to the left of a big blue square."  # the text example
    out: str | Path | None = None  # several runs: where bench_compare.{json,png} go (default: the first run)


ACCURACY_METRIC = "i2t_R@1"
TEACHER_WEIGHTS_NOTE = "random init: the architecture is rebuilt from its name; speed does not depend on weights"
SHARED_TEXT_NOTE = ("image-only student: captions and prompts go through the teacher's text tower, so its "
                    "text row is the teacher's (not re-measured) and the total includes it")
NOT_TEXT = ("visual", "logit_scale", "logit_bias")  # an open_clip model's children that are not its text tower
_SUM_KEYS = ("params", "size_fp32_bytes", "size_fp16_bytes", "flops_per_sample", "latency_b1_p50_ms",
             "latency_b1_p90_ms")


@dataclass
class Tower:
    """One tower to time: fn(example [B, ...]) -> output, the module that holds its weights, inputs."""

    name: str
    fn: Fn
    module: nn.Module
    example: Callable[[int], Tensor]  # batch size -> input batch on the device


class _Parts(nn.Module):
    """A view on some children / parameters of a model (shared, not copied): e.g. CLIP minus its visual tower."""

    def __init__(self, model: nn.Module, skip: tuple[str, ...]) -> None:
        super().__init__()
        for name, child in model.named_children():
            if name not in skip:
                self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            if name not in skip:
                self.register_parameter(name, p)


def _host(fn: Callable[[Tensor], Tensor]) -> Fn:
    return lambda x: fn(x).float().cpu()


def teacher_towers(teacher: Any, device: torch.device, caption: str) -> dict[str, Tower]:
    """Image and text towers of a kdpipe Teacher (fp32, trimmed text forward as in extraction)."""
    size = teacher.preprocess.size
    tokens = teacher.tokenize([caption]).to(device)
    return {
        "image": Tower("teacher/image", teacher.encode_images, teacher.model.visual,
                       lambda b: torch.randn(b, 3, size, size, device=device)),
        "text": Tower("teacher/text", teacher.encode_tokens, _Parts(teacher.model, NOT_TEXT),
                      lambda b: tokens.expand(b, -1).contiguous()),
    }


def student_towers(image: nn.Module, text: nn.Module | None, device: torch.device, caption: str,
                   label: str) -> dict[str, Tower]:
    size = image.image_size
    towers = {"image": Tower(f"{label}/image", _host(image), image,
                             lambda b: torch.randn(b, 3, size, size, device=device))}
    if text is not None:
        tokens = text.tokenize([caption]).to(device)
        towers["text"] = Tower(f"{label}/text", _host(text), text, lambda b: tokens.expand(b, -1).contiguous())
    return towers


def measure(tower: Tower, cfg: BenchConfig, device: torch.device) -> dict[str, Any]:
    """measure_tower at batch 1 and the largest N, plus throughput at every other N > 1."""
    sizes = sorted({n for n in cfg.batch_sizes if n > 1}) or [1]
    row = measure_tower(tower.name, tower.fn, tower.example(1), tower.example(sizes[-1]), tower.module, device,
                        warmup=cfg.warmup, iters=cfg.iters, throughput_iters=cfg.throughput_iters)
    row["throughput_by_batch"] = {str(n): throughput(tower.fn, tower.example(n), cfg.throughput_iters, device)
                                  for n in sizes[:-1]}
    row["throughput_by_batch"][str(sizes[-1])] = row["throughput"]
    return row


def total(image: Mapping[str, Any], text: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Both towers together: sizes, FLOPs and latencies add (one image + one caption); throughput in
    image-caption pairs per second when the towers run one after the other (1 / (1/a + 1/b))."""
    row: dict[str, Any] = {"name": name, **{k: image[k] + text[k] for k in _SUM_KEYS}}
    row["throughput"] = 1.0 / (1.0 / image["throughput"] + 1.0 / text["throughput"])
    row.update({k: image[k] for k in ("batch_n", "threads", "device")})
    return row


def measure_model(towers: dict[str, Tower], cfg: BenchConfig, device: torch.device, label: str,
                  shared_text: Mapping[str, Any] | None = None) -> dict[str, dict]:
    """{"image", "text", "total"} rows; ``shared_text`` stands in for a missing text tower."""
    rows = {kind: measure(t, cfg, device) for kind, t in towers.items()}
    if "text" not in rows:
        rows["text"] = {**shared_text, "name": f"{label}/text", "shared": "teacher text tower"}
    rows["total"] = total(rows["image"], rows["text"], f"{label}/total")
    return rows


def onnx_report(image: nn.Module, size: int, path: Path, cfg: BenchConfig) -> dict[str, Any]:
    """Export an image tower (input [B, 3, size, size], dynamic batch), check it against PyTorch,
    time it at batch 1 (ONNX Runtime, CPU, ``cfg.threads``)."""
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    export_onnx(image, example, path)
    diff, rel = check_onnx(path, image, example), check_onnx(path, image, example, relative=True)
    lat = onnx_latency(path, example[:1], warmup=cfg.warmup, iters=cfg.iters, threads=cfg.threads)
    ok = rel < cfg.onnx_tol
    if not ok:
        log.error("ONNX export of %s differs from PyTorch by %.3g of its largest output (> %g)", path.name, rel,
                  cfg.onnx_tol)
    return {"path": str(path), "max_abs_diff": diff, "max_rel_diff": rel, "tolerance": cfg.onnx_tol, "ok": ok,
            "device": "cpu (onnxruntime)",
            "latency_b1_p50_ms": lat["p50_ms"], "latency_b1_p90_ms": lat["p90_ms"], "bytes": path.stat().st_size}


def teacher_onnx(teacher: Any, cfg: BenchConfig) -> dict[str, Any]:
    """The teacher's image tower through the same export and ONNX Runtime timing as the students'
    (at batch 1 on CPU, PyTorch's per-operator overhead can dominate a small tower; ONNX Runtime is
    the deployment runtime and gives both sides the same advantage). The file is not kept."""
    with tempfile.TemporaryDirectory() as tmp:
        report = onnx_report(teacher.model.visual.cpu(), teacher.preprocess.size, Path(tmp) / "teacher_image.onnx", cfg)
    return {**report, "path": None}


def onnx_ratio(teacher: dict[str, Any] | None, student: dict[str, Any] | None) -> float | None:
    """Teacher ÷ student ONNX Runtime latency (> 1: the student is faster); None unless both were timed."""
    if not teacher or not student or not student.get("latency_b1_p50_ms"):
        return None
    return teacher["latency_b1_p50_ms"] / student["latency_b1_p50_ms"]


# --------------------------------------------------------------------------- the teacher to compare with


def teacher_fingerprint(cfg: BenchConfig, specs: list[RunSpec]) -> dict[str, Any] | None:
    """The fingerprint to rebuild: --teacher CACHE's, else the runs' (which must agree); None for a bare name."""
    if cfg.teacher is not None and not Path(cfg.teacher).is_dir():
        return None
    if cfg.teacher is not None:
        manifest = Manifest.load(Path(cfg.teacher))
        if manifest is None or "teacher" not in manifest.data:
            raise MissingInput(f"--teacher {cfg.teacher} is a directory without a cache manifest.json")
        return manifest.data["teacher"]
    fps = [s.teacher for s in specs]
    if fps[0] is None:
        raise BadValue(f"{Path(cfg.runs[0]) / SPEC_FILE} records no teacher; pass --teacher NAME or CACHE")
    for run, fp in zip(cfg.runs[1:], fps[1:]):
        if fp is None or not same_fingerprint(fp, fps[0]):
            raise BadValue(f"{run} was distilled from another teacher than {cfg.runs[0]}; bench them separately "
                           "or pass --teacher")
    return fps[0]


def build_teacher(cfg: BenchConfig, fp: dict[str, Any] | None, device: torch.device) -> Any:
    """The teacher's architecture with random weights (fp32)."""
    from .teachers import load_teacher, random_init_expected  # noqa: PLC0415

    name = fp["name"] if fp is not None else cfg.teacher
    try:
        with random_init_expected():  # said once below, as what it is: speed does not depend on weights
            teacher = load_teacher(name, None, device=device, precision="fp32", allow_random_init=True)
    except (KeyError, FileNotFoundError) as err:
        raise MissingInput(f"cannot rebuild teacher architecture {name!r}: {err.args[0]}") from None
    log.info("teacher %s for the benchmark: %s", name, TEACHER_WEIGHTS_NOTE)
    return teacher


# --------------------------------------------------------------------------- outputs


def read_accuracy(run: Path) -> dict[str, Any] | None:
    """{"metric", "student", "teacher", "checkpoint"} i2t R@1 from RUN/eval.json (and the checkpoint it
    judged, None for older eval.json files), or None when it was not evaluated."""
    report = read_json(run / EVAL_JSON)
    if report is None:
        return None
    row = report.get("metrics", {}).get(ACCURACY_METRIC)
    if not row:
        return None
    return {"metric": ACCURACY_METRIC, "student": row.get("student"), "teacher": row.get("teacher"),
            "checkpoint": (report.get("checkpoint") or {}).get("name")}


def plot_accuracy_latency(points: list[dict[str, Any]], path: Path) -> Path | None:
    """Scatter of accuracy vs image-tower latency: points [{"label", "latency_ms", "accuracy", "teacher"}]."""
    points = [p for p in points if p.get("accuracy") is not None]
    if not points:
        return None
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for p in points:
        ax.scatter(p["latency_ms"], p["accuracy"], marker="*" if p["teacher"] else "o",
                   s=180 if p["teacher"] else 60, color="black" if p["teacher"] else None, zorder=3)
        ax.annotate(p["label"], (p["latency_ms"], p["accuracy"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"image tower latency, batch 1, p50 (ms, {points[0]['device']})")
    ax.set_ylabel(f"{ACCURACY_METRIC} (image→text)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _points(teacher_rows: dict, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    teacher_acc = next((r["accuracy"]["teacher"] for r in results if r["accuracy"]), None)
    device = teacher_rows["image"]["device"]
    out = [{"label": "teacher", "latency_ms": teacher_rows["image"]["latency_b1_p50_ms"], "accuracy": teacher_acc,
            "teacher": True, "device": device}]
    for r in results:
        out.append({"label": r["student"]["label"], "latency_ms": r["student"]["image"]["latency_b1_p50_ms"],
                    "accuracy": (r["accuracy"] or {}).get("student"), "teacher": False, "device": device})
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def render_table(rows: Iterable[Mapping[str, Any]], title: str | None = None, left: int = 1) -> Table:
    """A rich table with one row per dict; columns are the keys in first-seen order.

    The first ``left`` columns (labels) are left-aligned, the rest (numbers) right-aligned.
    """
    rows = list(rows)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i < left else "right")
    for row in rows:
        table.add_row(*(_cell(row.get(col)) for col in columns))
    return table


def _si(n: float) -> str:
    """3.27M, 812k, 95: counts short enough for an 80-column table."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def print_tables(teacher_rows: dict, results: list[dict[str, Any]]) -> None:
    """Measurements (one row per tower) and ratios teacher / student (> 1: the student is smaller / faster)."""
    from .progress import console  # noqa: PLC0415

    def row(model: str, kind: str, r: Mapping[str, Any]) -> dict[str, Any]:
        return {"model": model, "tower": kind + ("*" if r.get("shared") else ""), "params": _si(r["params"]),
                "fp16 MB": r["size_fp16_bytes"] / 2**20, "FLOPs": _si(r["flops_per_sample"]),
                "p50 ms": r["latency_b1_p50_ms"], "p90 ms": r["latency_b1_p90_ms"],
                f"/s @{r['batch_n']}": r["throughput"]}

    towers = ("image", "text", "total")
    rows = [row("teacher", k, teacher_rows[k]) for k in towers]
    rows += [row(r["student"]["label"], k, r["student"][k]) for r in results for k in towers]
    first = teacher_rows["image"]
    shared = any(r["student"]["text_tower"] == "teacher" for r in results)
    console.print(render_table(rows, title=f"bench: {first['device']}, {first['threads']} threads, latency at batch 1",
                               left=2))
    if shared:
        console.print("* the teacher's text tower (image-only student): not re-measured, counted in its total")
    ratio_rows = [{"model": r["student"]["label"], "tower": k, "params ×": v["params"],
                   "fp16 size ×": v["size_fp16_bytes"], "FLOPs ×": v["flops_per_sample"],
                   "p50 ×": v["latency_b1_p50_ms"], "throughput ×": v["throughput"]}
                  for r in results for k, v in r["ratios"].items()]
    console.print(render_table(ratio_rows, title="teacher / student (> 1: the student is smaller or faster)",
                               left=2))
    if teacher_rows.get("onnx"):
        console.print(f"teacher: image tower b1 p50 {teacher_rows['onnx']['latency_b1_p50_ms']:.3g} ms (onnxruntime)")
    for r in results:
        if r["onnx"]:
            o, ratio = r["onnx"], r["ratios"]["image"].get("onnx_latency_b1_p50_ms")
            vs = "" if ratio is None else f", {ratio:.3g}× the teacher's speed"
            console.print(f"{r['student']['label']}: ONNX max |diff| {o['max_abs_diff']:.2g} "
                          f"({'ok' if o['ok'] else 'FAILED'}), b1 p50 {o['latency_b1_p50_ms']:.3g} ms "
                          f"(onnxruntime{vs})")


def _check_config(cfg: BenchConfig) -> None:
    if not cfg.runs:
        raise BadValue("give at least one RUN directory")
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise BadValue(f"--batch-sizes must be positive integers, got {list(cfg.batch_sizes)}")
    if cfg.iters < 1 or cfg.warmup < 0 or cfg.throughput_iters < 1:
        raise BadValue("iters and throughput_iters must be at least 1, warmup at least 0")
    check_checkpoint(cfg.checkpoint)


def _config_dict(cfg: BenchConfig) -> dict[str, Any]:
    out = asdict(cfg)
    out["runs"] = [str(r) for r in cfg.runs]
    out["out"] = None if cfg.out is None else str(cfg.out)
    out["batch_sizes"] = list(cfg.batch_sizes)
    return out


# --------------------------------------------------------------------------- run


def bench_run(run: Path, teacher_rows: dict, cfg: BenchConfig, device: torch.device) -> dict[str, Any]:
    """Measure one run's student against the already measured teacher; write RUN/bench.json."""
    from .students import load_student  # noqa: PLC0415

    image, text, loaded = load_student(run, device, checkpoint=cfg.checkpoint)
    spec, label = RunSpec.from_json(loaded), run.name
    rows = measure_model(student_towers(image, text, device, cfg.caption, label), cfg, device, label,
                         shared_text=teacher_rows["text"])
    ratios = {k: ratio_table(teacher_rows[k], {label: rows[k]})[label] for k in ("image", "text", "total")}
    result = {
        "run": str(run),
        "student": {"label": label, "image_name": spec.image_name, "text_name": spec.text_name,
                    "text_tower": "student" if text is not None else "teacher", **rows},
        "checkpoint": {k: v for k, v in loaded["checkpoint"].items() if k not in ("val", "score")},
        "ratios": ratios,
        "onnx": onnx_report(image.cpu(), image.image_size, run / ONNX_FILE, cfg) if cfg.onnx else None,
        "accuracy": read_accuracy(run),
        "notes": [] if text is not None else [SHARED_TEXT_NOTE],
    }
    judged = (result["accuracy"] or {}).get("checkpoint")
    if judged not in (None, cfg.checkpoint):
        result["notes"].append(f"accuracy is eval.json's, which judged the {judged} weights; this bench loaded "
                               f"the {cfg.checkpoint} weights (the timings do not depend on them)")
    if cfg.onnx:
        result["ratios"]["image"]["onnx_latency_b1_p50_ms"] = onnx_ratio(teacher_rows.get("onnx"), result["onnx"])
        image.to(device)
    return result


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Bench the teacher once and every run's student; write RUN/bench.{json,png} (+ a comparison when
    several runs are given). Returns {"teacher": rows, "results": [per run], "files": [...]}."""
    from .runtime import resolve_device, torch_threads  # noqa: PLC0415

    _check_config(cfg)
    runs = [Path(r) for r in cfg.runs]
    specs = [read_spec(r) for r in runs]
    device = resolve_device(cfg.device)
    fp = teacher_fingerprint(cfg, specs)
    with torch_threads(cfg.threads):
        teacher = build_teacher(cfg, fp, device)
        teacher_rows = measure_model(teacher_towers(teacher, device, cfg.caption), cfg, device, "teacher")
        if cfg.onnx:
            teacher_rows["onnx"] = teacher_onnx(teacher, cfg)
        del teacher
        results = [bench_run(r, teacher_rows, cfg, device) for r in runs]
    header = {"device": str(device), "threads": teacher_rows["image"]["threads"], "torch": torch.__version__,
              "teacher": {"name": fp["name"] if fp else cfg.teacher, "fingerprint": fp,
                          "weights": TEACHER_WEIGHTS_NOTE, **teacher_rows},
              "config": _config_dict(cfg)}
    files = []
    for r, result in zip(runs, results):
        atomic_write_json(r / BENCH_JSON, {**header, **result})
        files += [r / BENCH_JSON, plot_accuracy_latency(_points(teacher_rows, [result]), r / BENCH_PNG)]
    if len(runs) > 1:
        out = Path(cfg.out) if cfg.out else runs[0]
        atomic_write_json(out / COMPARE_JSON, {**header, "results": results})
        files += [out / COMPARE_JSON, plot_accuracy_latency(_points(teacher_rows, results), out / COMPARE_PNG)]
    print_tables(teacher_rows, results)
    if not any(r["accuracy"] for r in results):
        log.info("no eval.json in the runs: accuracy-vs-latency plot skipped (run `kdpipe eval RUN` first)")
    for path in files:
        if path is not None:
            log.info("wrote %s", path)
    return {"teacher": teacher_rows, "results": results, "files": [str(p) for p in files if p is not None]}
