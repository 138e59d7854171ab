"""Teachers: open_clip CLIP models behind one small interface (encode, tokenize, preprocessing).

What a teacher is built from (architecture, weights, fingerprint) is resolved by
``kdpipe.weights``; ``load_teacher`` builds the model from that and wraps it in ``Teacher``.

Text trimming: CLIP's text tower is causal and pools at one token (EOT/argmax), so positions
after the pooled token cannot change the output. ``encode_text`` (and ``Teacher.encode_texts``)
cut the batch to ``max(pool index) + 1`` tokens, which gives the same embeddings several times
faster on captions much shorter than the context. open_clip's ``encode_text`` adds the full
positional embedding and the full mask (no slicing), so the trimmed forward calls the tower's
pieces itself; it is used only when the tower is verified causal with a safe pooling.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import open_clip
import torch
from open_clip.model import CLIP, get_model_preprocess_cfg
from open_clip.transform import merge_preprocess_dict
from open_clip.transformer import TextTransformer, text_global_pool
from torch import Tensor

from .data.views import RESIZE_MODES
from .errors import BadValue
from .runtime import autocast, resolve_device, resolve_precision
from .store import describe_teacher
from .weights import RANDOM_INIT, Weights, make_fingerprint, resolve_arch, resolve_weights

log = logging.getLogger("kdpipe")

# Pooling at a fixed token is unchanged by cutting tokens after it (with a causal mask).
TRIM_SAFE_POOLS = ("argmax", "eos", "first")
OPEN_CLIP_RANDOM_INIT = "No pretrained weights loaded"  # how open_clip's random-init warning begins


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


def _trimmable(tower: _TextTower | None) -> bool:
    """Cutting tokens after the pooled one is exact: a causal tower pooled at a fixed token."""
    return (tower is not None and tower.pool_type in TRIM_SAFE_POOLS
            and _is_causal_mask(getattr(tower.module, "attn_mask", None)))


def trim_to_pooled(tokens: Tensor, tower: _TextTower) -> Tensor:
    """tokens [C, L] -> [C, L'] with L' = the batch's last pooled position + 1."""
    keep = int(pool_index(tokens, tower.pool_type, tower.eos_id).max()) + 1
    return tokens[:, :keep]


def encode_trimmed(tower: _TextTower, tokens: Tensor) -> Tensor:
    """open_clip's text forward on L' <= context tokens [C, L'] -> raw features [C, D]: slice the
    positional embedding and the causal mask to L' (open_clip's encode_text adds both at full length).
    Keeps the autograd graph (pretraining trains through it)."""
    t = tower.module
    n = tokens.shape[1]
    cast_dtype = t.transformer.get_cast_dtype()
    x = t.token_embedding(tokens).to(cast_dtype)
    x = x + t.positional_embedding[:n].to(cast_dtype)
    mask = t.attn_mask[:n, :n] if t.attn_mask is not None else None
    x = t.transformer(x, attn_mask=mask)
    x = t.ln_final(x)
    x = text_global_pool(x, tokens, tower.pool_type, eos_token_id=tower.eos_id)
    proj = t.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def encode_text(model: torch.nn.Module, tokens: Tensor) -> Tensor:
    """tokens [C, L] -> raw (un-normalised) text features [C, D] of any open_clip model.

    Runs only up to the batch's last pooled token when that is exact (``_trimmable``), else
    open_clip's own ``encode_text``. No ``no_grad`` and no autocast here: the caller decides.
    """
    tower = _text_tower(model)
    if tokens.shape[0] == 0 or not _trimmable(tower):
        return model.encode_text(tokens)
    return encode_trimmed(tower, trim_to_pooled(tokens, tower))


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
        return trim_to_pooled(tokens, self._tower)

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
        """tokens [C, L'] (already trimmed) -> raw features [C, D] by the sliced forward."""
        return encode_trimmed(self._tower, tokens)


# --------------------------------------------------------------------------------------------
# Loading


def _preprocess_of(model: torch.nn.Module) -> Preprocess:
    """The preprocessing open_clip attached to the model (model.visual.preprocess_cfg)."""
    cfg = get_model_preprocess_cfg(model)
    size = cfg["size"]
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise BadValue(f"non-square teacher input {tuple(size)} is not supported")
        size = size[0]
    resize_mode = str(cfg.get("resize_mode", "shortest"))  # open_clip's default when a cfg has none
    if resize_mode not in RESIZE_MODES:
        raise BadValue(f"teacher resize_mode {resize_mode!r} is not one of open_clip's {', '.join(RESIZE_MODES)}")
    return Preprocess(size=int(size), mean=tuple(float(m) for m in cfg["mean"]),
                      std=tuple(float(s) for s in cfg["std"]), interpolation=str(cfg["interpolation"]),
                      resize_mode=resize_mode, fill_color=int(cfg.get("fill_color", 0)))


class _RandomInitIsDebug(logging.Filter):
    """Warnings that a model has random weights (open_clip's, kdpipe's own) as DEBUG records of ``logger``."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger

    def filter(self, record: logging.LogRecord) -> bool:
        said = getattr(record, RANDOM_INIT, False) or record.getMessage().startswith(OPEN_CLIP_RANDOM_INIT)
        if record.levelno != logging.WARNING or not said:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return self.logger.isEnabledFor(logging.DEBUG)  # shown with -v only


@contextmanager
def random_init_expected() -> Iterator[None]:
    """Inside: the warnings that a model was built with random weights are DEBUG lines, for models
    random on purpose (a teacher about to be trained or given a checkpoint's weights next, an
    architecture timed by bench). open_clip logs its warning on the root logger, kdpipe on its own."""
    filters = [(logger, _RandomInitIsDebug(logger)) for logger in (logging.getLogger(), log)]
    for logger, quiet in filters:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger, quiet in filters:
            logger.removeFilter(quiet)


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
    w = resolve_weights(arch, pretrained, allow_random_init, cache_dir)
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
    return _make_teacher(model, tokenizer, w, arch.label, device, precision)


def _make_teacher(model: torch.nn.Module, tokenizer: Any, w: Weights, label: str, device: torch.device,
                  precision: str) -> Teacher:
    cfg = open_clip.get_model_config(w.arch_name) or {}
    preprocess = _preprocess_of(model)
    tower = _text_tower(model)
    causal = tower is not None and _is_causal_mask(getattr(tower.module, "attn_mask", None))
    logit_scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
    embed_dim, context_length = int(cfg["embed_dim"]), int(model.context_length)
    quickgelu = bool(cfg.get("quick_gelu", False)) or w.force_quick_gelu
    fingerprint = make_fingerprint(w.fingerprint_name, w.tag, w.sha256, quickgelu, preprocess.to_dict(),
                                   w.preprocess_source, embed_dim, logit_scale, context_length, label)
    teacher = Teacher(model=model, tokenizer=tokenizer, preprocess=preprocess, fingerprint=fingerprint,
                      embed_dim=embed_dim, logit_scale=logit_scale, context_length=context_length,
                      is_causal_text=causal, device=device, precision=precision, _tower=tower)
    log.info("teacher %s: dim %d, input %d px (%s preprocessing), text tokens %s", describe_teacher(fingerprint),
             embed_dim, preprocess.size, w.preprocess_source,
             "trimmed per batch" if teacher.can_trim else "not trimmed")
    return teacher
