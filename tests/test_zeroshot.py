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
    with pytest.raises(KeyError, match="valid: cifar10, cifar100, folder, imagenet$"):
        zeroshot.open_zeroshot("mnist:/x")
    with pytest.raises(ValueError, match=r"imagenet has no option 'name' \(its options: classes=\.\.\.\)"):
        zeroshot.open_zeroshot("imagenet:/x:name=a.txt")
    with pytest.raises(ValueError, match=r"cifar10 has no option 'classes' \(its options: none\)"):
        zeroshot.open_zeroshot("cifar10:/x:classes=all")
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
    assert info == {"folder:c": {"images": 6, "classes": 3, "class_embeddings": "teacher prompts.h5 [colours]",
                                 "class_names": "folder names"}}
    emb, labels = zeroshot.embed_labelled(MeanColour(), data, prep, Space(), torch.device("cpu"), batch_size=4,
                                          progress=False)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.allclose(emb[::2], torch.eye(3)[[2, 1, 0]])  # blue, green, red: unit rows in teacher space


def test_a_student_without_a_text_tower_needs_a_matching_prompt_set(tmp_path):
    data = zeroshot.open_zeroshot(f"folder:{colour_folder(tmp_path / 'c', ['red', 'green'])}")
    with pytest.raises(ValueError, match=r"no text tower.*sets: colours \(3 classes\)"):
        zeroshot.labelled_classifier(data, {"colours": prompt_set(["red", "green", "blue"])}, None, Space(), 4,
                                     torch.device("cpu"))


def test_parse_spec_reads_trailing_options_and_keeps_colons_in_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert zeroshot.parse_spec("folder:~/pets") == ("folder", str(tmp_path / "pets"), {})
    assert zeroshot.parse_spec("folder:/d/pets:names=~/n.txt") == ("folder", "/d/pets", {"names": "~/n.txt"})
    assert zeroshot.parse_spec("folder:/d/a:b") == ("folder", "/d/a:b", {})  # no KEY=: part of the path
    assert zeroshot.parse_spec("imagenet:/val:classes=all") == ("imagenet", "/val", {"classes": "all"})
    with pytest.raises(ValueError, match="expected KIND:PATH"):
        zeroshot.parse_spec("imagenet:")


# --------------------------------------------------------------------------- folder: class-names files


def test_folder_class_names_from_a_file_in_folder_order(tmp_path):
    root = colour_folder(tmp_path / "c", ["red", "green", "blue"])  # sorted: blue, green, red
    names = tmp_path / "names.txt"
    names.write_text("navy blue\n\nleaf green\nfire_red\n")  # blank lines skipped, names kept as written
    data = zeroshot.open_zeroshot(f"folder:{root}:names={names}")
    assert data.classnames == ["navy blue", "leaf green", "fire_red"]
    assert data.about == {"class_names": str(names)}
    (root / "classnames.txt").write_text("b\ng\nr\n")  # next to the class folders: used by default
    data = zeroshot.open_zeroshot(f"folder:{root}")
    assert data.classnames == ["b", "g", "r"] and data.about == {"class_names": str(root / "classnames.txt")}
    assert len(data.images) == 6  # the file is not a class


def test_folder_class_names_from_folder_tab_name_lines(tmp_path):
    root = colour_folder(tmp_path / "c", ["red", "blue"])
    names = tmp_path / "map.tsv"
    names.write_text("red\tcrimson\ngreen\tnot here: ignored\nblue\tcobalt blue\n")
    assert zeroshot.open_zeroshot(f"folder:{root}:names={names}").classnames == ["cobalt blue", "crimson"]


@pytest.mark.parametrize("text, error", [
    ("a\nb\n", r"names.txt has 2 class names for 3 class folders: expected one name per line in the folders' "
               r"sorted order \(blue, green, red\)"),
    ("blue\tb\ngreen\n", r"names.txt line 2: no tab, but line 1 is folder<TAB>name"),
    ("blue\tb\nred\tr\n", r"names.txt names no class for folder 'green'"),
    ("blue\tb\ngreen\tg\nblue\tc\nred\tr\n", r"names.txt line 3: folder 'blue' is already named on line 1"),
    ("blue\tb\ngreen\t \nred\tr\n", r"names.txt line 2: expected folder<TAB>name"),
])
def test_bad_class_names_files_name_the_file_and_line(tmp_path, text, error):
    root = colour_folder(tmp_path / "c", ["red", "green", "blue"], per_class=1)
    (tmp_path / "names.txt").write_text(text)
    with pytest.raises(ValueError, match=error):
        zeroshot.open_zeroshot(f"folder:{root}:names={tmp_path / 'names.txt'}")


def test_missing_class_names_file_and_empty_class_folder_are_named(tmp_path):
    root = colour_folder(tmp_path / "c", ["red", "green"], per_class=1)
    with pytest.raises(FileNotFoundError, match=f"class-names file {tmp_path / 'nope.txt'} does not exist"):
        zeroshot.open_zeroshot(f"folder:{root}:names={tmp_path / 'nope.txt'}")
    (root / "blue").mkdir()
    (root / "blue" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=f"class folder {root / 'blue'} holds no image files"):
        zeroshot.open_zeroshot(f"folder:{root}")


# --------------------------------------------------------------------------- imagenet:PATH

# Real ImageNet-1k classes: wnid -> (class index, open_clip's CLIP name). 836 and 837 are both "sunglasses"
# in CLIP's names, so only the index can tell them apart.
KNOWN_WNIDS = {"n01440764": (0, "tench"), "n02123045": (281, "tabby cat"), "n03773504": (657, "missile"),
               "n04355933": (836, "sunglasses"), "n04356056": (837, "sunglasses"), "n15075141": (999, "toilet paper")}
FIXTURE = {"n01440764": "red", "n02123045": "green", "n04356056": "blue"}  # wnid -> colour of its images


def imagenet_folder(root: Path, wnids: dict[str, str] = FIXTURE, per_class: int = 2) -> Path:
    """ImageNet val layout after valprep.sh: root/<wnid>/<JPEG>, each class a plain colour."""
    for wnid, colour in wnids.items():
        (root / wnid).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (24 + 4 * i, 20), COLOURS[colour]).save(root / wnid / f"ILSVRC2012_val_{i:08d}.JPEG")
    return root


def imagenet_set(name_rows: dict[int, str], templates: int = 1) -> PromptSet:
    """An "imagenet" prompt set over open_clip's 1000 names: class i's prompts on the colour axis
    ``name_rows[i]``; every other class points away from all colours (never the top-1 of a colour)."""
    from kdpipe.prompts import PROMPT_SETS

    axes = {"red": [1, 0, 0], "green": [0, 1, 0], "blue": [0, 0, 1]}
    emb = np.full((1000, templates, 3), -1.0, dtype=np.float16)
    for row, colour in name_rows.items():
        emb[row] = axes[colour]
    classnames, _ = PROMPT_SETS.get("imagenet")()
    return PromptSet(classnames, [f"t{i} {{}}" for i in range(templates)], emb)


def test_imagenet_classes_map_wnids_to_timm_order_and_open_clip_names():
    import open_clip

    classes = zeroshot.imagenet_classes()
    assert len(classes) == 1000 and list(classes) == sorted(classes)  # ImageNet-1k order: the sorted wnids
    assert {w: classes[w] for w in KNOWN_WNIDS} == KNOWN_WNIDS
    assert [name for _, name in classes.values()] == list(open_clip.IMAGENET_CLASSNAMES)


def _score(data: zeroshot.LabelledImages, sets: dict) -> tuple[dict, dict]:
    prep = zeroshot.ImagePrep(8, "bilinear", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return zeroshot.external_zeroshot(MeanColour(), None, sets, prep, Space(), torch.device("cpu"), [data],
                                      batch_size=4, progress=False)


def test_imagenet_subset_is_scored_over_the_classes_present_with_their_imagenet_rows(tmp_path):
    """Classes 0, 281 and 837 are present: the classifier is rows 0, 281, 837 of the cached set (rows
    0, 1, 2 or the other "sunglasses", 836, would score 0)."""
    data = zeroshot.open_zeroshot(f"imagenet:{imagenet_folder(tmp_path / 'val')}")
    assert data.name == "imagenet3" and data.classnames == ["tench", "tabby cat", "sunglasses"]
    assert data.set_rows == [0, 281, 837] and [data.images[i][1] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert "3 of the 1000 ImageNet-1k classes" in data.notes[0] and "classes=all" in data.notes[0]
    scores, info = _score(data, {"imagenet": imagenet_set({0: "red", 281: "green", 837: "blue", 836: "red"})})
    assert scores == {"zeroshot/imagenet3/top1": 1.0, "zeroshot/imagenet3/top5": 1.0}
    assert info == {"imagenet3": {"images": 6, "classes": 3, "class_embeddings": "teacher prompts.h5 [imagenet]",
                                  "imagenet_classes_present": 3, "scored_over": "classes present"}}
    rotated = imagenet_set({0: "green", 281: "blue", 837: "red", 1: "red", 282: "green", 838: "blue"})
    assert _score(data, {"imagenet": rotated})[0]["zeroshot/imagenet3/top1"] == 0.0  # rows 0, 281, 837 only


def test_imagenet_classes_all_scores_1000_way_with_imagenet_labels(tmp_path):
    data = zeroshot.open_zeroshot(f"imagenet:{imagenet_folder(tmp_path / 'val')}:classes=all")
    assert data.name == "imagenet3-1000way" and len(data.classnames) == 1000 and data.set_rows == list(range(1000))
    assert [data.images[i][1] for i in range(6)] == [0, 0, 281, 281, 837, 837]  # ImageNet-1k indices
    scores, info = _score(data, {"imagenet": imagenet_set({0: "red", 281: "green", 837: "blue"})})
    assert scores["zeroshot/imagenet3-1000way/top1"] == 1.0 and info["imagenet3-1000way"]["classes"] == 1000
    # a competing absent class (836, on blue's axis too) takes blue's images' top-1 half the time: 1000-way counts it
    tie = imagenet_set({0: "red", 281: "green", 836: "blue", 837: "blue"})
    tie.emb[836] = np.array([0.2, 0, 1], dtype=np.float16)  # closer to blue than 837 is? no: 837 is exactly blue
    assert _score(data, {"imagenet": tie})[0]["zeroshot/imagenet3-1000way/top1"] == 1.0


def test_imagenet_uses_any_cached_set_of_the_imagenet_names_named_set_first(tmp_path):
    data = zeroshot.open_zeroshot(f"imagenet:{imagenet_folder(tmp_path / 'val')}")
    simple = imagenet_set({0: "red", 281: "green", 837: "blue"}, templates=2)
    assert zeroshot.cached_rows({"imagenet-simple": simple}, data) == ("imagenet-simple", [0, 281, 837])
    wrong = imagenet_set({})
    assert zeroshot.cached_rows({"imagenet-simple": simple, "imagenet": wrong}, data)[0] == "imagenet"
    three = PromptSet(["tench", "tabby cat", "sunglasses"], ["{}"], np.ones((3, 1, 3), np.float16))
    assert zeroshot.cached_rows({"data": three}, data) is None  # by index, never by (ambiguous) name


def test_imagenet_folder_errors_name_the_folder(tmp_path):
    root = imagenet_folder(tmp_path / "val", {"n01440764": "red", "n99999999": "green", "cats": "blue"})
    with pytest.raises(ValueError, match=rf"imagenet folder {root / 'cats'} is not an ImageNet-1k class \(and 1 "
                                         r"more\): imagenet:PATH expects PATH/<wnid>/<images>"):
        zeroshot.open_zeroshot(f"imagenet:{root}")
    root = imagenet_folder(tmp_path / "val2", {"n01440764": "red"})
    (root / "n02123045").mkdir()
    with pytest.raises(FileNotFoundError, match=f"class folder {root / 'n02123045'} holds no image files"):
        zeroshot.open_zeroshot(f"imagenet:{root}")
    flat = tmp_path / "flat"  # val images not yet sorted into wnid folders
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(FileNotFoundError, match="has no class sub-folders .*valprep.sh"):
        zeroshot.open_zeroshot(f"imagenet:{flat}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zeroshot.open_zeroshot(f"imagenet:{tmp_path / 'absent'}")
    with pytest.raises(ValueError, match="expected classes=present or classes=all"):
        zeroshot.open_zeroshot(f"imagenet:{root}:classes=some")


def test_imagenet_without_a_cached_set_needs_a_text_tower_or_the_teacher(tmp_path):
    data = zeroshot.open_zeroshot(f"imagenet:{imagenet_folder(tmp_path / 'val')}")
    with pytest.raises(ValueError, match=r"no set there has the imagenet classes \(sets: shapes \(3 classes\)\); "
                                         r"they need the teacher: re-run `kdpipe extract` on this cache with "
                                         r"--prompt-set imagenet"):
        zeroshot.labelled_classifier(data, {"shapes": prompt_set(["red", "green", "blue"])}, None, Space(), 4,
                                     torch.device("cpu"))


# --------------------------------------------------------------------------- the same classifier as open_clip's


@pytest.fixture(scope="module")
def tiny():
    from kdpipe.teachers import load_teacher

    torch.manual_seed(0)
    return load_teacher("tiny-clip")


class TeacherTextTower(nn.Module):
    """The tiny teacher's text tower dressed as a student text tower (tokenize + forward)."""

    def __init__(self, teacher) -> None:
        super().__init__()
        self.model, self.tokenize, self.embed_dim = teacher.model, teacher.tokenize, teacher.embed_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def test_imagenet_classifier_equals_open_clips_zero_shot_classifier(tiny, tmp_path):
    """Both ways eval builds the ImageNet classifier (a student text tower live; an image-only
    student from the teacher's prompts.h5 set) give open_clip.build_zero_shot_classifier's weights
    for the same text tower, class names and OpenAI templates."""
    import open_clip

    from kdpipe.prompts import PROMPT_SETS, encode_prompts

    data = zeroshot.open_zeroshot(f"imagenet:{imagenet_folder(tmp_path / 'val')}")
    want = open_clip.build_zero_shot_classifier(tiny.model, tiny.tokenizer, ["tench", "tabby cat", "sunglasses"],
                                                open_clip.OPENAI_IMAGENET_TEMPLATES)  # [D, 3]
    live, source = zeroshot.labelled_classifier(data, {}, TeacherTextTower(tiny), Space(), 64, torch.device("cpu"))
    assert source == "student text tower"
    torch.testing.assert_close(live, want, rtol=0, atol=1e-5)

    classnames, templates = PROMPT_SETS.get("imagenet")()
    emb = np.zeros((1000, len(templates), tiny.embed_dim), np.float16)  # only the present rows are read
    emb[[0, 281, 837]] = encode_prompts(tiny, data.classnames, templates)
    cached, source = zeroshot.labelled_classifier(data, {"imagenet": PromptSet(classnames, templates, emb)}, None,
                                                  Space(), 64, torch.device("cpu"))
    assert source == "teacher prompts.h5 [imagenet]"
    torch.testing.assert_close(cached, want, rtol=0, atol=2e-3)  # prompts.h5 stores float16
