"""CLI for the data stage: ``kdpipe make-shapes``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .errors import user_errors
from .options import config_option, stage_config
from kdpipe.progress import console


def make_shapes(
    ctx: typer.Context,
    out: Optional[Path] = typer.Argument(None, help="Output directory (COCO layout: annotations/, train/, val/)."),
    train: int = typer.Option(2000, "--train", min=1, help="Number of train images."),
    val: int = typer.Option(500, "--val", min=0, help="Number of val images."),
    size: int = typer.Option(64, "--size", min=16, help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    config: Optional[Path] = config_option(),
) -> None:
    """Generate the shapes world: captioned synthetic images in COCO layout, usable as --data.

    Images show 1-2 coloured shapes on a named background colour; 5-6 captions per image name their colour,
    size (small/medium/large), grid position, relation and the background, so that almost no caption fits
    another image (the share that does is printed per split); the label is the shape of the largest object.
    """
    from kdpipe.data import shapes

    with user_errors():
        values = dict(out=out, n_train=train, n_val=val, size=size, seed=seed)
        cfg = stage_config(ctx, shapes.ShapesConfig, config, values, params={"n_train": "train", "n_val": "val"})
        summary = shapes.run(cfg)
    images, captions = summary["images"], summary["captions"]
    console.print(
        f"shapes world in [bold]{summary['root']}[/]: {images['train']} train + {images['val']} val images "
        f"({cfg.size}px), {sum(captions.values())} captions, {len(summary['classnames'])} classes, "
        f"{summary['seconds']:.1f}s"
    )
    shared = ", ".join(f"{split} {share:.1%}" for split, share in summary["shared_captions"].items())
    console.print(f"captions shared with another image: {shared}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the kdpipe app."""
    app.command("make-shapes")(make_shapes)
