"""Zero-shot prompts: class names x templates, encoded once by the teacher into CACHE/prompts.h5.

Image-only students are judged zero-shot with the teacher's text embeddings, so extraction
stores the teacher's embedding of every (class, template) prompt; evaluation needs no teacher.

Sets (``PROMPT_SETS``): ``shapes`` (the shapes world, class names from kdpipe.data.shapes),
``cifar10`` and ``cifar100`` (CLIP's CIFAR class names and its 18 CIFAR templates, as used by
CLIP_benchmark; open_clip ships no CIFAR templates), ``imagenet`` (open_clip's class names and
OpenAI's 80 templates, the prompts of open_clip's own ImageNet eval; not built by default, 80k
prompts: ``kdpipe extract --prompt-set imagenet``) and ``imagenet-simple`` (the same names with
open_clip's 7 "simple" templates: 7k prompts). Templates are ``str.format`` strings with one ``{}``.

prompts.h5 layout: one group per set, datasets ``classnames`` [K] and ``templates`` [T]
(utf-8 strings) and ``emb`` [K, T, D] float16, each prompt's embedding L2-normalised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from .atomic import atomic_write
from .registry import Registry

if TYPE_CHECKING:
    from .teachers import Teacher

log = logging.getLogger("kdpipe")

CIFAR10_CLASSNAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# torchvision's CIFAR-100 fine labels (alphabetical) with underscores as spaces, as in CLIP.
CIFAR100_CLASSNAMES = (
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn mower", "leopard", "lion", "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak tree", "orange", "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow tree", "wolf", "woman", "worm",
)
# CLIP's CIFAR-10/100 templates (openai/CLIP data/prompts.md; CLIP_benchmark uses the same).
CIFAR_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.",
    "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
)
# Phrasings the shapes-world captions use ("a photo of a star", "there is a small star ..."),
# so a teacher trained only on those captions understands them.
SHAPES_TEMPLATES = ("a photo of a {}", "a picture of a {}", "a image of a {}", "there is a {}")
DEFAULT_SETS = ("shapes", "cifar10", "cifar100")
DATA_SET = "data"  # the source's own labels when they match no named set

# name -> () -> (classnames, templates); lazy so that "shapes" imports its generator only when asked.
PROMPT_SETS: Registry[Callable[[], tuple[list[str], list[str]]]] = Registry("prompt set")


def _from_open_clip(templates: tuple) -> list[str]:
    """open_clip keeps templates as lambdas; turn each into a format string."""
    return [t("{}") for t in templates]


@PROMPT_SETS.register("shapes")
def _shapes() -> tuple[list[str], list[str]]:
    from .data.shapes import SHAPES  # noqa: PLC0415  (lazy: another module owns the world)

    return list(SHAPES), list(SHAPES_TEMPLATES)


@PROMPT_SETS.register("cifar10")
def _cifar10() -> tuple[list[str], list[str]]:
    return list(CIFAR10_CLASSNAMES), list(CIFAR_TEMPLATES)


@PROMPT_SETS.register("cifar100")
def _cifar100() -> tuple[list[str], list[str]]:
    return list(CIFAR100_CLASSNAMES), list(CIFAR_TEMPLATES)


@PROMPT_SETS.register("imagenet")
def _imagenet() -> tuple[list[str], list[str]]:
    import open_clip  # noqa: PLC0415

    return list(open_clip.IMAGENET_CLASSNAMES), _from_open_clip(open_clip.OPENAI_IMAGENET_TEMPLATES)


@PROMPT_SETS.register("imagenet-simple")
def _imagenet_simple() -> tuple[list[str], list[str]]:
    import open_clip  # noqa: PLC0415

    return list(open_clip.IMAGENET_CLASSNAMES), _from_open_clip(open_clip.SIMPLE_IMAGENET_TEMPLATES)


@dataclass
class PromptSet:
    classnames: list[str]
    templates: list[str]
    emb: np.ndarray  # [n_cls, n_tpl, D] float16, every prompt L2-normalised

    def __post_init__(self) -> None:
        want = (len(self.classnames), len(self.templates))
        if self.emb.ndim != 3 or self.emb.shape[:2] != want:
            raise ValueError(f"prompt emb shape {self.emb.shape} does not match "
                             f"{want[0]} classes x {want[1]} templates")


def prompt_texts(classnames: list[str], templates: list[str]) -> list[str]:
    """Class-major prompts: [c0 t0, c0 t1, ..., c1 t0, ...] (K * T strings)."""
    return [t.format(c) for c in classnames for t in templates]


def encode_prompts(teacher: Teacher, classnames: list[str], templates: list[str], batch_size: int = 256) -> np.ndarray:
    """Teacher text embeddings of every (class, template): -> [K, T, D] float16, L2-normalised."""
    texts = prompt_texts(classnames, templates)
    feats = [teacher.encode_texts(texts[s : s + batch_size]) for s in range(0, len(texts), batch_size)]
    emb = np.concatenate([f.float().numpy() for f in feats])  # [K*T, D]
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb.reshape(len(classnames), len(templates), -1).astype(np.float16)


def build_prompt_sets(
    teacher: Teacher,
    names: tuple[str, ...] | list[str] = DEFAULT_SETS,
    extra_classnames: list[str] | None = None,
    batch_size: int = 256,
) -> dict[str, PromptSet]:
    """Encode the named sets; the source's own class names become set "data" unless a named set
    already has exactly those names (the shapes world's labels are the "shapes" set)."""
    sets = {}
    for name in names:
        classnames, templates = PROMPT_SETS.get(name)()
        sets[name] = PromptSet(classnames, templates, encode_prompts(teacher, classnames, templates, batch_size))
    if extra_classnames and find_set(sets, extra_classnames) is None:
        templates = list(SHAPES_TEMPLATES)
        sets[DATA_SET] = PromptSet(list(extra_classnames), templates,
                                   encode_prompts(teacher, list(extra_classnames), templates, batch_size))
    log.info("prompt sets: %s", ", ".join(f"{n} ({len(s.classnames)}x{len(s.templates)})" for n, s in sets.items()))
    return sets


def encode_like(teacher: Teacher, sets: dict[str, PromptSet], batch_size: int = 256) -> dict[str, PromptSet]:
    """The same sets (class names, templates) encoded by ``teacher``: another teacher's prompts of a cache."""
    return {name: PromptSet(list(s.classnames), list(s.templates),
                            encode_prompts(teacher, list(s.classnames), list(s.templates), batch_size))
            for name, s in sets.items()}


def find_set(sets: dict[str, PromptSet], classnames: list[str]) -> str | None:
    """Name of the set whose class names are exactly ``classnames`` (same order), else None."""
    for name, s in sets.items():
        if list(s.classnames) == list(classnames):
            return name
    return None


def write_prompts(path: str | Path, sets: dict[str, PromptSet]) -> None:
    """Write prompts.h5 atomically: a killed writer leaves no half file."""
    import h5py  # noqa: PLC0415

    strings = h5py.string_dtype("utf-8")

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            for name, s in sets.items():
                g = f.create_group(name)
                g.create_dataset("classnames", data=np.array(s.classnames, dtype=object), dtype=strings)
                g.create_dataset("templates", data=np.array(s.templates, dtype=object), dtype=strings)
                g.create_dataset("emb", data=np.ascontiguousarray(s.emb, dtype=np.float16))

    atomic_write(path, write)


def read_prompts(path: str | Path) -> dict[str, PromptSet]:
    """prompts.h5 -> {set name: PromptSet}."""
    import h5py  # noqa: PLC0415

    with h5py.File(path, "r") as f:
        return {name: PromptSet(list(g["classnames"].asstr()[()]), list(g["templates"].asstr()[()]), g["emb"][()])
                for name, g in f.items()}
