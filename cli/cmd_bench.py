"""`kdpipe bench`: size, FLOPs, latency and throughput of the teacher and students, in one process."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .errors import user_errors
from .options import config_option, stage_config


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers like 1,64, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"batch sizes must be positive integers, got {text!r}")
    return sizes


def bench_cmd(
    ctx: typer.Context,
    runs: Optional[list[Path]] = typer.Argument(None, help="Run directories written by `kdpipe train`."),
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="Teacher to compare with: a model name "
                                          "(tiny-clip, ViT-B-32, ...), a model-config JSON or a CACHE directory "
                                          "(default: the runs' teacher]. Built with random weights: speed does "
                                          "not depend on them."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:N] (CUDA timings are synchronised)."),
    batch_sizes: str = typer.Option("1,64", "--batch-sizes", help="Latency at batch 1; throughput at each "
                                    "larger size."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch intra-op threads "
                                          "(default: torch's)."),
    warmup: int = typer.Option(5, "--warmup", min=0, help="Untimed calls before timing."),
    iters: int = typer.Option(30, "--iters", min=1, help="Timed batch-1 calls (p50/p90)."),
    throughput_iters: int = typer.Option(10, "--throughput-iters", min=1, help="Timed calls at batch N."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="Each run's weights to bench and export: best "
                                   "or last (speed does not depend on them; the ONNX file does)."),
    onnx: bool = typer.Option(False, "--onnx", help="Export the student image tower to ONNX (dynamic batch), "
                              "check it against PyTorch (max |diff| < 1e-4) and time it with onnxruntime."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="With several runs: folder for "
                                       "bench_compare.{json,png} (default: the first run)."),
    config: Optional[Path] = config_option(),
) -> None:
    """Parameters, size (fp32/fp16), FLOPs per sample, latency at batch 1 (p50/p90) and throughput at batch N,
    per tower and in total, teacher and students in the same run. Writes RUN/bench.json and RUN/bench.png
    (accuracy from eval.json against latency)."""
    from kdpipe.bench import BenchConfig, run

    with user_errors():
        run(stage_config(ctx, BenchConfig, config, dict(
            runs=list(runs) if runs else None, teacher=teacher, device=device, batch_sizes=_sizes(batch_sizes),
            warmup=warmup, iters=iters, throughput_iters=throughput_iters, threads=threads,
            checkpoint=checkpoint, onnx=onnx, out=out)))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the kdpipe app."""
    app.command("bench")(bench_cmd)
