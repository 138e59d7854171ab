"""CLI for the whiten stage: ``kdpipe fit-whitening CACHE``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .errors import user_errors
from .options import config_option, stage_config
from kdpipe.progress import console


def fit_whitening(
    ctx: typer.Context,
    cache: Optional[Path] = typer.Argument(None, help="Cache directory written by `kdpipe extract`."),
    mode: str = typer.Option(
        "all", "--mode", "-m",
        help="image (every image view), text (every caption), joint (both, one transform: keeps "
        "image-text alignment), or all (the three; one pass either way)."),
    eps_rel: float = typer.Option(1e-4, "--eps-rel", help="ε added to every eigenvalue, relative to the mean eigenvalue."),
    method: str = typer.Option("zca", "--method", help="zca (W = U diag((λ+ε)^-1/2) Uᵀ) or pca (W = diag((λ+ε)^-1/2) Uᵀ)."),
    variant: Optional[list[str]] = typer.Option(
        None, "--variant",
        help="Also fit this variant of every mode, stored as MODE@VARIANT (train with --whiten joint@VARIANT); "
        "repeatable. Comma-separated alpha=A (partial: scale by (λ+ε)^(-A/2), A in (0,1]), shrink=G "
        "(ε = G × mean eigenvalue), top=P (whiten only the leading directions holding a share P of the "
        "variance); e.g. --variant alpha=0.5 --variant top=0.9. The table gives the teacher's own "
        "retrieval and zero-shot in each space: a variant that costs the teacher much is no target."),
    eval_split: Optional[str] = typer.Option(
        None, "--eval-split", help="Held-out split for the checks [default: val, else test]."),
    check_train: bool = typer.Option(
        True, "--check-train/--no-check-train",
        help="Measure the whitened train covariance with a second pass (else computed analytically)."),
    verify: str = typer.Option("size", "--verify", help="Cache check before reading: none, size or sha256."),
    teacher: Optional[str] = typer.Option(
        None, "--teacher",
        help="Which teacher of a cache with several (its name in the cache, as `kdpipe extract --add-teacher` "
        "named it) [default: the first]; its files go to CACHE/teachers/NAME/."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    config: Optional[Path] = config_option(),
) -> None:
    """Fit whitening transforms on the TRAIN split of a cache.

    Writes CACHE/whitening.h5 (mu, W, W_inv, eigenvalues per mode; teacher fingerprint) and
    CACHE/whitening.json (checks: whitened train covariance vs I, held-out eigenvalues vs the
    Marchenko-Pastur band, the teacher's retrieval and zero-shot accuracy raw vs whitened).
    With --teacher NAME (a teacher added to the cache), both go to CACHE/teachers/NAME/.
    """
    from kdpipe import whiten

    with user_errors():
        cfg = stage_config(ctx, whiten.WhitenConfig, config, dict(
            cache=cache, mode=mode, eps_rel=eps_rel, method=method, variants=variant or None, eval_split=eval_split,
            check_train=check_train, verify=verify, teacher=teacher, progress=progress), params={"variants": "variant"})
        report = whiten.run(cfg)
    failed = [m for m, r in report["modes"].items() if not r["train_cov"]["ok"]]
    console.print(f"whitening: {report['whitening']} (checks: {Path(report['whitening']).parent / whiten.WHITENING_JSON})"
                  + (f" [red]train covariance check failed for {failed}[/]" if failed else ""))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the kdpipe app."""
    app.command("fit-whitening")(fit_whitening)
