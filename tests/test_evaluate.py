"""The eval stage: metrics through one path for teacher and student, view-0 replay, whitened
back-mapping, zero-shot datasets, eval.json and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from cache_factory import make_fake_cache
from kdpipe import cachereader
from kdpipe import evaluate as E
from kdpipe import extract, metrics, prompts, teachers, zca, zeroshot
from kdpipe.cli.main import app
from kdpipe.data import views as V
from kdpipe.rundir import RunSpec
from kdpipe.store import CacheError, open_cache
from kdpipe.students import build_student, build_text_student, save_student
from kdpipe.targetspace import BackMap, cache_back_maps

DIM, SIZE = 16, 32


@pytest.fixture(scope="module")
def fake_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic teacher embeddings over real 32 px JPEGs; val spread over 3 shards (30 = 12 + 12 + 6)."""
    return make_fake_cache(tmp_path_factory.mktemp("evcache") / "cache", n_train=80, n_val=30, dim=DIM,
                           shard_size=12, image_size=SIZE)


def make_run(path: Path, cache: Path, text: bool = False, whitening: dict | None = None, seed: int = 0,
             **meta) -> Path:
    """A RUN dir as `kdpipe train` leaves it (student-last.safetensors + student.json), untrained weights."""
    c = open_cache(cache)
    torch.manual_seed(seed)
    image = build_student("tiny", c.embed_dim, SIZE)
    tower = build_text_student("text_tiny", c.embed_dim) if text else None
    save_student(path, image, tower, meta={"teacher": c.teacher, "cache": str(c.root), "whitening": whitening,
                                           "losses": {"weights": {"fd": 7.8, "crd": 1.0}}, **meta})
    return path


def teacher_side(cache: Path, split: str = "val") -> tuple[E.Embeddings, torch.Tensor, torch.Tensor]:
    c = open_cache(cache)
    held = c.load_split(split)
    classifiers = zeroshot.cache_classifiers(zeroshot.read_prompt_sets(c), c.classnames, [])
    return (E._teacher_embeddings(held, classifiers), torch.from_numpy(held.txt_to_img),
            torch.from_numpy(held.labels))


# --------------------------------------------------------------------------- one path for both


def test_teacher_through_the_student_path_is_exact(fake_cache):
    teacher, txt_to_img, labels = teacher_side(fake_cache)
    student = E.Embeddings(teacher.img.clone(), teacher.txt.clone(), dict(teacher.classifiers))
    rows = E.evaluate_embeddings(student, teacher, txt_to_img, labels)
    assert {"i2t_R@1", "t2i_R@10", "zeroshot/shapes/top1", "zeroshot/shapes/top5",
            "agreement/cosine", "agreement/shapes/top1"} <= set(rows)
    for name, row in rows.items():
        assert row["student"] == row["teacher"], name
        assert row["ratio"] == pytest.approx(1.0) or row["teacher"] == 0
    assert rows["agreement/shapes/top1"]["student"] == 1.0
    assert rows["agreement/cosine"]["student"] == pytest.approx(1.0, abs=1e-6)
    # the teacher's numbers are the plain metrics on its cached view-0 embeddings
    want = metrics.retrieval_recall(teacher.img, teacher.txt, txt_to_img)
    assert {k: rows[k]["teacher"] for k in want} == want


def test_a_worse_student_gets_its_ratio(fake_cache):
    teacher, txt_to_img, labels = teacher_side(fake_cache)
    student = E.Embeddings(-teacher.img, teacher.txt, teacher.classifiers)  # points the wrong way
    rows = E.evaluate_embeddings(student, teacher, txt_to_img, labels)
    assert rows["agreement/cosine"]["student"] == pytest.approx(-1.0, abs=1e-6)
    r = rows["i2t_R@1"]
    assert r["student"] < r["teacher"] and r["ratio"] == pytest.approx(r["student"] / r["teacher"])


def test_non_finite_embeddings_are_refused_naming_split_and_model(fake_cache):
    teacher, txt_to_img, labels = teacher_side(fake_cache)
    img = teacher.img.clone()
    img[[0, 5]] = float("nan")  # a diverged student
    student = E.Embeddings(img, teacher.txt, teacher.classifiers)
    with pytest.raises(ValueError, match=r"^val split: student image embeddings have 2 non-finite rows of 30$"):
        E.evaluate_embeddings(student, teacher, txt_to_img, labels, split="val")
    # an image-only student borrows the teacher's captions: a bad cache is blamed on the teacher
    txt = teacher.txt.clone()
    txt[3, 1] = float("inf")
    bad_cache = E.Embeddings(teacher.img, txt, teacher.classifiers)
    with pytest.raises(ValueError, match=r"^test split: teacher text embeddings have 1 non-finite rows of "):
        E.evaluate_embeddings(E.Embeddings(teacher.img, txt), bad_cache, txt_to_img, labels, split="test")


def test_align_reorders_by_key_and_refuses_missing():
    rows = torch.arange(3.0)[:, None]
    assert E.align(["b", "c", "a"], rows, ["a", "b", "c"], "images")[:, 0].tolist() == [2.0, 0.0, 1.0]
    with pytest.raises(CacheError, match="missing from the tar"):
        E.align(["a"], rows[:1], ["a", "z"], "images")


# --------------------------------------------------------------------------- whitened students


def test_back_map_is_identity_without_whitening_and_recovers_teacher_directions(fake_cache):
    x = torch.randn(5, DIM)
    plain = BackMap(torch.zeros(DIM), torch.eye(DIM), 2.0)
    assert torch.allclose(plain(3 * x), torch.nn.functional.normalize(x, dim=-1), atol=1e-6)
    from kdpipe import whiten

    whiten.run(whiten.WhitenConfig(cache=fake_cache, mode="joint", progress=False))
    c = open_cache(fake_cache)
    back = cache_back_maps(c, "joint", ("image",))["image"]
    t = torch.from_numpy(c.load_split("val").img[:, 0].astype(np.float32))
    z = zca.apply(whiten.load_whitening(c, "joint"), t.double()).float()  # whitened targets
    cos = (back(0.1 * z) * t).sum(dim=1)  # the output norm of the student does not matter
    assert cos.mean() > 0.98 and cos.min() > 0.9


def test_whitened_run_is_mapped_back_and_says_so(fake_cache, tmp_path):
    from kdpipe import whiten
    from kdpipe.targetspace import load_targets, save_whitening

    fitted = whiten.run(whiten.WhitenConfig(cache=fake_cache, mode="joint", progress=False))
    teacher = E.run(E.EvalConfig(teacher=fake_cache, out=tmp_path / "t.json", progress=False))
    for name, value in fitted["teacher_raw"]["retrieval"].items():  # the whiten stage's own teacher check
        assert teacher["metrics"][name]["teacher"] == value
    run = tmp_path / "run"
    run.mkdir()
    meta = save_whitening(run, load_targets(open_cache(fake_cache), "joint"))  # what train writes
    make_run(run, fake_cache, text=True, whitening=meta)
    report = E.run(E.EvalConfig(run=run, device="cpu", progress=False))
    assert report["space"] == "teacher (mapped back from whitened joint: image, text)"
    assert report["whitening"] == "joint"
    space = E.student_space(run, json.loads((run / "student.json").read_text()), open_cache(fake_cache), True)
    assert space.image is not None and space.text is not None
    assert space.image.scale == pytest.approx(meta["modalities"]["image"]["scale"])


# --------------------------------------------------------------------------- a run end to end


def test_eval_run_writes_eval_json(fake_cache, tmp_path):
    run = make_run(tmp_path / "run", fake_cache)
    report = E.run(E.EvalConfig(run=run, device="cpu", batch_size=8, progress=False))
    saved = json.loads((run / "eval.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["kind"] == "student" and saved["split"] == "val" and saved["space"] == "teacher"
    assert saved["model"] == {"image": "tiny", "text": None, "captions": "teacher (cached)",
                              "teacher": "fake-vit (weights ffffffffffff)"}
    assert saved["teacher"]["name"] == "fake-vit"
    assert saved["dataset"]["images"] == 30 and saved["dataset"]["captions"] == 90
    # the teacher column is the teacher's own eval, computed from the cache alone
    t_report = E.run(E.EvalConfig(teacher=fake_cache, out=tmp_path / "t.json", progress=False))
    for name, row in saved["metrics"].items():
        assert row["teacher"] == t_report["metrics"][name]["teacher"], name
        assert 0.0 <= row["student"] <= 1.0 or name == "agreement/cosine" or name.startswith("geometry/")
        if row["teacher"]:
            assert row["ratio"] == pytest.approx(row["student"] / row["teacher"])
    assert (tmp_path / "t.json").is_file()
    assert json.loads((tmp_path / "t.json").read_text())["kind"] == "teacher"


def test_text_student_encodes_captions_and_prompts(fake_cache, tmp_path):
    run = make_run(tmp_path / "run", fake_cache, text=True)
    report = E.run(E.EvalConfig(run=run, device="cpu", progress=False))
    assert report["model"]["captions"] == "student text tower"
    assert report["zeroshot"]["shapes"]["class_embeddings"] == "student text tower"
    image_only = E.run(E.EvalConfig(run=make_run(tmp_path / "run2", fake_cache), device="cpu", progress=False))
    # same image weights (same seed): same agreement cosine, different retrieval (other texts)
    assert report["metrics"]["agreement/cosine"]["student"] == pytest.approx(
        image_only["metrics"]["agreement/cosine"]["student"], abs=1e-5)


def _spy_teacher(store: dict):
    def spy(*args, **kwargs):
        store["teacher"] = teachers.load_teacher(*args, **kwargs)
        return store["teacher"]
    return spy


class TeacherImageTower(nn.Module):
    """The teacher's image tower dressed as a student."""

    def __init__(self, teacher: teachers.Teacher) -> None:
        super().__init__()
        self.model = teacher.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)


def test_view0_replay_reproduces_the_cached_teacher_embeddings(shapes_root, tmp_path):
    """Feeding the teacher's own image tower through the student's image path gives back the
    cached view-0 embeddings: same crop, size, interpolation, normalisation and key order."""
    seen: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(extract, "load_teacher", _spy_teacher(seen))
        mp.setattr(extract, "write_prompt_sets", lambda *a, **k: None)  # 2k prompts: not needed here
        extract.run(extract.ExtractConfig(teacher="tiny-clip", data=str(shapes_root), out=str(tmp_path / "c"),
                                          views=2, batch_size=8, workers=0, device="cpu", shard_size=5,
                                          splits=["val"], progress=False))
    teacher = seen["teacher"]
    cache = open_cache(tmp_path / "c")
    held = cache.load_split("val")
    pre = teacher.preprocess
    prep = zeroshot.ImagePrep(pre.size, pre.interpolation, pre.mean, pre.std)
    cfg = E.EvalConfig(run="unused", batch_size=4, workers=2, progress=False)  # 2 workers: out-of-order batches
    img, txt = E.student_split_embeddings(TeacherImageTower(teacher).eval(), None, cache, "val", held, prep,
                                          E.Space(), cfg, torch.device("cpu"))
    cached = torch.from_numpy(held.img[:, 0].astype(np.float32))
    assert txt is None and img.shape == cached.shape
    assert (img - cached).abs().max() < 2e-3  # fp16 storage
    other = (img[:, None] - cached[None]).abs().amax(dim=2) + torch.eye(len(img)) * 10  # any other row
    assert other.min() > 10 * (img - cached).abs().max()  # rows really differ: the order was checked


def _tar_samples(cache, split: str) -> dict[str, dict]:
    """The raw members of every sample of the split's tar shards, by key."""
    import webdataset as wds

    return {s["__key__"]: s for path in cache.shard_paths(split, "tar")
            for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)}


def test_eval_split_decodes_the_training_streams_view0_pixels(fake_cache):
    """Eval and training read the shards through one reader (kdpipe.cachereader): for every sample,
    eval's pixels equal the training stream's view 0 normalised as the trainer does it, and the
    stored JPEG's view 0 replayed by hand (what eval computed before it used that reader)."""
    cache = open_cache(fake_cache)
    size, interpolation = 24, "bilinear"  # not the stored 32 px: a real resize
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    evaluated = {key: (px, caps) for keys, pixels, captions in
                 E.split_batches(cache, "val", zeroshot.ImagePrep(size, interpolation, mean, std), 7, 0, captions=True)
                 for key, px, caps in zip(keys, pixels, captions)}
    stream = cachereader.stream_config(cache.shard_paths("val", "tar"), batch_size=5, image_size=size,
                                       interpolation=interpolation, seed=1, views_used="0")
    trained = {key: px for batch in cachereader.epoch_batches(stream, 30 // 5)  # one epoch: every sample once
               for key, px in zip(batch["keys"], cachereader.normalize_images(batch["image"], mean, std))}
    assert sorted(evaluated) == sorted(trained) == sorted(cache.load_split("val").keys)
    for key, sample in _tar_samples(cache, "val").items():
        view0 = V.View.from_dict(json.loads(sample["views.json"])[0])
        by_hand = V.to_tensor(V.apply_view(V.decode_image(sample["jpg"]), view0, size, interpolation), mean, std)
        assert torch.equal(evaluated[key][0], trained[key])
        assert torch.equal(evaluated[key][0], by_hand)
        assert evaluated[key][1] == json.loads(sample["captions.json"])


def test_a_corrupt_image_in_the_split_is_skipped_then_named_as_missing(tmp_path, caplog):
    """A stored JPEG that does not decode is counted and logged by the reader's error handler (as in
    training), and eval stops on the key it lacks with a CacheError, not on the decoder's exception."""
    import webdataset as wds

    cache = open_cache(make_fake_cache(tmp_path / "c", n_train=8, n_val=6, dim=DIM, image_size=SIZE))
    (shard,) = cache.shard_paths("val", "tar")
    samples = list(_tar_samples(cache, "val").values())
    with wds.TarWriter(str(shard)) as sink:
        for i, sample in enumerate(samples):
            sink.write({k: (b"not a jpeg" if i == 2 and k == "jpg" else v) for k, v in sample.items()
                        if k == "__key__" or not k.startswith("__")})
    held = cache.load_split("val", fields=("img", "txt"))
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, DIM))
    cfg = E.EvalConfig(run="unused", batch_size=4, workers=0, progress=False)
    with caplog.at_level("WARNING", logger="kdpipe"), pytest.raises(CacheError, match="1 of 6 images"):
        E.student_split_embeddings(student, None, cache, "val", held, E.image_prep(
            RunSpec.from_json({"image_size": SIZE, "mean": [0.5] * 3, "std": [0.25] * 3}), cache.teacher), E.Space(), cfg,
            torch.device("cpu"))
    assert "skipped a bad cache sample (BadImage" in caplog.text


# --------------------------------------------------------------------------- zero-shot datasets


def write_folder(root: Path, classes: list[str], per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_folder_zeroshot(fake_cache, tmp_path):
    run = make_run(tmp_path / "run", fake_cache)
    known = write_folder(tmp_path / "known", ["circle", "cross", "square", "triangle"])  # the cache's set
    report = E.run(E.EvalConfig(run=run, zeroshot=[f"folder:{known}"], device="cpu", progress=False))
    row = report["metrics"]["zeroshot/folder:known/top1"]
    assert 0.0 <= row["student"] <= 1.0 and row["teacher"] is None and row["ratio"] is None
    assert report["zeroshot"]["folder:known"] == {"images": 12, "classes": 4, "class_names": "folder names",
                                                  "class_embeddings": "teacher prompts.h5 [shapes]"}
    unknown = write_folder(tmp_path / "pets", ["cat", "dog"])
    with pytest.raises(ValueError, match="no text tower"):
        E.run(E.EvalConfig(run=run, zeroshot=[f"folder:{unknown}"], device="cpu", progress=False))
    text_run = make_run(tmp_path / "trun", fake_cache, text=True)
    report = E.run(E.EvalConfig(run=text_run, zeroshot=[f"folder:{unknown}"], device="cpu", progress=False))
    assert report["zeroshot"]["folder:pets"]["class_embeddings"] == "student text tower"


def test_labels_used_in_training_make_accuracy_on_those_classes_supervised(fake_cache, tmp_path):
    """A run from before student.json recorded ``labels_used``: decided from its losses (hinton, α 0.5);
    a folder of the same classes is supervised too. What student.json records wins."""
    hinton = {"weights": {"hinton": 1.0}, "options": {}}
    run = make_run(tmp_path / "legacy", fake_cache, losses=hinton)
    known = write_folder(tmp_path / "known", ["circle", "cross", "square", "triangle"])  # the cache's set
    report = E.run(E.EvalConfig(run=run, zeroshot=[f"folder:{known}"], device="cpu", progress=False))
    rows = report["metrics"]
    assert not [k for k in rows if k.startswith("zeroshot/")]
    for name in ("shapes", "folder:known"):
        assert rows[f"supervised/{name}/top1"]["teacher"] is None and rows[f"supervised/{name}/top1"]["ratio"] is None
        assert report["zeroshot"][name]["supervised"] is True
    assert report["labels_used"] == {"losses": ["hinton"], "classnames": list(open_cache(fake_cache).classnames)}
    assert "agreement/shapes/top1" in rows  # prediction agreement with the teacher is not accuracy: kept

    recorded = make_run(tmp_path / "recorded", fake_cache, losses=hinton, labels_used=None)
    rows = E.run(E.EvalConfig(run=recorded, device="cpu", progress=False))["metrics"]
    assert "zeroshot/shapes/top1" in rows and not [k for k in rows if k.startswith("supervised/")]
    soft_hinton = {"weights": {"hinton": 1.0}, "options": {"hinton": {"alpha": 1}}}
    soft = make_run(tmp_path / "soft", fake_cache, losses=soft_hinton)
    assert "zeroshot/shapes/top1" in E.run(E.EvalConfig(run=soft, device="cpu", progress=False))["metrics"]


def test_cifar_absent_is_a_clear_error(fake_cache, tmp_path):
    run = make_run(tmp_path / "run", fake_cache)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        E.run(E.EvalConfig(run=run, zeroshot=[f"cifar10:{tmp_path}"], device="cpu", progress=False))
    with pytest.raises(KeyError, match="valid: cifar10, cifar100, folder, imagenet"):
        E.run(E.EvalConfig(run=run, zeroshot=["mnist:/x"], device="cpu", progress=False))


def test_cifar_uses_the_cached_teacher_prompts(fake_cache, tmp_path, monkeypatch):
    import torchvision

    class FakeCIFAR10:
        classes = list(prompts.CIFAR10_CLASSNAMES)

        def __init__(self, root, train, download):
            assert train is False and download is False
            self.items = [(Image.new("RGB", (32, 32), (25 * i, 0, 0)), i) for i in range(10)]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    cache = make_fake_cache(tmp_path / "cache", n_train=20, n_val=10, dim=DIM, image_size=SIZE)
    sets = prompts.read_prompts(cache / "prompts.h5")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((10, 2, DIM)).astype(np.float16)
    sets["cifar10"] = prompts.PromptSet(list(prompts.CIFAR10_CLASSNAMES), ["a photo of a {}.", "a {}."], emb)
    prompts.write_prompts(cache / "prompts.h5", sets)
    report = E.run(E.EvalConfig(run=make_run(tmp_path / "run", cache), zeroshot=["cifar10:/nowhere"],
                                device="cpu", progress=False))
    assert report["zeroshot"]["cifar10"] == {"images": 10, "classes": 10,
                                             "class_embeddings": "teacher prompts.h5 [cifar10]"}
    assert report["metrics"]["zeroshot/cifar10/top5"]["student"] >= report["metrics"]["zeroshot/cifar10/top1"]["student"]


IMAGENET_ROWS = {"n01440764": 0, "n02123045": 281, "n04356056": 837}  # tench, tabby cat, sunglasses


def imagenet_cache(path: Path) -> Path:
    """A fake cache whose prompts.h5 also holds an "imagenet" set (open_clip's 1000 names, random prompts)."""
    cache = make_fake_cache(path, n_train=20, n_val=10, dim=DIM, image_size=SIZE)
    sets = prompts.read_prompts(cache / "prompts.h5")
    classnames, _ = prompts.PROMPT_SETS.get("imagenet")()
    emb = np.random.default_rng(1).standard_normal((1000, 2, DIM)).astype(np.float16)
    sets["imagenet"] = prompts.PromptSet(classnames, ["a photo of a {}.", "a {}."], emb)
    prompts.write_prompts(cache / "prompts.h5", sets)
    return cache


def student_accuracy(run: Path, spec: str, rows: list[int], emb: np.ndarray) -> dict[str, float]:
    """The run's student on a zero-shot dataset against ``rows`` of a prompt set, computed here."""
    from kdpipe.students import load_student
    from kdpipe.targetspace import Space

    image, _, loaded = load_student(run, torch.device("cpu"))
    prep = E.image_prep(RunSpec.from_json(loaded), loaded["teacher"])
    img, labels = zeroshot.embed_labelled(image, zeroshot.open_zeroshot(spec), prep, Space(), torch.device("cpu"),
                                          batch_size=4, progress=False)
    return metrics.zero_shot_accuracy(img, metrics.zero_shot_classifier(torch.from_numpy(emb[rows]).float()), labels)


def test_cli_eval_imagenet_zeroshot(tmp_path):
    """`kdpipe eval --zeroshot imagenet:VAL` on a 3-class val folder: scored 3-way over rows 0, 281 and 837
    of the cache's imagenet set; with :classes=all, 1000-way over every row."""
    cache = imagenet_cache(tmp_path / "cache")
    run = make_run(tmp_path / "run", cache)
    val = write_folder(tmp_path / "val", list(IMAGENET_ROWS), per_class=2)
    result = CliRunner().invoke(app, ["eval", str(run), "-z", f"imagenet:{val}", "-z", f"imagenet:{val}:classes=all",
                                      "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "eval.json").read_text())
    emb = prompts.read_prompts(cache / "prompts.h5")["imagenet"].emb
    for name, spec, rows in (("imagenet3", f"imagenet:{val}", list(IMAGENET_ROWS.values())),
                             ("imagenet3-1000way", f"imagenet:{val}:classes=all", list(range(1000)))):
        want = student_accuracy(run, spec, rows, emb)
        for k in ("top1", "top5"):
            assert saved["metrics"][f"zeroshot/{name}/{k}"] == {"student": want[k], "teacher": None, "ratio": None}
        assert saved["zeroshot"][name]["class_embeddings"] == "teacher prompts.h5 [imagenet]"
        assert saved["zeroshot"][name]["images"] == 6 and saved["zeroshot"][name]["imagenet_classes_present"] == 3
    assert saved["zeroshot"]["imagenet3"]["classes"] == 3 and saved["zeroshot"]["imagenet3-1000way"]["classes"] == 1000
    assert any("3 of the 1000 ImageNet-1k classes" in note for note in saved["notes"])
    assert "zeroshot/imagenet3/top1" in flat(result.output)  # in the printed table


def test_eval_imagenet_without_a_cached_set(fake_cache, tmp_path):
    """An image-only student needs the teacher's ImageNet prompts (the error says how to add them); a
    student with a text tower encodes open_clip's names and templates itself."""
    val = write_folder(tmp_path / "val", list(IMAGENET_ROWS), per_class=2)
    result = CliRunner().invoke(app, ["eval", str(make_run(tmp_path / "run", fake_cache)), "-z", f"imagenet:{val}",
                                      "--device", "cpu", "--no-progress"])
    assert result.exit_code == 2
    assert "no set there has the imagenet classes" in flat(result.output)
    assert "re-run `kdpipe extract` on this cache with --prompt-set imagenet" in flat(result.output)
    report = E.run(E.EvalConfig(run=make_run(tmp_path / "trun", fake_cache, text=True), zeroshot=[f"imagenet:{val}"],
                                device="cpu", progress=False))
    assert report["zeroshot"]["imagenet3"]["class_embeddings"] == "student text tower"
    assert 0.0 <= report["metrics"]["zeroshot/imagenet3/top1"]["student"] <= 1.0


def test_eval_names_a_bad_imagenet_folder_or_option(fake_cache, tmp_path):
    run = make_run(tmp_path / "run", fake_cache)
    val = write_folder(tmp_path / "val", ["n01440764", "pets"], per_class=1)
    with pytest.raises(ValueError, match=f"imagenet folder {val / 'pets'} is not an ImageNet-1k class"):
        E.run(E.EvalConfig(run=run, zeroshot=[f"imagenet:{val}"], device="cpu", progress=False))
    with pytest.raises(ValueError, match="imagenet has no option 'class'"):
        E.run(E.EvalConfig(run=run, zeroshot=[f"imagenet:{val}:class=all"], device="cpu", progress=False))


# --------------------------------------------------------------------------- errors and CLI


def test_teacher_eval_refuses_external_datasets(fake_cache):
    with pytest.raises(ValueError, match="no teacher forward"):
        E.run(E.EvalConfig(teacher=fake_cache, zeroshot=["cifar10:/x"], progress=False))
    with pytest.raises(ValueError, match="not both"):
        E.run(E.EvalConfig(progress=False))


def test_run_from_another_teacher_is_refused(fake_cache, tmp_path):
    run = make_run(tmp_path / "run", fake_cache)
    spec = json.loads((run / "student.json").read_text())
    spec["teacher"] = {**spec["teacher"], "name": "other-vit"}
    (run / "student.json").write_text(json.dumps(spec))
    with pytest.raises(CacheError, match="other-vit"):
        E.run(E.EvalConfig(run=run, device="cpu", progress=False))


def flat(text: str) -> str:
    """CLI output with the console's line wrapping undone."""
    return " ".join(text.split())


def test_cli_help_and_bad_run(tmp_path):
    runner = CliRunner()
    for cmd in ("eval", "report"):
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output
    result = runner.invoke(app, ["eval", "--help"], terminal_width=200)
    for term in ("imagenet:PATH:", "PATH/<wnid>/<images>", ":classes=all", ":names=FILE", "PATH/classnames.txt",
                 "folder<TAB>name", "--prompt-set"):
        assert term in result.output, term
    result = runner.invoke(app, ["eval", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in flat(result.output)
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["eval", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "holds no student.json" in flat(result.output)
    result = runner.invoke(app, ["eval"])
    assert result.exit_code == 2 and "--teacher CACHE" in flat(result.output)


def test_cli_checkpoint_flag(fake_cache, tmp_path):
    run = make_run(tmp_path / "run", fake_cache)  # one set of weights: best = last
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(run), "--checkpoint", "last", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    judged = json.loads((run / "eval.json").read_text())["checkpoint"]
    assert judged == {"name": "last", "file": "student-last.safetensors"}
    result = runner.invoke(app, ["eval", str(run), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    judged = json.loads((run / "eval.json").read_text())["checkpoint"]
    assert judged["name"] == "best" and judged["same_as"] == "last"
    result = runner.invoke(app, ["eval", str(run), "--checkpoint", "final"])
    assert result.exit_code == 2 and "unknown checkpoint 'final'; valid: best, last" in flat(result.output)


def test_cli_eval_teacher(fake_cache, tmp_path):
    out = tmp_path / "teacher.json"
    result = CliRunner().invoke(app, ["eval", "--teacher", str(fake_cache), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["metrics"]["i2t_R@1"]["teacher"] > 0


def test_geometry_rows_are_the_metrics_of_the_same_embeddings():
    """eval's modality gap and effective rank are metrics.modality_gap / effective_rank of the split's rows."""
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(12, 8, generator=g), torch.randn(20, 8, generator=g) + 2.0
    rows = E.split_metrics(E.Embeddings(img, txt), torch.arange(20) % 12, torch.full((12,), -1))
    assert rows["geometry/modality_gap"] == pytest.approx(metrics.modality_gap(img, txt))
    assert rows["geometry/modality_gap"] > 0.5  # the text rows sit around (2, ..., 2): far from the images
    assert rows["geometry/effective_rank_image"] == pytest.approx(metrics.effective_rank(img))
