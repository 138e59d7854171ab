"""Training on a cache of several teachers: the reader's join of an added teacher's targets,
`train --teachers A,B --teacher-weights`, and what a run records of its teachers.

The caches are conftest.py's: ``one_teacher_cache`` (tiny-clip, D = 32) and ``two_teacher_cache`` (the
same with teacher "b", D = 24, 48 px, added).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe import cachereader, ensemble, store, zeroshot
from kdpipe import train as T
from kdpipe.errors import BadValue, MissingInput, UnknownName
from kdpipe.evaluate import EvalConfig
from kdpipe.evaluate import run as run_eval

PRIMARY = "tiny-clip"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread


def _cfg(cache: Path, out: Path, **kw) -> T.TrainConfig:
    base = dict(student="tiny", cache=str(cache), out=str(out), epochs=1, batch_size=4, workers=0, log_every=1,
                bn_samples=8, val_samples=6, progress=False, lr=2e-3, warmup_steps=1, device="cpu",
                losses="clip=1,fd=7.8,crd=1,icl=1", shuffle_buffer=8)
    return T.TrainConfig(**{**base, **kw})


def _stored_rows(cache: store.Cache, teacher: str, keys: list[str], views: torch.Tensor,
                 captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's stored train embeddings of (key, view) and (key, caption), float32 [B, D] each."""
    split = cache.load_split("train", fields=("img", "txt"), teacher=teacher)
    rows = np.array([split.keys.index(k) for k in keys])
    img = split.img[rows, views.numpy()]
    txt = split.txt[split.txt_offsets[rows] + captions.numpy()]
    return torch.from_numpy(img.astype(np.float32)), torch.from_numpy(txt.astype(np.float32))


# --------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("workers", [0, 2])
def test_reader_joins_an_added_teachers_rows_by_key(two_teacher_cache, workers):
    """Each sample's b targets are b's stored rows of its key, at the view and caption the primary's were drawn."""
    cache = store.open_cache(two_teacher_cache)
    b = T.teacher_streams(cache, ensemble.select_teachers(cache, [PRIMARY, "b"], None), "train")
    cfg = cachereader.stream_config(cache.shard_paths("train", "tar"), batch_size=4, image_size=32,
                                    interpolation="bicubic", seed=5, workers=workers, teachers=b, shuffle_buffer=8)
    batches = list(cachereader.epoch_batches(cfg, 5))
    assert [t.name for t in b] == ["b"] and len(batches) == 5
    for batch in batches:
        assert batch["teachers"]["b"]["t_img"].shape == (4, 24)
        for name, got in ((PRIMARY, batch), ("b", batch["teachers"]["b"])):
            img, txt = _stored_rows(cache, name, batch["keys"], batch["view"], batch["caption_idx"])
            assert torch.equal(got["t_img"], img) and torch.equal(got["t_txt"], txt)
    assert len({int(v) for batch in batches for v in batch["view"]}) > 1  # the drawn views differ: a real check


def test_reader_without_added_teachers_has_no_teachers_key(two_teacher_cache):
    cache = store.open_cache(two_teacher_cache)
    cfg = cachereader.stream_config(cache.shard_paths("train", "tar"), batch_size=4, image_size=32,
                                    interpolation="bicubic")
    assert "teachers" not in next(iter(cachereader.epoch_batches(cfg, 1)))


# --------------------------------------------------------------------------- choosing teachers


def test_teacher_selection_and_its_refusals(two_teacher_cache, tmp_path):
    cache = store.open_cache(two_teacher_cache)
    default = ensemble.select_teachers(cache, None, None)
    assert [(t.name, t.weight, t.embed_dim, t.primary) for t in default] == [(PRIMARY, 1.0, 32, True)]
    pair = ensemble.select_teachers(cache, ["b", PRIMARY], [3, 1])
    assert [(t.name, t.weight, t.embed_dim) for t in pair] == [("b", 0.75, 24), (PRIMARY, 0.25, 32)]
    with pytest.raises(UnknownName, match=f"no such teacher; it has {PRIMARY}, b"):
        ensemble.select_teachers(cache, ["c"], None)
    with pytest.raises(BadValue, match="2 weight.s. for 1 teacher"):
        ensemble.select_teachers(cache, ["b"], [1, 1])
    with pytest.raises(BadValue, match="positive"):
        ensemble.select_teachers(cache, ["b", PRIMARY], [1, 0])
    with pytest.raises(BadValue, match="twice"):
        ensemble.select_teachers(cache, ["b", "b"], None)
    with pytest.raises(BadValue, match="--whiten image cannot be used with an ensemble .*--teachers b,tiny-clip.*"
                                       "spaces differ"):
        T.build_setup(_cfg(two_teacher_cache, tmp_path / "w", teachers=["b", PRIMARY], whiten="image"))
    with pytest.raises(MissingInput, match="teachers/b/whitening.h5; run `kdpipe fit-whitening .* --teacher b"):
        T.build_setup(_cfg(two_teacher_cache, tmp_path / "w", teachers=["b"], whiten="image"))


def test_a_teacher_whose_add_has_not_covered_val_is_refused_before_training(two_teacher_cache, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(two_teacher_cache, cache)
    manifest = json.loads((cache / store.MANIFEST).read_text())
    del manifest["teachers"]["b"]["splits"]["val"]  # an add stopped after the train split
    (cache / store.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(store.CacheError, match="teacher 'b' .* lacks 1 of 1 shards of split 'val'"):
        T.build_setup(_cfg(cache, tmp_path / "r", teachers=[PRIMARY, "b"]))
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- training


def _trained_state(cache: Path, out: Path, steps: int, **kw) -> dict[str, torch.Tensor]:
    T.run(_cfg(cache, out, max_steps=steps, **kw))
    return torch.load(out / "checkpoints" / "latest.pt", weights_only=False)["model"]


def test_the_first_teacher_on_a_multi_teacher_cache_trains_as_on_its_single_teacher_cache(
        one_teacher_cache, two_teacher_cache, tmp_path):
    """Same weights after 3 steps, bit for bit (default teacher selection, and naming it)."""
    ref = _trained_state(one_teacher_cache, tmp_path / "one", 3)
    for name, kw in (("two", {}), ("named", {"teachers": [PRIMARY], "teacher_weights": [2.0]})):
        got = _trained_state(two_teacher_cache, tmp_path / name, 3, **kw)
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref), name


def test_an_added_teacher_alone_is_the_target(two_teacher_cache, tmp_path):
    """--teachers b: the student lives in b's space (D 24, 48 px) and its targets are b's stored rows."""
    cache = store.open_cache(two_teacher_cache)
    setup = T.build_setup(_cfg(two_teacher_cache, tmp_path / "b", teachers=["b"]))
    assert setup.image.image_size == 48 and setup.distiller.heads is None
    batch = next(iter(cachereader.epoch_batches(setup.stream, 1)))
    inputs = T.to_device_batch(setup, batch)
    img, txt = _stored_rows(cache, "b", batch["keys"], batch["view"], batch["caption_idx"])
    assert torch.equal(inputs["t_img"], img) and torch.equal(inputs["t_txt"], txt)
    assert setup.image(inputs["image"]).shape == (4, 24)

    result = T.run(_cfg(two_teacher_cache, tmp_path / "run", teachers=["b"], max_steps=2, epochs=1))
    spec = json.loads((Path(result["run"]) / "student.json").read_text())
    assert spec["teacher"] == cache.teacher_entry("b")["fingerprint"]
    assert [(t["name"], t["weight"]) for t in spec["teachers"]] == [("b", 1.0)]
    assert result["val"] is not None and 0 <= result["val"]["val_cos"] <= 1

    # eval finds b in the cache (it refused a run whose teacher is not the primary) and compares with b's rows
    report = run_eval(EvalConfig(run=result["run"], split="val", device="cpu", progress=False))
    assert report["teacher"] == spec["teacher"] and report["model"]["teacher"].startswith("b")
    held = cache.load_split("val", fields=("img", "txt"), teacher="b")
    teacher = T.metrics.retrieval_recall(torch.from_numpy(held.img[:, 0].astype(np.float32)),
                                         torch.from_numpy(held.txt.astype(np.float32)),
                                         torch.from_numpy(held.txt_to_img), ks=(1,))
    assert {k: report["metrics"][k]["teacher"] for k in teacher} == teacher
    # zero-shot on the cache's classes with b's own prompts (it was skipped with a note)
    b_cls = _classifiers(cache, "b")
    assert report["metrics"]["zeroshot/shapes/top1"]["teacher"] == pytest.approx(
        _top1(held.img[:, 0], b_cls["shapes"], held.labels))
    assert report["zeroshot"]["shapes"]["class_embeddings"] == "teacher prompts.h5"


def test_two_teacher_ensemble_end_to_end(two_teacher_cache, tmp_path):
    """A weighted ensemble trains (finite, every part gets gradients), records its teachers, and eval reports it."""
    # hinton over the class prompts, KD part only (alpha 1: no label used, so eval's rows stay zero-shot)
    cfg = _cfg(two_teacher_cache, tmp_path / "ens", teachers=[PRIMARY, "b"], teacher_weights=[1.0, 3.0],
               losses="clip=1,fd=7.8,mfd=1,crd=1,icl=1,gd=1,afd=1,hinton=1", max_steps=3,
               loss_options={"hinton": {"alpha": 1.0}})
    setup = T.build_setup(cfg)
    assert [tuple(h.weight.shape) for h in setup.distiller.heads] == [(24, 32)]  # D_0 = 32 -> D_b = 24
    batch = T.to_device_batch(setup, next(iter(cachereader.epoch_batches(setup.stream, 1))))
    terms = setup.distiller(batch)
    T.losses.total_loss(terms).backward()
    assert all(math.isfinite(float(v.detach())) for v in terms.values())
    no_grad = [n for n, p in setup.distiller.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []

    result = T.run(replace(cfg, out=str(tmp_path / "run")))
    run_dir = Path(result["run"])
    spec = json.loads((run_dir / "student.json").read_text())
    assert [(t["name"], t["weight"], t["embed_dim"]) for t in spec["teachers"]] == [(PRIMARY, 0.25, 32), ("b", 0.75, 24)]
    report = run_eval(EvalConfig(run=str(run_dir), split="val", device="cpu", progress=False))
    assert report["teacher"] == spec["teacher"] == store.open_cache(two_teacher_cache).teacher  # the student's space
    assert 0 < report["metrics"]["agreement/cosine"]["student"] <= 1
    rows = report["metrics"]
    cache = store.open_cache(two_teacher_cache)
    sims = {}
    for name in (PRIMARY, "b"):  # each teacher's figure is its own retrieval on its cached embeddings
        held = cache.load_split("val", fields=("img", "txt"), teacher=name)
        img = held.img[:, 0].astype(np.float64)
        txt = held.txt.astype(np.float64)
        sims[name] = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
        assert rows[f"teachers/{name}/i2t_R@1"]["teacher"] == pytest.approx(_i2t_r1(sims[name], held.txt_to_img))
        assert rows[f"teachers/{name}/i2t_R@1"]["student"] == rows["i2t_R@1"]["student"]
        assert rows[f"teachers/{name}/agreement/i2t_top1"]["teacher"] == 1.0
        assert 0 <= rows[f"teachers/{name}/agreement/i2t_top1"]["student"] <= 1
    ensemble_sim = 0.25 * sims[PRIMARY] + 0.75 * sims["b"]  # the weighted average similarity
    assert rows["teachers/ensemble/i2t_R@1"]["teacher"] == pytest.approx(_i2t_r1(ensemble_sim, held.txt_to_img))
    assert rows["teachers/ensemble/t2i_R@1"]["teacher"] == pytest.approx(
        float(np.mean(ensemble_sim.argmax(axis=0) == held.txt_to_img)))

    # zero-shot: each teacher's column with its own prompts; the student's classifier is its own (the first's)
    class_sims = {}
    for name in (PRIMARY, "b"):
        held = cache.load_split("val", fields=("img",), teacher=name)
        img = held.img[:, 0].astype(np.float64)
        cls = _classifiers(cache, name)["shapes"]
        assert rows[f"teachers/{name}/zeroshot/shapes/top1"]["teacher"] == pytest.approx(_top1(img, cls, held.labels))
        assert rows[f"teachers/{name}/zeroshot/shapes/top1"]["student"] == rows["zeroshot/shapes/top1"]["student"]
        assert 0 <= rows[f"teachers/{name}/agreement/shapes/top1"]["student"] <= 1
        class_sims[name] = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ cls
    known = held.labels >= 0
    ensemble_pred = (0.25 * class_sims[PRIMARY] + 0.75 * class_sims["b"]).argmax(axis=1)
    assert rows["teachers/ensemble/zeroshot/shapes/top1"]["teacher"] == pytest.approx(
        float(np.mean(ensemble_pred[known] == held.labels[known])))


def _classifiers(cache: store.Cache, teacher: str) -> dict[str, np.ndarray]:
    """A teacher's prompt-ensemble classifiers from its own prompts.h5, by hand: {set: [D, K]} (float64)."""
    out = {}
    for name, ps in zeroshot.read_prompt_sets(cache, teacher).items():
        emb = ps.emb.astype(np.float64)  # [K, T, D]
        mean = (emb / np.linalg.norm(emb, axis=-1, keepdims=True)).mean(axis=1)
        out[name] = (mean / np.linalg.norm(mean, axis=1, keepdims=True)).T
    return out


def _top1(img: np.ndarray, classifier: np.ndarray, labels: np.ndarray) -> float:
    """Zero-shot top-1 on the labelled images: img [N, D], classifier [D, K] (argmax of the cosine)."""
    known = labels >= 0
    return float(np.mean((img[known].astype(np.float64) @ classifier).argmax(axis=1) == labels[known]))


def _i2t_r1(sim: np.ndarray, txt_to_img: np.ndarray) -> float:
    """Share of images whose most similar caption [N, M] is one of their own."""
    return float(np.mean(txt_to_img[sim.argmax(axis=1)] == np.arange(sim.shape[0])))


def test_open_cache_finds_any_of_its_teachers(one_teacher_cache, two_teacher_cache):
    b = store.open_cache(two_teacher_cache).teacher_entry("b")["fingerprint"]
    assert store.open_cache(two_teacher_cache, expect_teacher=b).find_teacher(b) == "b"
    with pytest.raises(store.CacheError, match="was made by teacher tiny-clip .*, not b "):
        store.open_cache(one_teacher_cache, expect_teacher=b)


def test_cli_train_refuses_an_unknown_teacher_naming_the_caches(two_teacher_cache, tmp_path):
    from typer.testing import CliRunner  # noqa: PLC0415

    from kdpipe.cli.main import app  # noqa: PLC0415

    res = CliRunner().invoke(app, ["train", "--cache", str(two_teacher_cache), "--out", str(tmp_path / "r"),
                                   "--teachers", f"{PRIMARY},zz", "--device", "cpu", "--no-progress"])
    assert res.exit_code == 2, res.output
    assert f"--teachers zz: cache {two_teacher_cache} has no such teacher; it has {PRIMARY}, b" in " ".join(res.output.split())
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- DDP


def _ensemble_grads(dist) -> dict[str, torch.Tensor]:
    """Gradients of an ensemble's losses (heads, per-teacher modules) for a fixed global batch of 8, this
    rank holding its slice (hinton over 5 class prompts: each rank has every teacher's class_emb whole)."""
    torch.manual_seed(0)
    teachers = [ensemble.Teacher("a", 0.25, 8, 50.0, {}, True), ensemble.Teacher("b", 0.75, 6, 30.0, {}, False)]
    image = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 8))
    built = T.losses.build_ensemble_losses({"fd": 7.8, "crd": 1.0, "icl": 1.0, "clip": 0.5, "afd": 1.0, "hinton": 1.0},
                                           [(8, 50.0), (6, 30.0)])
    distiller = T.Distiller(image, None, built, dist, teachers)
    g = torch.Generator().manual_seed(1)
    targets = [{"t_img": torch.randn(8, d, generator=g), "t_txt": torch.randn(8, d, generator=g),
                "class_emb": torch.randn(5, d, generator=g)} for d in (8, 6)]
    batch = {"image": torch.randn(8, 3, 4, 4, generator=g), **targets[0], "labels": torch.full((8,), -1),
             "teachers": targets}
    per = 8 // dist.world_size
    cut = lambda k, v: v if k == "class_emb" else v[dist.rank * per:(dist.rank + 1) * per]  # noqa: E731
    local = {k: [{s: cut(s, x) for s, x in t.items()} for t in v] if k == "teachers" else cut(k, v)
             for k, v in batch.items()}
    model = torch.nn.parallel.DistributedDataParallel(distiller) if dist.enabled else distiller
    T.backward_global(T.losses.total_loss(model(local)), distiller, dist.world_size)
    return {n: p.grad.clone() for n, p in distiller.named_parameters() if p.grad is not None}


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_ensemble_grads(T.runtime.DistInfo(rank, world, rank)), Path(out_dir) / f"grads{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_ensemble_gradients_equal_one_process_on_the_global_batch(tmp_path):
    """The heads project each rank's slice before the gather, so they get their gradient as the student does."""
    import torch.multiprocessing as mp  # noqa: PLC0415

    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    single = _ensemble_grads(T.runtime.DistInfo())
    assert {"heads.0.weight", "losses.icl.members.1.logit_scale.log_scale", "losses.afd.members.1.fuse_img.weight"} <= set(single)
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        assert grads.keys() == single.keys()
        for k in single:
            torch.testing.assert_close(grads[k], single[k], rtol=1e-4, atol=1e-6, msg=k)


# --------------------------------------------------------------------------- the per-teacher files in training


def test_whitening_of_an_added_teacher_alone(two_teacher_cache, tmp_path):
    """--teachers b --whiten joint: b's whitening (fit-whitening --teacher b), the temperature calibrated on
    b's rows, RUN/whitening.safetensors = b's W, and eval's map back (run copy or cache) = b's."""
    from kdpipe import targetspace
    from kdpipe.whiten import WhitenConfig, run as fit

    root = tmp_path / "c"
    shutil.copytree(two_teacher_cache, root)
    fit(WhitenConfig(cache=str(root), mode="joint", teacher="b", check_train=False, progress=False))
    cache = store.open_cache(root)
    w = targetspace.load_whitening(cache, "joint", teacher="b")
    assert w.W.shape == (24, 24) and not targetspace.whitening_path(cache).exists()  # b's only: none at the root

    result = T.run(_cfg(root, tmp_path / "run", teachers=["b"], whiten="joint", max_steps=2, losses="fd=1,crd=1"))
    run_dir = Path(result["run"])
    saved = targetspace.load_file(str(run_dir / targetspace.RUN_WHITENING))
    for side in ("image", "text"):  # joint: both sides through b's joint transform
        assert torch.allclose(saved[f"{side}.W"], torch.from_numpy(w.W).float())
        assert torch.allclose(saved[f"{side}.W_inv"], torch.from_numpy(w.W_inv).float())
    spec = json.loads((run_dir / "student.json").read_text())
    assert spec["whitening"]["source"] == str(targetspace.whitening_path(cache, "b"))
    targets = targetspace.load_targets(cache, "joint", teacher="b")
    tau_b = cache.teacher_entry("b")["logit_scale"]
    assert spec["target_logit_scale"] == pytest.approx(T.target_logit_scale(cache, targets, tau_b, 4, teacher="b"))
    assert spec["target_logit_scale"] != pytest.approx(tau_b)

    report = run_eval(EvalConfig(run=str(run_dir), split="val", device="cpu", progress=False))
    assert report["space"].startswith("teacher (mapped back from whitened joint")
    (run_dir / targetspace.RUN_WHITENING).unlink()  # no run copy: the maps are rebuilt from b's file in the cache
    space = targetspace.student_space(run_dir, spec, cache, text_tower=False)
    assert torch.allclose(space.image.w_inv, torch.from_numpy(w.W_inv).float())
    assert torch.allclose(space.image.mu, torch.from_numpy(w.mu).float())


def _hinton_by_hand(s_img: torch.Tensor, members: list[tuple[float, float, torch.Tensor, torch.Tensor]],
                    T_: float) -> torch.Tensor:
    """α = 1 hinton over class prompts: T²·KL(Σ_k w_k softmax(τ_k t_k c_kᵀ / T) ‖ softmax(τ_0 ŝ c_0ᵀ / T)).
    members: (w_k, τ_k, t_img [B, D_k], class_emb [K, D_k]), the first the student's space."""
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    p = sum(w * torch.softmax(tau * unit(t) @ unit(c).T / T_, dim=-1) for w, tau, t, c in members)
    q = torch.log_softmax(members[0][1] * unit(s_img) @ unit(members[0][3]).T / T_, dim=-1)
    return T_**2 * (p * (p.log() - q)).sum(dim=1).mean()


def _prompt_classes(cache: store.Cache, teacher: str) -> torch.Tensor:
    """[K, D] the teacher's classifier of the cache's classes (its prompts.h5), float32."""
    return torch.from_numpy(_classifiers(cache, teacher)["shapes"].T).float()


@pytest.mark.parametrize("names", [["b"], [PRIMARY, "b"]])
def test_hinton_over_each_teachers_class_prompts(two_teacher_cache, tmp_path, names):
    """hinton's class_emb is each teacher's own (its prompts.h5): b's alone for --teachers b, and in each
    teacher's dict for an ensemble; the term equals the loss written out by hand."""
    cache = store.open_cache(two_teacher_cache)
    setup = T.build_setup(_cfg(two_teacher_cache, tmp_path / "h", teachers=names,
                               teacher_weights=[1.0, 3.0][:len(names)], losses="hinton=1",
                               loss_options={"hinton": {"alpha": 1.0}}))
    batch = T.to_device_batch(setup, next(iter(cachereader.epoch_batches(setup.stream, 1))))
    classes = [_prompt_classes(cache, n) for n in names]
    assert torch.allclose(batch["class_emb"], classes[0], atol=1e-6)
    for view, want in zip(batch.get("teachers", ()), classes):
        assert torch.allclose(view["class_emb"], want, atol=1e-6)
    setup.distiller.eval()  # the same student output twice (BN on running statistics)
    with torch.no_grad():
        got = setup.distiller(batch)["hinton"]
        s_img = setup.image(batch["image"])
        views = batch.get("teachers") or [{"t_img": batch["t_img"]}]
        members = [(t.weight, t.logit_scale, v["t_img"], c) for t, v, c in zip(setup.teachers, views, classes)]
        assert float(got) == pytest.approx(float(_hinton_by_hand(s_img, members, 4.0)), rel=1e-5)


def test_supervised_classes_are_moved_in_every_teachers_rows_too():
    """A run whose hinton used the labels: the per-teacher zero-shot rows of those classes are supervised as well."""
    from kdpipe.evaluate import mark_supervised

    row = {"student": 0.5, "teacher": 0.4, "ratio": 1.25}
    rows = {"zeroshot/shapes/top1": dict(row), "teachers/b/zeroshot/shapes/top1": dict(row),
            "teachers/b/zeroshot/other/top1": dict(row)}
    notes: list[str] = []
    moved = mark_supervised(rows, {"shapes": ["a", "b"], "other": ["c"]},
                            {"losses": ["hinton"], "classnames": ["b", "a"]}, {}, notes)
    assert moved == ["shapes"] and len(notes) == 1
    unmarked = {"student": 0.5, "teacher": None, "ratio": None}
    assert rows == {"supervised/shapes/top1": unmarked, "teachers/b/supervised/shapes/top1": unmarked,
                    "teachers/b/zeroshot/other/top1": row}


# --------------------------------------------------------------------------- validation against every teacher


def _val_sims(cache: store.Cache, name: str, keys: list[str], s_img: np.ndarray) -> tuple[np.ndarray, ...]:
    """A teacher's val rows of ``keys`` by hand: (student [n, M] and teacher [n, M] cosines to its captions,
    txt_to_img [M]); s_img [n, D_k] the student in that teacher's space."""
    held = cache.load_split("val", fields=("img", "txt"), teacher=name)
    rows = [held.keys.index(k) for k in keys]
    txt_rows = [j for r in rows for j in range(held.txt_offsets[r], held.txt_offsets[r + 1])]
    txt_to_img = np.repeat(np.arange(len(rows)), np.diff(held.txt_offsets)[rows])
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    txt = unit(held.txt[txt_rows].astype(np.float64))
    return unit(s_img) @ txt.T, unit(held.img[rows, 0].astype(np.float64)) @ txt.T, txt_to_img


def test_validation_scores_the_student_against_each_teacher_and_the_ensemble(two_teacher_cache, tmp_path,
                                                                             monkeypatch):
    """An ensemble's validation adds, per teacher (the student through its head) and for the ensemble (Σ_k w_k
    cos_k), R@1 both ways and the share of equal top-1 captions; best.pt's score stays the first teacher's."""
    cache = store.open_cache(two_teacher_cache)
    setup = T.build_setup(_cfg(two_teacher_cache, tmp_path / "v", teachers=[PRIMARY, "b"], teacher_weights=[1.0, 3.0]))
    held = cache.load_split("val", fields=("img",))
    keys = list(held.keys)[::-1]  # not the h5 order: rows are found by key
    noise = torch.randn(len(keys), 32, generator=torch.Generator().manual_seed(0))
    student = torch.from_numpy(held.img[::-1, 0].astype(np.float32)) + 0.05 * noise  # near the first teacher
    monkeypatch.setattr(T, "embed_val", lambda _: (keys, student, None))
    val = T.validate(setup)
    s_img = student.double().numpy()
    students = {PRIMARY: s_img, "b": s_img @ setup.distiller.heads[0].weight.detach().double().numpy().T}
    sims = {name: _val_sims(cache, name, keys, students[name]) for name in (PRIMARY, "b")}
    sims["ensemble"] = tuple(0.25 * a + 0.75 * b for a, b in zip(sims[PRIMARY][:2], sims["b"][:2])) + (sims["b"][2],)
    for name, (s, t, txt_to_img) in sims.items():
        assert val[f"val_teachers/{name}/i2t_R@1"] == pytest.approx(_i2t_r1(s, txt_to_img)), name
        assert val[f"val_teachers/{name}/t2i_R@1"] == pytest.approx(float(np.mean(s.argmax(axis=0) == txt_to_img)))
        assert val[f"val_teachers/{name}/agreement/i2t_top1"] == pytest.approx(
            float(np.mean(s.argmax(axis=1) == t.argmax(axis=1))))
    assert val[f"val_teachers/{PRIMARY}/i2t_R@1"] == val["val_i2t_R@1"]  # the first teacher's: the usual figure
    assert val[f"val_teachers/{PRIMARY}/agreement/i2t_top1"] > 0.5 > val["val_teachers/b/agreement/i2t_top1"]
    assert val["val_score"] == pytest.approx((val["val_i2t_R@1"] + val["val_t2i_R@1"]) / 2 + 1e-3 * val["val_cos"])

    single = T.validate(T.build_setup(_cfg(two_teacher_cache, tmp_path / "s")))  # (embed_val: the same stand-in)
    assert not [k for k in single if k.startswith("val_teachers/")]  # one teacher: the rows as before


def test_an_ensemble_run_logs_each_teachers_share_and_validation(two_teacher_cache, tmp_path):
    """metrics.jsonl: train rows split the per-teacher terms by teacher (summing to the term), val rows hold
    the student against each teacher and the ensemble; a single teacher's rows have neither."""
    run = Path(T.run(_cfg(two_teacher_cache, tmp_path / "e", teachers=[PRIMARY, "b"], teacher_weights=[1.0, 3.0],
                          losses="fd=1,crd=1", max_steps=2))["run"])
    rows = T.read_metrics(run / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 2
    for row in train:
        assert set(row["teacher_terms"]) == {f"{t}/{n}" for t in ("fd_img",) for n in (PRIMARY, "b")}
        assert sum(row["teacher_terms"].values()) == pytest.approx(row["terms"]["fd_img"], rel=1e-5)
        assert row["teacher_terms"]["fd_img/b"] > 0
    val = [r for r in rows if r["kind"] == "val"][-1]
    assert {f"val_teachers/{n}/{k}" for n in (PRIMARY, "b", "ensemble")
            for k in ("i2t_R@1", "t2i_R@1", "agreement/i2t_top1")} <= set(val)
    single = T.read_metrics(Path(T.run(_cfg(two_teacher_cache, tmp_path / "s", losses="fd=1", max_steps=1))["run"])
                            / "metrics.jsonl")
    assert not any("teacher_terms" in r or any(k.startswith("val_teachers/") for k in r) for r in single)
