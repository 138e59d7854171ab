"""Stage 2 (fit-whitening): numbers against a numpy reference, what is read, refusals, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cache_factory import fake_teacher, make_fake_cache
from kdpipe import store, whiten, zca
from kdpipe.cli.main import app

DIM = 16


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A fake cache (several train shards) already whitened with --mode all; tests read it only."""
    root = make_fake_cache(tmp_path_factory.mktemp("w") / "cache", n_train=200, n_val=60, dim=DIM, shard_size=64)
    whiten.run(whiten.WhitenConfig(cache=root, progress=False))
    return root


def fresh_cache(tmp_path: Path, **kw) -> Path:
    kw = {"n_train": 120, "n_val": 30, "dim": DIM, "shard_size": 50, **kw}
    return make_fake_cache(tmp_path / "cache", **kw)


def train_rows(root: Path, split: str = "train") -> dict[str, np.ndarray]:
    """Reference data read with h5py directly: every view, every caption, float64."""
    img, txt = [], []
    for path in sorted((root / split).glob("shard-*.h5")):
        with h5py.File(path, "r") as f:
            img.append(f["img"][()].reshape(-1, DIM))
            txt.append(f["txt"][()])
    img, txt = np.concatenate(img).astype(np.float64), np.concatenate(txt).astype(np.float64)
    return {"image": img, "text": txt, "joint": np.concatenate([img, txt])}


def reference_zca(x: np.ndarray, eps_rel: float = 1e-4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mu, W, W_inv by the textbook route: population covariance, eigh, U diag((λ+ε)^∓½) Uᵀ."""
    mu = x.mean(axis=0)
    lam, u = np.linalg.eigh(np.cov(x.T, bias=True))
    eps = eps_rel * lam.mean()
    return mu, (u / np.sqrt(lam + eps)) @ u.T, (u * np.sqrt(lam + eps)) @ u.T


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("mode", ["image", "text", "joint"])
def test_fit_matches_numpy_reference_on_train_only(cache_dir, mode):
    rows = train_rows(cache_dir)[mode]
    w = whiten.load_whitening(cache_dir, mode)
    mu, W, W_inv = reference_zca(rows)
    assert w.n == len(rows) and w.method == "zca"
    np.testing.assert_allclose(w.mu, mu, atol=1e-12)
    np.testing.assert_allclose(w.W, W, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(w.W_inv, W_inv, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(w.W_inv @ w.W, np.eye(DIM), atol=1e-9)
    # including the held-out split would have moved the mean: proves it was left out
    with_val = np.concatenate([rows, train_rows(cache_dir, "val")[mode]])
    assert np.abs(with_val.mean(axis=0) - w.mu).max() > 1e-4


def test_report_has_every_check(cache_dir):
    report = json.loads((cache_dir / whiten.WHITENING_JSON).read_text())
    assert report["fit_split"] == "train" and report["eval_split"] == "val"
    assert report["train"] == {"image_rows": 200 * 2, "captions": 200 * 3}
    assert store.same_fingerprint(report["teacher"], fake_teacher(DIM))
    raw = report["teacher_raw"]
    assert 0.1 < raw["retrieval"]["i2t_R@1"] < 1.0 and 0.1 < raw["zero_shot"]["shapes"]["top1"] < 1.0
    for mode in ("image", "text", "joint"):
        m = report["modes"][mode]
        cov = m["train_cov"]
        assert cov["ok"] and not cov["eps_dominates"] and cov["max_abs_C_minus_I"] <= 1e-3
        assert cov["how"].startswith("second pass")
        h = m["heldout"]
        n_val = {"image": 60 * 2, "text": 60 * 3, "joint": 60 * 5}[mode]
        assert h["n"] == n_val and h["mp_band"] == pytest.approx(list(zca.eigen_band(n_val, DIM)))
        assert 0 < h["eig_min"] <= h["eig_max"] and 0.5 < h["eig_mean"] < 2.0  # roughly white on held-out data
        for key in ("i2t_R@1", "t2i_R@1", "i2t_R@10"):
            assert 0.0 <= m["teacher"]["retrieval"][key] <= 1.0
        assert set(m["teacher"]["zero_shot"]) == {"shapes"}
    # per-modality modes share one space (images via image, texts via text)
    assert report["modes"]["image"]["teacher"] == report["modes"]["text"]["teacher"]


def test_whitening_file_layout(cache_dir):
    with h5py.File(cache_dir / whiten.WHITENING_H5, "r") as f:
        assert json.loads(f.attrs["modes"]) == ["image", "text", "joint"]
        assert json.loads(f.attrs["teacher"]) == fake_teacher(DIM)
        assert "normalised" in f.attrs["embeddings"]
        for mode in ("image", "text", "joint"):
            g = f[mode]
            assert g["W"].shape == g["W_inv"].shape == (DIM, DIM) and g["mu"].shape == g["eigvals"].shape == (DIM,)
            assert g["W"].dtype == np.float64 and g.attrs["method"] == "zca" and g.attrs["eps"] > 0
    assert not list(cache_dir.glob(".*.tmp"))


def test_stored_raw_scores_match_a_direct_computation(cache_dir):
    """The teacher's raw zero-shot top-1, recomputed by hand from prompts.h5 and view 0."""
    report = json.loads((cache_dir / whiten.WHITENING_JSON).read_text())
    val = store.open_cache(cache_dir).load_split("val")
    with h5py.File(cache_dir / "prompts.h5", "r") as f:
        emb = f["shapes/emb"][()].astype(np.float64)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    cls = emb.mean(axis=1)
    img = val.img[:, 0].astype(np.float64)
    top1 = np.mean((img @ cls.T).argmax(axis=1) == val.labels)
    assert report["teacher_raw"]["zero_shot"]["shapes"]["top1"] == pytest.approx(top1)


def test_pca_and_eps_dominated_fit(tmp_path):
    root = fresh_cache(tmp_path)
    report = whiten.run(whiten.WhitenConfig(cache=root, mode="joint", method="pca", eps_rel=0.5, progress=False))
    cov = report["modes"]["joint"]["train_cov"]
    assert cov["eps_dominates"] and cov["ok"] and "explain" in cov
    assert cov["max_abs_C_minus_I"] > 1e-2 and cov["max_abs_C_minus_target"] <= 1e-3
    w = whiten.load_whitening(root, "joint")
    assert w.method == "pca" and not np.allclose(w.W, w.W.T)


def test_single_modality_mode_fits_partner_for_check_only(tmp_path):
    root = fresh_cache(tmp_path)
    (root / "prompts.h5").unlink()  # no prompts: zero-shot is skipped with a note, retrieval still runs
    report = whiten.run(whiten.WhitenConfig(cache=root, mode="text", check_train=False, progress=False))
    assert list(report["modes"]) == ["text"] and "analytic" in report["modes"]["text"]["train_cov"]["how"]
    assert report["modes"]["text"]["train_cov"]["max_abs_C_minus_I"] <= 1e-3
    assert any("image transform was fitted" in n for n in report["notes"])
    assert any("zero-shot skipped" in n for n in report["notes"])
    assert report["modes"]["text"]["teacher"]["zero_shot"] == {}
    assert report["modes"]["text"]["teacher"]["retrieval"]["i2t_R@1"] > 0
    with pytest.raises(ValueError, match=r"holds modes \['text'\], not 'image'"):
        whiten.load_whitening(root, "image")


def test_without_a_heldout_split_only_train_checks_run(tmp_path):
    root = fresh_cache(tmp_path, n_val=0)
    report = whiten.run(whiten.WhitenConfig(cache=root, mode="joint", progress=False))
    assert report["eval_split"] is None and report["teacher_raw"] is None
    assert "heldout" not in report["modes"]["joint"] and report["modes"]["joint"]["train_cov"]["ok"]
    assert any("held-out checks skipped" in n for n in report["notes"])
    with pytest.raises(ValueError, match="must be held out"):
        whiten.run(whiten.WhitenConfig(cache=root, eval_split="train", progress=False))


# --------------------------------------------------------------------------- what is read


def test_the_summary_says_what_whitening_did_to_students(tmp_path):
    """fit-whitening says plainly, with the study's numbers, that no whitened space has helped a student."""
    from kdpipe.progress import console
    from kdpipe.targetspace import MEASURED

    root = fresh_cache(tmp_path)
    with console.capture() as printed:
        report = whiten.run(whiten.WhitenConfig(cache=root, mode="joint", progress=False))
    shown = " ".join(printed.get().split())  # rich wraps the line
    assert "has not helped a student" in MEASURED and "0.416" in MEASURED and "--whiten none" in MEASURED
    assert " ".join(MEASURED.split()) in shown
    assert report["measured"] == MEASURED
    assert json.loads((Path(root) / "whitening.json").read_text())["measured"] == MEASURED


def test_fit_pass_reads_train_shards_only(tmp_path, monkeypatch):
    root = fresh_cache(tmp_path)
    events: list[str] = []
    real_read, real_write = store.read_h5_shard, whiten.write_whitening

    def spy_read(path, fields=None):
        events.append(str(Path(path).relative_to(root)))
        return real_read(path, fields)

    def spy_write(*args, **kw):
        events.append("WRITE")
        return real_write(*args, **kw)

    monkeypatch.setattr(store, "read_h5_shard", spy_read)
    monkeypatch.setattr(whiten, "write_whitening", spy_write)
    whiten.run(whiten.WhitenConfig(cache=root, progress=False))
    fit_reads = events[: events.index("WRITE")]
    assert fit_reads == [f"train/shard-{i:06d}.h5" for i in range(3)]  # 120 images / 50 per shard
    assert any(e.startswith("val/") for e in events[events.index("WRITE"):])  # checks do read val, after


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("split,dataset,row", [("train", "img", 17), ("train", "txt", 5), ("val", "img", 2)])
def test_nan_embedding_is_refused_naming_shard_and_key(tmp_path, split, dataset, row):
    root = fresh_cache(tmp_path, n_val=80)
    shard = root / split / "shard-000001.h5"
    with h5py.File(shard, "r+") as f:  # in place: same size, so the cache still verifies by size
        data = f[dataset][()]
        if dataset == "img":
            data[row, 1, 3] = np.nan  # one value of one view of sample 17
        else:
            data[row] = np.inf  # caption 5 belongs to sample 1 (3 captions each)
        f[dataset][...] = data
        key = f["keys"][()][row if dataset == "img" else row // 3].decode()
    with pytest.raises(ValueError, match="NaN/Inf") as err:
        whiten.run(whiten.WhitenConfig(cache=root, progress=False))
    assert str(shard) in str(err.value) and f"'{dataset}'" in str(err.value) and key in str(err.value)
    assert (root / whiten.WHITENING_H5).exists() == (split == "val")  # a bad train shard stops the fit
    assert not (root / whiten.WHITENING_JSON).exists()


def test_too_few_rows_for_the_dimension_is_refused(tmp_path):
    root = fresh_cache(tmp_path, n_train=6, n_val=4, views=1, captions=3)
    with pytest.raises(ValueError, match=r"6 image views for 16-dim .* more than 16 rows"):
        whiten.run(whiten.WhitenConfig(cache=root, mode="image", progress=False))
    report = whiten.run(whiten.WhitenConfig(cache=root, mode="joint", progress=False))  # 6 + 18 rows is enough
    assert report["modes"]["joint"]["n"] == 24


def test_bad_names_and_missing_cache(tmp_path):
    with pytest.raises(ValueError, match="valid: image, text, joint, all"):
        whiten.run(whiten.WhitenConfig(cache=tmp_path, mode="both"))
    with pytest.raises(KeyError, match="valid: pca, zca"):
        whiten.run(whiten.WhitenConfig(cache=tmp_path, method="svd"))
    with pytest.raises(store.CacheError, match="no cache at"):
        whiten.run(whiten.WhitenConfig(cache=tmp_path / "nope"))


def test_load_whitening_refuses_another_teacher(cache_dir, tmp_path):
    other = {**fake_teacher(DIM), "name": "ViT-L-14", "pretrained": "openai"}
    with pytest.raises(store.CacheError, match=r"teacher fake-vit .* not ViT-L-14 \(openai\)"):
        whiten.load_whitening(cache_dir / whiten.WHITENING_H5, "joint", expect_teacher=other)
    # a whitening file copied next to a cache of another teacher is refused by default
    root = fresh_cache(tmp_path, teacher=other)
    shutil.copy(cache_dir / whiten.WHITENING_H5, root / whiten.WHITENING_H5)
    with pytest.raises(store.CacheError, match="re-run `kdpipe fit-whitening`"):
        whiten.load_whitening(root, "joint")
    with pytest.raises(store.CacheError):
        whiten.load_whitening(store.open_cache(root), "joint")
    # only the open_clip version differs: same teacher
    same = {**fake_teacher(DIM), "open_clip_version": "9.9.9"}
    assert whiten.load_whitening(cache_dir, "joint", expect_teacher=same).dim == DIM
    with pytest.raises(FileNotFoundError, match="fit-whitening"):
        whiten.load_whitening(tmp_path, "joint")


# --------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_round_trip(tmp_path):
    root = fresh_cache(tmp_path)
    result = runner.invoke(app, ["fit-whitening", str(root), "--mode", "joint", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (root / "whitening.h5").exists() and (root / "whitening.json").exists()
    report = json.loads((root / "whitening.json").read_text())
    assert list(report["modes"]) == ["joint"]
    assert report["modes"]["joint"]["train_cov"]["max_abs_C_minus_I"] <= 1e-3
    assert "zs@1" in result.output and "joint" in result.output


def test_cli_help():
    result = runner.invoke(app, ["fit-whitening", "--help"])
    assert result.exit_code == 0
    for word in ("--mode", "--eps-rel", "--method", "TRAIN split", "whitening.h5"):
        assert word in result.output


@pytest.mark.parametrize("args,message", [
    (["--mode", "both"], "valid: image, text, joint, all"),
    (["--method", "svd"], "valid: pca, zca"),
])
def test_cli_bad_names_exit_2(tmp_path, args, message):
    root = fresh_cache(tmp_path, n_train=20, n_val=5)
    result = runner.invoke(app, ["fit-whitening", str(root), *args])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


def test_cli_missing_cache_exit_2(tmp_path):
    result = runner.invoke(app, ["fit-whitening", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no cache at" in result.output


# --------------------------------------------------------------------------- variants


def test_variants_are_stored_beside_the_full_fit_and_checked_against_their_design(tmp_path):
    root = fresh_cache(tmp_path, n_train=200, n_val=40)
    result = runner.invoke(app, ["fit-whitening", str(root), "--mode", "joint", "--no-progress",
                                 "--variant", "alpha=0.5", "--variant", "top=0.9,alpha=1", "--variant", "full"])
    assert result.exit_code == 0, result.output
    report = json.loads((root / whiten.WHITENING_JSON).read_text())
    assert list(report["modes"]) == ["joint", "joint@alpha=0.5", "joint@top=0.9"]
    rows = train_rows(root)["joint"]
    lam = np.linalg.eigvalsh(np.cov(rows.T, bias=True))[::-1]
    half = whiten.load_whitening(root, "joint@alpha=0.5")
    assert half.power == 0.5 and half.top_k is None
    z = zca.apply(half, rows)  # partial: the whitened spectrum is λ (λ+ε)^(−1/2), by hand
    np.testing.assert_allclose(np.linalg.eigvalsh(np.cov(z.T, bias=True))[::-1], lam / np.sqrt(lam + half.eps),
                               rtol=1e-6)
    top = whiten.load_whitening(root, "joint@top=0.9")
    assert top.top_k == int(np.argmax(np.cumsum(lam) / lam.sum() >= 0.9)) + 1 < DIM
    for group in ("joint@alpha=0.5", "joint@top=0.9"):
        cov = report["modes"][group]["train_cov"]
        assert cov["partial"] and cov["ok"] and cov["max_abs_C_minus_I"] > 0.05  # not white, as designed
        assert report["modes"][group]["heldout"] is None  # the MP band describes white data only
        teacher = report["modes"][group]["teacher"]
        assert 0 <= teacher["retrieval"]["i2t_R@1"] <= 1 and 0 < teacher["modality_gap"] <= 2
        assert 1 <= teacher["effective_rank"]["image"] <= DIM
    # the full fit is unchanged by the variants beside it
    np.testing.assert_allclose(whiten.load_whitening(root, "joint").W, reference_zca(rows)[1], rtol=1e-8, atol=1e-8)
    assert "joint@alpha=0.5" in result.output and "gap" in result.output


def test_a_missing_or_bad_variant_is_refused(cache_dir):
    with pytest.raises(ValueError, match="holds modes"):
        whiten.load_whitening(cache_dir, "joint@alpha=0.5")
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        whiten.load_whitening(cache_dir, "joint@alpha=2")
    result = runner.invoke(app, ["fit-whitening", str(cache_dir), "--variant", "beta=1"])
    assert result.exit_code == 2 and "expected 'full'" in result.output
