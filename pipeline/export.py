"""The export stage: a trained run as files that need no kdpipe (open_clip, timm, ONNX) and a model card.

``kdpipe export RUN --out DIR [--format open_clip|timm|onnx|all] [--checkpoint best|last]`` writes

- ``DIR/open_clip_config.json`` + ``DIR/open_clip_model.safetensors``: a complete CLIP for
  ``open_clip.create_model_and_transforms("local-dir:DIR")`` and ``open_clip.get_tokenizer("local-dir:DIR")``.
  The image tower is the student as an open_clip timm tower (``vision_cfg.timm_model_name``,
  ``timm_proj: ""``: the timm classifier built with ``num_classes = D`` *is* the student's
  projection, keys ``visual.trunk.*``); the text tower is the teacher's own (its weights
  resolved from the run's teacher fingerprint, as ``kdpipe extract`` loaded them) or the
  run's text student; the logit scale is the teacher's (recorded in the cache manifest's
  teacher fingerprint, which the run copies); the preprocessing is the one the student was
  evaluated with (its size, mean and std, the teacher's interpolation and resize mode).
- ``DIR/timm/``: ``config.json`` + ``model.safetensors`` (timm's own ``save_for_hf``), loadable
  with ``timm.create_model("local-dir:DIR/timm", pretrained=True)``: ``num_classes`` = D, the classifier is the
  projection, ``pretrained_cfg`` holds the input size, mean, std and interpolation.
- ``DIR/image_encoder.onnx`` (input ``image`` [batch, 3, S, S] float32, normalised; output
  ``image_embeds`` [batch, D]) and, with a text student, ``DIR/text_encoder.onnx`` (input
  ``text`` [batch, 77] int64 token ids; output ``text_embeds`` [batch, D]); each checked
  against ONNX Runtime (max abs difference <= ``ONNX_TOLERANCE``). Needs ``kdpipe[onnx]``.
- ``DIR/README.md``: the model card.

Every output is the student's raw (un-normalised) embedding, as open_clip's
``encode_image(normalize=False)``. Whitened runs: the student learnt whitened directions and
its outputs return to the teacher's space by t = normalise(r · normalise(s) W⁻¹ᵀ + μ); the inner
normalisation makes that map non-linear, so it cannot be folded into the projection of an
open_clip or timm model and those formats are refused. The ONNX graph includes the exact map
(its outputs are then unit rows in the teacher's space).

Students must be timm models (the architecture is read from the model's ``pretrained_cfg``);
others are refused with the list of formats that would need them.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
from safetensors.torch import save_file
from timm.models import save_for_hf
from timm.models._input import get_model_args
from torch import Tensor, nn

from .atomic import atomic_write
from .errors import BadValue
from .measure import check_onnx, export_onnx
from .rundir import BENCH_JSON, EVAL_JSON, RunSpec, check_checkpoint, describe_checkpoint, read_config, read_json
from .store import describe_teacher, open_cache, same_fingerprint
from .students import ImageStudent, TextStudent, load_student
from .targetspace import Space, student_space, whitening_mode
from .teachers import Teacher, load_teacher

log = logging.getLogger("kdpipe")

FORMATS = ("open_clip", "timm", "onnx")
OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"
TIMM_DIR = "timm"
ONNX_IMAGE, ONNX_TEXT = "image_encoder.onnx", "text_encoder.onnx"
CARD = "README.md"
ONNX_NAMES = {"image": ("image", "image_embeds"), "text": ("text", "text_embeds")}
ONNX_TOLERANCE = 1e-4  # of the largest PyTorch output (float32 round-off at the output's scale)
# kdpipe's eval crop (resize_mode, as open_clip names it) -> timm's crop_mode, both at crop_pct 1
TIMM_CROP_MODE = {"shortest": "center", "squash": "squash", "longest": "border"}
# timm arguments that the export sets itself (the classifier is the projection)
OWN_ARGS = ("num_classes", "global_pool")


@dataclass
class ExportConfig:
    run: str | Path | None = None  # RUN directory written by `kdpipe train`
    out: str | Path | None = None  # DIR to write
    format: str = "all"  # open_clip | timm | onnx | all
    checkpoint: str = "best"  # best (validation) | last (final step)
    pretrained: str | None = None  # the teacher's weights file, when the fingerprint names a local file
    teacher_config: str | None = None  # the teacher's open_clip model-config JSON (custom architectures)
    license: str = "other"  # the model card's license (the teacher's weights' license applies too)


class ExportError(BadValue):
    """A run that cannot be written in the asked format; the message says why and what would work."""


# --------------------------------------------------------------------------- the student as a timm model


def timm_architecture(backbone: nn.Module, student_name: str | None) -> str:
    """The timm name of a student backbone (``pretrained_cfg["architecture"]``), else ExportError."""
    cfg = getattr(backbone, "pretrained_cfg", None) or getattr(backbone, "default_cfg", None) or {}
    if not cfg.get("architecture") or not hasattr(backbone, "reset_classifier"):
        raise ExportError(f"student {student_name!r} ({type(backbone).__name__}) is not a timm model: open_clip "
                          "and timm exports need a timm student (every registered student is one, and "
                          "timm:NAME); `--format onnx` exports any student")
    return str(cfg["architecture"])


def timm_tower(image: ImageStudent) -> nn.Module:
    """A copy of the backbone whose classifier (num_classes = D) holds the projection: x [B, 3, S, S] -> [B, D].

    timm's classifier and kdpipe's ``proj`` are both ``nn.Linear(dim, D)`` with a bias after the
    pooled features, so the copy computes exactly ``image(x)``.
    """
    timm_architecture(image.backbone, image.spec.get("name"))
    tower = copy.deepcopy(image.backbone).cpu().eval()
    tower.reset_classifier(image.embed_dim)
    head = tower.get_classifier()
    if not isinstance(head, nn.Linear) or head.weight.shape != image.proj.weight.shape:
        raise ExportError(f"{type(tower).__name__}'s classifier is {head}, not a Linear{tuple(image.proj.weight.shape)}:"
                          " the projection has nowhere to go")
    with torch.no_grad():
        head.weight.copy_(image.proj.weight)
        head.bias.copy_(image.proj.bias)
    return tower


def global_pool(tower: nn.Module) -> str:
    """The tower's timm pooling ("avg", "token", ...), as ``timm.create_model(global_pool=...)`` takes it."""
    return str(get_model_args(tower).get("global_pool", "avg"))


def extra_timm_args(tower: nn.Module) -> dict[str, Any]:
    """Arguments the tower was built with that ``timm.create_model(name, num_classes, global_pool)`` lacks.

    open_clip's TimmModel builds its trunk from those three alone, so a student built with more
    (a ViT's img_size / patch_size) cannot be written as an open_clip timm tower. Compared with a
    reference built on the meta device (no memory, no weights).
    """
    name = tower.pretrained_cfg["architecture"]
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False, num_classes=tower.num_classes,
                                      global_pool=global_pool(tower))
    ours, theirs = get_model_args(tower), get_model_args(reference)
    return {k: v for k, v in ours.items() if k not in OWN_ARGS and theirs.get(k) != v}


# --------------------------------------------------------------------------- what the run is


@dataclass
class Run:
    """A loaded run: the students, the run's spec and where its outputs live."""

    path: Path
    image: ImageStudent
    text: TextStudent | None
    spec: RunSpec
    checkpoint: dict[str, Any]  # the weights loaded: {"name", "file", "step", ...}

    @property
    def teacher(self) -> dict[str, Any]:
        if self.spec.teacher is None:
            raise ExportError(f"{self.path} records no teacher fingerprint; was it written by `kdpipe train`?")
        return self.spec.teacher


def open_run(path: Path, checkpoint: str) -> Run:
    image, text, raw = load_student(path, "cpu", checkpoint=checkpoint)
    return Run(path, image, text, RunSpec.from_json(raw), raw["checkpoint"])


def refuse_whitened(run: Run, fmt: str) -> None:
    """open_clip and timm cannot hold the non-linear map back of a whitened run (see the module docstring)."""
    mode = whitening_mode(run.spec)
    if mode is not None and fmt in ("open_clip", "timm"):
        raise ExportError(
            f"{run.path} was trained on whitened targets ({mode}): its outputs reach the teacher's space only "
            "through t = normalise(r * normalise(s) @ W_inv.T + mu), which is not linear (the inner normalise) "
            f"and cannot be folded into a {fmt} model; `--format onnx` includes that map exactly")


def preprocess(run: Run) -> dict[str, Any]:
    """How images must be prepared for the student: open_clip's preprocess_cfg keys.

    The student's input size, mean and std; the interpolation it was evaluated with (the
    teacher's unless the run recorded its own); the teacher's resize mode.
    """
    teacher = run.teacher.get("preprocess", {})
    out = {"size": int(run.spec.image_size), "mode": "RGB", "mean": list(run.spec.mean), "std": list(run.spec.std),
           "interpolation": run.spec.interpolation or teacher.get("interpolation", "bicubic"),
           "resize_mode": teacher.get("resize_mode", "shortest")}
    if out["resize_mode"] == "longest":
        out["fill_color"] = int(teacher.get("fill_color", 0))
    return out


# --------------------------------------------------------------------------- the teacher's text tower


def teacher_for_text(fp: dict[str, Any], pretrained: str | None, teacher_config: str | None) -> Teacher:
    """Rebuild the run's teacher with the weights its fingerprint names (for the text tower).

    A tag goes through open_clip's local cache (``kdpipe.weights``); a local weights file must be
    passed again (``pretrained``) and is checked against the fingerprint's sha256; a teacher built
    from a model-config JSON needs that JSON (``teacher_config``).
    """
    weights = pretrained or fp.get("pretrained")
    if weights is None and fp.get("checkpoint_sha256"):
        raise ExportError(f"teacher {describe_teacher(fp)} was loaded from a local weights file; pass that file "
                          "again: kdpipe export RUN --pretrained FILE")
    try:
        teacher = load_teacher(teacher_config or fp["name"], weights, allow_random_init=weights is None)
    except KeyError:
        raise ExportError(f"teacher {fp['name']!r} was built from an open_clip model-config JSON; pass it: "
                          "--teacher-config FILE (e.g. the TEACHER/config.json of `kdpipe pretrain-teacher`)") from None
    except RuntimeError as err:  # a tag neither cached nor downloadable
        raise ExportError(f"teacher {fp['name']} weights {fp.get('pretrained')!r}: {err}; or pass the weights "
                          "file: kdpipe export RUN --pretrained FILE") from None
    if not same_fingerprint(teacher.fingerprint, fp):
        raise ExportError(f"the teacher rebuilt for the text tower, {describe_teacher(teacher.fingerprint)}, is not "
                          f"the run's {describe_teacher(fp)}; check --pretrained / --teacher-config")
    return teacher


def teacher_model_cfg(teacher: Teacher) -> dict[str, Any]:
    """The teacher's open_clip model config (its text_cfg and every model-level flag, quick_gelu included)."""
    cfg = copy.deepcopy(open_clip.get_model_config(teacher.fingerprint["name"]) or {})
    if "multimodal_cfg" in cfg:
        raise ExportError(f"teacher {teacher.fingerprint['name']} is a CoCa model: its text decoder is not exported")
    cfg["quick_gelu"] = bool(teacher.fingerprint.get("quickgelu", cfg.get("quick_gelu", False)))
    return cfg


def text_student_cfg(text: TextStudent) -> dict[str, Any]:
    """open_clip's text_cfg of a ``TextStudent`` (a plain causal TextTransformer with the CLIP tokenizer)."""
    tower = text.tower
    block = tower.transformer.resblocks[0]
    return {"context_length": text.context_length, "vocab_size": tower.vocab_size, "width": tower.width,
            "heads": tower.heads, "layers": tower.transformer.layers,
            "mlp_ratio": block.mlp.c_fc.out_features / tower.width}


# --------------------------------------------------------------------------- open_clip


def open_clip_parts(run: Run, tower: nn.Module, teacher: Teacher | None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(open_clip_config.json, state dict) of the exported CLIP."""
    vision_cfg = {"timm_model_name": tower.pretrained_cfg["architecture"], "timm_model_pretrained": False,
                  "timm_pool": global_pool(tower), "timm_proj": "", "image_size": int(run.image.image_size)}
    state = {f"visual.trunk.{k}": v for k, v in tower.state_dict().items()}
    if run.text is not None:
        model_cfg = {"embed_dim": run.image.embed_dim, "quick_gelu": False, "text_cfg": text_student_cfg(run.text)}
        state.update(run.text.tower.state_dict())
    else:
        model_cfg = teacher_model_cfg(teacher)
        state.update({k: v for k, v in teacher.model.state_dict().items() if not k.startswith("visual.")})
    model_cfg["vision_cfg"] = vision_cfg
    state["logit_scale"] = torch.tensor(math.log(float(run.teacher["logit_scale"])))
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess(run)}, state


def write_open_clip(run: Run, out: Path, teacher: Teacher | None) -> list[Path]:
    tower = timm_tower(run.image)
    extra = extra_timm_args(tower)
    if extra:
        raise ExportError(f"student {run.spec.image_name!r} was built with timm arguments {extra}; open_clip "
                          "builds a timm tower from its name alone, so it cannot rebuild this one; use "
                          "`--format timm` or `--format onnx`")
    config, state = open_clip_parts(run, tower, teacher)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(out / OPEN_CLIP_WEIGHTS, lambda p: save_file(state, str(p)))
    atomic_write(out / OPEN_CLIP_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2)))
    if "hf_tokenizer_name" in config["model_cfg"].get("text_cfg", {}):
        open_clip.get_tokenizer(teacher.fingerprint["name"]).save_pretrained(str(out))  # local-dir reads it from DIR
    return [out / OPEN_CLIP_CONFIG, out / OPEN_CLIP_WEIGHTS]


# --------------------------------------------------------------------------- timm


def timm_data_config(run: Run) -> dict[str, Any]:
    """timm's data config for kdpipe's eval crop (resize + crop at crop_pct 1)."""
    pp = preprocess(run)
    return {"input_size": (3, pp["size"], pp["size"]), "mean": tuple(pp["mean"]), "std": tuple(pp["std"]),
            "interpolation": pp["interpolation"], "crop_pct": 1.0, "crop_mode": TIMM_CROP_MODE[pp["resize_mode"]]}


def write_timm(run: Run, out: Path) -> list[Path]:
    folder = out / TIMM_DIR
    save_for_hf(timm_tower(run.image), str(folder), safe_serialization=True, data_config=timm_data_config(run))
    return [folder / "config.json", folder / "model.safetensors"]


# --------------------------------------------------------------------------- ONNX


class MappedBack(nn.Module):
    """A whitened student followed by its exact map back: x -> unit rows [B, D] in the teacher's space."""

    def __init__(self, student: nn.Module, back: Any) -> None:
        super().__init__()
        self.student, self.back = student, back

    def forward(self, x: Tensor) -> Tensor:
        return self.back(self.student(x))


def onnx_towers(run: Run, space: Space) -> dict[str, tuple[nn.Module, Tensor]]:
    """{"image": (module, example), "text": ...}: what goes into ONNX, with the map back where whitened."""
    size = run.image.image_size
    image = run.image if space.image is None else MappedBack(run.image, space.image)
    towers = {"image": (image, torch.randn(2, 3, size, size))}
    if run.text is not None:
        # the tower's own forward (full length): TextStudent.forward trims per batch, which a trace would freeze
        text = run.text.tower if space.text is None else MappedBack(run.text.tower, space.text)
        towers["text"] = (text, run.text.tokenize(["a photo of a cat.", "a red circle on a white background"]))
    return towers


def run_space(run: Run) -> Space:
    """The run's back-maps: from its own whitening file, else rebuilt from its cache."""
    if whitening_mode(run.spec) is None:
        return Space()
    own = run.spec.whitening_file and (run.path / run.spec.whitening_file).is_file()
    cache = None if own else open_cache(run.spec.cache, expect_teacher=run.teacher)
    return student_space(run.path, run.spec, cache, text_tower=run.text is not None)


def write_onnx(run: Run, out: Path, space: Space) -> list[Path]:
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        raise ExportError("ONNX export needs the onnx and onnxruntime packages: pip install 'kdpipe[onnx]'")
    written = []
    for kind, (module, example) in onnx_towers(run, space).items():
        path = out / (ONNX_IMAGE if kind == "image" else ONNX_TEXT)
        export_onnx(module.eval(), example, path, names=ONNX_NAMES[kind])
        diff = check_onnx(path, module, example, relative=True)
        if not diff <= ONNX_TOLERANCE:
            raise ExportError(f"{path}: ONNX Runtime differs from PyTorch by {diff:.2e} of the largest output "
                              f"(> {ONNX_TOLERANCE})")
        log.info("%s: ONNX Runtime matches PyTorch (max abs diff %.1e)", path, diff)
        written.append(path)
    return written


# --------------------------------------------------------------------------- model card


def _eval_lines(report: dict[str, Any] | None) -> list[str]:
    if not report:
        return ["Not measured (run `kdpipe eval RUN`, then export again)."]
    lines = [f"On `{report.get('dataset', {}).get('cache')}` [{report.get('split')}], "
             f"{describe_checkpoint(report.get('checkpoint')) or '?'} weights; space: {report.get('space')}.", "",
             "| metric | student | teacher |", "|---|---|---|"]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines += [f"| {name} | {fmt(row.get('student'))} | {fmt(row.get('teacher'))} |"
              for name, row in report.get("metrics", {}).items()]
    return lines


def _bench_lines(bench: dict[str, Any] | None) -> list[str]:
    if not bench:
        return ["Not measured (run `kdpipe bench RUN`, then export again)."]
    s, t = bench.get("student", {}).get("image", {}), bench.get("teacher", {}).get("image", {})
    lines = [f"Image tower on {bench.get('device')} ({bench.get('threads')} threads), batch 1:", "",
             "| | student | teacher |", "|---|---|---|"]
    for key, label in (("params", "parameters"), ("flops_per_sample", "FLOPs / image"),
                       ("latency_b1_p50_ms", "latency p50 (ms)")):
        lines.append(f"| {label} | {s.get(key, '–')} | {t.get(key, '–')} |")
    return lines


def model_card(run: Run, cfg: ExportConfig, formats: list[str]) -> str:
    """DIR/README.md: front matter, teacher and fingerprint, data, recipe, figures, limitations, usage."""
    fp, spec, train = run.teacher, run.spec, read_config(run.path) or {}
    text = spec.text_name or f"the teacher's own ({describe_teacher(fp)})"
    usage = (["```python", "import open_clip",
              "model, _, preprocess = open_clip.create_model_and_transforms('local-dir:DIR')",
              "tokenizer = open_clip.get_tokenizer('local-dir:DIR')", "```"] if "open_clip" in formats else
             ["```python", "import timm", "model = timm.create_model('local-dir:DIR/timm', pretrained=True)", "```"]
             if "timm" in formats else ["```python", "import onnxruntime",
                                        f"session = onnxruntime.InferenceSession('DIR/{ONNX_IMAGE}')", "```"])
    return "\n".join([
        "---", "library_name: open_clip", f"license: {cfg.license}",
        "tags: [clip, zero-shot-image-classification, knowledge-distillation, kdpipe, timm]", "---", "",
        f"# {spec.image_name} distilled from {describe_teacher(fp)}", "",
        f"Image tower: `{spec.image_name}`, {run.image.image_size} px, {run.image.embed_dim}-dim embeddings. "
        f"Text tower: {text}. Weights: {describe_checkpoint(run.checkpoint) or run.checkpoint.get('name')}.", "",
        "## Teacher", "", f"{describe_teacher(fp)}; fingerprint:", "", "```json", json.dumps(fp, indent=2), "```", "",
        "## Data", "", f"Teacher embeddings cached in `{spec.cache}` (`kdpipe extract`).", "",
        "## Recipe", "", f"Losses: `{spec.loss_weights}`; whitening: {spec.whitening or 'none'}; "
        f"epochs: {train.get('epochs', '?')}, batch size: {train.get('batch_size', '?')}, lr: {train.get('lr', '?')} "
        "(the run's config.toml holds the rest).", "",
        "## Evaluation", "", *_eval_lines(read_json(run.path / EVAL_JSON)), "",
        "## Size and speed", "", *_bench_lines(read_json(run.path / BENCH_JSON)), "",
        "## Limitations", "",
        "The student imitates its teacher on the distillation data only: expect lower accuracy than the teacher, "
        "most of all away from that data; it inherits the teacher's biases. Embeddings are un-normalised "
        "(normalise before comparing). The teacher's weights keep their own license.", "",
        "## Usage", "", *usage, "",
    ])


# --------------------------------------------------------------------------- run


def formats_of(fmt: str) -> list[str]:
    """"all", one format or a comma-separated list ("open_clip,timm") -> formats in FORMATS order."""
    if fmt == "all":
        return list(FORMATS)
    asked = [f.strip() for f in fmt.split(",") if f.strip()]
    unknown = [f for f in asked if f not in FORMATS]
    if unknown or not asked:
        raise BadValue(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}, all, or a comma-separated list")
    return [f for f in FORMATS if f in asked]


def _check(cfg: ExportConfig) -> list[str]:
    if cfg.run is None or cfg.out is None:
        raise BadValue("export needs a RUN directory and --out DIR")
    check_checkpoint(cfg.checkpoint)
    return formats_of(cfg.format)


def run(cfg: ExportConfig) -> dict[str, Any]:
    """Write every asked format and the model card to ``cfg.out``; returns {"files": [...], "formats": [...]}."""
    formats = _check(cfg)
    r = open_run(Path(cfg.run), cfg.checkpoint)
    for fmt in formats:
        refuse_whitened(r, fmt)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    if "open_clip" in formats:
        teacher = None if r.text is not None else teacher_for_text(r.teacher, cfg.pretrained, cfg.teacher_config)
        files += write_open_clip(r, out, teacher)
    if "timm" in formats:
        files += write_timm(r, out)
    if "onnx" in formats:
        files += write_onnx(r, out, run_space(r))
    atomic_write(out / CARD, lambda p: p.write_text(model_card(r, cfg, formats)))
    files.append(out / CARD)
    for path in files:
        log.info("wrote %s", path)
    return {"files": [str(p) for p in files], "formats": formats, "config": asdict(cfg)}
