"""Zero-shot classification: classifiers from prompt sets, and labelled image datasets beyond the cache.

- Classifiers: the teacher's come from the prompt embeddings cached in ``CACHE/prompts.h5``
  (``read_prompt_sets``, ``cache_classifiers``: the set whose class names are the cache's
  labels); a student with a text tower builds its own from the same class names and templates
  (``text_classifier``). Weights are [D, K] in the teacher's space (``metrics.zero_shot_classifier``).
- Other datasets: ``ZEROSHOT_DATASETS`` opens ``KIND:PATH[:KEY=VALUE]...`` (never downloaded) as
  ``LabelledImages``: ``folder:PATH`` (class = sub-folder; names from ``names=FILE`` or
  ``PATH/classnames.txt``, else the folder names), ``imagenet:PATH`` (ImageNet-1k val as
  ``PATH/<wnid>/``: timm's class order, open_clip's class names and prompts; ``classes=present|all``),
  ``cifar10:ROOT``, ``cifar100:ROOT``. ``external_zeroshot`` scores a student on them, its images
  cut as ``ImagePrep`` says (view 0 at the student's size).

Knows models and datasets, not runs: the eval stage (``kdpipe.evaluate``) decides what to score
and writes the report.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from . import metrics, prompts
from .data import views
from .data.labelled import CLASSNAMES_FILE, folder_classname, read_classnames, refuse_empty_classes
from .errors import BadValue, MissingInput
from .progress import make_progress
from .registry import Registry
from .runtime import WorkerInit
from .store import Cache
from .targetspace import Space

log = logging.getLogger("kdpipe")


# --------------------------------------------------------------------------- images and texts of a student


@dataclass(frozen=True)
class ImagePrep:
    """How the student's input is cut from a stored image: view 0 at its size."""

    size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, img: Any, view: views.View | None = None) -> Tensor:
        """PIL image (+ its view 0; default the centred square crop) -> [3, size, size]."""
        view = view or views.center_view(*img.size)
        cut = views.apply_view(views.to_rgb(img), view, self.size, self.interpolation)
        return views.to_tensor(cut, self.mean, self.std)


@torch.no_grad()
def encode_text(tower: nn.Module, texts: list[str], batch_size: int, device: torch.device) -> Tensor:
    """A student text tower on texts -> raw outputs [len(texts), D] float32 on CPU."""
    out = [tower(tower.tokenize(texts[s : s + batch_size]).to(device)).float().cpu()
           for s in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, tower.embed_dim)


# --------------------------------------------------------------------------- zero-shot classifiers


def read_prompt_sets(cache: Cache, teacher: str | None = None) -> dict[str, prompts.PromptSet]:
    """The cache's prompts.h5 ({set name: PromptSet}); empty when the cache has none.

    ``teacher``: that teacher's prompts in a cache with several (None: the primary's).
    """
    path = cache.teacher_prompts_path(teacher)
    return prompts.read_prompts(path) if path.exists() else {}


def text_classifier(tower: nn.Module, classnames: list[str], templates: list[str], space: Space,
                    batch_size: int, device: torch.device) -> Tensor:
    """A student text tower's prompt-ensemble classifier [D, K] (teacher space)."""
    emb = space.text_out(encode_text(tower, prompts.prompt_texts(classnames, templates), batch_size, device))
    return metrics.zero_shot_classifier(emb.reshape(len(classnames), len(templates), -1))


def cache_classifiers(sets: dict[str, prompts.PromptSet], classnames: list[str] | None,
                      notes: list[str]) -> dict[str, Tensor]:
    """The teacher's classifier for the cache's own labels: {set name: [D, K]} (empty when none fits)."""
    if not classnames:
        return {}
    name = prompts.find_set(sets, classnames)
    if name is None:
        notes.append("zero-shot on the cache's labels skipped: no prompt set in prompts.h5 has its class names")
        return {}
    return {name: metrics.zero_shot_classifier(torch.from_numpy(sets[name].emb).float())}


# --------------------------------------------------------------------------- zero-shot: other datasets


@dataclass
class LabelledImages:
    """A zero-shot dataset: class names and a map-style dataset of (PIL image, label).

    ``prompt_set``: the ``PROMPT_SETS`` entry its classes come from (its prompts.h5 set is tried
    first, and its templates serve a student text tower when the cache has none). ``set_rows``:
    each class's row in that set, for a dataset holding some of the set's classes by index
    (ImageNet); None: classes are matched to a cached set by name. ``about``: facts added to
    eval.json's entry for the dataset; ``notes``: lines for eval.json's notes.
    """

    name: str
    classnames: list[str]
    images: Dataset
    prompt_set: str | None = None
    set_rows: list[int] | None = None
    about: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


ZeroShotBuilder = Callable[..., LabelledImages]  # (path, **options) -> LabelledImages
ZEROSHOT_DATASETS: Registry[ZeroShotBuilder] = Registry("zero-shot dataset")
WNID = re.compile(r"n\d{8}")  # a WordNet synset id, ImageNet's class folder name
IMAGENET_CLASSES = 1000
IMAGENET_SCORING = ("present", "all")  # imagenet:PATH:classes=...


def _image_folder(path: str, what: str, layout: str) -> Any:
    """torchvision's ImageFolder on PATH/<class>/<images>; a missing PATH, one without class
    folders, or an empty class folder is an error naming it (``what``: "zero-shot folder", ...)."""
    from torchvision.datasets import ImageFolder  # noqa: PLC0415
    from torchvision.datasets.folder import IMG_EXTENSIONS  # noqa: PLC0415

    root = Path(path)
    if not root.is_dir():
        raise MissingInput(f"{what} {path} does not exist (expected {layout})")
    if not any(p.is_dir() for p in root.iterdir()):
        raise MissingInput(f"{what} {path} has no class sub-folders (expected {layout})")
    ds = ImageFolder(path, allow_empty=True)  # empty classes are named below, one at a time
    counts = Counter(ds.classes[t] for t in ds.targets)
    refuse_empty_classes(root, ds.classes, counts, IMG_EXTENSIONS)
    return ds


# --------------------------------------------------------------------------- folder:PATH and its class names


@ZEROSHOT_DATASETS.register("folder")
def _folder(path: str, *, names: str | None = None) -> LabelledImages:
    """ImageFolder layout PATH/<class>/<image>. Class names: the ``names`` file, else PATH/classnames.txt
    when there is one, else the folder names with underscores read as spaces."""
    ds = _image_folder(path, "zero-shot folder", "PATH/<class>/<image files>")
    file = Path(names).expanduser() if names else Path(path) / CLASSNAMES_FILE
    if names or file.is_file():
        classnames, source = read_classnames(file, ds.classes), str(file)
    else:
        classnames, source = [folder_classname(c) for c in ds.classes], "folder names"
        if all(WNID.fullmatch(c) for c in ds.classes):
            log.warning("zero-shot folder %s: its class folders are wnids, used as class names; for ImageNet "
                        "val use imagenet:%s (CLIP's class names and prompts)", path, path)
    return LabelledImages(f"folder:{Path(path).name}", classnames, ds, about={"class_names": source})


# --------------------------------------------------------------------------- imagenet:PATH


def imagenet_classes() -> dict[str, tuple[int, str]]:
    """ImageNet-1k wnid -> (class index, CLIP class name).

    The index is the wnid's place in timm's ImageNet-1k synset list (the sorted wnids: the class
    order of every ImageNet-1k classifier); the name is open_clip's IMAGENET_CLASSNAMES entry at
    that index (the ``imagenet`` prompt set's class names; two pairs share a name).
    """
    from timm.data import ImageNetInfo  # noqa: PLC0415

    wnids = ImageNetInfo("imagenet-1k").label_names()
    names = prompts.PROMPT_SETS.get("imagenet")()[0]
    if len(wnids) != IMAGENET_CLASSES or len(names) != IMAGENET_CLASSES:
        raise RuntimeError(f"timm lists {len(wnids)} ImageNet-1k synsets and open_clip {len(names)} class names")
    return {w: (i, n) for i, (w, n) in enumerate(zip(wnids, names))}


def _unknown_wnids(path: str, folders: list[str], known: dict[str, Any]) -> None:
    unknown = [f for f in folders if f not in known]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise BadValue(f"imagenet folder {Path(path) / unknown[0]} is not an ImageNet-1k class{more}: imagenet:PATH "
                       "expects PATH/<wnid>/<images> with wnids such as n01440764; for other classes use folder:PATH")


@ZEROSHOT_DATASETS.register("imagenet")
def _imagenet(path: str, *, classes: str = "present") -> LabelledImages:
    """ImageNet-1k val as PATH/<wnid>/<image> (the layout ImageNet's valprep.sh leaves), with
    open_clip's class names and prompts (the ``imagenet`` prompt set).

    ``classes=present`` scores over the wnid folders there: 1000-way on the full val set, k-way
    on a k-class subset (named ``imagenet{k}``); ``classes=all`` always 1000-way (``imagenet{k}-1000way``).
    """
    if classes not in IMAGENET_SCORING:
        raise BadValue(f"imagenet:{path}:classes={classes}: expected classes={' or classes='.join(IMAGENET_SCORING)}")
    ds = _image_folder(path, "imagenet folder", "PATH/<wnid>/<image files>, the layout ImageNet's valprep.sh leaves")
    known = imagenet_classes()
    _unknown_wnids(path, ds.classes, known)
    index, names = [known[w][0] for w in ds.classes], [known[w][1] for w in ds.classes]
    k = len(index)
    about = {"imagenet_classes_present": k,
             "scored_over": "all 1000 classes" if classes == "all" else "classes present"}
    if k == IMAGENET_CLASSES:
        return LabelledImages("imagenet", names, ds, "imagenet", index, about)
    if classes == "present":
        note = (f"zeroshot/imagenet{k}: {k} of the 1000 ImageNet-1k classes are in {path}, scored {k}-way over them "
                "(not comparable with 1000-way ImageNet figures; imagenet:PATH:classes=all scores 1000-way)")
        return LabelledImages(f"imagenet{k}", names, ds, "imagenet", index, about, [note])
    ds.target_transform = index.__getitem__  # folder label -> ImageNet-1k index: scored over all 1000 classes
    note = f"zeroshot/imagenet{k}-1000way: the images of {k} ImageNet-1k classes in {path}, scored 1000-way"
    return LabelledImages(f"imagenet{k}-1000way", prompts.PROMPT_SETS.get("imagenet")()[0], ds, "imagenet",
                          list(range(IMAGENET_CLASSES)), about, [note])


# --------------------------------------------------------------------------- cifar10:ROOT, cifar100:ROOT


def _cifar(path: str, which: str) -> LabelledImages:
    from torchvision import datasets  # noqa: PLC0415

    cls, folder = {"cifar10": (datasets.CIFAR10, "cifar-10-batches-py"),
                   "cifar100": (datasets.CIFAR100, "cifar-100-python")}[which]
    try:
        ds = cls(path, train=False, download=False)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted."
        raise MissingInput(
            f"{which} test set not found under {path}: expected {Path(path) / folder}/ (the folder "
            f"torchvision.datasets.{cls.__name__}(root, download=True) writes). kdpipe never downloads "
            "datasets: fetch it on a machine with network and copy that folder here") from None
    classnames = prompts.PROMPT_SETS.get(which)()[0]
    if [c.replace("_", " ") for c in ds.classes] != classnames:
        raise BadValue(f"{which} at {path} has classes {ds.classes[:5]}..., not CLIP's {which} class names")
    return LabelledImages(which, classnames, ds, prompt_set=which)


@ZEROSHOT_DATASETS.register("cifar10")
def _cifar10(path: str) -> LabelledImages:
    """torchvision's CIFAR-10 test set under ROOT (never downloaded)."""
    return _cifar(path, "cifar10")


@ZEROSHOT_DATASETS.register("cifar100")
def _cifar100(path: str) -> LabelledImages:
    """torchvision's CIFAR-100 test set under ROOT (never downloaded)."""
    return _cifar(path, "cifar100")


# --------------------------------------------------------------------------- KIND:PATH[:KEY=VALUE]...

_OPTION = re.compile(r"([a-z_]+)=(.*)")
SPEC_EXAMPLES = "folder:/data/pets, folder:/data/pets:names=names.txt, imagenet:/data/imagenet/val, cifar10:~/data"


def options_of(kind: str) -> list[str]:
    """The KEY=VALUE options a zero-shot kind takes: its builder's keyword-only parameters."""
    params = inspect.signature(ZEROSHOT_DATASETS.get(kind)).parameters.values()
    return [p.name for p in params if p.kind is p.KEYWORD_ONLY]


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """'KIND:PATH[:KEY=VALUE]...' -> (kind, PATH with ~ expanded, {key: value}); an unknown kind or
    option raises naming the valid ones. Reads no file (a typo fails before any image is read)."""
    kind, sep, rest = spec.partition(":")
    parts, options = rest.split(":"), {}
    while len(parts) > 1 and (opt := _OPTION.fullmatch(parts[-1])):  # trailing KEY=VALUE pieces
        options[opt[1]] = opt[2]
        parts.pop()
    path = ":".join(parts)
    if not sep or not path:
        raise BadValue(f"--zeroshot {spec!r}: expected KIND:PATH with KIND one of "
                       f"{', '.join(ZEROSHOT_DATASETS.names())} (e.g. {SPEC_EXAMPLES})")
    valid = options_of(kind)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise BadValue(f"--zeroshot {spec!r}: {kind} has no option {unknown[0]!r} "
                       f"(its options: {', '.join(f'{v}=...' for v in valid) or 'none'})")
    return kind, str(Path(path).expanduser()), options


def open_zeroshot(spec: str) -> LabelledImages:
    """'KIND:PATH[:KEY=VALUE]...' (e.g. folder:/data/pets, imagenet:/data/imagenet/val) -> LabelledImages."""
    kind, path, options = parse_spec(spec)
    return ZEROSHOT_DATASETS.get(kind)(path, **options)


class _Prepped(Dataset):
    """(PIL, label) -> (student input [3, S, S], label)."""

    def __init__(self, base: Dataset, prep: ImagePrep) -> None:
        self.base, self.prep = base, prep

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img, label = self.base[i]
        return self.prep(img), int(label)


@torch.no_grad()
def embed_labelled(image: nn.Module, data: LabelledImages, prep: ImagePrep, space: Space, device: torch.device,
                   *, batch_size: int, workers: int = 0, progress: bool = True) -> tuple[Tensor, Tensor]:
    """Student image embeddings [N, D] (teacher space) and labels [N] of a zero-shot dataset.

    ``workers``: DataLoader processes decoding images; ``progress``: show a progress bar.
    """
    loader = DataLoader(_Prepped(data.images, prep), batch_size=batch_size, num_workers=workers,
                        worker_init_fn=WorkerInit())
    rows, labels = [], []
    with make_progress("images", disable=not progress) as bar:
        task = bar.add_task(f"zero-shot {data.name}", total=len(data.images), info="")
        for pixels, y in loader:
            rows.append(space.image_out(image(pixels.to(device)).float().cpu()))
            labels.append(y)
            bar.update(task, advance=len(y))
    return torch.cat(rows), torch.cat(labels)


def match_set(sets: dict[str, prompts.PromptSet], classnames: list[str],
              preferred: str | None = None) -> tuple[str, list[int]] | None:
    """A prompt set with exactly these class names in any order (folders sort theirs) -> (name, index of
    each class in the set); None when there is none."""
    names = [preferred] if preferred in sets else []
    names += [n for n in sets if n != preferred]
    for name in names:
        own = list(sets[name].classnames)
        if sorted(own) == sorted(classnames) and len(set(own)) == len(own):
            return name, [own.index(c) for c in classnames]
    return None


def cached_rows(sets: dict[str, prompts.PromptSet], data: LabelledImages) -> tuple[str, list[int]] | None:
    """The prompts.h5 set holding the dataset's classes -> (name, row of each class); None when none does.

    A dataset with ``set_rows`` (ImageNet, whose CLIP names are not unique) takes those rows of a set
    with exactly its prompt set's class names in order: the named set first, then any other (e.g.
    ``imagenet-simple``). Any other dataset is matched by name (``match_set``).
    """
    if data.set_rows is None:
        return match_set(sets, data.classnames, data.prompt_set)
    classnames = prompts.PROMPT_SETS.get(data.prompt_set)()[0]
    for name in sorted(sets, key=lambda n: n != data.prompt_set):  # stable: the named set, then file order
        if list(sets[name].classnames) == classnames:
            return name, list(data.set_rows)
    return None


def _no_cached_set(data: LabelledImages, sets: dict[str, prompts.PromptSet]) -> BadValue:
    """Why an image-only student cannot be scored on ``data``, and what would fix it."""
    have = ", ".join(f"{n} ({len(s.classnames)} classes)" for n, s in sets.items()) or "none"
    if data.prompt_set is None:
        what, fix = f"these {len(data.classnames)} class names", "extract a cache whose source has these classes"
    else:
        what = f"the {data.prompt_set} classes"
        fix = (f"they need the teacher: re-run `kdpipe extract` on this cache with --prompt-set {data.prompt_set} "
               "(same --teacher, --data and --out: its shards are kept, only the prompts are encoded)")
    return BadValue(f"zero-shot on {data.name}: this student has no text tower, so it classifies with the teacher's "
                    f"prompt embeddings from prompts.h5, and no set there has {what} (sets: {have}); {fix}, or "
                    "evaluate a student with a text tower")


def labelled_classifier(data: LabelledImages, sets: dict[str, prompts.PromptSet], text: nn.Module | None,
                        space: Space, batch_size: int, device: torch.device) -> tuple[Tensor, str]:
    """The student's classifier [D, K] for a zero-shot dataset and where its class embeddings came from.

    A student text tower uses the templates of the cached set that holds the classes (the teacher's
    prompts), else those of the dataset's own prompt set (ImageNet: OpenAI's 80, as open_clip's eval).
    """
    found = cached_rows(sets, data)
    if text is not None:
        if found:
            templates = sets[found[0]].templates
        elif data.prompt_set:
            templates = prompts.PROMPT_SETS.get(data.prompt_set)()[1]
        else:
            templates = list(prompts.SHAPES_TEMPLATES)
        return text_classifier(text, data.classnames, templates, space, batch_size, device), "student text tower"
    if found is None:
        raise _no_cached_set(data, sets)
    name, rows = found
    emb = torch.from_numpy(sets[name].emb[rows]).float()  # [K, T, D] in the dataset's class order
    return metrics.zero_shot_classifier(emb), f"teacher prompts.h5 [{name}]"


def external_zeroshot(image: nn.Module, text: nn.Module | None, sets: dict[str, prompts.PromptSet],
                      prep: ImagePrep, space: Space, device: torch.device, datasets: list[LabelledImages],
                      *, batch_size: int, workers: int = 0, progress: bool = True,
                      ) -> tuple[dict[str, float], dict[str, dict]]:
    """Top-1/top-5 of the student on each extra dataset (the teacher's need a forward: not computed).

    Returns ({"zeroshot/{dataset}/top1": accuracy, ...}, {dataset: {"images", "classes",
    "class_embeddings", + the dataset's ``about``}}).
    """
    scores, info = {}, {}
    for data in datasets:
        classifier, source = labelled_classifier(data, sets, text, space, batch_size, device)
        emb, labels = embed_labelled(image, data, prep, space, device, batch_size=batch_size, workers=workers,
                                     progress=progress)
        acc = metrics.zero_shot_accuracy(emb, classifier, labels)
        scores.update({f"zeroshot/{data.name}/{k}": v for k, v in acc.items()})
        info[data.name] = {"images": len(labels), "classes": len(data.classnames), "class_embeddings": source,
                           **data.about}
    return scores, info
