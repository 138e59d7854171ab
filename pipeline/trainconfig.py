"""Every setting of `kdpipe train`: its type, default and help, each defined once, here.

This module imports no torch, so the command line builds `kdpipe train`'s options from
``TrainConfig``'s fields (one flag per field, its help and default on screen) and answers
``--help`` and ``--print-config`` without loading the trainer. A new field is a new flag and a new
``--config`` / ``RUN/config.toml`` key; ``config.setting`` gives it help text (and, where it has one,
a short flag and a minimum).

Precedence, lowest first (``resolve_config``): the defaults here < ``RUN/config.toml`` (with
``resume``) < a ``--config`` file < the flags given. ``RUN/config.toml`` is ``config_toml`` of the
resolved config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import config
from .config import setting
from .errors import BadValue
from .rundir import CONFIG_FILE, has_checkpoint

# CLIP-KD's full recipe (Yang et al., CVPR 2024): task + CRD 1 + ICL 1 + FD 2000. The task term is
# CLIP's InfoNCE of the student's image against the (teacher's or student's) text, both ways, so
# an image-only student keeps the text->image direction. fd 2000 is CLIP-KD's MSE weight at
# D = 512, i.e. λ = 7.8125 of λ·(1 − cos) (see ``losses.FeatureDistillation``).
DEFAULT_RECIPE = "clip=1,crd=1,icl=1,fd=7.8125"

_WHERE = "here, in --config, or in RUN/config.toml with --resume"


@dataclass
class TrainConfig:
    student: str = setting(
        "mobilenetv3", "Image student, a timm model: mobilenetv3, mobilenetv3_050 (half width), mobilenetv3_large, "
        "resnet18/34/50, efficientnet_b0, vit_tiny, mobilevit_s, tiny (STUDENTS registry), or timm:NAME for any timm "
        "model (names: timm.list_models('*mobilenet*')).", short="-s")
    cache: str = setting("", f"Cache directory from `kdpipe extract` (required: {_WHERE}).", short="-c")
    out: str = setting("", f"Run directory to write (required: {_WHERE}).", short="-o")
    losses: str = setting(
        DEFAULT_RECIPE, "Weighted losses (clip, fd, mfd, crd, icl, gd, afd, hinton). The default is CLIP-KD's full "
        "recipe: the task InfoNCE (student image vs text) + CRD + ICL + FD; fd/mfd weight = λ of λ·(1−cos), "
        "CLIP-KD's MSE 2000 at D=512 = 7.8125.", short="-l")
    loss_options: dict[str, dict[str, Any]] = setting(
        help="A loss's constructor argument, LOSS.NAME=VALUE (repeatable; VALUE as in TOML): e.g. hinton.T=2, "
        "icl.init_scale=2.66, crd.learn_scale=false. Given here, it replaces the whole table of a config file.",
        factory=dict)
    teachers: list[str] | None = setting(
        None, "The cache's teachers to learn from, by name (manifest.json's teachers table), "
        "comma-separated, e.g. A,B (default: the cache's first teacher). The student lives in the first one's "
        "space; with several, losses over similarity distributions (crd, hinton) learn the teachers' weighted "
        "average probabilities and feature losses (fd, mfd, icl, gd, afd) use one projection head per teacher.")
    teacher_weights: list[float] | None = setting(
        None, "One positive weight per --teachers entry, in order, e.g. 0.5,0.5 (normalised to sum 1; "
        "default: equal).")
    labels: bool = setting(
        False, "Task KD on the cache's class labels (a labelled input: imagefolder, cifar, ...): the student gets a "
        "class head whose logits are hinton's student side (teacher side: its zero-shot logits over the class prompts, "
        "from the cached embeddings; with several --teachers, their probabilities averaged with the teacher weights) "
        "and its CE term's; eval reports the head's top-1/top-5. VLM_Distillation's recipe: "
        "--losses hinton=1 (T=4, alpha=0.5); the no-teacher baseline: --losses hinton=1 --loss-options hinton.alpha=0.")
    whiten: str = setting(
        "none", "none | image | text | joint | separate: learn whitened targets (needs `kdpipe fit-whitening`; "
        "for --teachers NAME alone, `kdpipe fit-whitening --teacher NAME`; not with several --teachers); "
        "joint keeps image-text alignment, separate whitens each modality with its own transform. "
        "Measured so far, no whitened space trained a better student than none (benchmarks/README.md).")
    text_student: str = setting(
        "none", "none (use the teacher's cached text embeddings) or a text student: text_tiny, text_small, text_base.")
    student_kwargs: dict[str, Any] = setting(
        help="An argument of the image student's builder, NAME=VALUE (repeatable; VALUE as in TOML), e.g. "
        "drop_rate=0.1.", factory=dict)
    text_student_kwargs: dict[str, Any] = setting(
        help="An argument of the text student's builder, NAME=VALUE (repeatable; VALUE as in TOML).", factory=dict)
    init_checkpoint: str | None = setting(
        None, "Local weights for the student backbone (e.g. a timm ImageNet checkpoint, .safetensors or .pth; its "
        "classifier is dropped).")
    image_size: int | None = setting(None, "Student input size (default: the teacher's).", minimum=8)
    mean: list[float] | None = setting(None, "Student input normalisation mean, R,G,B (default: the teacher's).")
    std: list[float] | None = setting(None, "Student input normalisation std, R,G,B (default: the teacher's).")
    epochs: int = setting(10, "Epochs.", short="-e", minimum=1)
    batch_size: int = setting(64, "Batch per process.", short="-b", minimum=1)
    lr: float = setting(1e-3, "Peak learning rate, AdamW.")
    weight_decay: float = setting(0.05, "AdamW weight decay (none on parameters with < 2 dims).")
    warmup_steps: int = setting(100, "Linear warmup steps.", minimum=0)
    min_lr_ratio: float = setting(0.0, "Floor of the cosine decay, as a fraction of --lr (reached at the last step).")
    grad_clip: float = setting(0.0, "Max gradient norm; 0: no clipping.")
    mask_ratio: float = setting(0.75, "Share of each image masked for the mfd loss.")
    views_used: str = setting("all", "all (a random cached view per sample) or 0 (the teacher's eval view only).",
                              convert=str)  # a file may say views_used = 0
    shuffle_buffer: int = setting(1000, "Samples in the shuffle buffer of each cache reader.")
    precision: str = setting("auto", "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.")
    device: str = setting("auto", "auto, cpu or cuda[:N].")
    dist_timeout: float = setting(30.0, "Minutes a collective (all-gather, barrier) may wait under torchrun/srun "
                                  "before the run fails (NCCL's own default is 10); ranks idle while others finish "
                                  "their work never time out.", minimum=0.1)  # = runtime.DEFAULT_DIST_TIMEOUT_MIN
    workers: int = setting(2, "DataLoader workers.", short="-w", minimum=0)
    seed: int = setting(0, "Seed (data order, views, init).")
    max_steps: int | None = setting(None, "Stop after this many steps (the schedule still spans all epochs).",
                                    minimum=1)
    log_every: int = setting(10, "Log a metrics row (metrics.jsonl, and TensorBoard / W&B scalars) every N steps.",
                             minimum=1)
    print_every: int | None = setting(None, "Off a terminal (a log file): a plain line (step, loss and its terms, lr, "
                                      "samples/s, ETA) every N steps (default: about 100 lines per run).", minimum=1)
    log: str = setting("none", "Also log the metrics rows to tensorboard (RUN/tensorboard/) and/or wandb (RUN/wandb/, "
                       "offline unless WANDB_MODE is set), comma-separated; needs pip install 'kdpipe[tensorboard]' "
                       "/ 'kdpipe[wandb]'.")
    val_every: int | None = setting(None, "Validate every N steps (default: each epoch end).", minimum=1)
    val_samples: int = setting(1000, "Val images used by each validation.", minimum=1)
    bn_samples: int = setting(256, "Train samples for precise BatchNorm statistics before validation and saving.",
                              minimum=1)
    ckpt_every: int | None = setting(None, "Save the full training state every N steps (default: at each "
                                     "validation, epoch end and the stop).")
    max_nonfinite: int = setting(5, "Consecutive non-finite steps (skipped) that stop the run.", minimum=1)
    verify: str = setting("size", "Cache check before reading: none, size or sha256.")
    resume: bool | str = setting(False, "yes: continue the run in --out from its latest checkpoint, with its "
                                 "config.toml under the other settings (an error without one; --resume alone means "
                                 "yes); auto: continue it if --out holds a checkpoint, else start a fresh run (one "
                                 "command for a job that may be requeued); no: start a fresh run.")
    progress: bool = setting(True, "Show a progress bar.")


def resolve_config(overrides: dict[str, Any], config_file: str | Path | None = None) -> TrainConfig:
    """Defaults < RUN/config.toml (with resume) < ``config_file`` < ``overrides`` (flags given).

    ``overrides`` holds only what the user set (None values are ignored); ``kdpipe.config`` checks
    the files and merges.
    """
    out = overrides.get("out")
    saved = Path(out) / CONFIG_FILE if out and continues(overrides.get("resume"), out) else None
    files = [saved] if saved is not None and saved.is_file() else []
    files += [config_file] if config_file is not None else []
    return config.resolve(TrainConfig, flags=overrides, files=files)


def continues(resume: bool | str | None, out: str | Path) -> bool:
    """Whether a run continues the checkpoint in ``out``: ``resume`` yes (true), or auto and ``out`` holds one.

    auto lets a requeued job run one command whether or not it ran before.
    """
    word = "yes" if resume is True else "no" if resume is False or resume is None else resume
    if word == "auto":
        return has_checkpoint(out)
    if word not in ("yes", "no", "true", "false"):
        raise BadValue(f"--resume must be yes, no or auto, got {resume!r}")
    return word in ("yes", "true")


def config_toml(cfg: TrainConfig) -> str:
    """The resolved config as RUN/config.toml holds it (``resume`` is how a run started, not a setting of it)."""
    return config.dumps(cfg, leave_out=("resume",))
