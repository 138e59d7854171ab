"""Pretrain a small open_clip CLIP from scratch on a captioned dataset.

No pretrained weights can be downloaded on an offline machine, so the demo first trains its
own teacher on the shapes world. The model is built by open_clip from a model config (a
shipped one such as ``shapes-vit``, or a config JSON) and trained with open_clip's
``ClipLoss``: each step takes a batch of images through a light random-resized crop and one
random caption of each. The dataset is small, so every image is decoded once into one
uint8 tensor and every caption tokenised once.

No horizontal flips: shapes-world captions say "on the left" / "to the right of", which a
flip would make false.

Output (``TEACHER/``), loadable by ``load_teacher("TEACHER/config.json", "TEACHER/model.safetensors")``
and therefore by ``kdpipe extract --teacher TEACHER/config.json --pretrained TEACHER/model.safetensors``
(or, the same teacher with the same fingerprint, ``--teacher local-dir:TEACHER``):

- ``config.json``: ``{"name": ARCH, "model_cfg": ..., "preprocess_cfg": ...}`` (open_clip_config.json
  format; ``name``, the architecture trained, is what kdpipe calls this teacher);
- ``model.safetensors``: the state dict;
- ``open_clip_config.json``: the same config under open_clip's name, so that the directory is also
  an open_clip ``local-dir:`` model: ``open_clip.create_model_and_transforms("local-dir:TEACHER")``
  and ``open_clip.get_tokenizer("local-dir:TEACHER")`` load it without kdpipe (open_clip finds
  ``model.safetensors`` itself: it is one of the checkpoint names its local-dir schema looks for);
- ``train.json``: the request (what identifies this teacher: model config, schedule, seed,
  data and its annotations' sha256), the loss curve, val metrics and time. Written last: a
  teacher directory without it is incomplete. A later run with the same request reuses it.

While training, ``TEACHER/checkpoints/`` (``kdpipe.trainstate``: ``latest.pt``, ``previous.pt``)
holds the full state every ``checkpoint_every`` steps: model, optimiser, scheduler, the batch
and crop generator, the process RNGs, the data position (this epoch's permutation and the
batches drawn from it) and the loss and val curves so far. Running the same request again on
an incomplete teacher resumes from it and ends with the weights an uninterrupted run would
have (bit-equal on CPU). Once ``train.json`` is written the folder is removed: a complete
teacher is reused, never resumed. SIGTERM or SIGUSR1 (a scheduler's preemption notice) stops the
run after the step in progress, with a checkpoint of that step (unless checkpoints are off), so
that re-running the same command resumes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import HF_CONFIG_NAME
from torch import Tensor

from . import runtime, trainstate
from .atomic import atomic_write, atomic_write_json
from .data.views import normalize_images
from .errors import AlreadyExists, BadValue, MissingInput, on_write_failure
from .optim import lr_lambda, param_groups
from .progress import StepLines, interactive, line_every, make_progress
from .teachers import encode_text as text_features, random_init_expected
from .weights import resolve_arch

log = logging.getLogger("kdpipe")

DEFAULT_STEPS = 700  # shapes world, 2000 train images: ~3.5 min on 2 shared CPU cores, val i2t R@1 ~0.35
FILES = ("config.json", "model.safetensors", "train.json")


@dataclass
class PretrainConfig:
    data: str  # captioned dataset with a train split (COCO layout, e.g. `kdpipe make-shapes`)
    out: str  # teacher directory to write
    arch: str = "shapes-vit"  # shipped config name, open_clip model name, or model-config JSON
    steps: int = DEFAULT_STEPS
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup: int | None = None  # warm-up steps; default 10% of steps
    crop_scale: tuple[float, float] = (0.8, 1.0)  # RandomResizedCrop area range
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # autocast on CUDA (bf16); fp32 on CPU
    overwrite: bool = False
    log_every: int = 10  # loss curve resolution (steps)
    print_every: int | None = None  # steps between plain log lines off a terminal; None: ~100 per run
    val_every: int | None = None  # steps between held-out evaluations (the val curve); None: at the end only
    checkpoint_every: int | None = None  # steps between checkpoints; None: at each val point, else every ~10%; 0: never
    eval_batch_size: int = 256
    progress: bool = True


# --------------------------------------------------------------------------- data


@dataclass
class CaptionedImages:
    """A split in memory: every image at the model's size, every caption tokenised."""

    images: Tensor  # uint8 [N, 3, S, S]: view 0 (centred square crop) of each image
    tokens: Tensor  # long [M, L]: all captions, image after image
    offsets: Tensor  # long [N + 1]: captions of image n are tokens[offsets[n]:offsets[n + 1]]
    labels: Tensor  # long [N], -1 where unknown

    def __len__(self) -> int:
        return self.images.shape[0]

    def caption_owner(self) -> Tensor:
        """long [M]: the image index of each caption."""
        counts = self.offsets[1:] - self.offsets[:-1]
        return torch.repeat_interleave(torch.arange(len(self)), counts)


def _image_tensor(record: Any, size: int, interpolation: str) -> Tensor:
    """A record's image -> uint8 [3, size, size] (the teacher's eval view: centred square crop)."""
    from .data import views

    img = views.to_rgb(views.decode_image(record.data if record.data is not None else record.path))
    view = views.apply_view(img, views.center_view(*img.size), size, interpolation)
    return torch.from_numpy(np.asarray(view, dtype=np.uint8).copy()).permute(2, 0, 1)


def _usable(record: Any, size: int, interpolation: str) -> tuple[Tensor | None, list[str], str | None]:
    """(pixels, non-empty captions, None), or (None, [], why the record is skipped)."""
    from .data.views import BadImage

    captions = [c.strip() for c in record.captions if c and c.strip()]
    if not captions:
        return None, [], "no_caption"
    try:
        return _image_tensor(record, size, interpolation), captions, None
    except BadImage as err:
        return None, [], err.reason


def load_split(source: Any, split: str, size: int, interpolation: str, tokenizer: Any) -> CaptionedImages:
    """Decode every image of ``split`` and tokenise its non-empty captions; skip unusable records."""
    images, captions, offsets, labels, skipped = [], [], [0], [], Counter()
    for unit in source.units(split):
        for record in unit.records():
            pixels, caps, reason = _usable(record, size, interpolation)
            if reason:
                skipped[reason] += 1
                continue
            images.append(pixels)
            captions += caps
            offsets.append(len(captions))
            labels.append(-1 if record.label is None else int(record.label))
    if skipped:
        log.warning("%s: skipped %s", split, dict(skipped))
    if not images:
        raise BadValue(f"split {split!r} of {source.name} has no usable image with a caption")
    return CaptionedImages(torch.stack(images), tokenizer(captions), torch.tensor(offsets), torch.tensor(labels))


def data_digest(spec: str) -> str | None:
    """sha256 over a COCO-layout source's annotation files (what identifies its content cheaply)."""
    files = sorted((Path(spec) / "annotations").glob("*.json"))
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- augmentation (pure)


def sample_boxes(n: int, scale: tuple[float, float], generator: torch.Generator,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """RandomResizedCrop boxes: float [n, 4] (x0, y0, x1, y1) relative to the image, inside [0, 1].

    Area share uniform in ``scale``, aspect ratio log-uniform in ``ratio``; sides are clipped to
    the image (torchvision re-draws instead; with scale near 1 the difference is negligible).
    """
    area = torch.empty(n).uniform_(*scale, generator=generator)
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    w = torch.sqrt(area * log_r.exp()).clamp(max=1.0)
    h = torch.sqrt(area / log_r.exp()).clamp(max=1.0)
    x0 = torch.rand(n, generator=generator) * (1 - w)
    y0 = torch.rand(n, generator=generator) * (1 - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def crop_resize(images: Tensor, boxes: Tensor) -> Tensor:
    """Crop each box and resize it to the full image size, bilinearly, in one batched call.

    images float [B, C, S, S], boxes [B, 4] relative (x0, y0, x1, y1) -> float [B, C, S, S].
    Crops are at least as large as ``scale[0]`` of the image, so this only up-samples (no
    aliasing to guard against).
    """
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    theta = torch.zeros(boxes.shape[0], 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = x1 - x0, x0 + x1 - 1  # output [-1, 1] -> box in input coords
    theta[:, 1, 1], theta[:, 1, 2] = y1 - y0, y0 + y1 - 1
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------- text


def encode_text(model: torch.nn.Module, tokens: Tensor) -> Tensor:
    """tokens [B, L] -> unit text embeddings [B, D], running only up to the batch's last EOT.

    Shapes captions fill ~17 (at most 22) of the 32 context positions; the teachers' trimmed
    text forward (``teachers.encode_text``: exact for a causal tower pooled at EOT) does about
    half the text FLOPs of open_clip's full forward, with gradients.
    """
    return F.normalize(text_features(model, tokens), dim=-1)


# --------------------------------------------------------------------------- schedule and optimiser


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at step ``total``.

    Zero falls one step after the last step (``total − 1``), so the last step still learns:
    ``optim.lr_lambda``, whose cosine ends on its own last step, run for ``total + 1`` steps.
    """
    return lr_lambda(total + 1, warmup, 0.0)(step)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; gains, biases and the logit scale get no weight decay (``optim.param_groups``: < 2 dims).

    Fused: the 49408-row token embedding gets a dense gradient every step, and the fused kernel
    updates it ~6x faster than the default on CPU (there, the optimiser step otherwise rivals the
    forward pass of a small model).
    """
    groups = param_groups(model, weight_decay)
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=fused)


# --------------------------------------------------------------------------- training


class Batches:
    """Endless (image indices [B], caption rows [B]): epochs of shuffled images, one random caption each.

    An iterator object rather than a generator function, so that a checkpoint can hold where it
    stands: the epoch's permutation (``order``, kept rather than re-drawn: ``generator`` has moved
    on since) and the batches drawn from it. With the generator's state restored too, a resumed
    run draws the very batches and captions an uninterrupted one would.
    """

    def __init__(self, data: CaptionedImages, batch_size: int, generator: torch.Generator) -> None:
        self.offsets = data.offsets
        self.counts = data.offsets[1:] - data.offsets[:-1]  # captions per image
        self.batch_size = min(batch_size, len(data))  # contrastive batches need distinct images
        self.generator = generator
        self.order: Tensor | None = None  # long [N]: this epoch's permutation; None before the first batch
        self.epoch, self.batch = -1, 0  # epochs started (from 0), batches drawn in this one

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        size = self.batch_size
        if self.order is None or (self.batch + 1) * size > len(self.order):  # the incomplete tail is dropped
            self.order = torch.randperm(len(self.counts), generator=self.generator)
            self.epoch, self.batch = self.epoch + 1, 0
        idx = self.order[self.batch * size : (self.batch + 1) * size]
        self.batch += 1
        pick = (torch.rand(size, generator=self.generator) * self.counts[idx]).long()
        return idx, self.offsets[idx] + pick


def batches(data: CaptionedImages, batch_size: int, generator: torch.Generator) -> Batches:
    """Endless (image indices [B], caption rows [B]) from ``generator`` (see ``Batches``)."""
    return Batches(data, batch_size, generator)


@dataclass
class Trainer:
    """Everything one training step needs (built by ``run``)."""

    model: torch.nn.Module
    loss: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_scale: tuple[float, float]
    device: torch.device
    precision: str
    generator: torch.Generator

    def step(self, images: Tensor, tokens: Tensor) -> float:
        """images uint8 [B, 3, S, S], tokens [B, L] -> the batch's ClipLoss (one optimiser step)."""
        boxes = sample_boxes(images.shape[0], self.crop_scale, self.generator)
        crops = crop_resize(images.to(self.device).float(), boxes.to(self.device))
        x = normalize_images(crops, self.mean, self.std)
        with runtime.autocast(self.precision, self.device):
            img = self.model.encode_image(x, normalize=True)
            txt = encode_text(self.model, tokens.to(self.device))
            loss = self.loss(img.float(), txt.float(), self.model.logit_scale.exp())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():  # open_clip clamps the learnt temperature to at most 100
            self.model.logit_scale.clamp_(0, math.log(100))
        return float(loss.detach())


@dataclass
class LoopState:
    """What the loop has done: with the model, optimiser and RNG states, what a checkpoint holds."""

    step: int = 0  # optimiser steps done
    curve: list[dict] = field(default_factory=list)  # [{"step", "loss", "lr"}]
    val_curve: list[dict] = field(default_factory=list)  # [{"step", **metrics}]
    window: list[float] = field(default_factory=list)  # losses since the last curve point
    seconds: float = 0.0  # training time of the sessions before this one (evaluations left out)
    stopped: str | None = None  # the stop signal that ended this session early (not checkpointed)

    def to_dict(self) -> dict[str, Any]:
        """Everything but ``step`` (a checkpoint keeps it in its ``position``)."""
        return {"curve": self.curve, "val_curve": self.val_curve, "window": self.window, "seconds": self.seconds}


def train_loop(trainer: Trainer, data: CaptionedImages, cfg: PretrainConfig,
               on_val: Callable[[int], dict[str, float]] | None = None, feed: Batches | None = None,
               loop: LoopState | None = None, on_checkpoint: Callable[[LoopState], None] | None = None,
               stop: runtime.StopRequest | None = None) -> LoopState:
    """Run steps ``loop.step`` (0 by default) to ``cfg.steps``; returns the loop's state: the loss curve
    (means over log_every steps) and the val curve [{"step", **on_val(step)}] (every ``cfg.val_every``
    steps). ``on_checkpoint(loop)`` is called every ``checkpoint_steps(cfg)`` steps, after that step's
    evaluation, but not after the last step (the teacher itself is saved then). Once ``stop`` is set,
    the loop checkpoints the step just done (when checkpoints are on) and returns early, ``loop.stopped``
    naming the signal."""
    loop = loop if loop is not None else LoopState()
    feed = feed if feed is not None else Batches(data, cfg.batch_size, trainer.generator)
    every = checkpoint_steps(cfg)
    trainer.model.train()
    # off a terminal, the lines say what a bar would (and the lr): no bar there
    lines = StepLines("pretrain", cfg.steps, cfg.print_every or line_every(cfg.steps, cfg.log_every),
                      feed.batch_size, start=loop.step, enabled=not interactive())
    with make_progress("samples", disable=not (cfg.progress and interactive())) as bar:
        task = bar.add_task("pretrain", total=cfg.steps * feed.batch_size, completed=loop.step * feed.batch_size,
                            info="")
        for step in range(loop.step, cfg.steps):
            tick = time.perf_counter()
            idx, rows = next(feed)
            loop.window.append(trainer.step(data.images[idx], data.tokens[rows]))
            loop.step = step + 1
            lr = trainer.optimizer.param_groups[0]["lr"]
            lines.add(step + 1, time.perf_counter() - tick, loop.window[-1], {}, lr)
            if len(loop.window) == cfg.log_every or step == cfg.steps - 1:
                loop.curve.append({"step": step + 1, "loss": sum(loop.window) / len(loop.window), "lr": lr})
                loop.window = []
            if on_val is not None and cfg.val_every and (step + 1) % cfg.val_every == 0 and step + 1 < cfg.steps:
                loop.val_curve.append({"step": step + 1, **on_val(step + 1)})
                trainer.model.train()
            last = step + 1 == cfg.steps
            saved = on_checkpoint is not None and every and (step + 1) % every == 0 and not last
            if saved:
                on_checkpoint(loop)
            bar.update(task, advance=len(idx), info=f"loss {loop.curve[-1]['loss']:.3f}" if loop.curve else "")
            if stop and not last:
                if on_checkpoint is not None and every and not saved:
                    on_checkpoint(loop)
                loop.stopped = stop.signal
                break
    return loop


def tail_gain(val_curve: list[dict[str, float]], key: str = "i2t_R@1", tail: float = 0.2) -> float | None:
    """Relative gain of ``key`` over the last ``tail`` of the steps: (final − v₀) / v₀, where v₀ is
    the value at the latest evaluation at or before step (1 − tail)·final_step. None if there is
    no such earlier evaluation (or v₀ is 0). A gain below ~2% means the run has plateaued."""
    if len(val_curve) < 2:
        return None
    final = val_curve[-1]
    earlier = [r for r in val_curve[:-1] if r["step"] <= (1 - tail) * final["step"]]
    if not earlier or not earlier[-1][key]:
        return None
    return (final[key] - earlier[-1][key]) / earlier[-1][key]


# --------------------------------------------------------------------------- evaluation


def val_line(step: int, metrics: dict[str, float]) -> str:
    """'pretrain step 300: val R@1 i2t 0.251, t2i 0.240; zero-shot top-1 0.512 (chance 0.125)'."""
    zs = (f"; zero-shot top-1 {metrics['zeroshot_top1']:.3f} (chance {metrics['zeroshot_chance']:.3f})"
          if "zeroshot_top1" in metrics else "")
    return f"pretrain step {step:,}: val R@1 i2t {metrics['i2t_R@1']:.3f}, t2i {metrics['t2i_R@1']:.3f}{zs}"


@torch.no_grad()
def encode(model: torch.nn.Module, data: CaptionedImages, mean: tuple[float, ...], std: tuple[float, ...],
           device: torch.device, precision: str, batch_size: int) -> tuple[Tensor, Tensor]:
    """Unit image [N, D] and caption [M, D] embeddings (float32, CPU) of the eval views."""
    model.eval()
    img, txt = [], []
    with runtime.autocast(precision, device):
        for s in range(0, len(data), batch_size):
            x = normalize_images(data.images[s : s + batch_size].to(device), mean, std)
            img.append(model.encode_image(x, normalize=True).float().cpu())
        for s in range(0, data.tokens.shape[0], batch_size):
            txt.append(encode_text(model, data.tokens[s : s + batch_size].to(device)).float().cpu())
    return torch.cat(img), torch.cat(txt)


def prompt_templates(classnames: list[str]) -> list[str]:
    """Zero-shot templates as extraction picks them (kdpipe.prompts): a named set's own templates
    when its class names are exactly ``classnames`` (the shapes world), else the shapes templates."""
    from .prompts import PROMPT_SETS, SHAPES_TEMPLATES

    for name in PROMPT_SETS.names():
        names, templates = PROMPT_SETS.get(name)()
        if list(names) == list(classnames):
            return list(templates)
    return list(SHAPES_TEMPLATES)


@torch.no_grad()
def class_embeddings(model: torch.nn.Module, tokenizer: Any, classnames: list[str], device: torch.device) -> Tensor:
    """Prompt embeddings [K, T, D] (class x template), unit length."""
    from .prompts import prompt_texts

    model.eval()
    templates = prompt_templates(classnames)
    emb = encode_text(model, tokenizer(prompt_texts(classnames, templates)).to(device)).float().cpu()
    return emb.view(len(classnames), len(templates), -1)


def evaluate(model: torch.nn.Module, tokenizer: Any, data: CaptionedImages, classnames: list[str] | None,
             mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, precision: str,
             batch_size: int) -> dict[str, float]:
    """Retrieval R@1/5/10 both ways (all captions) and, with labels, zero-shot top-1/top-5."""
    from .metrics import retrieval_recall, zero_shot_accuracy, zero_shot_classifier

    img, txt = encode(model, data, mean, std, device, precision, batch_size)
    out = retrieval_recall(img, txt, data.caption_owner())
    known = data.labels >= 0
    if classnames and bool(known.any()):
        classifier = zero_shot_classifier(class_embeddings(model, tokenizer, classnames, device))
        zs = zero_shot_accuracy(img[known], classifier, data.labels[known])
        out.update({f"zeroshot_{k}": v for k, v in zs.items()})
        out["zeroshot_chance"] = 1.0 / len(classnames)
    return out


# --------------------------------------------------------------------------- files


def save_teacher(out: Path, model: torch.nn.Module, model_cfg: dict, preprocess_cfg: dict,
                 name: str | None = None) -> None:
    """model.safetensors (state dict), config.json, then open_clip_config.json, each written atomically.

    ``name`` (the architecture trained, e.g. shapes-vit) is recorded beside the two configs: the name
    kdpipe shows for this teacher (``weights.TeacherArch.label``; open_clip reads only the configs).

    The weights are written once: open_clip's ``local-dir:`` loads ``model.safetensors`` when no
    ``open_clip_model.safetensors`` is there (its preferred name, so a second copy or link under it
    would double the disk or, once a retrain replaced model.safetensors, be the one loaded, stale).
    """
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    config = {**({"name": name} if name else {}), "model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    atomic_write_json(out / "config.json", config)
    atomic_write_json(out / HF_CONFIG_NAME, config)


def add_open_clip_config(out: Path) -> bool:
    """Write open_clip_config.json from config.json if it is missing; True if written.

    Teachers pretrained before kdpipe wrote open_clip's layout are reused, not retrained: this
    makes them ``local-dir:`` models too.
    """
    if (out / HF_CONFIG_NAME).is_file():
        return False
    atomic_write_json(out / HF_CONFIG_NAME, json.loads((out / "config.json").read_text()))
    return True


def request_of(cfg: PretrainConfig, model_cfg: dict) -> dict[str, Any]:
    """What identifies a pretrained teacher: same request, same weights (up to hardware numerics)."""
    return {"model_cfg": model_cfg, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "weight_decay": cfg.weight_decay, "warmup": warmup_steps(cfg), "crop_scale": list(cfg.crop_scale),
            "seed": cfg.seed, "data": str(Path(cfg.data).resolve()), "data_sha256": data_digest(cfg.data)}


def differences(request: dict[str, Any], recorded: dict[str, Any]) -> list[str]:
    """The keys of ``request`` whose value ``recorded`` (an earlier run's request) does not share, sorted."""
    # the world's path is recorded but is not its identity (data_sha256 is): a moved world is the same
    return sorted(k for k in request if k != "data" and json.loads(json.dumps(request[k])) != recorded.get(k))


def existing_summary(out: Path, request: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The previous run's train.json if ``out`` holds a complete teacher for the same request.

    A complete teacher for a different request is refused (caches may have been built from it)
    unless ``overwrite``.
    """
    if overwrite or not (out / "train.json").is_file():
        return None
    previous = json.loads((out / "train.json").read_text())
    complete = all((out / f).is_file() for f in FILES)
    changed = differences(request, previous.get("request", {}))
    if complete and not changed:
        return previous
    if complete:
        raise AlreadyExists(f"{out} holds a teacher trained with other settings ({', '.join(changed)} differ); "
                            "pass --overwrite to replace it or choose another --out")
    return None


# --------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpointing:
    """Where ``fit`` saves its state (``out/checkpoints/``), what it saves it for, where it resumes."""

    out: Path  # the teacher directory
    request: dict[str, Any]  # ``request_of``: saved with the state, compared on resume
    resume: dict[str, Any] | None = None  # a checkpoint from ``resume_point``


def checkpoint_state(trainer: Trainer, feed: Batches, loop: LoopState, request: dict[str, Any],
                     seconds: float) -> dict[str, Any]:
    """Everything a resumed run needs to go on exactly (tensors and plain values: weights_only-loadable).

    ``seconds``: training time so far, all sessions together.
    """
    position = trainstate.Position(epoch=feed.epoch, batch=feed.batch, step=loop.step)
    return {"request": request, "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "generator": trainer.generator.get_state(),
            "rng": trainstate.capture_rng(), "position": position.to_dict(), "order": feed.order,
            "loop": {**loop.to_dict(), "seconds": seconds}}


def save_checkpoint(out: Path, trainer: Trainer, state: dict[str, Any]) -> None:
    """``out/checkpoints/latest.pt`` (the one before becomes ``previous.pt``); never NaN weights."""
    if not trainstate.all_finite(trainer.model):
        raise RuntimeError(f"step {state['position']['step']}: the weights are not finite; "
                           "refusing to overwrite the checkpoint")
    # from its first checkpoint on, the folder belongs to this run: incomplete (no train.json) until it ends,
    # so that re-running this request resumes it instead of finding an older teacher of another request
    (out / "train.json").unlink(missing_ok=True)
    trainstate.save_checkpoint(out, state)


def restore(state: dict[str, Any], trainer: Trainer, feed: Batches) -> LoopState:
    """Load a checkpoint into the trainer, the RNGs and the batch feed; returns the loop's state."""
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.generator.set_state(state["generator"])  # batches and crops
    trainstate.restore_rng(state["rng"])
    pos = trainstate.Position(**state["position"])
    feed.order, feed.epoch, feed.batch = state["order"], pos.epoch, pos.batch
    return LoopState(step=pos.step, **state["loop"])


def resume_point(out: Path, request: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The latest checkpoint of an unfinished run of the same request in ``out``, or None.

    ``overwrite`` removes the checkpoints (the run starts over); a checkpoint of another request is
    refused, naming what differs.
    """
    if not trainstate.has_checkpoint(out):
        return None
    if overwrite:
        shutil.rmtree(trainstate.ckpt_dir(out))
        log.info("removed the checkpoints of an unfinished teacher in %s (--overwrite: starting over)", out)
        return None
    try:
        state, path = trainstate.load_latest(out)
    except FileNotFoundError as err:  # both checkpoints unreadable
        raise MissingInput(f"{err}; pass --overwrite to start over") from err
    changed = differences(request, state["request"])
    if changed:
        raise AlreadyExists(f"{out} holds an unfinished teacher trained with other settings ({', '.join(changed)} "
                            "differ); pass --overwrite to start over or choose another --out")
    log.info("resuming from step %d of %d (%s)", state["position"]["step"], request["steps"], path)
    return state


# --------------------------------------------------------------------------- stage


def checkpoint_steps(cfg: PretrainConfig) -> int:
    """Steps between checkpoints (0: none): ``cfg.checkpoint_every``, else ``val_every``, else ~10% of steps."""
    if cfg.checkpoint_every is not None:
        return cfg.checkpoint_every
    return cfg.val_every or max(1, cfg.steps // 10)


def warmup_steps(cfg: PretrainConfig) -> int:
    return cfg.warmup if cfg.warmup is not None else max(1, cfg.steps // 10)


def _check(cfg: PretrainConfig) -> None:
    if cfg.steps < 1 or cfg.batch_size < 2:
        raise BadValue(f"need steps >= 1 and batch_size >= 2, got {cfg.steps} and {cfg.batch_size}")
    if not (0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1):
        raise BadValue(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {cfg.crop_scale}")
    if cfg.lr <= 0:
        raise BadValue(f"lr must be positive, got {cfg.lr}")
    if cfg.print_every is not None and cfg.print_every < 1:
        raise BadValue(f"print_every must be at least 1, got {cfg.print_every}")
    if cfg.checkpoint_every is not None and cfg.checkpoint_every < 0:
        raise BadValue(f"checkpoint_every must be >= 0 (0: no checkpoints), got {cfg.checkpoint_every}")


@dataclass
class Built:
    """A randomly initialised open_clip model and what describes it."""

    model: torch.nn.Module
    tokenizer: Any
    model_cfg: dict  # open_clip model config (embed_dim, vision_cfg, text_cfg)
    preprocess: dict  # open_clip PreprocessCfg as a dict (size, mean, std, interpolation, ...)
    label: str  # the architecture as the user named it (weights.TeacherArch.label)


def build_model(arch_name: str, device: torch.device) -> Built:
    """Resolve ``arch_name`` like a teacher name and build it with random weights."""
    import open_clip
    from open_clip.model import get_model_preprocess_cfg

    arch = resolve_arch(arch_name)
    model_cfg = open_clip.get_model_config(arch.open_clip_name)
    if model_cfg is None:  # resolve_arch found it, so open_clip's config store lost it
        raise ValueError(f"open_clip has no model config for {arch_name!r}")
    with random_init_expected():  # to be trained, or given a checkpoint's weights on resume
        model = open_clip.create_model(arch.open_clip_name, pretrained=None, device=device, pretrained_text=False)
    preprocess = dict(get_model_preprocess_cfg(model))
    preprocess["size"] = list(preprocess["size"]) if isinstance(preprocess["size"], tuple) else preprocess["size"]
    return Built(model, open_clip.get_tokenizer(arch.open_clip_name), model_cfg, preprocess, arch.label)


def _size(preprocess: dict) -> int:
    size = preprocess["size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def fit(cfg: PretrainConfig, built: Built, device: torch.device, precision: str,
        checkpoints: Checkpointing | None = None, stop: runtime.StopRequest | None = None) -> dict[str, Any]:
    """Load the data, train ``built.model`` in place, evaluate on val; returns the run's statistics.

    With ``checkpoints``, saves the state every ``checkpoint_steps(cfg)`` steps and starts from
    ``checkpoints.resume`` when given. Once ``stop`` is set, returns after the step in progress:
    ``{"stopped": signal name, "step": steps done, "checkpoint": the folder that step was saved in, or None}``.
    """
    from open_clip.loss import ClipLoss

    from .data import open_source

    source = open_source(cfg.data)
    if "train" not in source.splits():
        raise BadValue(f"{cfg.data} has no 'train' split (found {source.splits()})")
    size, interp = _size(built.preprocess), str(built.preprocess["interpolation"])
    train = load_split(source, "train", size, interp, built.tokenizer)
    val = load_split(source, "val", size, interp, built.tokenizer) if "val" in source.splits() else None
    batch = min(cfg.batch_size, len(train))
    log.info("pretraining %s on %d train images (%d captions): %d steps x %d", cfg.arch, len(train),
             train.tokens.shape[0], cfg.steps, batch)

    optimizer = make_optimizer(built.model, cfg.lr, cfg.weight_decay)
    warmup = warmup_steps(cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, cfg.steps))
    mean, std = tuple(built.preprocess["mean"]), tuple(built.preprocess["std"])
    trainer = Trainer(built.model, ClipLoss(), optimizer, scheduler, mean, std, tuple(cfg.crop_scale), device,
                      precision, torch.Generator().manual_seed(cfg.seed))
    feed = Batches(train, cfg.batch_size, trainer.generator)
    resume = checkpoints.resume if checkpoints is not None else None
    loop = restore(resume, trainer, feed) if resume is not None else LoopState()
    eval_seconds = [0.0]

    def on_val(step: int) -> dict[str, float]:
        tick = time.perf_counter()
        metrics = evaluate(built.model, built.tokenizer, val, source.classnames(), mean, std, device, precision,
                           cfg.eval_batch_size)
        eval_seconds[0] += time.perf_counter() - tick
        log.info(val_line(step, metrics))
        return metrics

    start = time.perf_counter()

    def train_seconds() -> float:  # all sessions together; the periodic evals are left out
        return loop.seconds + time.perf_counter() - start - eval_seconds[0]

    def on_checkpoint(done: LoopState) -> None:
        state = checkpoint_state(trainer, feed, done, checkpoints.request, train_seconds())
        save_checkpoint(checkpoints.out, trainer, state)

    train_loop(trainer, train, cfg, on_val if val is not None else None, feed, loop,
               on_checkpoint if checkpoints is not None else None, stop)
    if loop.stopped is not None:
        saved = checkpoints is not None and checkpoint_steps(cfg) > 0
        return {"stopped": loop.stopped, "step": loop.step,
                "checkpoint": str(trainstate.ckpt_dir(checkpoints.out)) if saved else None}
    curve, val_curve = loop.curve, loop.val_curve
    seconds = train_seconds()
    metrics = {} if val is None else evaluate(built.model, built.tokenizer, val, source.classnames(), mean, std,
                                              device, precision, cfg.eval_batch_size)
    if metrics:
        val_curve.append({"step": cfg.steps, **metrics})
    return {"train_images": len(train), "train_captions": int(train.tokens.shape[0]),
            "val_images": 0 if val is None else len(val), "final_loss": curve[-1]["loss"], "loss_curve": curve,
            "val": metrics, "val_curve": val_curve, "val_tail_gain": tail_gain(val_curve),
            "logit_scale": float(built.model.logit_scale.detach().exp()),
            "seconds": round(seconds, 2), "samples_per_s": round(cfg.steps * batch / seconds, 1),
            "resumed_from": None if resume is None else resume["position"]["step"]}


def kept_after_failure(out: Path) -> tuple[str, str]:
    """After a failed write (disk full, ...): the checkpoint that is intact, and that a re-run resumes from it."""
    kept, step = trainstate.describe_kept(out)
    if step is None:
        return kept, "free some space, then re-run the same command: it starts the teacher's training again"
    return kept, f"free some space, then re-run the same command: it resumes from step {step}"


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Train (or reuse) a teacher in ``cfg.out``; returns the summary also written to train.json.

    Stopped by SIGTERM / SIGUSR1: returns ``fit``'s ``{"stopped", "step", "checkpoint"}`` (+ ``steps``,
    ``reused``) and writes no teacher.
    """
    _check(cfg)
    device = runtime.resolve_device(cfg.device)
    precision = runtime.resolve_precision(cfg.precision, device)
    runtime.seed_everything(cfg.seed)  # model initialisation
    built = build_model(cfg.arch, device)
    out = Path(cfg.out)
    request = request_of(cfg, built.model_cfg)
    previous = existing_summary(out, request, cfg.overwrite)
    if previous is not None:
        log.info("teacher in %s already trained with these settings: reused (pass --overwrite to retrain)", out)
        if add_open_clip_config(out):
            log.info("wrote %s: %s is now also an open_clip local-dir model", HF_CONFIG_NAME, out)
        return {**previous, "reused": True}

    resume = resume_point(out, request, cfg.overwrite)
    with runtime.stop_requests() as stop, on_write_failure(lambda: kept_after_failure(out)):
        stats = fit(cfg, built, device, precision, Checkpointing(out, request, resume), stop)
        if "stopped" in stats:
            return {**stats, "steps": cfg.steps, "reused": False}
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.json").unlink(missing_ok=True)  # the directory is incomplete until train.json is rewritten
        save_teacher(out, built.model, built.model_cfg, built.preprocess, built.label)
        summary = {"request": request, "arch": cfg.arch, "steps": cfg.steps, "seed": cfg.seed, "data": cfg.data,
                   **stats, "device": str(device), "precision": precision,
                   "config": str(out / "config.json"), "weights": str(out / "model.safetensors")}
        atomic_write_json(out / "train.json", summary)
    # complete: from now on the teacher is reused, never resumed, so its checkpoints are only disk
    shutil.rmtree(trainstate.ckpt_dir(out), ignore_errors=True)
    log.info("teacher saved in %s (%.0fs, final loss %.3f)", out, stats["seconds"], stats["final_loss"])
    return {**summary, "reused": False}
