"""Student models: image backbones (timm models) and small text transformers (open_clip).

A student maps its input to the teacher's embedding dim D through a linear projection and
returns *un-normalised* features; the losses normalise. Everything is built with
``pretrained=False`` (no downloads); ``init_checkpoint`` loads a local ImageNet file instead.

Checkpoints describe how to rebuild themselves (nanoGPT's ``model_args``): ``student.json``
holds builder names and kwargs and which file holds each checkpoint's weights —
``student-best.safetensors`` (the best validation score) and ``student-last.safetensors`` (the
final step); "best" may name the last file when they are the same weights — so
``load_student`` needs nothing but the run directory (and which checkpoint, best by default).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import timm
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_write
from .errors import BadValue, MissingInput, UnknownName
from .registry import Registry
from .rundir import CHECKPOINTS, LEGACY_WEIGHTS_FILE, SPEC_FILE, check_checkpoint, read_spec, weights_file

log = logging.getLogger("kdpipe")

NO_BEST = "no validation chose a best: best = last"
VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer (CLIP BPE); the EOT id 49407 is the largest


# --------------------------------------------------------------------------- image backbones


@dataclass
class Backbone:
    """What a builder returns: a module emitting pooled features [B, dim], how to mask it, and
    what rebuilds it as a plain timm model (``timm.create_model(timm_name, **timm_kwargs,
    num_classes=N, global_pool=global_pool)``: its classifier then takes the place of the
    student's projection)."""

    module: nn.Module
    dim: int
    mask_kind: str  # "patch" (ViTs: zero whole patches) or "block" (CNNs: random block erasing)
    patch_size: int  # ViT patch size; for CNNs the network's total stride (informational)
    timm_name: str | None = None  # the timm architecture; None for a module timm cannot rebuild
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # create_model kwargs besides the head's
    global_pool: str | None = None  # the model's pooling ("avg", "token", ...), as create_model takes it


BackboneBuilder = Callable[..., Backbone]
STUDENTS: Registry[BackboneBuilder] = Registry("student")
TIMM_PREFIX = "timm:"  # --student timm:NAME builds any timm model NAME


def _global_pool(model: nn.Module) -> str | None:
    """The pooling a timm model applies before its classifier: a str on ViTs and ByobNets, a
    ``SelectAdaptivePool2d`` (its ``pool_type``) on most CNNs, sometimes only on ``model.head``."""
    for owner in (model, getattr(model, "head", None)):
        pool = getattr(owner, "global_pool", None)
        if isinstance(pool, str):
            return pool
        if isinstance(pool, nn.Module) and isinstance(getattr(pool, "pool_type", None), str):
            return pool.pool_type
    return None


def _patch_size(model: nn.Module) -> int | None:
    """The patch size of a model that tokenises its input by patches (``patch_embed``), else None."""
    size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    return None if size is None else int(size[0] if isinstance(size, (tuple, list)) else size)


def _total_stride(model: nn.Module) -> int:
    """The reduction of a timm model's last feature map (32 for the usual CNNs), 32 if unknown."""
    info = getattr(model, "feature_info", None)
    return int(info[-1]["reduction"]) if info else 32


def _timm(name: str, **kwargs: Any) -> Backbone:
    """timm ``name`` without its classifier (pretrained=False, num_classes=0); kwargs go to create_model.

    Models that embed patches (ViTs, Swin, ...) are masked by whole patches, all others by blocks.
    The feature dim is ``head_hidden_size``: what the model emits before its classifier (1024 on
    MobileNetV3-small, whose conv_head follows the pooling).
    """
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    patch = _patch_size(model)
    dim = getattr(model, "head_hidden_size", None) or model.num_features
    return Backbone(model, dim, mask_kind="block" if patch is None else "patch",
                    patch_size=patch or _total_stride(model), timm_name=name, timm_kwargs=dict(kwargs),
                    global_pool=_global_pool(model))


@STUDENTS.register("mobilenetv3", "mobilenetv3_small")
def mobilenetv3_small(image_size: int) -> Backbone:
    """timm mobilenetv3_small_100: 576 pooled channels, conv_head to 1024 features."""
    return _timm("mobilenetv3_small_100")


@STUDENTS.register("mobilenetv3_050")
def mobilenetv3_050(image_size: int) -> Backbone:
    """timm mobilenetv3_small_050: MobileNetV3-small at half width (0.57 M params, 1024 features).

    For teachers too small for the full one to be a 4x compression (e.g. the shapes-world
    teacher: 21 MFLOPs at 64 px vs mobilenetv3's 9.9 and this one's 4.8, projection included).
    """
    return _timm("mobilenetv3_small_050")


@STUDENTS.register("mobilenetv3_large")
def mobilenetv3_large(image_size: int) -> Backbone:
    """timm mobilenetv3_large_100: 960 pooled channels, conv_head to 1280 features."""
    return _timm("mobilenetv3_large_100")


@STUDENTS.register("resnet18")
def resnet18(image_size: int) -> Backbone:
    return _timm("resnet18")


@STUDENTS.register("resnet34")
def resnet34(image_size: int) -> Backbone:
    return _timm("resnet34")


@STUDENTS.register("resnet50")
def resnet50(image_size: int) -> Backbone:
    return _timm("resnet50")


@STUDENTS.register("efficientnet_b0")
def efficientnet_b0(image_size: int) -> Backbone:
    return _timm("efficientnet_b0")


@STUDENTS.register("vit_tiny")
def vit_tiny(image_size: int, patch_size: int = 16) -> Backbone:
    """timm vit_tiny_patch16_224 at ``image_size`` (dynamic size: other resolutions interpolate)."""
    return _timm("vit_tiny_patch16_224", img_size=image_size, patch_size=patch_size, dynamic_img_size=True)


@STUDENTS.register("mobilevit_s")
def mobilevit_s(image_size: int) -> Backbone:
    """timm mobilevit_s (needs image_size divisible by 32)."""
    return _timm("mobilevit_s")


@STUDENTS.register("tiny")
def tiny(image_size: int) -> Backbone:
    """timm test_efficientnet (0.1 M params, 256 features): a test student, fast on CPU."""
    return _timm("test_efficientnet")


def timm_student(name: str, image_size: int, **kwargs: Any) -> Backbone:
    """Any timm model ``name`` (``--student timm:NAME``); kwargs go to ``timm.create_model``.

    A model with a fixed input size (a ViT's strict ``patch_embed``) is built at ``image_size``
    unless kwargs set ``img_size``, as ``vit_tiny`` is.
    """
    if not timm.is_model(name):
        raise UnknownName(f"unknown timm model {name!r}; list the names with e.g. "
                          f"python -c \"import timm; print(timm.list_models('*mobilenet*'))\"")
    backbone = _timm(name, **kwargs)
    embed = getattr(backbone.module, "patch_embed", None)
    fixed = getattr(embed, "strict_img_size", False) and tuple(embed.img_size) != (image_size, image_size)
    if fixed and "img_size" not in kwargs:
        backbone = _timm(name, **kwargs, img_size=image_size)
    return backbone


def student_builder(name: str) -> BackboneBuilder:
    """``STUDENTS[name]``, or for ``timm:NAME`` the builder of timm model NAME."""
    if name.startswith(TIMM_PREFIX):
        return functools.partial(timm_student, name.removeprefix(TIMM_PREFIX))
    try:
        return STUDENTS.get(name)
    except KeyError as err:
        raise UnknownName(f"{err.args[0]}; or {TIMM_PREFIX}NAME for any timm model") from None


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A local checkpoint as a flat state dict (safetensors, or torch.load with weights_only)."""
    if path.endswith(".safetensors"):
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):  # common wrappers of training checkpoints
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_init_checkpoint(module: nn.Module, path: str) -> dict[str, list[str]]:
    """Load ImageNet weights into a backbone, non-strictly, and log what did not fit.

    Classifier weights and shape mismatches are skipped (they are expected: the head is
    stripped); a checkpoint matching *nothing* is an error, since it is surely the wrong file.
    """
    if not Path(path).is_file():
        raise MissingInput(f"init checkpoint {path!r} does not exist")
    state = _read_state_dict(path)
    own = module.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in mismatched}
    loaded = sum(k in own for k in state)
    if loaded == 0:
        raise BadValue(f"init checkpoint {path!r} matches no parameter of the student backbone")
    result = module.load_state_dict(state, strict=False)
    log.info(
        "init checkpoint %s: loaded %d/%d tensors; missing %d %s; unexpected %d %s; shape mismatch %d %s",
        path, loaded, len(own), len(result.missing_keys), result.missing_keys[:5],
        len(result.unexpected_keys), result.unexpected_keys[:5], len(mismatched), mismatched[:5],
    )
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys), "mismatched": mismatched}


class ImageStudent(nn.Module):
    """Backbone + linear projection to the teacher's embedding dim.

    Attributes used by the trainer: ``mask_kind`` / ``patch_size`` (for ``losses.mask_images``),
    ``mean`` / ``std`` (input normalisation), ``spec`` (how to rebuild it); by export:
    ``timm_name`` / ``timm_kwargs`` / ``global_pool`` (the backbone as a timm model, see ``Backbone``).
    ``head``: the class head of a run trained with ``--labels`` (``add_class_head``), else None; it
    maps the embedding to class logits and is saved with the student (``image.head.*``).
    """

    def __init__(
        self, backbone: Backbone, embed_dim: int, image_size: int,
        mean: tuple[float, ...], std: tuple[float, ...], spec: dict[str, Any],
    ) -> None:
        super().__init__()
        self.backbone = backbone.module
        self.proj = nn.Linear(backbone.dim, embed_dim)
        self.feature_dim, self.embed_dim, self.image_size = backbone.dim, embed_dim, image_size
        self.mask_kind, self.patch_size = backbone.mask_kind, backbone.patch_size
        self.timm_name, self.timm_kwargs, self.global_pool = backbone.timm_name, backbone.timm_kwargs, backbone.global_pool
        self.mean, self.std = tuple(mean), tuple(std)
        self.spec = spec
        self.head: nn.Linear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, S, S] normalised images -> [B, D] un-normalised embeddings."""
        return self.proj(self.backbone(x))

    def add_class_head(self, num_classes: int) -> nn.Linear:
        """A linear class head on the embedding, [B, D] -> [B, num_classes] logits (``--labels``)."""
        if num_classes < 1:
            raise BadValue(f"a class head needs at least one class, got {num_classes}")
        self.head = nn.Linear(self.embed_dim, num_classes).to(self.proj.weight.device)
        return self.head

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """[B, D] embeddings (this student's ``forward``) -> [B, K] class logits of the head."""
        if self.head is None:
            raise ValueError("this student has no class head (it was not trained with --labels)")
        return self.head(embedding)


def build_student(
    name: str, embed_dim: int, image_size: int,
    mean: tuple[float, ...] = OPENAI_DATASET_MEAN, std: tuple[float, ...] = OPENAI_DATASET_STD,
    init_checkpoint: str | None = None, **kwargs: Any,
) -> ImageStudent:
    """Build ``STUDENTS[name]`` or timm model NAME for ``timm:NAME`` (+ projection to ``embed_dim``);
    kwargs go to the builder (for ``timm:NAME``, to ``timm.create_model``)."""
    backbone = student_builder(name)(image_size, **kwargs)
    if init_checkpoint is not None:
        load_init_checkpoint(backbone.module, init_checkpoint)
    spec = {"name": name, "kwargs": dict(kwargs), "init_checkpoint": init_checkpoint}
    return ImageStudent(backbone, embed_dim, image_size, mean, std, spec)


# --------------------------------------------------------------------------- text students


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int) -> SimpleTokenizer:
    return SimpleTokenizer(context_length=context_length)  # bundled BPE file, no download


class TextStudent(nn.Module):
    """open_clip ``TextTransformer`` (causal, EOT pooling) whose projection outputs D directly."""

    def __init__(self, embed_dim: int, width: int, heads: int, layers: int, context_length: int = 77,
                 spec: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.tower = TextTransformer(
            context_length=context_length, vocab_size=VOCAB_SIZE, width=width, heads=heads,
            layers=layers, output_dim=embed_dim,
        )
        self.embed_dim, self.context_length = embed_dim, context_length
        self.spec = spec or {}

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """captions -> [C, context_length] int64 token ids (SOT … EOT, zero padded)."""
        return _tokenizer(self.context_length)(list(captions))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [C, L] (L ≤ context_length) -> [C, D] un-normalised embeddings.

        The tower is causal and pools at EOT (the largest id), so tokens after the last EOT of
        the batch cannot change the output: they are trimmed before the transformer runs.
        """
        tower = self.tower
        eot = tokens.argmax(dim=-1)
        n = int(eot.max()) + 1
        tokens = tokens[:, :n]
        x = tower.token_embedding(tokens) + tower.positional_embedding[:n]
        x = tower.transformer(x, attn_mask=tower.attn_mask[:n, :n])
        x = tower.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        return pooled @ tower.text_projection


TextBuilder = Callable[..., TextStudent]
TEXT_STUDENTS: Registry[TextBuilder] = Registry("text student")


@TEXT_STUDENTS.register("text_tiny")
def text_tiny(embed_dim: int, context_length: int = 77) -> TextStudent:
    """2 layers, width 64: test student."""
    return TextStudent(embed_dim, width=64, heads=2, layers=2, context_length=context_length)


@TEXT_STUDENTS.register("text_small")
def text_small(embed_dim: int, context_length: int = 77) -> TextStudent:
    """4 layers, width 256."""
    return TextStudent(embed_dim, width=256, heads=4, layers=4, context_length=context_length)


@TEXT_STUDENTS.register("text_base")
def text_base(embed_dim: int, context_length: int = 77) -> TextStudent:
    """12 layers, width 512: the size of CLIP ViT-B's text tower."""
    return TextStudent(embed_dim, width=512, heads=8, layers=12, context_length=context_length)


def build_text_student(name: str, embed_dim: int, **kwargs: Any) -> TextStudent:
    student = TEXT_STUDENTS.get(name)(embed_dim, **kwargs)
    student.spec = {"name": name, "kwargs": dict(kwargs)}
    return student


# --------------------------------------------------------------------------- save / load


def save_weights(run_dir: str | Path, image: ImageStudent, text: TextStudent | None, checkpoint: str) -> str:
    """Write RUN/student-<checkpoint>.safetensors ("image.*", "text.*" weights); returns its file name."""
    name = weights_file(checkpoint)
    tensors = {f"image.{k}": v for k, v in image.state_dict().items()}
    if text is not None:
        tensors.update({f"text.{k}": v for k, v in text.state_dict().items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(Path(run_dir) / name, lambda p: save_file(tensors, str(p)))
    return name


def write_spec(run_dir: str | Path, image: ImageStudent, text: TextStudent | None, meta: dict[str, Any],
               checkpoints: dict[str, dict[str, Any]]) -> None:
    """Write RUN/student.json: how to rebuild the students, ``meta`` merged in (it must be JSON-able),
    and ``checkpoints`` {"best": {"file", "step", ...}, "last": {...}}: which weights file holds each.

    Written after the weights, so a run directory with student.json has every file it names.
    """
    reserved = {"format", "image", "text", "embed_dim", "image_size", "mean", "std", "checkpoints"} & set(meta)
    if reserved:
        raise ValueError(f"meta may not set {sorted(reserved)}: write_spec writes them")
    if set(checkpoints) != set(CHECKPOINTS) or any("file" not in c for c in checkpoints.values()):
        raise ValueError(f"checkpoints must describe {list(CHECKPOINTS)}, each with its weights 'file'")
    spec = {
        **meta,
        "format": 1,
        "image": {"name": image.spec["name"], "kwargs": image.spec["kwargs"],
                  "init_checkpoint": image.spec.get("init_checkpoint"),
                  # informational (name + kwargs rebuild it): the backbone as a timm model
                  "timm": None if image.timm_name is None else {
                      "name": image.timm_name, "kwargs": image.timm_kwargs, "global_pool": image.global_pool},
                  # --labels: the class head's size (its class names are the cache's, in labels_used)
                  "class_head": None if image.head is None else {"classes": image.head.out_features}},
        "text": None if text is None else {"name": text.spec["name"], "kwargs": text.spec["kwargs"]},
        "embed_dim": image.embed_dim, "image_size": image.image_size,
        "mean": list(image.mean), "std": list(image.std),
        "checkpoints": checkpoints,
    }
    atomic_write(Path(run_dir) / SPEC_FILE, lambda p: p.write_text(json.dumps(spec, indent=2)))


def save_student(run_dir: str | Path, image: ImageStudent, text: TextStudent | None, meta: dict[str, Any]) -> None:
    """One set of weights (nothing chose a best): RUN/student-last.safetensors, best = last, and student.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = save_weights(run_dir, image, text, "last")
    write_spec(run_dir, image, text, meta, {"last": {"file": name},
                                            "best": {"file": name, "same_as": "last", "note": NO_BEST}})


def resolve_checkpoint(run_dir: str | Path, spec: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """Which weights ``checkpoint`` means in this run: {"name", "file", "step", ...} from student.json.

    A run saved before best and last were kept apart has one ``student.safetensors``: the last
    weights; it is used for either name, with a warning.
    """
    check_checkpoint(checkpoint)
    run_dir = Path(run_dir)
    entries = spec.get("checkpoints")
    if entries is None:
        log.warning("%s holds only %s (saved before best and last were kept apart): these are the last "
                    "weights%s", run_dir, LEGACY_WEIGHTS_FILE, ", used for 'best' too" if checkpoint == "best" else "")
        entry = {"file": LEGACY_WEIGHTS_FILE, "step": spec.get("step"), "epoch": spec.get("epoch")}
        if checkpoint == "best":
            entry.update(same_as="last", note=f"legacy run: only {LEGACY_WEIGHTS_FILE} (the last weights) was saved")
    else:
        entry = entries[checkpoint]
    if not (run_dir / entry["file"]).is_file():
        raise MissingInput(f"{run_dir / entry['file']} ({checkpoint} weights) not found; re-run `kdpipe train`")
    return {"name": checkpoint, **entry}


def load_student(run_dir: str | Path, device: str | torch.device = "cpu",
                 checkpoint: str = "best") -> tuple[ImageStudent, TextStudent | None, dict]:
    """Rebuild the students from RUN/student.json alone and load the ``checkpoint`` weights (strict).

    Returns (image, text or None, spec): spec is student.json plus "checkpoint", the entry of the
    weights loaded ({"name": "best", "file", "step", ...}, see ``resolve_checkpoint``).
    """
    run_dir = Path(run_dir)
    spec = dict(read_spec(run_dir).raw)
    spec["checkpoint"] = resolve_checkpoint(run_dir, spec, checkpoint)
    weights = load_file(str(run_dir / spec["checkpoint"]["file"]))
    image = build_student(spec["image"]["name"], spec["embed_dim"], spec["image_size"],
                          mean=tuple(spec["mean"]), std=tuple(spec["std"]), **spec["image"]["kwargs"])
    image.spec["init_checkpoint"] = spec["image"].get("init_checkpoint")  # provenance only, not reloaded
    if spec["image"].get("class_head"):
        image.add_class_head(int(spec["image"]["class_head"]["classes"]))
    try:
        image.load_state_dict(_with_prefix(weights, "image."))
    except RuntimeError as err:
        if "timm" in spec["image"]:
            raise
        # student.json without "image.timm": trained before the students became timm towers
        # (mobilenetv3*, efficientnet_b0 and tiny were torchvision / hand-written nets then)
        raise BadValue(f"{run_dir}: its {spec['image']['name']!r} weights are from an older kdpipe, whose "
                       f"students were torchvision models; this version builds timm towers, which name and "
                       f"shape their weights differently. Retrain the run with this version.") from err
    text = None
    if spec["text"] is not None:
        text = build_text_student(spec["text"]["name"], spec["embed_dim"], **spec["text"]["kwargs"])
        text.load_state_dict(_with_prefix(weights, "text."))
        text = text.to(device).eval()
    return image.to(device).eval(), text, spec


def _with_prefix(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- precise BN


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable[torch.Tensor], max_samples: int = 512) -> int:
    """Re-estimate every BatchNorm's running stats over up to ``max_samples`` inputs.

    Why: running stats are an exponential average (momentum 0.1 in timm's CNNs, 0.01 in
    torchvision's MobileNetV3) over weights that moved; on a short schedule they lag the
    weights and eval-mode outputs drift or collapse. Stats are reset and
    accumulated as a cumulative average (momentum=None) with only the BN layers in train
    mode (dropout / stochastic depth stay off); modes and momenta are restored afterwards.
    Returns the number of samples used (0 when the model has no BatchNorm).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for bn in bns]
    saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in bns]
    device = next(model.parameters()).device
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    seen = 0
    try:
        for x in batches:
            x = x[: max_samples - seen].to(device)
            model(x)
            seen += x.shape[0]
            if seen >= max_samples:
                break
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    if seen == 0:  # keep the old statistics rather than the blank reset ones
        for bn, state in zip(bns, saved):
            bn.load_state_dict(state)
        raise ValueError("precise_bn got no batches")
    log.debug("precise_bn: re-estimated %d BatchNorm layers on %d samples", len(bns), seen)
    return seen
