"""Task KD on a labelled cache (`kdpipe train --labels`): the hinton loss on a class head, the teacher's
logits derived from the cache, the head saved with the student and scored by `kdpipe eval`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from cache_factory import make_fake_cache
from kdpipe import evaluate as E
from kdpipe import losses as L
from kdpipe import metrics
from kdpipe import train as T
from kdpipe.cli.main import app
from kdpipe.prompts import CIFAR10_CLASSNAMES
from kdpipe.store import open_cache
from kdpipe.students import load_student

from test_labelled_inputs import labelled_folder, write_cifar

DIM, N_TRAIN, N_VAL, BATCH = 16, 48, 16, 8


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A labelled fake cache: 4 classes with their prompt set in prompts.h5."""
    return make_fake_cache(tmp_path_factory.mktemp("taskkd") / "cache", n_train=N_TRAIN, n_val=N_VAL, dim=DIM,
                           views=2, captions=2, shard_size=24)


def _cfg(cache: Path, out: Path, **kw) -> T.TrainConfig:
    base = dict(student="tiny", cache=str(cache), out=str(out), epochs=1, batch_size=BATCH, workers=0, log_every=1,
                bn_samples=8, val_samples=N_VAL, progress=False, lr=2e-3, warmup_steps=0, device="cpu",
                losses="hinton=1", labels=True)
    return T.TrainConfig(**{**base, **kw})


# --------------------------------------------------------------------------- the loss on given logits


def test_hinton_on_head_logits_is_alpha_t2_kl_plus_ce():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    t = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 4.0]])
    labels = torch.tensor([0, -1])  # the unknown label is left out of the CE
    batch = {"s_img": torch.randn(2, 4), "t_img": torch.randn(2, 4), "t_txt": torch.randn(2, 4),
             "s_logits": s, "t_logits": t, "labels": labels, "class_emb": torch.randn(3, 4)}  # logits win
    loss = L.build_losses({"hinton": 2.0}, 4, 100.0, hinton={"T": 4.0, "alpha": 0.25})["hinton"]
    p_t, log_p_s = F.softmax(t / 4, dim=1), F.log_softmax(s / 4, dim=1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(dim=1).mean()
    ce = -F.log_softmax(s, dim=1)[0, 0]
    torch.testing.assert_close(loss(batch)["hinton"], 2.0 * (0.25 * 16 * kl + 0.75 * ce))
    ce_only = L.build_losses({"hinton": 1.0}, 4, 100.0, hinton={"alpha": 0.0})["hinton"]
    torch.testing.assert_close(ce_only(batch)["hinton"], ce)  # alpha 0: the no-teacher baseline


# --------------------------------------------------------------------------- the teacher's logits


def test_teacher_logits_from_the_cache_equal_open_clips_zero_shot_logits(tmp_path):
    """The teacher's logits over the class prompts are not stored: τ_t · stored view-0 embedding · prompts.h5's
    ensemble classifier gives open_clip's zero-shot logits on the pixels the teacher saw (float16 storage apart)."""
    import open_clip

    from kdpipe.data import open_source
    from kdpipe.extract import ExtractConfig, prepare, run
    from kdpipe.prompts import SHAPES_TEMPLATES
    from kdpipe.teachers import load_teacher

    root = labelled_folder(tmp_path / "folder", train=2, val=1)
    cache = tmp_path / "cache"
    run(ExtractConfig(teacher="tiny-clip", data=str(root), out=str(cache), views=1, store_size=32, workers=0,
                      device="cpu", progress=False, batch_size=8))
    cache_obj = open_cache(cache)
    held = cache_obj.load_split("train", fields=("img",))
    derived = metrics.zero_shot_logits(torch.from_numpy(held.img[:, 0].astype(np.float32)),
                                       T.teacher_classifier(cache_obj), float(cache_obj.manifest["logit_scale"]))

    teacher = load_teacher("tiny-clip")
    source = open_source(str(root))
    records = {r.key: r for unit in source.units("train") for r in unit.records()}
    pixels = torch.stack([prepare(records[k], 1, 32, teacher.preprocess).pixels[0] for k in held.keys])
    model = teacher.model
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(model, teacher.tokenizer, source.classnames(),
                                                          SHAPES_TEMPLATES, device="cpu")
        want = model.logit_scale.exp() * F.normalize(model.encode_image(pixels), dim=-1) @ classifier
    assert derived.shape == (6, 3)
    assert want.std() > 1  # logits that tell the classes apart, not all near zero
    torch.testing.assert_close(derived, want, rtol=0, atol=5e-3)  # float16 storage: observed 1e-3
    assert (derived.argmax(1) == want.argmax(1)).all()


def test_the_teacher_side_is_the_raw_teacher_even_when_targets_are_whitened(cache_dir, tmp_path):
    from kdpipe.whiten import WhitenConfig
    from kdpipe.whiten import run as fit

    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    fit(WhitenConfig(cache=str(cache), check_train=False, progress=False))
    setup = T.build_setup(_cfg(cache, tmp_path / "run", whiten="joint"))
    t_img = torch.randn(BATCH, DIM)
    batch = {"image": torch.zeros(BATCH, 3, 32, 32, dtype=torch.uint8), "t_img": t_img,
             "t_txt": torch.randn(BATCH, DIM),
             "labels": torch.zeros(BATCH, dtype=torch.long), "captions": [["c"]] * BATCH}
    out = T.to_device_batch(setup, batch)
    want = 100.0 * F.normalize(t_img, dim=-1) @ T.teacher_classifier(open_cache(cache))
    torch.testing.assert_close(out["t_logits"], want)
    assert not torch.allclose(out["t_img"], t_img)  # the embedding targets are whitened, the logits are not


# --------------------------------------------------------------------------- train --labels


def test_labels_train_a_class_head_saved_with_the_student_and_scored_by_eval(cache_dir, tmp_path):
    out = tmp_path / "run"
    T.run(_cfg(cache_dir, out, max_steps=2))
    spec = json.loads((out / "student.json").read_text())
    k = len(open_cache(cache_dir).classnames)
    assert spec["image"]["class_head"] == {"classes": k}
    assert spec["labels_used"]["losses"] == ["hinton"]
    for name in ("student-last.safetensors",):
        weights = load_file(str(out / name))
        assert weights["image.head.weight"].shape == (k, DIM) and weights["image.head.bias"].shape == (k,)
    image, _, _ = load_student(out)
    assert image.head is not None and image.head.out_features == k
    val = [r for r in T.read_metrics(out / "metrics.jsonl") if r["kind"] == "val"][-1]
    assert 0 <= val["val_top1"] <= 1 and val["val_labelled"] == N_VAL
    assert val["val_score"] == pytest.approx(val["val_top1"] + 1e-3 * val["val_cos"])
    report = E.run(E.EvalConfig(run=out, device="cpu", progress=False))
    head = {k: v for k, v in report["metrics"].items() if k.startswith("head/")}
    assert set(head) == {"head/top1", "head/top5"}
    teacher = E.run(E.EvalConfig(teacher=cache_dir, device="cpu", progress=False, out=tmp_path / "t.json"))
    for key in ("top1", "top5"):  # the teacher column is its zero-shot on the same images
        assert head[f"head/{key}"]["teacher"] == pytest.approx(teacher["metrics"][f"zeroshot/shapes/{key}"]["teacher"])
        assert 0 <= head[f"head/{key}"]["student"] <= 1
    assert any(n.startswith("head/: the class head") for n in report["notes"])


def test_head_rows_are_the_heads_top_k_beside_the_teachers_zero_shot():
    logits = torch.tensor([[5.0, 1.0, 0.0], [0.0, 1.0, 2.0], [3.0, 2.0, 1.0], [0.0, 0.0, 9.0]])
    labels = torch.tensor([0, 1, 1, -1])  # top-1 hits: row 0 only; top-2 would hit row 2 too; row 3 unlabelled
    teacher_img = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    classifier = torch.eye(3)  # teacher: rows 0 and 1 right, row 2 wrong
    rows = E.head_rows(logits, teacher_img, classifier, labels)
    assert rows["head/top1"] == {"student": pytest.approx(1 / 3), "teacher": pytest.approx(2 / 3),
                                 "ratio": pytest.approx(0.5)}
    assert rows["head/top5"]["student"] == 1.0 and rows["head/top5"]["teacher"] == 1.0  # 3 classes < 5
    assert E.head_rows(logits, teacher_img, None, labels)["head/top1"]["teacher"] is None


def test_labels_are_refused_without_classes_prompts_or_hinton(cache_dir, tmp_path):
    with pytest.raises(ValueError, match="--labels trains a class head with the hinton loss; --losses 'fd=1' has no"):
        T.build_setup(_cfg(cache_dir, tmp_path / "a", losses="fd=1"))
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(cache_dir, unlabelled)
    for shard in (unlabelled / "train").glob("*.h5"):  # same size: the cache still verifies
        with h5py.File(shard, "r+") as f:
            f["labels"][...] = -1
    with pytest.raises(ValueError, match=r"--labels: no train image of the cache .* has a label"):
        T.build_setup(_cfg(unlabelled, tmp_path / "d"))
    no_prompts = tmp_path / "no-prompts"
    shutil.copytree(cache_dir, no_prompts)
    (no_prompts / "prompts.h5").unlink()
    with pytest.raises(ValueError, match=r"--labels: .*prompts.h5 has no prompt set of the cache's 4 classes"):
        T.build_setup(_cfg(no_prompts, tmp_path / "b"))
    manifest = json.loads((no_prompts / "manifest.json").read_text())
    manifest["classnames"] = None
    (no_prompts / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"--labels: the cache .* has no classes \(its input had no labels\)"):
        T.build_setup(_cfg(no_prompts, tmp_path / "c", verify="none"))


LABELLED_INPUTS = {  # kind -> (write a fixture under a folder, its class names)
    "imagefolder": (lambda tmp: labelled_folder(tmp / "folder", train=6, val=2), ["blue", "green", "red square"]),
    "cifar": (lambda tmp: write_cifar(tmp / "cifar", "cifar10", train_per_file=3, test=4), list(CIFAR10_CLASSNAMES)),
}


@pytest.mark.parametrize("kind", LABELLED_INPUTS)
def test_cli_extract_a_labelled_set_then_train_labels_and_eval(tmp_path, kind):
    """The CLI path of task KD on each labelled input: extract (prompts on) -> train --labels -> eval's head rows
    (CIFAR's classes are the cifar10 prompt set's: CLIP's names and templates)."""
    write, classnames = LABELLED_INPUTS[kind]
    root, cache, run = write(tmp_path), tmp_path / "cache", tmp_path / "run"

    def invoke(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    invoke("extract", "--teacher", "tiny-clip", "--data", root, "--out", cache, "--views", "2", "--store-size", "32",
           "--workers", "0", "--device", "cpu")
    invoke("train", "--student", "tiny", "--cache", cache, "--out", run, "--labels", "--losses", "hinton=1",
           "--max-steps", "2", "--batch-size", "6", "--workers", "0", "--device", "cpu", "--no-progress",
           "--bn-samples", "4")
    output = invoke("eval", run, "--device", "cpu", "--no-progress")
    report = json.loads((run / "eval.json").read_text())
    assert "head/top1" in output and report["dataset"]["classnames"] == classnames
    assert all(math.isfinite(report["metrics"][f"head/{k}"]["teacher"]) for k in ("top1", "top5"))


# --------------------------------------------------------------------------- --labels with an added teacher or an ensemble

PRIMARY = "tiny-clip"  # conftest's two_teacher_cache: the primary (D 32) and "b" (D 24, 48 px), each with its prompts


def _ens_cfg(cache: Path, out: Path, **kw) -> T.TrainConfig:
    return _cfg(cache, out, batch_size=4, val_samples=6, shuffle_buffer=8, **kw)


def _hand_logits(cache, teacher: str, batch: dict) -> torch.Tensor:
    """τ_k · teacher's stored (key, view) rows, normalised, · its prompt-ensemble classifier (by hand, float64)."""
    from test_ensemble import _classifiers, _stored_rows

    img, _ = _stored_rows(cache, teacher, batch["keys"], batch["view"], batch["caption_idx"])
    img = img.double() / img.double().norm(dim=1, keepdim=True)
    tau = cache.teacher_entry(teacher)["logit_scale"]
    return tau * img @ torch.from_numpy(_classifiers(cache, teacher)["shapes"])


def test_labels_with_an_added_teacher_alone_use_its_classifier_and_rows(two_teacher_cache, tmp_path):
    """--teachers b --labels: the batch's teacher logits are τ_b · b's stored rows · b's classifier (was refused)."""
    from kdpipe import cachereader

    cache = open_cache(two_teacher_cache)
    setup = T.build_setup(_ens_cfg(two_teacher_cache, tmp_path / "b", teachers=["b"]))
    assert setup.image.head.out_features == len(cache.classnames) and setup.image.head.in_features == 24
    batch = next(iter(cachereader.epoch_batches(setup.stream, 1)))
    out = T.to_device_batch(setup, batch)
    want = _hand_logits(cache, "b", batch)
    assert want.std() > 0.1  # logits that differ between classes and images
    torch.testing.assert_close(out["t_logits"].double(), want, rtol=0, atol=1e-4)
    assert "teachers" not in out  # one teacher: the single-teacher batch


def test_labels_with_an_ensemble_average_the_teachers_probabilities(two_teacher_cache, tmp_path):
    """--teachers A,B --teacher-weights 1,3 --labels: hinton = α·T²·KL(Σ_k w_k softmax(z_k/T) ‖ softmax(z_s/T))
    + (1 − α)·CE(z_s, y), z_k = τ_k · k's stored rows · k's classifier, z_s the class head's logits."""
    from kdpipe import cachereader

    cache = open_cache(two_teacher_cache)
    setup = T.build_setup(_ens_cfg(two_teacher_cache, tmp_path / "e", teachers=[PRIMARY, "b"],
                                   teacher_weights=[1.0, 3.0], loss_options={"hinton": {"alpha": 0.25}}))
    batch = next(iter(cachereader.epoch_batches(setup.stream, 1)))
    inputs = T.to_device_batch(setup, batch)
    hand = {name: _hand_logits(cache, name, batch) for name in (PRIMARY, "b")}
    for view, name in zip(inputs["teachers"], (PRIMARY, "b")):
        torch.testing.assert_close(view["t_logits"].double(), hand[name], rtol=0, atol=1e-4)
    torch.testing.assert_close(inputs["t_logits"], inputs["teachers"][0]["t_logits"])
    assert (batch["labels"] >= 0).any()  # the CE part is there
    setup.distiller.eval()  # the same student output twice (BN on running statistics)
    with torch.no_grad():
        got = setup.distiller(inputs)["hinton"]
        z_s = setup.image.classify(setup.image(inputs["image"])).double()
    p = 0.25 * F.softmax(hand[PRIMARY] / 4, dim=1) + 0.75 * F.softmax(hand["b"] / 4, dim=1)
    kl = (p * (p.log() - F.log_softmax(z_s / 4, dim=1))).sum(dim=1).mean()
    ce = F.cross_entropy(z_s, batch["labels"], ignore_index=-1)
    assert float(got) == pytest.approx(float(0.25 * 16 * kl + 0.75 * ce), rel=1e-4)
    single = 0.25 * 16 * (F.softmax(hand["b"] / 4, 1) * (F.log_softmax(hand["b"] / 4, 1)
                                                         - F.log_softmax(z_s / 4, 1))).sum(1).mean() + 0.75 * ce
    assert float(got) != pytest.approx(float(single), rel=1e-3)  # the average, not b's alone


def test_labels_refuse_a_teacher_without_the_class_prompts(two_teacher_cache, tmp_path):
    """A teacher added with --no-prompts: refused by name, saying how to add its prompts."""
    import json as _json

    root = tmp_path / "c"
    shutil.copytree(two_teacher_cache, root)
    manifest = _json.loads((root / "manifest.json").read_text())
    manifest["teachers"]["b"].pop("files")  # as an add with --no-prompts leaves it
    (root / "manifest.json").write_text(_json.dumps(manifest))
    (root / "teachers" / "b" / "prompts.h5").unlink()
    for names in (["b"], [PRIMARY, "b"]):
        with pytest.raises(ValueError, match=r"--labels: .*teachers/b/prompts.h5 has no prompt set of the cache's 8 "
                                             r"classes .* re-run `kdpipe extract --add-teacher` of teacher 'b' "
                                             r"without --no-prompts"):
            T.build_setup(_ens_cfg(root, tmp_path / "r", teachers=names))
    assert not (tmp_path / "r").exists()


def test_cli_train_an_ensemble_with_labels_then_eval(two_teacher_cache, tmp_path):
    run = tmp_path / "run"

    def invoke(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    invoke("train", "--student", "tiny", "--cache", two_teacher_cache, "--out", run, "--labels", "--losses", "hinton=1",
           "--teachers", f"{PRIMARY},b", "--teacher-weights", "1,3", "--max-steps", "2", "--batch-size", "4",
           "--workers", "0", "--device", "cpu", "--no-progress", "--bn-samples", "4", "--val-samples", "6")
    spec = json.loads((run / "student.json").read_text())
    assert [(t["name"], t["weight"]) for t in spec["teachers"]] == [(PRIMARY, 0.25), ("b", 0.75)]  # whom the head learnt
    assert spec["image"]["class_head"] == {"classes": 8} and spec["labels_used"]["losses"] == ["hinton"]
    val = [r for r in T.read_metrics(run / "metrics.jsonl") if r["kind"] == "val"][-1]
    assert 0 <= val["val_top1"] <= 1 and val["val_labelled"] == 6
    assert {f"val_teachers/{n}/i2t_R@1" for n in (PRIMARY, "b", "ensemble")} <= set(val)
    output = invoke("eval", run, "--device", "cpu", "--no-progress")
    report = json.loads((run / "eval.json").read_text())
    assert "head/top1" in output
    assert 0 <= report["metrics"]["head/top1"]["student"] <= 1
    assert math.isfinite(report["metrics"]["head/top1"]["teacher"])
    assert any(n.startswith("head/ of a run of several teachers") for n in report["notes"])  # whose column it is
