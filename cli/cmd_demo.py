"""CLI for the embedded default: ``kdpipe pretrain-teacher`` and ``kdpipe demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .errors import user_errors
from .options import config_option, stage_config
from kdpipe.progress import console


def _print_pretrain_summary(summary: dict) -> None:
    if summary.get("stopped"):
        saved = (f"checkpoint saved in {escape(summary['checkpoint'])}; re-run the same command to resume"
                 if summary["checkpoint"] else "no checkpoint (--checkpoint-every 0): re-running starts over")
        console.print(f"[yellow]stopped[/] by {summary['stopped']} after step {summary['step']} of "
                      f"{summary['steps']}, {saved}", soft_wrap=True)
        return
    verb = "reused" if summary["reused"] else f"trained in {summary['seconds']:.0f}s"
    console.print(f"teacher {summary['arch']} {verb}: {summary['steps']} steps, final loss {summary['final_loss']:.3f}")
    val = summary.get("val") or {}
    if "i2t_R@1" in val:
        console.print(f"val retrieval R@1: image->text {val['i2t_R@1']:.3f}, text->image {val['t2i_R@1']:.3f}")
    if "zeroshot_top1" in val:
        console.print(f"val zero-shot top-1: {val['zeroshot_top1']:.3f} (chance {val['zeroshot_chance']:.3f})")
    if summary.get("val_tail_gain") is not None:
        console.print(f"val image->text R@1 over the last 20% of steps: {summary['val_tail_gain']:+.1%} "
                      "(under +2%: plateaued)")
    console.print(f"use it: kdpipe extract --teacher {summary['config']} --pretrained {summary['weights']}")


def pretrain_teacher(
    ctx: typer.Context,
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Captioned dataset with a train split (and val "
                                       "for metrics), e.g. a shapes world from `kdpipe make-shapes data/shapes`. "
                                       "Required, here or in --config."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Teacher directory: config.json, "
                                       "model.safetensors, train.json. Required, here or in --config."),
    arch: str = typer.Option("shapes-vit", "--arch", help="Architecture: a shipped config (shapes-vit, tiny-clip), "
                             "an open_clip model name or an open_clip model-config JSON."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimiser steps (default: the shapes-world "
                                         "setting, a few minutes on 2 CPU cores)."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", min=2, help="Images per step (one random caption each)."),
    lr: float = typer.Option(5e-4, "--lr", help="Peak AdamW learning rate (warm-up, then cosine decay)."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation, batches and crops."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Retrain even if OUT holds a teacher (any settings), "
                                   "or start over an unfinished one instead of resuming it."),
    val_every: Optional[int] = typer.Option(None, "--val-every", min=1, help="Evaluate on the val split every N "
                                            "steps (the val curve in train.json, and whether the last 20% of "
                                            "steps still gained); default: at the end only."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", min=0, help="Save the full "
                                                   "training state in OUT/checkpoints/ every N steps (0: never); "
                                                   "default: at each --val-every point, else every 10% of the "
                                                   "steps. Re-running the same command on an unfinished OUT "
                                                   "resumes from the latest one (same weights as an "
                                                   "uninterrupted run); removed once the teacher is saved."),
    print_every: Optional[int] = typer.Option(None, "--print-every", min=1, help="Off a terminal (a log file): a "
                                              "plain line (step, loss, lr, samples/s, ETA) every N steps "
                                              "(default: about 100 lines per run)."),
    config: Optional[Path] = config_option(),
) -> None:
    """Train a small open_clip CLIP from scratch (a teacher for offline demos); reuses OUT when already trained."""
    from kdpipe.pretrain import PretrainConfig, run

    with user_errors():
        cfg = stage_config(ctx, PretrainConfig, config, dict(
            data=data, out=str(out) if out else None, arch=arch, steps=steps,  # None: PretrainConfig's default
            batch_size=batch_size, lr=lr, seed=seed, device=device, overwrite=overwrite, val_every=val_every,
            checkpoint_every=checkpoint_every, print_every=print_every))
        summary = run(cfg)
    _print_pretrain_summary(summary)


def demo(
    ctx: typer.Context,
    out: Path = typer.Option(Path("data/demo"), "--out", "-o", help="Where everything goes: shapes/, teacher/, "
                             "cache/, runs/, report.md. Re-running reuses finished stages."),
    quick: bool = typer.Option(False, "--quick", help="A small world, a short teacher and one student "
                               "instead of the full demo (timings: benchmarks/README.md)."),
    workers: int = typer.Option(1, "--workers", "-w", min=0, help="DataLoader workers for extract and train."),
    config: Optional[Path] = config_option(),
) -> None:
    """Every stage on the embedded shapes world, offline on CPU: make-shapes -> pretrain-teacher -> extract ->
    fit-whitening -> train mobilenetv3_050 (smaller and, in ONNX Runtime, faster than the teacher's image
    tower) with CLIP-KD's full recipe (clip + crd + icl + fd), on raw and on whitened targets -> eval -> bench
    (PyTorch and ONNX Runtime) -> report."""
    from kdpipe.demo import DemoConfig, Stopped, run

    with user_errors():
        try:
            result = run(stage_config(ctx, DemoConfig, config, dict(out=str(out), quick=quick, workers=workers)))
        except Stopped as stopped:
            console.print(f"[yellow]{escape(str(stopped))}[/]: re-run the same command to resume", soft_wrap=True)
            return
    console.print(result["markdown"])


def register(app: typer.Typer) -> None:
    """Add this module's commands to the kdpipe app."""
    app.command("pretrain-teacher")(pretrain_teacher)
    app.command("demo")(demo)
