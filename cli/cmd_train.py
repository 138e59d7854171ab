"""`kdpipe train`: distil a student from a cache (the teacher is never loaded).

Every option defaults to "not given" so precedence is explicit: built-in defaults <
RUN/config.toml (with --resume) < --config FILE.toml < flags on the command line.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .errors import user_errors
from .options import bare_value, config_option
from kdpipe.losses import DEFAULT_RECIPE
from kdpipe.progress import console


class Resume(str, Enum):
    """``--resume`` [yes|no|auto]; the bare flag means yes."""

    yes = "yes"
    no = "no"
    auto = "auto"


RESUME = {Resume.yes: True, Resume.no: False, Resume.auto: "auto"}  # -> TrainConfig.resume


def train(
    student: Optional[str] = typer.Option(None, "--student", "-s", help="Image student, a timm model: "
                                          "mobilenetv3, mobilenetv3_050 (half width), mobilenetv3_large, resnet18/34/50, "
                                          "efficientnet_b0, "
                                          "vit_tiny, mobilevit_s, tiny (STUDENTS registry), or timm:NAME for any timm "
                                          "model (names: timm.list_models('*mobilenet*')). Default mobilenetv3."),
    init_checkpoint: Optional[Path] = typer.Option(None, "--init-checkpoint", help="Local weights for the student "
                                                   "backbone (e.g. a timm ImageNet checkpoint, .safetensors or .pth; "
                                                   "its classifier is dropped)."),
    cache: Optional[Path] = typer.Option(None, "--cache", "-c", help="Cache directory from `kdpipe extract`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory to write."),
    losses: Optional[str] = typer.Option(None, "--losses", "-l", help="Weighted losses (clip, fd, mfd, crd, icl, "
                                         "gd, afd, hinton). Default: CLIP-KD's full recipe "
                                         f"'{DEFAULT_RECIPE}' = the task InfoNCE (student image vs text) + CRD + ICL + "
                                         "FD; fd/mfd weight = λ of λ·(1−cos), CLIP-KD's MSE 2000 at D=512 = 7.8125."),
    whiten: Optional[str] = typer.Option(None, "--whiten", help="none | image | text | joint | separate: learn "
                                         "whitened targets (needs `kdpipe fit-whitening`); joint keeps image-text "
                                         "alignment, separate whitens each modality with its own transform."),
    text_student: Optional[str] = typer.Option(None, "--text-student", help="none (use the teacher's cached text "
                                               "embeddings) or a text student: text_tiny, text_small, text_base."),
    epochs: Optional[int] = typer.Option(None, "--epochs", "-e", min=1, help="Epochs (default 10)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="Batch per process (default 64)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate, AdamW (default 1e-3)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (default 0.05)."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", min=0, help="Linear warmup steps (default 100)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=8, help="Student input size "
                                             "(default: the teacher's)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto (bf16 on CUDA, fp32 on CPU), fp32, "
                                            "bf16, fp16."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda[:N]."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=0, help="DataLoader workers (default 2)."),
    views_used: Optional[str] = typer.Option(None, "--views-used", help="all (a random cached view per sample) "
                                             "or 0 (the teacher's eval view only)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (data order, views, init)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after this many steps "
                                            "(the schedule still spans all epochs)."),
    val_every: Optional[int] = typer.Option(None, "--val-every", min=1, help="Validate every N steps "
                                            "(default: each epoch end)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", min=1, help="Log a metrics row every N steps."),
    resume: Optional[Resume] = typer.Option(None, "--resume", help="Continue the run in --out from its latest "
                                            "checkpoint (--resume alone: yes; an error without one). auto: continue it "
                                            "if --out holds a checkpoint, else start a fresh run (one command for a "
                                            "job that may be requeued)."),
    config: Optional[Path] = config_option(),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Distil STUDENT from the teacher embeddings cached in CACHE; writes OUT/ (config, metrics, student)."""
    from kdpipe.train import resolve_config, run

    flags = dict(student=student, cache=str(cache) if cache else None, out=str(out) if out else None,
                 losses=losses, whiten=whiten, text_student=text_student, epochs=epochs, batch_size=batch_size,
                 lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, image_size=image_size,
                 precision=precision, device=device, workers=workers, views_used=views_used, seed=seed,
                 max_steps=max_steps, val_every=val_every, log_every=log_every,
                 resume=None if resume is None else RESUME[resume], progress=False if no_progress else None,
                 init_checkpoint=str(init_checkpoint) if init_checkpoint else None)
    with user_errors():
        cfg = resolve_config(flags, config)
        result = run(cfg)
    if result["rank"] != 0:  # under torchrun only rank 0 reports
        return
    if result["stopped"]:
        console.print(f"[yellow]stopped[/] by {result['stopped']} after step {result['step']}, checkpoint saved; "
                      f"resume with: kdpipe train --out {escape(result['run'])} --resume auto", soft_wrap=True)
        return
    val = result["val"] or {}
    shown = ", ".join(f"{k.removeprefix('val_')} {v:.3f}" for k, v in val.items() if k != "val_images")
    console.print(f"[green]trained[/] {result['step']} steps; val: {shown or 'n/a'}")
    best = result["best"].get("step")
    console.print(f"student: {result['run']}/student.json; weights student-last.safetensors (step {result['step']})"
                  + ("" if best in (None, result["step"]) else f" and student-best.safetensors (step {best}, "
                     "best validation score; what eval and bench use by default)"))


def register(app: typer.Typer) -> None:
    app.command("train", cls=bare_value("--resume", Resume.yes.value))(train)
