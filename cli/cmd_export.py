"""CLI for the export stage: ``kdpipe export RUN --out DIR``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .errors import user_errors
from .options import config_option, stage_config
from kdpipe.progress import console


def export_cmd(
    ctx: typer.Context,
    run: Optional[Path] = typer.Argument(None, help="Run directory written by `kdpipe train`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder to write the exported model to."),
    format: str = typer.Option("all", "--format", "-f", help="open_clip (open_clip_config.json + weights: "
                               "create_model_and_transforms('local-dir:DIR')), timm (DIR/timm: "
                               "timm.create_model('local-dir:DIR/timm', pretrained=True)), onnx (image_encoder.onnx: image -> "
                               "image_embeds; text_encoder.onnx: text -> text_embeds with a text student), all, or a "
                               "comma-separated list (open_clip,timm)."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="The run's weights: best (the best validation "
                                   "score) or last (the final step)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="The teacher's weights FILE, when the run's "
                                             "teacher was loaded from a local file (its text tower is exported)."),
    teacher_config: Optional[str] = typer.Option(None, "--teacher-config", help="The teacher's open_clip "
                                                 "model-config JSON, for a custom-architecture teacher."),
    license: str = typer.Option("other", "--license", help="License named in the model card's front matter."),
    config: Optional[Path] = config_option(),
) -> None:
    """Write a trained student as an open_clip model (the teacher's text tower, or the text student), a timm
    model, ONNX files checked against ONNX Runtime, and a model card (DIR/README.md). None of them needs
    kdpipe. Whitened runs export to ONNX only (their map back to the teacher's space is not linear)."""
    from kdpipe.export import ExportConfig, run as export

    with user_errors():
        result = export(stage_config(ctx, ExportConfig, config, dict(
            run=run, out=out, format=format, checkpoint=checkpoint, pretrained=pretrained,
            teacher_config=teacher_config, license=license)))
    for path in result["files"]:
        console.print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the kdpipe app."""
    app.command("export")(export_cmd)
