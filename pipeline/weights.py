"""Where a teacher comes from: its architecture, its weights and the fingerprint that names both.

A teacher is named four ways (resolved in this order by ``resolve_arch``):

- a shipped config in ``kdpipe/model_configs/`` (``TEACHERS``: ``tiny-clip`` for tests,
  ``shapes-vit`` for the shapes world), random init allowed;
- a path to an open_clip model-config JSON (a custom architecture, e.g. ``RUN/config.json``
  written when pretraining on the shapes world), either the bare model config
  (``embed_dim``, ``vision_cfg``, ``text_cfg``) or open_clip's ``{"model_cfg", "preprocess_cfg"}``;
- ``local-dir:DIR``, open_clip's own folder layout (``DIR/open_clip_config.json`` and a weights
  file open_clip's local-dir schema would pick, e.g. a pretrained teacher's ``model.safetensors``),
  which brings its weights with it;
- any open_clip architecture name (``open_clip.list_models()``).

Weights (``pretrained``, resolved by ``resolve_weights``): ``None`` (random init), an open_clip
pretrained tag, or a local ``.pt/.pth/.bin/.safetensors`` file (its sha256 goes into the
fingerprint). Tags whose weights were trained with QuickGELU (``openai``, ViT-B-32
``laion400m_*``, ...) resolve to the ``-quickgelu`` architecture, from open_clip's own
pretrained metadata. Nothing here builds a model: ``teachers.load_teacher`` does, from what
this module resolves.

The fingerprint's ``label`` is the teacher as the user named it, for people to read: the name
given (``ViT-B-32``, ``shapes-vit``), or for a config JSON the name it records (``"name"``, written
by ``kdpipe pretrain-teacher``), else its file stem, else (``config.json``, ``open_clip_config.json``)
its folder's name. It never decides whether two teachers are the same (``store.same_fingerprint``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import open_clip
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

from .errors import BadValue, CannotRun, MissingInput, UnknownName
from .registry import Registry
from .store import file_digest

log = logging.getLogger("kdpipe")

CONFIG_DIR = Path(__file__).parent / "model_configs"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
PASS_A_FILE = "--pretrained /path/to/open_clip_pytorch_model.bin"
RANDOM_INIT = "random_init"  # a log record's attribute: it warns of random weights (teachers.random_init_expected)
LOCAL_DIR = "local-dir:"  # open_clip's schema for a model folder (open_clip >= 3.0)

# Shipped architectures: name -> model-config JSON. Dropping a JSON into model_configs/ adds one.
TEACHERS: Registry[Path] = Registry("teacher")
for _path in sorted(CONFIG_DIR.glob("*.json")):
    TEACHERS.register(_path.stem)(_path)


@dataclass(frozen=True)
class TeacherArch:
    """A resolved architecture: the name open_clip builds it by, and where it came from."""

    name: str                 # the fingerprint's: a shipped or open_clip name, or a config JSON's registered one
    open_clip_name: str       # name registered in open_clip's model-config registry
    kind: str                 # "shipped" | "config" | "local-dir" | "open_clip"
    label: str                # as the user named it (the module docstring): shown, never compared
    config_preprocess: dict[str, Any] = field(default_factory=dict)  # from an open_clip_config.json
    checkpoint: str | None = None  # local-dir only: the weights file in the folder, if any


# --------------------------------------------------------------------------------------------
# Architecture resolution


_registered_shipped = False


def _register_shipped() -> None:
    """Make open_clip's factory know the shipped configs (its public add_model_config)."""
    global _registered_shipped
    if not _registered_shipped:
        open_clip.add_model_config(CONFIG_DIR)
        _registered_shipped = True


def _read_config_json(path: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A model-config JSON -> (model_cfg, preprocess_cfg, label). Accepts open_clip_config.json's wrapper."""
    data = json.loads(path.read_text())
    wrapped = "model_cfg" in data
    model_cfg = data["model_cfg"] if wrapped else data
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise BadValue(f"{path} is not an open_clip model config: missing {missing} "
                       "(see open_clip/model_configs/ViT-B-32.json for the format)")
    label = data.get("name") if wrapped and isinstance(data.get("name"), str) else None
    return model_cfg, data.get("preprocess_cfg", {}) if wrapped else {}, label or _file_label(path)


def _file_label(path: Path) -> str:
    """A config file's stem, or its folder's name when the stem names no model (config.json)."""
    generic = path.stem in ("config", Path(HF_CONFIG_NAME).stem)
    return path.resolve().parent.name if generic else path.stem


def _register_config_file(path: Path, stem: str | None = None) -> TeacherArch:
    """Register a model-config JSON under a content-derived name that cannot shadow a built-in.

    open_clip registers configs by file stem ("config" for RUN/config.json, which would clash
    between runs), so a copy is registered as ``kdpipe-<stem>-<sha>`` (``stem`` defaults to the
    file's) and then removed; open_clip keeps the parsed dict.
    """
    model_cfg, preprocess_cfg, label = _read_config_json(path)
    digest = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:12]
    reg_name = f"kdpipe-{stem or path.stem}-{digest}"
    if reg_name not in open_clip.list_models():
        with tempfile.TemporaryDirectory(prefix="kdpipe-config-") as tmp:
            copy = Path(tmp) / f"{reg_name}.json"
            copy.write_text(json.dumps(model_cfg))
            open_clip.add_model_config(copy)
    # The content-derived name (not the path as typed) goes into the fingerprint, so a moved or
    # relatively-addressed run directory is still the same teacher.
    return TeacherArch(name=reg_name, open_clip_name=reg_name, kind="config", label=label,
                       config_preprocess=preprocess_cfg)


def _local_dir_arch(folder: Path) -> TeacherArch:
    """``local-dir:FOLDER`` -> its architecture and the weights file open_clip would load from it.

    Registered under the name FOLDER/config.json gets (a pretrained teacher's folder holds both,
    with the same content), so both ways of naming one teacher give one fingerprint and share caches.
    """
    from open_clip.factory import _find_checkpoint_in_dir  # the very file open_clip's local-dir loads

    config = folder / HF_CONFIG_NAME
    if not config.is_file():
        raise MissingInput(f"{LOCAL_DIR}{folder} has no {HF_CONFIG_NAME} (open_clip's local-dir layout)")
    arch = _register_config_file(config, stem="config")
    return replace(arch, kind="local-dir", checkpoint=_find_checkpoint_in_dir(folder))


def resolve_arch(name: str) -> TeacherArch:
    """Teacher name -> architecture. Unknown names raise UnknownName (a KeyError) listing the shipped ones."""
    if name.startswith(LOCAL_DIR):
        return _local_dir_arch(Path(name[len(LOCAL_DIR):]))
    if name in TEACHERS:
        _register_shipped()
        return TeacherArch(name=name, open_clip_name=name, kind="shipped", label=name)
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise MissingInput(f"teacher model config {name} not found")
        return _register_config_file(path)
    if name in open_clip.list_models():
        return TeacherArch(name=name, open_clip_name=name, kind="open_clip", label=name)
    raise UnknownName(f"unknown teacher {name!r}; shipped: {', '.join(TEACHERS.names())}; "
                      "or any open_clip architecture (python -c 'import open_clip; print(open_clip.list_models())'), "
                      "or a path to an open_clip model-config .json, or local-dir:DIR")


def resolve_quickgelu(name: str, tag: str) -> tuple[str, bool]:
    """(open_clip name, tag) -> (architecture to build, force_quick_gelu).

    Weights trained with QuickGELU (open_clip marks their tags ``quick_gelu=True``: ``openai``,
    ViT-B-32 ``laion400m_*``, ...) silently lose accuracy in a GELU model. Prefer the shipped
    ``-quickgelu`` config; if none exists, force QuickGELU on the given one.
    """
    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise BadValue(f"{name!r} has no pretrained tag {tag!r}; its tags: {tags or 'none'}; "
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
# Weights: pretrained tags from open_clip's cache (or a download), local checkpoint files


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


def _unavailable(name: str, tag: str, cache_dir: str | None, why: str) -> CannotRun:
    return CannotRun(
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
        raise MissingInput(f"pretrained weights file {path} not found")
    if not path.endswith(CHECKPOINT_SUFFIXES):
        raise BadValue(f"pretrained weights file {path} must be one of {', '.join(CHECKPOINT_SUFFIXES)}")


def _looks_like_file(pretrained: str) -> bool:
    return pretrained.endswith(CHECKPOINT_SUFFIXES) or os.sep in pretrained or os.path.exists(pretrained)


# --------------------------------------------------------------------------------------------
# Fingerprint and resolved weights


def make_fingerprint(
    name: str, tag: str | None, sha256: str | None, quickgelu: bool, preprocess: dict[str, Any],
    preprocess_source: str, embed_dim: int, logit_scale: float, context_length: int, label: str | None = None,
) -> dict[str, Any]:
    """The teacher's identity as recorded in a cache manifest (docs/ARCHITECTURE.md).

    ``preprocess`` is ``teachers.Preprocess.to_dict()``; fingerprints are compared with
    ``store.same_fingerprint``, which ignores ``label`` (the name shown: ``TeacherArch.label``).
    """
    return {
        "name": name, "label": label or name, "pretrained": tag, "checkpoint_sha256": sha256,
        "open_clip_version": open_clip.__version__, "quickgelu": quickgelu,
        "preprocess": preprocess, "preprocess_source": preprocess_source,
        "embed_dim": embed_dim, "logit_scale": logit_scale, "context_length": context_length,
    }


@dataclass(frozen=True)
class Weights:
    """Where weights come from, resolved before building the model (``teachers.load_teacher`` builds it)."""

    arch_name: str                 # open_clip name to build (may be the -quickgelu variant)
    fingerprint_name: str
    force_quick_gelu: bool
    checkpoint: str | None         # local file, or None for random init
    tag: str | None
    sha256: str | None
    preprocess: dict[str, Any]     # overrides on top of the architecture's defaults
    preprocess_source: str         # "pretrained-tag" | "config" | "architecture-default"


def resolve_weights(arch: TeacherArch, pretrained: str | None, allow_random_init: bool,
                    cache_dir: str | None) -> Weights:
    """``pretrained`` (None, a local weights file or an open_clip tag) -> where to load weights from.

    A tag is looked up in the local cache (downloaded only when online); random init is refused
    for non-shipped architectures unless ``allow_random_init``. A ``local-dir:`` teacher brings its
    own weights file and takes no ``pretrained``.
    """
    if arch.kind == "local-dir":
        return _local_dir_weights(arch, pretrained, allow_random_init)
    if pretrained is None:
        return _random_weights(arch, allow_random_init)
    if _looks_like_file(pretrained):
        return _file_weights(arch, pretrained)
    return _tag_weights(arch, pretrained, cache_dir)


def _default_preprocess_source(arch: TeacherArch) -> str:
    return "config" if arch.config_preprocess else "architecture-default"


def _random_weights(arch: TeacherArch, allow_random_init: bool) -> Weights:
    if arch.kind != "shipped":
        if not allow_random_init:
            raise BadValue(f"teacher {arch.name!r} without --pretrained would have random weights; pass an "
                           f"open_clip tag or a local file ({PASS_A_FILE}), or allow_random_init for tests")
        log.warning("TEACHER %s HAS RANDOM WEIGHTS (no --pretrained): its embeddings mean nothing", arch.name,
                    extra={RANDOM_INIT: True})
    return Weights(arch.open_clip_name, arch.name, False, None, None, None, arch.config_preprocess,
                   _default_preprocess_source(arch))


def _local_dir_weights(arch: TeacherArch, pretrained: str | None, allow_random_init: bool) -> Weights:
    """The folder's own weights file. open_clip ignores ``pretrained`` with a schema; refusing it says so."""
    if pretrained is not None:
        raise BadValue(f"a {LOCAL_DIR} teacher brings its own weights ({arch.checkpoint or 'none found'}); "
                       f"drop --pretrained {pretrained}")
    if arch.checkpoint is None:
        return _random_weights(arch, allow_random_init)
    return _file_weights(arch, arch.checkpoint)


def _file_weights(arch: TeacherArch, path: str) -> Weights:
    """A local weights file: preprocessing stays the architecture's (a bare file carries none)."""
    _check_checkpoint_file(path)
    if arch.kind == "open_clip":
        log.info("weights from %s: %s uses its architecture's default preprocessing, not a tag's; "
                 "for openai/laion400m weights name the -quickgelu model", path, arch.name)
    return Weights(arch.open_clip_name, arch.name, False, path, None, file_digest(Path(path))["sha256"],
                   arch.config_preprocess, _default_preprocess_source(arch))


def _tag_weights(arch: TeacherArch, tag: str, cache_dir: str | None) -> Weights:
    """An open_clip pretrained tag: the tag's preprocessing and QuickGELU setting apply."""
    if arch.kind == "config":
        raise BadValue(f"teacher {arch.name!r} has no pretrained tags; --pretrained must be a local weights "
                       f"file ({', '.join(CHECKPOINT_SUFFIXES)}), got {tag!r}")
    name, force_qg = resolve_quickgelu(arch.open_clip_name, tag)
    path = fetch_tag_checkpoint(name, tag, cache_dir)
    return Weights(name, name, force_qg, path, tag, None, open_clip.get_pretrained_cfg(name, tag), "pretrained-tag")
