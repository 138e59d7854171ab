"""Zero-shot classification: classifiers from prompt sets, and labelled image datasets beyond the cache.

- Classifiers: the teacher's come from the prompt embeddings cached in ``CACHE/prompts.h5``
  (``read_prompt_sets``, ``cache_classifiers``: the set whose class names are the cache's
  labels); a student with a text tower builds its own from the same class names and templates
  (``text_classifier``). Weights are [D, K] in the teacher's space (``metrics.zero_shot_classifier``).
- Other datasets: ``ZEROSHOT_DATASETS`` opens ``KIND:PATH`` (``folder:PATH``, ``cifar10:ROOT``,
  ``cifar100:ROOT``; never downloaded) as ``LabelledImages``; ``external_zeroshot`` scores a
  student on them, its images cut as ``ImagePrep`` says (view 0 at the student's size).

Knows models and datasets, not runs: the eval stage (``kdpipe.evaluate``) decides what to score
and writes the report.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from . import metrics, prompts
from .data import views
from .errors import BadValue, MissingInput
from .progress import make_progress
from .registry import Registry
from .runtime import WorkerInit
from .store import Cache
from .targetspace import Space


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


def read_prompt_sets(cache: Cache) -> dict[str, prompts.PromptSet]:
    """The cache's prompts.h5 ({set name: PromptSet}); empty when the cache has none."""
    return prompts.read_prompts(cache.prompts_path) if cache.prompts_path.exists() else {}


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
    """A zero-shot dataset: class names and a map-style dataset of (PIL image, label)."""

    name: str
    classnames: list[str]
    images: Dataset
    prompt_set: str | None = None  # the prompts.h5 set holding the teacher's prompt embeddings


ZeroShotBuilder = Callable[[str], LabelledImages]
ZEROSHOT_DATASETS: Registry[ZeroShotBuilder] = Registry("zero-shot dataset")


@ZEROSHOT_DATASETS.register("folder")
def _folder(path: str) -> LabelledImages:
    """ImageFolder layout: PATH/<class name>/<image>; underscores in folder names read as spaces."""
    from torchvision.datasets import ImageFolder  # noqa: PLC0415

    if not Path(path).is_dir():
        raise MissingInput(f"zero-shot folder {path} does not exist (expected PATH/<class>/<image files>)")
    ds = ImageFolder(path)
    return LabelledImages(f"folder:{Path(path).name}", [c.replace("_", " ") for c in ds.classes], ds)


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


ZEROSHOT_DATASETS.register("cifar10")(functools.partial(_cifar, which="cifar10"))
ZEROSHOT_DATASETS.register("cifar100")(functools.partial(_cifar, which="cifar100"))


def open_zeroshot(spec: str) -> LabelledImages:
    """'KIND:PATH' (e.g. folder:/data/pets, cifar10:~/data) -> LabelledImages. Unknown kinds list the valid ones."""
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise BadValue(f"--zeroshot {spec!r}: expected KIND:PATH with KIND one of "
                       f"{', '.join(ZEROSHOT_DATASETS.names())} (e.g. folder:/data/pets, cifar10:~/data)")
    return ZEROSHOT_DATASETS.get(kind)(str(Path(path).expanduser()))


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


def labelled_classifier(data: LabelledImages, sets: dict[str, prompts.PromptSet], text: nn.Module | None,
                        space: Space, batch_size: int, device: torch.device) -> tuple[Tensor, str]:
    """The student's classifier [D, K] for a zero-shot dataset and where its class embeddings came from."""
    found = match_set(sets, data.classnames, data.prompt_set)
    if text is not None:
        templates = sets[found[0]].templates if found else list(prompts.SHAPES_TEMPLATES)
        return text_classifier(text, data.classnames, templates, space, batch_size, device), "student text tower"
    if found is None:
        raise BadValue(
            f"zero-shot on {data.name}: this student has no text tower, so it classifies with the teacher's "
            f"prompt embeddings from prompts.h5, and no set there has these {len(data.classnames)} class names "
            f"(sets: {', '.join(f'{n} ({len(s.classnames)} classes)' for n, s in sets.items()) or 'none'}). "
            "Evaluate a student with a text tower, or extract a cache whose source has these classes")
    name, order = found
    emb = torch.from_numpy(sets[name].emb[order]).float()  # [K, T, D] in the dataset's class order
    return metrics.zero_shot_classifier(emb), f"teacher prompts.h5 [{name}]"


def external_zeroshot(image: nn.Module, text: nn.Module | None, sets: dict[str, prompts.PromptSet],
                      prep: ImagePrep, space: Space, device: torch.device, datasets: list[LabelledImages],
                      *, batch_size: int, workers: int = 0, progress: bool = True,
                      ) -> tuple[dict[str, float], dict[str, dict]]:
    """Top-1/top-5 of the student on each extra dataset (the teacher's need a forward: not computed).

    Returns ({"zeroshot/{dataset}/top1": accuracy, ...}, {dataset: {"images", "classes", "class_embeddings"}}).
    """
    scores, info = {}, {}
    for data in datasets:
        classifier, source = labelled_classifier(data, sets, text, space, batch_size, device)
        emb, labels = embed_labelled(image, data, prep, space, device, batch_size=batch_size, workers=workers,
                                     progress=progress)
        acc = metrics.zero_shot_accuracy(emb, classifier, labels)
        scores.update({f"zeroshot/{data.name}/{k}": v for k, v in acc.items()})
        info[data.name] = {"images": len(labels), "classes": len(data.classnames), "class_embeddings": source}
    return scores, info

