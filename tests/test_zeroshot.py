"""kdpipe.zeroshot: matching a dataset's classes to a cached prompt set, opening KIND:PATH datasets,
and scoring a student on one (exercised end to end through `kdpipe eval` in test_evaluate.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from kdpipe import zeroshot
from kdpipe.prompts import PromptSet
from kdpipe.targetspace import Space

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def prompt_set(classnames: list[str], templates: int = 2) -> PromptSet:
    """Every template of class c embedded as the colour axis of c: [K, T, 3]."""
    axes = {"red": [1, 0, 0], "green": [0, 1, 0], "blue": [0, 0, 1]}
    emb = np.array([[axes[c]] * templates for c in classnames], dtype=np.float16)
    return PromptSet(list(classnames), [f"t{i} {{}}" for i in range(templates)], emb)


def colour_folder(root: Path, classes: list[str], per_class: int = 2) -> Path:
    """ImageFolder layout, each class a plain colour (folder names may hold underscores)."""
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20 + 4 * i, 16), COLOURS[c.replace("light_", "")]).save(root / c / f"{i}.png")
    return root


class MeanColour(nn.Module):
    """A stand-in image tower: pixels [B, 3, S, S] -> mean colour [B, 3] (the colour axis)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_match_set_finds_the_classes_in_any_order_and_prefers_the_named_set():
    sets = {"a": prompt_set(["red", "green", "blue"]), "b": prompt_set(["blue", "red", "green"])}
    assert zeroshot.match_set(sets, ["blue", "green", "red"]) == ("a", [2, 1, 0])  # the first set that fits
    assert zeroshot.match_set(sets, ["blue", "green", "red"], preferred="b") == ("b", [0, 2, 1])
    assert zeroshot.match_set(sets, ["red", "green"]) is None  # a subset is not the same classes
    assert zeroshot.match_set({"dup": prompt_set(["red", "red"])}, ["red", "red"]) is None  # ambiguous order
    assert zeroshot.match_set({}, ["red"]) is None


def test_open_zeroshot_reads_an_image_folder(tmp_path, monkeypatch):
    colour_folder(tmp_path / "colours", ["red", "light_blue"], per_class=3)
    monkeypatch.setenv("HOME", str(tmp_path))
    data = zeroshot.open_zeroshot("folder:~/colours")  # ~ expanded
    assert data.name == "folder:colours" and data.prompt_set is None
    assert data.classnames == ["light blue", "red"]  # sorted folder names, underscores read as spaces
    assert len(data.images) == 6 and data.images[0][1] == 0 and data.images[5][1] == 1


def test_open_zeroshot_errors_name_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="expected KIND:PATH with KIND one of cifar10, cifar100, folder"):
        zeroshot.open_zeroshot("folder")
    with pytest.raises(KeyError, match="valid: cifar10, cifar100, folder"):
        zeroshot.open_zeroshot("imagenet:/x")
    with pytest.raises(FileNotFoundError, match="expected PATH/<class>/<image files>"):
        zeroshot.open_zeroshot(f"folder:{tmp_path / 'absent'}")


def test_external_zeroshot_uses_the_matching_teacher_prompts_in_the_datasets_class_order(tmp_path):
    """The folder sorts its classes (blue, green, red); the prompt set lists them red, green, blue:
    the classifier's columns are reordered to the folder's labels, so a perfect model scores 1.0."""
    data = zeroshot.open_zeroshot(f"folder:{colour_folder(tmp_path / 'c', ['red', 'green', 'blue'])}")
    sets = {"colours": prompt_set(["red", "green", "blue"])}
    prep = zeroshot.ImagePrep(8, "bilinear", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    scores, info = zeroshot.external_zeroshot(MeanColour(), None, sets, prep, Space(), torch.device("cpu"), [data],
                                              batch_size=4, progress=False)
    assert scores == {"zeroshot/folder:c/top1": 1.0, "zeroshot/folder:c/top5": 1.0}
    assert info == {"folder:c": {"images": 6, "classes": 3, "class_embeddings": "teacher prompts.h5 [colours]"}}
    emb, labels = zeroshot.embed_labelled(MeanColour(), data, prep, Space(), torch.device("cpu"), batch_size=4,
                                          progress=False)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.allclose(emb[::2], torch.eye(3)[[2, 1, 0]])  # blue, green, red: unit rows in teacher space


def test_a_student_without_a_text_tower_needs_a_matching_prompt_set(tmp_path):
    data = zeroshot.open_zeroshot(f"folder:{colour_folder(tmp_path / 'c', ['red', 'green'])}")
    with pytest.raises(ValueError, match=r"no text tower.*sets: colours \(3 classes\)"):
        zeroshot.labelled_classifier(data, {"colours": prompt_set(["red", "green", "blue"])}, None, Space(), 4,
                                     torch.device("cpu"))
