"""The embedded default: every stage on the shapes world, offline, on CPU.

generate the world -> pretrain a small open_clip teacher -> extract the cache -> fit
whitening (its table: the teacher's own retrieval and zero-shot in each whitened space) -> train the
student (CLIP-KD's full recipe clip + crd + icl + fd, on raw targets: no whitened space measured
trained a better student, benchmarks/README.md) -> eval (teacher and student) -> bench -> report.
Each stage is the library stage the CLI runs, at demo size; each is skipped when its output is
already there, so a re-run reuses work.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import bench, evaluate, export, extract, pretrain, report, runtime, train, whiten
from .data.shapes import make_shapes
from .progress import console
from .rundir import BENCH_JSON, EVAL_JSON, SPEC_FILE
from .store import TEACHER_EVAL_JSON
from .trainconfig import DEFAULT_RECIPE

log = logging.getLogger("kdpipe")

RECIPE = DEFAULT_RECIPE  # CLIP-KD's full recipe: task InfoNCE + CRD 1 + ICL 1 + FD 2000 (= 7.8125·(1−cos) at D=512)


@dataclass
class DemoSize:
    """How big each stage is. Budget on 2 CPU cores: default ≤ 15 minutes, quick ≤ 3 (benchmarks/README.md)."""

    n_train: int
    n_val: int
    teacher_steps: int
    views: int
    students: tuple[str, ...]
    whiten: tuple[str, ...]
    epochs: int
    teacher_batch: int = 256
    teacher_lr: float = 5e-4
    student_lr: float = 6e-3  # AdamW peak; beat 2e-3 clearly on these short schedules (benchmarks/README.md)
    batch_size: int = 64
    bench_iters: int = 20


SIZES = {
    # The 600-step teacher on the distinctive-caption world: val i2t R@1 0.71, zero-shot 0.30 (chance
    # 0.125). Stage times and what the demo prints: benchmarks/README.md.
    # The student is timm's mobilenetv3_small_050: smaller than the shapes teacher's image tower
    # (0.67 M vs 0.91 M parameters, 4.8 vs 21 MFLOPs at 64 px) and faster in ONNX Runtime; the
    # earlier mobilenetv3 / resnet18 students were larger than this tiny teacher.
    "default": DemoSize(n_train=2000, n_val=500, teacher_steps=600, views=2,
                        students=("mobilenetv3_050",), whiten=("none",), epochs=6),
    # lr 1e-3 learns more in a short run (pretrain-teacher's tuning); 5e-4 is best from ~600 steps
    "quick": DemoSize(n_train=400, n_val=100, teacher_steps=140, teacher_lr=1e-3, views=2,
                      students=("mobilenetv3_050",), whiten=("none",), epochs=10, bench_iters=5),
}


@dataclass
class DemoConfig:
    out: str = "data/demo"
    quick: bool = False
    image_size: int = 64  # the shapes world's size (and the teacher's input)
    seed: int = 0
    workers: int = 1
    progress: bool = True
    size: DemoSize | None = None  # override SIZES (tests)
    timings: dict[str, float] = field(default_factory=dict)


class Stopped(Exception):
    """A stage stopped early on SIGTERM / SIGUSR1 (its outputs resumable): the demo ends there."""


def stage(cfg: DemoConfig, name: str, done: bool, fn: Callable[[], Any]) -> Any:
    """Run one stage (or say it is reused) and record its time; ``Stopped`` if a stop signal ended it."""
    if done:
        console.print(f"[dim]· {name}: reused[/]")
        return None
    console.rule(f"[bold]{name}")
    start = time.perf_counter()
    with runtime.stop_requests() as stop:  # also hears a stop that came after the stage's last safe point
        result = fn()
    if isinstance(result, dict) and result.get("stopped"):
        raise Stopped(f"{name} stopped by {result['stopped']}")
    cfg.timings[name] = round(time.perf_counter() - start, 1)
    if stop:
        raise Stopped(f"{name} finished; stopped by {stop.signal} before the next stage")
    return result


def run_name(student: str, whiten_mode: str) -> str:
    return f"{student}-{'raw' if whiten_mode == 'none' else 'white-' + whiten_mode}"


def demo_runs(cfg: DemoConfig, size: DemoSize, cache: Path, root: Path) -> list[Path]:
    runs = []
    for student in size.students:
        for mode in size.whiten:
            run_dir = root / "runs" / run_name(student, mode)
            tcfg = train.TrainConfig(
                student=student, cache=str(cache), out=str(run_dir), losses=RECIPE, whiten=mode,
                epochs=size.epochs, batch_size=size.batch_size, lr=size.student_lr, warmup_steps=20,
                image_size=cfg.image_size, workers=cfg.workers, device="cpu", seed=cfg.seed,
                progress=cfg.progress, resume="auto")
            stage(cfg, f"train {run_dir.name}", (run_dir / SPEC_FILE).exists(),  # written last
                  lambda c=tcfg: train.run(c))
            runs.append(run_dir)
    return runs


def onnx_available() -> bool:
    """ONNX Runtime (kdpipe[onnx]) times both image towers as deployed; without it, PyTorch only."""
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        log.warning("onnxruntime is not installed (pip install 'kdpipe[onnx]'): the demo's bench times "
                    "PyTorch only")
        return False
    return True


def export_student(cfg: DemoConfig, runs: list[Path], teacher: Path, out: Path) -> Path | None:
    """The first raw (not whitened) student, exported for open_clip, timm (and ONNX when installed)."""
    raw = [r for r in runs if r.name.endswith("-raw")]
    if not raw:
        return None
    stage(cfg, "export", (out / export.CARD).exists(), lambda: export.run(export.ExportConfig(
        run=str(raw[0]), out=str(out), format="all" if onnx_available() else "open_clip,timm",
        pretrained=str(teacher / "model.safetensors"), teacher_config=str(teacher / "config.json"))))
    return out


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Every stage on the shapes world; returns the report (also printed and written)."""
    size = cfg.size or SIZES["quick" if cfg.quick else "default"]
    root = Path(cfg.out)
    world, teacher, cache = root / "shapes", root / "teacher", root / "cache"
    stage(cfg, "make-shapes", (world / "annotations" / "captions_val.json").exists(),
          lambda: make_shapes(world, size.n_train, size.n_val, size=cfg.image_size, seed=cfg.seed))
    stage(cfg, "pretrain-teacher", False, lambda: pretrain.run(pretrain.PretrainConfig(
        data=str(world), out=str(teacher), steps=size.teacher_steps, batch_size=size.teacher_batch, lr=size.teacher_lr,
        seed=cfg.seed, device="cpu",
        progress=cfg.progress)))
    stage(cfg, "extract", False, lambda: extract.run(extract.ExtractConfig(
        teacher=str(teacher / "config.json"), pretrained=str(teacher / "model.safetensors"), data=str(world),
        out=str(cache), views=size.views, batch_size=64, workers=cfg.workers, device="cpu",
        shard_size=500, progress=cfg.progress)))
    stage(cfg, "fit-whitening", (cache / "whitening.json").exists(),
          lambda: whiten.run(whiten.WhitenConfig(cache=str(cache), mode="all", progress=cfg.progress)))
    stage(cfg, "eval teacher", (cache / TEACHER_EVAL_JSON).exists(),
          lambda: evaluate.run(evaluate.EvalConfig(teacher=str(cache), device="cpu", progress=cfg.progress)))
    runs = demo_runs(cfg, size, cache, root)
    for run_dir in runs:
        stage(cfg, f"eval {run_dir.name}", (run_dir / EVAL_JSON).exists(),
              lambda r=run_dir: evaluate.run(evaluate.EvalConfig(run=str(r), device="cpu", progress=cfg.progress)))
    stage(cfg, "bench", all((r / BENCH_JSON).exists() for r in runs),
          lambda: bench.run(bench.BenchConfig(runs=[str(r) for r in runs], device="cpu", iters=size.bench_iters,
                                              batch_sizes=(1, 32), onnx=onnx_available())))
    result = report.run(report.ReportConfig(runs=[str(r) for r in runs], out=str(root / "report.md")))
    exported = export_student(cfg, runs, teacher, root / "export")
    (root / "demo.json").write_text(json.dumps({"timings_s": cfg.timings, "runs": [str(r) for r in runs],
                                                "size": size.__dict__}, indent=1, default=list))
    console.print(f"\nreport: {root / 'report.md'}   timings (s): {cfg.timings}")
    if exported is not None:
        console.print(f"\nthe student, ready to use outside kdpipe ({exported}):\n"
                      f"  import open_clip\n"
                      f"  model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{exported}')\n"
                      f"  tokenizer = open_clip.get_tokenizer('local-dir:{exported}')")
    return result
