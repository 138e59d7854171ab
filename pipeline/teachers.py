"""Teachers: open_clip CLIP models behind one small interface, plus where their weights come from.

A teacher is named three ways (resolved in this order):

- a shipped config in ``kdpipe/model_configs/`` (``TEACHERS``: ``tiny-clip`` for tests,
  ``shapes-vit`` for the shapes world), random init allowed;
- a path to an open_clip model-config JSON (a custom architecture, e.g. ``RUN/config.json``
  written when pretraining on the shapes world), either the bare model config
  (``embed_dim``, ``vision_cfg``, ``text_cfg``) or open_clip's ``{"model_cfg", "preprocess_cfg"}``;
- any open_clip architecture name (``open_clip.list_models()``).

Weights (``pretrained``): ``None`` (random init), an open_clip pretrained tag, or a local
``.pt/.pth/.bin/.safetensors`` file (its sha256 goes into the fingerprint). Tags whose
weights were trained with QuickGELU (``openai``, ViT-B-32 ``laion400m_*``, ...) resolve to the
``-quickgelu`` architecture, from open_clip's own pretrained metadata.

Text trimming: CLIP's text tower is causal and pools at one token (EOT/argmax), so positions
after the pooled token cannot change the output. ``encode_texts`` cuts the batch to
``max(pool index) + 1`` tokens, which gives the same embeddings several times faster on
captions much shorter than the context. open_clip's ``encode_text`` adds the full
positional embedding and the full mask (no slicing), so the trimmed forward calls the tower's
pieces itself; it is used only when the tower is verified causal with a safe pooling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.model import CLIP, get_model_preprocess_cfg
from open_clip.transform import merge_preprocess_dict
from open_clip.transformer import TextTransformer, text_global_pool
from torch import Tensor

from .data.views import RESIZE_MODES
from .registry import Registry
from .runtime import autocast, resolve_device, resolve_precision

log = logging.getLogger("kdpipe")

CONFIG_DIR = Path(__file__).parent / "model_configs"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# Pooling at a fixed token is unchanged by cutting tokens after it (with a causal mask).
TRIM_SAFE_POOLS = ("argmax", "eos", "first")
PASS_A_FILE = "--pretrained /path/to/open_clip_pytorch_model.bin"

# Shipped architectures: name -> model-config JSON. Dropping a JSON into model_configs/ adds one.
TEACHERS: Registry[Path] = Registry("teacher")
for _path in sorted(CONFIG_DIR.glob("*.json")):
    TEACHERS.register(_path.stem)(_path)


@dataclass(frozen=True)
class Preprocess:
    """How images must be prepared for the teacher (open_clip's PreprocessCfg, the parts that matter)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    resize_mode: str  # open_clip's eval resize: "shortest" | "squash" | "longest" (views.RESIZE_MODES)
    fill_color: int = 0  # pad colour of "longest"

    def to_dict(self) -> dict[str, Any]:
        d = {"size": self.size, "mean": list(self.mean), "std": list(self.std),
             "interpolation": self.interpolation, "resize_mode": self.resize_mode}
        # The fill colour changes pixels only under "longest"; elsewhere the fingerprint stays as it was.
        return {**d, "fill_color": self.fill_color} if self.resize_mode == "longest" else d


@dataclass(frozen=True)
class TeacherArch:
    """A resolved architecture: the name open_clip builds it by, and where it came from."""

    name: str                 # as the user gave it (a shipped name, a JSON path or an open_clip name)
    open_clip_name: str       # name registered in open_clip's model-config registry
    kind: str                 # "shipped" | "config" | "open_clip"
    config_preprocess: dict[str, Any] = field(default_factory=dict)  # from an open_clip_config.json


# --------------------------------------------------------------------------------------------
# Architecture resolution


_registered_shipped = False


def _register_shipped() -> None:
    """Make open_clip's factory know the shipped configs (its public add_model_config)."""
    global _registered_shipped
    if not _registered_shipped:
        open_clip.add_model_config(CONFIG_DIR)
        _registered_shipped = True


def _read_config_json(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A model-config JSON -> (model_cfg, preprocess_cfg). Accepts open_clip_config.json's wrapper."""
    data = json.loads(path.read_text())
    model_cfg = data.get("model_cfg", data)
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise ValueError(f"{path} is not an open_clip model config: missing {missing} "
                         "(see open_clip/model_configs/ViT-B-32.json for the format)")
    return model_cfg, data.get("preprocess_cfg", {}) if "model_cfg" in data else {}


def _register_config_file(path: Path) -> TeacherArch:
    """Register a model-config JSON under a content-derived name that cannot shadow a built-in.

    open_clip registers configs by file stem ("config" for RUN/config.json, which would clash
    between runs), so a copy is registered as ``kdpipe-<stem>-<sha>`` and then removed; open_clip
    keeps the parsed dict.
    """
    model_cfg, preprocess_cfg = _read_config_json(path)
    digest = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:12]
    reg_name = f"kdpipe-{path.stem}-{digest}"
    if reg_name not in open_clip.list_models():
        with tempfile.TemporaryDirectory(prefix="kdpipe-config-") as tmp:
            copy = Path(tmp) / f"{reg_name}.json"
            copy.write_text(json.dumps(model_cfg))
            open_clip.add_model_config(copy)
    # The content-derived name (not the path as typed) goes into the fingerprint, so a moved or
    # relatively-addressed run directory is still the same teacher.
    return TeacherArch(name=reg_name, open_clip_name=reg_name, kind="config", config_preprocess=preprocess_cfg)


def resolve_arch(name: str) -> TeacherArch:
    """Teacher name -> architecture. Unknown names raise KeyError listing the shipped ones."""
    if name in TEACHERS:
        _register_shipped()
        return TeacherArch(name=name, open_clip_name=name, kind="shipped")
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"teacher model config {name} not found")
        return _register_config_file(path)
    if name in open_clip.list_models():
        return TeacherArch(name=name, open_clip_name=name, kind="open_clip")
    raise KeyError(f"unknown teacher {name!r}; shipped: {', '.join(TEACHERS.names())}; "
                   "or any open_clip architecture (python -c 'import open_clip; print(open_clip.list_models())'), "
                   "or a path to an open_clip model-config .json")


def resolve_quickgelu(name: str, tag: str) -> tuple[str, bool]:
    """(open_clip name, tag) -> (architecture to build, force_quick_gelu).

    Weights trained with QuickGELU (open_clip marks their tags ``quick_gelu=True``: ``openai``,
    ViT-B-32 ``laion400m_*``, ...) silently lose accuracy in a GELU model. Prefer the shipped
    ``-quickgelu`` config; if none exists, force QuickGELU on the given one.
    """
    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(f"{name!r} has no pretrained tag {tag!r}; its tags: {tags or 'none'}; "
                         f"or pass a local weights file: {PASS_A_FILE}")
    model_qg = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
    if not tag_cfg.get("quick_gelu", False) or model_qg:
        return name, False
    variant = f"{name}-quickgelu"
    if variant in open_clip.list_models():
        log.info("pretrained %r was trained with QuickGELU: using %s", tag, variant)
        return variant, False
    return name, True


# --------------------------------------------------------------------------------------------
# Weights


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _hf_cache_dir(cache_dir: str | None) -> str:
    """The hub cache huggingface_hub would use, read from the environment now (its own
    constants are frozen at import time)."""
    if cache_dir:
        return cache_dir
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def _url_cache_dir(cache_dir: str | None) -> str:
    return cache_dir or os.path.expanduser("~/.cache/clip")  # open_clip's download_pretrained_from_url default


def _hf_filenames(tag_cfg: dict[str, Any]) -> tuple[str, list[str]]:
    """open_clip's hf_hub entry 'org/repo/[file]' -> (repo id, files to look for, safetensors first)."""
    repo, filename = os.path.split(tag_cfg["hf_hub"])
    filename = filename or HF_WEIGHTS_NAME
    names = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else []
    if filename.endswith((".bin", ".pth")) and filename != HF_WEIGHTS_NAME:
        names.append(filename[:-4] + ".safetensors")
    return repo, names + [filename]


def cached_checkpoint(tag_cfg: dict[str, Any], cache_dir: str | None = None) -> str | None:
    """The local file of a pretrained tag if it is already downloaded, else None. Never touches the network."""
    if tag_cfg.get("file"):
        return tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    if tag_cfg.get("hf_hub"):
        repo, names = _hf_filenames(tag_cfg)
        for filename in names:
            hit = try_to_load_from_cache(repo, filename, cache_dir=_hf_cache_dir(cache_dir))
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    if tag_cfg.get("url"):
        path = os.path.join(_url_cache_dir(cache_dir), os.path.basename(tag_cfg["url"]))
        if os.path.isfile(path):
            return path
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to url's host? Behind a proxy we cannot tell, so assume yes.

    Without this, huggingface_hub retries an unreachable host for ~25 s per file.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    parts = urllib.parse.urlparse(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _tag_source_url(tag_cfg: dict[str, Any]) -> str:
    if tag_cfg.get("hf_hub"):
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return tag_cfg.get("url", "")


def _unavailable(name: str, tag: str, cache_dir: str | None, why: str) -> RuntimeError:
    return RuntimeError(
        f"pretrained weights {name}:{tag} are not cached and cannot be downloaded ({why}); looked in "
        f"{_hf_cache_dir(cache_dir)} and {_url_cache_dir(cache_dir)}. Copy the weights file to this machine "
        f"and pass it instead: {PASS_A_FILE}")


def fetch_tag_checkpoint(name: str, tag: str, cache_dir: str | None = None) -> str:
    """Local file for (open_clip name, tag): the cached copy, else a download.

    Offline (HF_HUB_OFFLINE=1 or the host unreachable) with nothing cached fails at once with
    a message saying where it looked and how to pass a local file.
    """
    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    hit = cached_checkpoint(tag_cfg, cache_dir)
    if hit:
        return hit
    if _offline():
        raise _unavailable(name, tag, cache_dir, "HF_HUB_OFFLINE is set")
    source = _tag_source_url(tag_cfg)
    if source and not _reachable(source):
        raise _unavailable(name, tag, cache_dir, f"{urllib.parse.urlparse(source).hostname} is unreachable")
    log.info("downloading %s:%s", name, tag)
    try:
        return open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - any download failure means the same thing to the user
        raise _unavailable(name, tag, cache_dir, f"download failed: {err}") from err


def _check_checkpoint_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file {path} not found")
    if not path.endswith(CHECKPOINT_SUFFIXES):
        raise ValueError(f"pretrained weights file {path} must be one of {', '.join(CHECKPOINT_SUFFIXES)}")


def _looks_like_file(pretrained: str) -> bool:
    return pretrained.endswith(CHECKPOINT_SUFFIXES) or os.sep in pretrained or os.path.exists(pretrained)


# --------------------------------------------------------------------------------------------
# Text tower inspection (decides trimming from the model itself, never from its name)


@dataclass(frozen=True)
class _TextTower:
    """The pieces of an open_clip text transformer, wherever the model keeps them."""

    module: torch.nn.Module   # CLIP (text parts live on the model) or open_clip TextTransformer
    pool_type: str
    eos_id: int | None


def _text_tower(model: torch.nn.Module) -> _TextTower | None:
    """The native open_clip text transformer, or None (HF text towers, CoCa's cls token, pad masks)."""
    if isinstance(model, CLIP):
        return _TextTower(model, model.text_pool_type, getattr(model, "text_eos_id", None))
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer) and text.cls_emb is None and not text.use_pad_mask:
        return _TextTower(text, text.pool_type, text.eos_id)
    return None


def _is_causal_mask(mask: Tensor | None) -> bool:
    """True iff mask is the additive causal mask: 0 on and below the diagonal, -inf above."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    n = mask.shape[0]
    upper = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.isneginf(mask[upper]).all() and (mask[~upper] == 0).all())


def pool_index(tokens: Tensor, pool_type: str, eos_id: int | None) -> Tensor:
    """Position each caption's embedding is read from: tokens [C, L] -> LongTensor [C].

    Mirrors open_clip.transformer.text_global_pool for the trim-safe pool types.
    """
    if pool_type == "argmax":  # EOT has the highest id in CLIP's vocabulary
        return tokens.argmax(dim=-1)
    if pool_type == "eos":
        return (tokens == eos_id).int().argmax(dim=-1)
    if pool_type == "first":
        return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    raise ValueError(f"pool type {pool_type!r} cannot be trimmed")


# --------------------------------------------------------------------------------------------
# Teacher


@dataclass(eq=False)
class Teacher:
    """An open_clip model in eval mode with its tokenizer, preprocessing and fingerprint."""

    model: torch.nn.Module
    tokenizer: Any
    preprocess: Preprocess
    fingerprint: dict[str, Any]
    embed_dim: int
    logit_scale: float
    context_length: int
    is_causal_text: bool
    device: torch.device
    precision: str = "fp32"
    _tower: _TextTower | None = field(default=None, repr=False)

    @property
    def can_trim(self) -> bool:
        """Trimming is exact only for a causal tower pooled at a fixed token."""
        return self.is_causal_text and self._tower is not None and self._tower.pool_type in TRIM_SAFE_POOLS

    @torch.no_grad()
    def encode_images(self, x: Tensor) -> Tensor:
        """x [B, 3, S, S] (normalised with preprocess.mean/std) -> raw features [B, D] float32 on CPU."""
        x = x.to(self.device, dtype=torch.float32, non_blocking=True)
        with autocast(self.precision, self.device):
            feats = self.model.encode_image(x)
        return feats.float().cpu()

    def tokenize(self, captions: list[str]) -> Tensor:
        """captions -> LongTensor [C, context_length]. Empty captions are refused: the tokenizer
        would turn them into a valid-looking [SOT, EOT] input."""
        if any(not c.strip() for c in captions):
            raise ValueError("empty caption passed to the teacher; drop empty captions before encoding")
        return self.tokenizer(list(captions))

    def trim_tokens(self, tokens: Tensor) -> Tensor:
        """tokens [C, L] -> [C, L'] with L' = max pooled position + 1 (unchanged when trimming is unsafe)."""
        if not self.can_trim or tokens.shape[0] == 0:
            return tokens
        keep = int(pool_index(tokens, self._tower.pool_type, self._tower.eos_id).max()) + 1
        return tokens[:, :keep]

    @torch.no_grad()
    def encode_tokens(self, tokens: Tensor, trim: bool = True) -> Tensor:
        """tokens [C, L] -> raw features [C, D] float32 on CPU."""
        tokens = tokens.to(self.device)
        with autocast(self.precision, self.device):
            if trim and self.can_trim:
                feats = self._encode_trimmed(self.trim_tokens(tokens))
            else:
                feats = self.model.encode_text(tokens)
        return feats.float().cpu()

    def encode_texts(self, captions: list[str], trim: bool = True) -> Tensor:
        """captions -> raw (un-normalised) features [C, D] float32 on CPU."""
        return self.encode_tokens(self.tokenize(captions), trim=trim)

    def _encode_trimmed(self, tokens: Tensor) -> Tensor:
        """open_clip's text forward on L' <= context tokens: slice the positional embedding and
        the causal mask to L' (open_clip's encode_text adds both at full length)."""
        t = self._tower.module
        n = tokens.shape[1]
        cast_dtype = t.transformer.get_cast_dtype()
        x = t.token_embedding(tokens).to(cast_dtype)
        x = x + t.positional_embedding[:n].to(cast_dtype)
        mask = t.attn_mask[:n, :n] if t.attn_mask is not None else None
        x = t.transformer(x, attn_mask=mask)
        x = t.ln_final(x)
        x = text_global_pool(x, tokens, self._tower.pool_type, eos_token_id=self._tower.eos_id)
        proj = t.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


# --------------------------------------------------------------------------------------------
# Loading


def _preprocess_of(model: torch.nn.Module) -> Preprocess:
    """The preprocessing open_clip attached to the model (model.visual.preprocess_cfg)."""
    cfg = get_model_preprocess_cfg(model)
    size = cfg["size"]
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"non-square teacher input {tuple(size)} is not supported")
        size = size[0]
    resize_mode = str(cfg.get("resize_mode", "shortest"))  # open_clip's default when a cfg has none
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"teacher resize_mode {resize_mode!r} is not one of open_clip's {', '.join(RESIZE_MODES)}")
    return Preprocess(size=int(size), mean=tuple(float(m) for m in cfg["mean"]),
                      std=tuple(float(s) for s in cfg["std"]), interpolation=str(cfg["interpolation"]),
                      resize_mode=resize_mode, fill_color=int(cfg.get("fill_color", 0)))


def make_fingerprint(
    name: str, tag: str | None, sha256: str | None, quickgelu: bool, preprocess: Preprocess,
    preprocess_source: str, embed_dim: int, logit_scale: float, context_length: int,
) -> dict[str, Any]:
    """The teacher's identity as recorded in a cache manifest (docs/ARCHITECTURE.md)."""
    return {
        "name": name, "pretrained": tag, "checkpoint_sha256": sha256,
        "open_clip_version": open_clip.__version__, "quickgelu": quickgelu,
        "preprocess": preprocess.to_dict(), "preprocess_source": preprocess_source,
        "embed_dim": embed_dim, "logit_scale": logit_scale, "context_length": context_length,
    }


def same_teacher(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two fingerprints describe the same teacher (the open_clip version changes no numbers)."""
    strip = lambda d: {k: v for k, v in d.items() if k != "open_clip_version"}  # noqa: E731
    return json.loads(json.dumps(strip(a))) == json.loads(json.dumps(strip(b)))


@dataclass(frozen=True)
class _Weights:
    """Where weights come from, resolved before building the model."""

    arch_name: str                 # open_clip name to build (may be the -quickgelu variant)
    fingerprint_name: str
    force_quick_gelu: bool
    checkpoint: str | None         # local file, or None for random init
    tag: str | None
    sha256: str | None
    preprocess: dict[str, Any]     # overrides on top of the architecture's defaults
    preprocess_source: str         # "pretrained-tag" | "config" | "architecture-default"


def _resolve_weights(arch: TeacherArch, pretrained: str | None, allow_random_init: bool,
                     cache_dir: str | None) -> _Weights:
    if pretrained is None:
        return _random_weights(arch, allow_random_init)
    if _looks_like_file(pretrained):
        return _file_weights(arch, pretrained)
    return _tag_weights(arch, pretrained, cache_dir)


def _default_preprocess_source(arch: TeacherArch) -> str:
    return "config" if arch.config_preprocess else "architecture-default"


def _random_weights(arch: TeacherArch, allow_random_init: bool) -> _Weights:
    if arch.kind != "shipped":
        if not allow_random_init:
            raise ValueError(f"teacher {arch.name!r} without --pretrained would have random weights; pass an "
                             f"open_clip tag or a local file ({PASS_A_FILE}), or allow_random_init for tests")
        log.warning("TEACHER %s HAS RANDOM WEIGHTS (no --pretrained): its embeddings mean nothing", arch.name)
    return _Weights(arch.open_clip_name, arch.name, False, None, None, None, arch.config_preprocess,
                    _default_preprocess_source(arch))


def _file_weights(arch: TeacherArch, path: str) -> _Weights:
    """A local weights file: preprocessing stays the architecture's (a bare file carries none)."""
    _check_checkpoint_file(path)
    if arch.kind == "open_clip":
        log.info("weights from %s: %s uses its architecture's default preprocessing, not a tag's; "
                 "for openai/laion400m weights name the -quickgelu model", path, arch.name)
    return _Weights(arch.open_clip_name, arch.name, False, path, None, file_sha256(path),
                    arch.config_preprocess, _default_preprocess_source(arch))


def _tag_weights(arch: TeacherArch, tag: str, cache_dir: str | None) -> _Weights:
    """An open_clip pretrained tag: the tag's preprocessing and QuickGELU setting apply."""
    if arch.kind == "config":
        raise ValueError(f"teacher {arch.name!r} has no pretrained tags; --pretrained must be a local weights "
                         f"file ({', '.join(CHECKPOINT_SUFFIXES)}), got {tag!r}")
    name, force_qg = resolve_quickgelu(arch.open_clip_name, tag)
    path = fetch_tag_checkpoint(name, tag, cache_dir)
    return _Weights(name, name, force_qg, path, tag, None, open_clip.get_pretrained_cfg(name, tag), "pretrained-tag")


def load_teacher(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    *,
    allow_random_init: bool = False,
    cache_dir: str | None = None,
) -> Teacher:
    """Build a teacher: shipped name, model-config JSON path or open_clip name + weights.

    pretrained: None (random init; shipped configs only unless allow_random_init), an open_clip
    tag (e.g. "laion2b_s34b_b79k"), or a local .pt/.pth/.bin/.safetensors file.
    precision: fp32 | bf16 | fp16 | auto; weights stay fp32 and encoding runs under autocast.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    precision = resolve_precision(precision, device)
    arch = resolve_arch(name)
    w = _resolve_weights(arch, pretrained, allow_random_init, cache_dir)
    # Random init is seeded, so a weightless teacher (tiny-clip in tests) is the same teacher
    # every time it is loaded: re-runs resume and recomputed embeddings match the cache.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(
            w.arch_name, pretrained=w.checkpoint, precision="fp32", device=device,
            force_quick_gelu=w.force_quick_gelu, force_preprocess_cfg=merge_preprocess_dict({}, w.preprocess),
            weights_only=True, cache_dir=cache_dir)
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(w.arch_name)
    return _make_teacher(model, tokenizer, w, device, precision)


def _make_teacher(model: torch.nn.Module, tokenizer: Any, w: _Weights, device: torch.device,
                  precision: str) -> Teacher:
    cfg = open_clip.get_model_config(w.arch_name) or {}
    preprocess = _preprocess_of(model)
    tower = _text_tower(model)
    causal = tower is not None and _is_causal_mask(getattr(tower.module, "attn_mask", None))
    logit_scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
    embed_dim, context_length = int(cfg["embed_dim"]), int(model.context_length)
    quickgelu = bool(cfg.get("quick_gelu", False)) or w.force_quick_gelu
    fingerprint = make_fingerprint(w.fingerprint_name, w.tag, w.sha256, quickgelu, preprocess,
                                   w.preprocess_source, embed_dim, logit_scale, context_length)
    teacher = Teacher(model=model, tokenizer=tokenizer, preprocess=preprocess, fingerprint=fingerprint,
                      embed_dim=embed_dim, logit_scale=logit_scale, context_length=context_length,
                      is_causal_text=causal, device=device, precision=precision, _tower=tower)
    log.info("teacher %s: dim %d, input %d px (%s preprocessing), text tokens %s", w.fingerprint_name, embed_dim,
             preprocess.size, w.preprocess_source, "trimmed per batch" if teacher.can_trim else "not trimmed")
    return teacher
