"""`kdpipe eval` (a student run, or the teacher from its cache) and `kdpipe report` (runs side by side)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .errors import user_errors
from .options import config_option, stage_config
from kdpipe.progress import console


def eval_cmd(
    ctx: typer.Context,
    run: Optional[Path] = typer.Argument(None, help="Run directory written by `kdpipe train`."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="Evaluate the teacher itself from this CACHE's "
                                           "embeddings (no teacher forward) instead of a RUN."),
    teacher_name: Optional[str] = typer.Option(
        None, "--teacher-name", help="With --teacher CACHE: which of the cache's teachers (its name in the cache) "
        "[default: the first]; an added teacher's report goes to CACHE/teachers/NAME/teacher_eval.json."),
    cache: Optional[Path] = typer.Option(None, "--cache", "-c", help="Cache to evaluate on (default: the one "
                                         "RUN/student.json records)."),
    split: str = typer.Option("val", "--split", help="Held-out split of the cache: val or test."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="The run's weights to judge: best (the best "
                                   "validation score; the last when the run had no validation) or last "
                                   "(the final step). Best was picked on the val split: its val figures are "
                                   "optimistic (the report notes it); last is the one to publish."),
    zeroshot: Optional[list[str]] = typer.Option(
        None, "--zeroshot", "-z", help="Extra zero-shot dataset (repeatable), KIND:PATH[:KEY=VALUE]. "
        "folder:PATH: PATH/<class>/<images>; class names from :names=FILE, else PATH/classnames.txt, else the "
        "folder names (_ read as space); the file holds one name per line in the folders' sorted order, or "
        "folder<TAB>name lines. imagenet:PATH: ImageNet-1k val as PATH/<wnid>/<images> (valprep.sh's layout) "
        "with open_clip's class names and 80 templates; a subset of k wnid folders is scored k-way over the "
        "classes present (reported as imagenet<k>), :classes=all scores it 1000-way. An image-only student "
        "needs the teacher's ImageNet prompts in the cache (`kdpipe extract --prompt-set imagenet`). "
        "cifar10:ROOT, cifar100:ROOT: a local torchvision root. Never downloaded. The cache's own labels "
        "are always used when it has them."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1, help="Images (or captions) per student forward."),
    workers: int = typer.Option(0, "--workers", "-w", min=0, help="DataLoader workers decoding images."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N)."),
    chunk: int = typer.Option(1024, "--chunk", min=1, help="Queries per similarity block (memory bound)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output JSON (default: RUN/eval.json, "
                                       "or CACHE/teacher_eval.json with --teacher)."),
    verify: str = typer.Option("size", "--verify", help="Cache check before reading: none, size or sha256."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    config: Optional[Path] = config_option(),
) -> None:
    """Retrieval R@1/5/10 both ways, zero-shot top-1/top-5 and agreement with the teacher, each next to the
    teacher's own figure on the same split and their ratio; for a run trained with --labels, its class head's
    top-1/top-5 (head/) beside the teacher's zero-shot on the same images. Writes RUN/eval.json and prints a table."""
    from kdpipe.evaluate import EvalConfig, run as evaluate

    with user_errors():
        evaluate(stage_config(ctx, EvalConfig, config, dict(
            run=run, teacher=teacher, teacher_name=teacher_name, cache=cache, split=split, checkpoint=checkpoint,
            zeroshot=list(zeroshot or []),
            batch_size=batch_size, workers=workers, device=device, chunk=chunk, out=out,
            verify=verify, progress=not no_progress), params={"progress": "no_progress"}))


def report_cmd(
    ctx: typer.Context,
    runs: Optional[list[Path]] = typer.Argument(None, help="Run directories to compare."),
    out: Path = typer.Option(Path("report.md"), "--out", "-o", help="Markdown file to write."),
    config: Optional[Path] = config_option(),
) -> None:
    """One Markdown table comparing runs: student, losses, whitening, R@1 both ways, zero-shot, agreement,
    size and latency, each with its ratio to the teacher. Reads each RUN's student.json, config.toml,
    eval.json and bench.json ("–" where missing); written to --out and printed."""
    from kdpipe.report import ReportConfig, run as report

    with user_errors():
        result = report(stage_config(ctx, ReportConfig, config, dict(runs=list(runs) if runs else None, out=out)))
    typer.echo(result["markdown"])
    console.print(f"report: {result['path']}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the kdpipe app."""
    app.command("eval")(eval_cmd)
    app.command("report")(report_cmd)
