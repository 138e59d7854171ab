"""Benchmark: measurement primitives, then the bench stage (``BenchConfig``, ``run(cfg)``).

The primitives measure one thing on a callable or module they are given: parameters,
serialised size, FLOPs, latency, throughput, ONNX export/check/latency. The stage (bottom of
this file) rebuilds the teacher's architecture and every run's student, feeds their towers
to the primitives in one process, and writes JSON for machines (RUN/bench.json), a rich
table for people and an accuracy-vs-latency PNG.

Callers put the module (and whatever ``fn`` closes over) on ``device`` first; the
functions here move only the example tensors.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from rich.table import Table
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from . import runtime
from .atomic import atomic_write_json
from .store import Manifest, same_fingerprint

log = logging.getLogger("kdpipe")

Fn = Callable[[Tensor], Any]


# ---------------------------------------------------------------------------- size


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared parameters counted once, as ``parameters()`` yields them)."""
    return sum(p.numel() for p in module.parameters())


def size_bytes(module: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the safetensors file holding the state dict with floating tensors cast to dtype.

    Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) keep their dtype, as a real
    half-precision export would. Tensors are copied, so tied weights count once per key.
    """
    state = {
        k: v.detach().to(dtype=dtype if v.is_floating_point() else v.dtype, device="cpu", copy=True).contiguous()
        for k, v in module.state_dict().items()
    }
    return len(safetensors_bytes(state))


# --------------------------------------------------------------------------- compute


def flops_per_sample(fn: Fn, example: Tensor) -> int:
    """FLOPs of one forward per sample: example [B, ...] -> total / B.

    Counted by ``torch.utils.flop_counter.FlopCounterMode``: 2 x multiply-adds of matmuls,
    convolutions and attention; element-wise ops (activations, norms) are not counted.
    """
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        fn(example)
    return counter.get_total_flops() // example.shape[0]


def _timed_calls(fn: Fn, example: Tensor, warmup: int, iters: int, device: torch.device) -> list[float]:
    """Seconds per call of fn(example), each call synchronised, after warm-up calls."""
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn(example)
        runtime.synchronize(device)
        for _ in range(iters):
            start = time.perf_counter()
            fn(example)
            runtime.synchronize(device)
            times.append(time.perf_counter() - start)
    return times


def _summary_ms(seconds: Iterable[float]) -> dict[str, float]:
    ms = np.asarray(list(seconds)) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(ms.mean())}


def latency(
    fn: Fn,
    example: Tensor,
    warmup: int = 5,
    iters: int = 30,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Per-call latency of fn(example) in milliseconds: {"p50_ms", "p90_ms", "mean_ms"}.

    Usually example is a batch of one [1, ...]. Every call is timed alone (synchronised on
    CUDA), so the percentiles describe single requests, not a pipelined stream.
    """
    device = torch.device(device)
    return _summary_ms(_timed_calls(fn, example.to(device), warmup, iters, device))


def throughput(
    fn: Fn,
    example_batch: Tensor,
    iters: int = 10,
    device: torch.device | str = "cpu",
    warmup: int = 2,
) -> float:
    """Samples per second of fn over back-to-back calls on example_batch [N, ...]."""
    device = torch.device(device)
    example_batch = example_batch.to(device)
    with torch.inference_mode():
        for _ in range(warmup):
            fn(example_batch)
        runtime.synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn(example_batch)
        runtime.synchronize(device)
        elapsed = time.perf_counter() - start
    return example_batch.shape[0] * iters / elapsed


def measure_tower(
    name: str,
    fn: Fn,
    example_1: Tensor,
    example_n: Tensor,
    module: nn.Module,
    device: torch.device | str = "cpu",
    warmup: int = 5,
    iters: int = 30,
    throughput_iters: int = 10,
) -> dict[str, Any]:
    """All numbers for one tower (e.g. "teacher/image"): fn runs the tower on a batch.

    example_1 [1, ...] for latency, example_n [N, ...] for throughput; module is what
    gets counted and sized (the tower's weights). Returns a flat JSON-ready dict.
    """
    device = torch.device(device)
    lat = latency(fn, example_1, warmup=warmup, iters=iters, device=device)
    return {
        "name": name,
        "params": count_params(module),
        "size_fp32_bytes": size_bytes(module, torch.float32),
        "size_fp16_bytes": size_bytes(module, torch.float16),
        "flops_per_sample": flops_per_sample(fn, example_1.to(device)),
        "latency_b1_p50_ms": lat["p50_ms"],
        "latency_b1_p90_ms": lat["p90_ms"],
        "throughput": throughput(fn, example_n, iters=throughput_iters, device=device),
        "batch_n": int(example_n.shape[0]),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


# Bigger is worse for these (teacher / student = "times smaller / faster") ...
_COST_KEYS = ("params", "size_fp32_bytes", "size_fp16_bytes", "flops_per_sample", "latency_b1_p50_ms",
              "latency_b1_p90_ms")
# ... and better for this one (student / teacher = "times faster").
_RATE_KEYS = ("throughput",)


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def ratio_table(teacher: Mapping[str, Any], students: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """How many times smaller / faster each student is than the teacher.

    teacher and students[name] are ``measure_tower`` dicts. Cost keys give teacher /
    student, throughput gives student / teacher, so > 1 always means the student wins.
    A missing value or zero denominator gives None.
    """
    out = {}
    for name, s in students.items():
        row = {k: _ratio(teacher.get(k), s.get(k)) for k in _COST_KEYS}
        row.update({k: _ratio(s.get(k), teacher.get(k)) for k in _RATE_KEYS})
        out[name] = row
    return out


# ---------------------------------------------------------------------------- ONNX


def _export_dynamo(module: nn.Module, example: Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        module, (example,), str(path), dynamo=True, input_names=["image"], output_names=["embedding"],
        dynamic_shapes=({0: batch},), external_data=False,
    )


def _export_torchscript(module: nn.Module, example: Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        # torch >= 2.9 warns that this exporter is legacy; it is the one that needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed")
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-dependent Python ifs in timm/torch
        torch.onnx.export(
            module, (example,), str(path), dynamo=False, input_names=["image"], output_names=["embedding"],
            dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}},
        )


_EXPORTERS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def _exporter_order(exporter: str) -> list[str]:
    """Exporters to try in turn; "auto" skips dynamo where onnxscript is missing (torch needs it)."""
    if exporter != "auto":
        return [exporter]
    if importlib.util.find_spec("onnxscript") is None:
        return ["torchscript"]
    return ["dynamo", "torchscript"]


def export_onnx(module: nn.Module, example: Tensor, path: str | os.PathLike, exporter: str = "auto") -> Path:
    """Export an image tower to ONNX with a dynamic batch axis: example [B, 3, S, S].

    Input "image" [batch, 3, S, S], output "embedding" [batch, D]. ``exporter``: "dynamo"
    (torch.export, torch's default since 2.9, needs the onnxscript package), "torchscript"
    (legacy, works with torch alone) or "auto": dynamo when onnxscript is installed,
    falling back to torchscript if it fails. The module is exported in eval mode and its
    training flag restored afterwards.
    """
    if exporter not in ("auto", *_EXPORTERS):
        raise ValueError(f"unknown ONNX exporter {exporter!r}; use auto, {', '.join(_EXPORTERS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a batch of 1 would let the tracer treat the batch size as a constant
    device = next(module.parameters(), example).device
    example = example[:1].expand(2, *example.shape[1:]).contiguous().to(device)
    order = _exporter_order(exporter)
    was_training, fastpath = module.training, torch.backends.mha.get_fastpath_enabled()
    module.eval()
    # nn.MultiheadAttention's inference fast path (taken when no parameter needs a gradient, as in a
    # loaded teacher) is one fused operator that ONNX has no export for: trace the plain path
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        for i, name in enumerate(order):
            try:
                _EXPORTERS[name](module, example, path)
                return path
            except Exception as err:  # noqa: BLE001 - any exporter failure -> try the next one
                if i == len(order) - 1:
                    raise
                log.warning("ONNX %s export failed (%s: %s); trying %s", name, type(err).__name__, err, order[i + 1])
    finally:
        module.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


def _onnx_session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort  # optional dependency: kdpipe[onnx]

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx(path: str | os.PathLike, module: nn.Module, example: Tensor) -> float:
    """Largest absolute difference between ONNX Runtime (CPU) and PyTorch on example [B, ...]."""
    session = _onnx_session(path)
    x = example.detach().cpu().float()
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            device = next(module.parameters(), x).device
            torch_out = module(x.to(device)).float().cpu().numpy()
    finally:
        module.train(was_training)
    return float(np.abs(onnx_out - torch_out).max())


def onnx_latency(
    path: str | os.PathLike,
    example: Tensor,
    warmup: int = 5,
    iters: int = 30,
    threads: int | None = None,
) -> dict[str, float]:
    """ONNX Runtime CPU latency of one call on example in ms: {"p50_ms", "p90_ms", "mean_ms"}."""
    session = _onnx_session(path, threads)
    feed = {session.get_inputs()[0].name: example.detach().cpu().float().numpy()}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return _summary_ms(times)


# --------------------------------------------------------------------------- tables


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


# =========================================================================== the bench stage
#
# `kdpipe bench RUN [RUN ...]`: the teacher and every student measured in one process, on
# the same device and threads. The teacher is rebuilt from its architecture with random
# weights (speed does not depend on them). Each tower's callable returns its output on the
# host as float32 (as a service would hand it back), teacher and student alike.


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
    onnx_tol: float = 1e-4
    caption: str = "a photo of a small red circle to the left of a big blue square."  # the text example
    out: str | Path | None = None  # several runs: where bench_compare.{json,png} go (default: the first run)


BENCH_JSON, BENCH_PNG = "bench.json", "bench.png"
COMPARE_JSON, COMPARE_PNG = "bench_compare.json", "bench_compare.png"
ONNX_FILE = "student_image.onnx"
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
    diff = check_onnx(path, image, example)
    lat = onnx_latency(path, example[:1], warmup=cfg.warmup, iters=cfg.iters, threads=cfg.threads)
    ok = diff < cfg.onnx_tol
    if not ok:
        log.error("ONNX export of %s differs from PyTorch by %.3g (> %g)", path.name, diff, cfg.onnx_tol)
    return {"path": str(path), "max_abs_diff": diff, "tolerance": cfg.onnx_tol, "ok": ok, "device": "cpu (onnxruntime)",
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


def _read_spec(run: Path) -> dict[str, Any]:
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    path = run / "student.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run} holds no student.json: not a finished `kdpipe train` run")
    return json.loads(path.read_text())


def teacher_fingerprint(cfg: BenchConfig, specs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fingerprint to rebuild: --teacher CACHE's, else the runs' (which must agree); None for a bare name."""
    if cfg.teacher is not None and not Path(cfg.teacher).is_dir():
        return None
    if cfg.teacher is not None:
        manifest = Manifest.load(Path(cfg.teacher))
        if manifest is None or "teacher" not in manifest.data:
            raise FileNotFoundError(f"--teacher {cfg.teacher} is a directory without a cache manifest.json")
        return manifest.data["teacher"]
    fps = [s.get("teacher") for s in specs]
    if not isinstance(fps[0], dict):
        raise ValueError(f"{cfg.runs[0]}/student.json records no teacher; pass --teacher NAME or CACHE")
    for run, fp in zip(cfg.runs[1:], fps[1:]):
        if not isinstance(fp, dict) or not same_fingerprint(fp, fps[0]):
            raise ValueError(f"{run} was distilled from another teacher than {cfg.runs[0]}; bench them separately "
                             "or pass --teacher")
    return fps[0]


def build_teacher(cfg: BenchConfig, fp: dict[str, Any] | None, device: torch.device) -> Any:
    """The teacher's architecture with random weights (fp32)."""
    from .teachers import load_teacher  # noqa: PLC0415

    name = fp["name"] if fp is not None else cfg.teacher
    try:
        teacher = load_teacher(name, None, device=device, precision="fp32", allow_random_init=True)
    except (KeyError, FileNotFoundError) as err:
        raise FileNotFoundError(f"cannot rebuild teacher architecture {name!r}: {err.args[0]}") from None
    log.info("teacher %s for the benchmark: %s", name, TEACHER_WEIGHTS_NOTE)
    return teacher


# --------------------------------------------------------------------------- outputs


def read_accuracy(run: Path) -> dict[str, Any] | None:
    """{"metric", "student", "teacher", "checkpoint"} i2t R@1 from RUN/eval.json (and the checkpoint it
    judged, None for older eval.json files), or None when it was not evaluated."""
    path = run / "eval.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
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
        raise ValueError("give at least one RUN directory")
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive integers, got {list(cfg.batch_sizes)}")
    if cfg.iters < 1 or cfg.warmup < 0 or cfg.throughput_iters < 1:
        raise ValueError("iters and throughput_iters must be at least 1, warmup at least 0")
    from .students import check_checkpoint  # noqa: PLC0415

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

    image, text, spec = load_student(run, device, checkpoint=cfg.checkpoint)
    label = run.name
    rows = measure_model(student_towers(image, text, device, cfg.caption, label), cfg, device, label,
                         shared_text=teacher_rows["text"])
    ratios = {k: ratio_table(teacher_rows[k], {label: rows[k]})[label] for k in ("image", "text", "total")}
    result = {
        "run": str(run),
        "student": {"label": label, "image_name": spec["image"]["name"],
                    "text_name": (spec.get("text") or {}).get("name"),
                    "text_tower": "student" if text is not None else "teacher", **rows},
        "checkpoint": {k: v for k, v in spec["checkpoint"].items() if k not in ("val", "score")},
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
    specs = [_read_spec(r) for r in runs]
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
