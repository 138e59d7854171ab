"""Several teachers in one cache: `extract --add-teacher`, the per-teacher files and their refusals.

The first teacher (tiny-clip, 32 px, D = 32) makes the cache as always; teacher "b" (tiny-clip's
architecture at 48 px with D = 24) is added from the stored images and views.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache_factory import add_teacher_b, teacher_b_config, tiny_extract_config
from kdpipe import extract as extract_mod
from kdpipe import store
from kdpipe.cli.main import app
from kdpipe.data import views as V
from kdpipe.errors import AlreadyExists, BadValue
from kdpipe.extract import ExtractConfig, run
from kdpipe.teachers import load_teacher


def _cfg(data: Path | str, out: Path, **kw) -> ExtractConfig:
    """The shared cache's settings, 4 images per batch (several batches per shard), no prompts unless asked."""
    return tiny_extract_config(data, out, **{"batch_size": 4, "prompts": False, **kw})


_teacher_b, _add = teacher_b_config, add_teacher_b


def _digests(root: Path, skip_teacher: str | None = None) -> dict[str, str]:
    """sha256 of every file of a cache but the manifest, a killed write's temporary files (atomic's
    `.NAME.*.tmp`, never read) and, when given, one added teacher's folders."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        temporary = rel.name.startswith(".") and rel.name.endswith(".tmp")
        if path.is_dir() or temporary or rel.name == store.MANIFEST or (skip_teacher and f"teachers/{skip_teacher}/" in str(rel)):
            continue
        out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_single_teacher_cache_is_format_1_with_its_teacher_named(one_teacher_cache):
    manifest = json.loads((one_teacher_cache / store.MANIFEST).read_text())
    assert manifest["format"] == 1 and "teachers" not in manifest
    assert not any("add_teacher" in k or k.endswith("_teacher") for k in manifest["config"])
    assert not list(one_teacher_cache.rglob(store.TEACHERS_DIR))
    cache = store.open_cache(one_teacher_cache, verify="sha256")
    assert list(cache.teachers()) == ["tiny-clip"] and cache.primary == "tiny-clip"
    by_name, plain = cache.load_split("train", teacher="tiny-clip"), cache.load_split("train")
    assert by_name.keys == plain.keys and np.array_equal(by_name.img, plain.img)


def test_added_teacher_round_trip(two_teacher_cache, one_teacher_cache, tmp_path):
    """Its own files, the primary's keys in order, and its embeddings = the teacher on the replayed stored views."""
    cache = store.open_cache(two_teacher_cache, verify="sha256")
    assert cache.manifest["format"] == 2 and list(cache.teachers()) == ["tiny-clip", "b"]
    entry = cache.teacher_entry("b")
    assert entry["embed_dim"] == 24 and entry["fingerprint"]["preprocess"]["size"] == 48
    assert entry["splits"]["train"]["count"] == 20 and len(entry["splits"]["train"]["shards"]) == 3
    assert (two_teacher_cache / "val" / "teachers" / "b" / "shard-000000.h5").exists()
    assert _digests(two_teacher_cache, skip_teacher="b") == _digests(one_teacher_cache)  # nothing of the first teacher rewritten
    primary, b = cache.load_split("val"), cache.load_split("val", teacher="b")
    assert b.keys == primary.keys and b.img.shape == (6, 3, 24) and b.txt.shape == (len(primary.txt), 24)
    assert np.array_equal(b.txt_offsets, primary.txt_offsets) and np.array_equal(b.labels, primary.labels)
    shard = cache.teacher_shard("val", "shard-000000", "b")
    assert shard.keys == b.keys and np.array_equal(shard.img, b.img)

    teacher = load_teacher(str(_teacher_b(tmp_path / "b.json")), device=torch.device("cpu"), allow_random_init=True)
    pre = teacher.preprocess
    tar = {s["__key__"]: s for s in _tar(two_teacher_cache / "val" / "shard-000000.tar")}
    for n, key in enumerate(b.keys[:2]):
        stored = V.decode_image(tar[key]["jpg"]).convert("RGB")
        for v, view in enumerate(json.loads(tar[key]["views.json"])):
            x = V.to_tensor(V.apply_view(stored, V.View.from_dict(view), 48, pre.interpolation), pre.mean, pre.std)
            feat = torch.nn.functional.normalize(teacher.encode_images(x[None]).float(), dim=-1)[0]
            assert float(feat @ torch.from_numpy(b.img[n, v].astype(np.float32))) >= 0.999
        captions = json.loads(tar[key]["captions.json"])
        ref = torch.nn.functional.normalize(teacher.encode_texts(captions, trim=False).float(), dim=-1)
        got = torch.from_numpy(b.txt[b.txt_offsets[n]:b.txt_offsets[n + 1]].astype(np.float32))
        assert float((ref * got).sum(-1).min()) >= 0.999


def _tar(path: Path) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))


def test_rerun_is_a_noop(two_teacher_cache, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in two_teacher_cache.rglob("*.h5")}
    _add(two_teacher_cache, _teacher_b(tmp_path / "b.json"))
    assert {p: p.stat().st_mtime_ns for p in two_teacher_cache.rglob("*.h5")} == before


def test_rerunning_the_first_teachers_extract_keeps_the_added_teachers(tiny_world, two_teacher_cache, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(two_teacher_cache, out)
    before = _digests(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = out / "val" / f".shard-000000.json.{socket.gethostname().split('.')[0]}-{dead.stdout.strip()}.x1.tmp"
    orphan.write_text("half")  # what a kill -9 mid-write leaves
    run(_cfg(tiny_world, out))
    manifest = json.loads((out / store.MANIFEST).read_text())
    assert manifest["format"] == 2 and list(manifest["teachers"]) == ["tiny-clip", "b"]
    assert _digests(out) == before and not orphan.exists()
    assert store.open_cache(out, verify="sha256").load_split("val", teacher="b").img.shape == (6, 3, 24)


def test_killed_add_resumes_without_touching_the_other_teachers(one_teacher_cache, two_teacher_cache, tmp_path, monkeypatch):
    out = tmp_path / "c"
    shutil.copytree(one_teacher_cache, out)
    b = _teacher_b(tmp_path / "b.json")
    _add(out, _teacher_b(tmp_path / "c.json", embed_dim=16), teacher_name="c")  # a third teacher, there before
    before = _digests(out)
    real, calls = extract_mod.write_teacher_shard, {"n": 0}

    def crashing(split_dir, teacher, index, samples, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # a truncated h5 without sidecar, as a SIGKILL would leave it
            folder = store.teacher_dir(split_dir, teacher)
            (folder / f"{store.shard_name(index)}.h5").write_bytes(b"\0" * 100)
            raise KeyboardInterrupt
        return real(split_dir, teacher, index, samples, *a, **kw)

    monkeypatch.setattr(extract_mod, "write_teacher_shard", crashing)
    with pytest.raises(KeyboardInterrupt):
        _add(out, b)
    assert _digests(out, skip_teacher="b") == before
    store.open_cache(out, verify="sha256")  # the listed shards verify; the unfinished one is not listed
    with pytest.raises(store.CacheError, match="lacks 1 of 3 shards"):
        store.open_cache(out).load_split("train", teacher="b")
    first = {p: p.stat().st_mtime_ns for p in (out / "train" / "teachers" / "b").glob("shard-00000[01].h5")}
    assert len(first) == 2
    monkeypatch.setattr(extract_mod, "write_teacher_shard", real)
    _add(out, b)
    assert _digests(out, skip_teacher="b") == before
    assert {p: p.stat().st_mtime_ns for p in first} == first
    cache, ref = store.open_cache(out, verify="sha256"), store.open_cache(two_teacher_cache)
    assert list(cache.teachers()) == ["tiny-clip", "c", "b"]
    for split in ("train", "val"):
        got, want = cache.load_split(split, teacher="b"), ref.load_split(split, teacher="b")
        assert got.keys == want.keys and np.array_equal(got.img, want.img) and np.array_equal(got.txt, want.txt)


def test_a_name_held_by_other_weights_is_refused_unless_overwritten(two_teacher_cache, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(two_teacher_cache, out)
    other = _teacher_b(tmp_path / "other.json", embed_dim=20)
    with pytest.raises(AlreadyExists, match="--overwrite-teacher b"):
        _add(out, other)
    primary_files = _digests(out, skip_teacher="b")
    _add(out, other, overwrite_teacher="b")
    cache = store.open_cache(out, verify="sha256")
    assert cache.teacher_entry("b")["embed_dim"] == 20 and cache.load_split("val", teacher="b").img.shape[-1] == 20
    assert _digests(out, skip_teacher="b") == primary_files
    assert not (out / store.TEACHERS_DIR / "b").exists()  # the old weights' prompts (whitening, eval) are gone
    assert "files" not in cache.teacher_entry("b")
    with pytest.raises(BadValue, match="named 'b'"):
        _add(out, other, overwrite_teacher="x")


def test_first_teacher_and_duplicates_refused(two_teacher_cache, tmp_path):
    with pytest.raises(AlreadyExists, match="first teacher.*--overwrite"):  # other weights under the primary's name
        run(_cfg("", two_teacher_cache, teacher=str(_teacher_b(tmp_path / "x.json", embed_dim=20)), add_teacher=True,
                 teacher_name="tiny-clip"))
    with pytest.raises(AlreadyExists, match="already in the cache as 'b'"):
        _add(two_teacher_cache, _teacher_b(tmp_path / "b.json"), teacher_name="again")
    with pytest.raises(AlreadyExists, match="already there"):
        run(_cfg("", two_teacher_cache, add_teacher=True))
    with pytest.raises(BadValue, match="folder name"):
        _add(two_teacher_cache, _teacher_b(tmp_path / "b.json"), teacher_name="../up")
    with pytest.raises(BadValue, match="'Ensemble' is reserved"):  # eval's teachers/ensemble/ rows
        _add(two_teacher_cache, _teacher_b(tmp_path / "e.json", embed_dim=12), teacher_name="Ensemble")
    assert store.default_teacher_name({"label": "ensemble"}) == "ensemble-teacher"
    before = (two_teacher_cache / store.MANIFEST).read_bytes()
    with pytest.raises(BadValue, match=r"split\(s\) \['test'\] not in the cache"):
        _add(two_teacher_cache, _teacher_b(tmp_path / "d.json", embed_dim=12), teacher_name="d", splits=["test"])
    assert (two_teacher_cache / store.MANIFEST).read_bytes() == before  # nothing recorded for a refused teacher


def test_teacher_larger_than_the_stored_images_is_refused(tiny_world, tmp_path):
    out = tmp_path / "small"
    run(_cfg(tiny_world, out, store_size=40, views=1, splits=["val"]))
    with pytest.raises(BadValue, match=r"input is 48 px.*at most 40 px.*--store-size >= 48"):
        _add(out, _teacher_b(tmp_path / "b.json"))
    assert not list(out.rglob(store.TEACHERS_DIR)) and "teachers" not in json.loads((out / store.MANIFEST).read_text())


def test_corrupt_added_teacher_detected(two_teacher_cache, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(two_teacher_cache, out)
    h5 = out / "train" / "teachers" / "b" / "shard-000001.h5"
    data = bytearray(h5.read_bytes())
    data[-10] ^= 0xFF
    h5.write_bytes(bytes(data))
    store.open_cache(out)  # same size
    with pytest.raises(store.CacheError, match="teachers/b/shard-000001.h5 does not match its sha256"):
        store.open_cache(out, verify="sha256")


def test_cli_add_teacher(one_teacher_cache, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(one_teacher_cache, out)
    b = _teacher_b(tmp_path / "b.json")
    args = ["extract", "--add-teacher", "--teacher", str(b), "--out", str(out), "--teacher-name", "b",
            "--device", "cpu", "--workers", "0", "--allow-random-init", "--no-prompts"]  # prompts: their own tests
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "20 images" in result.output and list(store.open_cache(out).teachers()) == ["tiny-clip", "b"]
    result = CliRunner().invoke(app, [*args, "--overwrite-teacher", "z"])
    assert result.exit_code == 2 and "named 'b'" in result.output
    result = CliRunner().invoke(app, ["extract", "--teacher", "tiny-clip", "--data", str(tmp_path), "--out",
                                      str(tmp_path / "n"), "--teacher-name", "x"])
    assert result.exit_code == 2 and "go with --add-teacher" in result.output


def test_disk_full_while_adding_says_what_is_kept_and_a_rerun_finishes(one_teacher_cache, two_teacher_cache, tmp_path, monkeypatch):
    import errno

    from kdpipe.errors import WriteFailed

    out = tmp_path / "c"
    shutil.copytree(one_teacher_cache, out)
    before, b = _digests(out), _teacher_b(tmp_path / "b.json")
    real, calls = store._write_h5, []

    def write_h5(path, samples, embed_dim):  # the second shard of teacher b meets a full disk
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, samples, embed_dim)

    monkeypatch.setattr(store, "_write_h5", write_h5)
    with pytest.raises(WriteFailed) as err:
        _add(out, b)
    assert err.value.needed_for == "b/shard-000001.h5" and err.value.needed > 0
    assert err.value.kept.startswith("1 of 4 shards of teacher 'b' are complete") and "re-run" in err.value.resume
    assert _digests(out, skip_teacher="b") == before
    assert sorted(p.name for p in (out / "train" / "teachers" / "b").iterdir()) == ["shard-000000.h5",
                                                                                     "shard-000000.json"]
    monkeypatch.undo()
    _add(out, b)
    got = store.open_cache(out, verify="sha256").load_split("train", ("img",), teacher="b")
    assert np.array_equal(got.img, store.open_cache(two_teacher_cache).load_split("train", ("img",), teacher="b").img)


def test_several_teachers_in_one_pass_equal_extract_then_add(tiny_world, two_teacher_cache, tmp_path):
    b = _teacher_b(tmp_path / "b.json")
    args = ["extract", "--teacher", "tiny-clip", "--teacher", str(b), "--data", str(tiny_world), "--out",
            str(tmp_path / "c"), "--device", "cpu", "--workers", "0", "--views", "3", "--batch-size", "4",
            "--shard-size", "8", "--no-prompts", "--allow-random-init"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cache, ref = store.open_cache(tmp_path / "c", verify="sha256"), store.open_cache(two_teacher_cache)
    assert list(cache.teachers()) == ["tiny-clip", "b"]
    for teacher in ("tiny-clip", "b"):  # the same embeddings (the files hold write times: not byte-equal)
        got, want = cache.load_split("train", teacher=teacher), ref.load_split("train", teacher=teacher)
        assert got.keys == want.keys and np.array_equal(got.img, want.img) and np.array_equal(got.txt, want.txt)
    result = CliRunner().invoke(app, [*args[:5], "--pretrained", "openai", *args[5:]])
    assert result.exit_code == 2 and "one --pretrained per --teacher" in result.output


def test_teacher_options_pair_pretrained_in_order():
    from kdpipe.extract import teacher_options

    assert teacher_options(["a"], ["x"]) == {"teacher": "a", "pretrained": "x", "extra_teachers": None,
                                             "extra_pretrained": None}
    assert teacher_options(["a", "b", "c"], ["none", "y", "none"]) == {
        "teacher": "a", "pretrained": None, "extra_teachers": ["b", "c"], "extra_pretrained": [None, "y", None][1:]}
    assert teacher_options(["a", "b"], None)["extra_pretrained"] is None
    with pytest.raises(BadValue, match="2 --pretrained for one --teacher"):
        teacher_options(["a"], ["x", "y"])


def test_decoding_workers_give_the_same_teacher_files(one_teacher_cache, two_teacher_cache, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(one_teacher_cache, out)
    _add(out, _teacher_b(tmp_path / "b.json"), workers=2)
    cache, ref = store.open_cache(out, verify="sha256"), store.open_cache(two_teacher_cache)
    for split in ("train", "val"):
        got, want = cache.load_split(split, teacher="b"), ref.load_split(split, teacher="b")
        assert got.keys == want.keys and np.array_equal(got.img, want.img) and np.array_equal(got.txt, want.txt)


def test_sigterm_stops_the_add_and_a_rerun_finishes(one_teacher_cache, tmp_path, monkeypatch):
    out = tmp_path / "c"
    shutil.copytree(one_teacher_cache, out)
    real, calls = extract_mod.embed_batch, {"n": 0}

    def embed_then_term(teacher, batch, precision):  # the preemption notice arrives during the third batch
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(teacher, batch, precision)

    monkeypatch.setattr(extract_mod, "embed_batch", embed_then_term)
    result = _add(out, b := _teacher_b(tmp_path / "b.json"))
    assert result == {"stopped": "SIGTERM"}
    folder = out / "train" / "teachers" / "b"
    assert sorted(p.name for p in folder.iterdir()) == ["shard-000000.h5", "shard-000000.json"]  # 2 batches of 4
    monkeypatch.setattr(extract_mod, "embed_batch", real)
    assert _add(out, b)["train"]["count"] == 20


# --------------------------------------------------------------------------- per-teacher prompts, whitening, eval


def test_added_teacher_has_its_own_prompts_listed_and_verified(two_teacher_cache, tmp_path):
    """CACHE/teachers/b/prompts.h5: the primary's sets (same class names and templates) encoded by b, listed
    in b's manifest entry with its sha256 and verified; the primary's prompts.h5 is where it always was."""
    from kdpipe import prompts

    cache = store.open_cache(two_teacher_cache, verify="sha256")
    path = two_teacher_cache / store.TEACHERS_DIR / "b" / store.PROMPTS
    assert cache.teacher_prompts_path("b") == path
    assert cache.teacher_prompts_path() == cache.teacher_prompts_path("tiny-clip") == cache.prompts_path == \
        two_teacher_cache / store.PROMPTS
    mine, primary = prompts.read_prompts(path), prompts.read_prompts(cache.prompts_path)
    assert list(mine) == list(primary) and "shapes" in mine
    for name, s in primary.items():
        assert (mine[name].classnames, mine[name].templates) == (s.classnames, s.templates)
        assert mine[name].emb.shape == (*s.emb.shape[:2], 24)
    teacher = load_teacher(str(_teacher_b(tmp_path / "b.json")), device=torch.device("cpu"), allow_random_init=True)
    want = prompts.encode_prompts(teacher, primary["shapes"].classnames, primary["shapes"].templates)
    np.testing.assert_allclose(mine["shapes"].emb.astype(np.float32), want.astype(np.float32), atol=2e-3)
    assert cache.teacher_entry("b")["files"] == {store.PROMPTS: store.file_digest(path)}
    with pytest.raises(store.CacheError, match="has no teacher 'zz'; it has tiny-clip, b"):
        cache.teacher_prompts_path("zz")

    out = tmp_path / "c"
    shutil.copytree(two_teacher_cache, out)
    corrupt = out / store.TEACHERS_DIR / "b" / store.PROMPTS
    data = bytearray(corrupt.read_bytes())
    data[-10] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with pytest.raises(store.CacheError, match="teachers/b/prompts.h5 does not match its sha256"):
        store.open_cache(out, verify="sha256")


def test_added_teachers_prompts_resume_and_are_unlisted_while_replaced(two_teacher_cache, tmp_path, monkeypatch):
    """A new --prompt-set for teacher b: killed while its prompts.h5 is replaced, the cache still verifies (the
    file is unlisted first); the same command then adds the set, keeps the others and lists the file."""
    from kdpipe import prompts

    monkeypatch.setitem(prompts.PROMPT_SETS._entries, "tiny-test", lambda: (["tench", "goldfish"], ["a {}."]))
    out = tmp_path / "c"
    shutil.copytree(two_teacher_cache, out)
    b, path = _teacher_b(tmp_path / "b.json"), out / store.TEACHERS_DIR / "b" / store.PROMPTS
    before, others = prompts.read_prompts(path), _digests(out, skip_teacher="b")
    real = prompts.write_prompts

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(prompts, "write_prompts", killed)
    with pytest.raises(KeyboardInterrupt):
        _add(out, b, prompts=True, prompt_sets=["tiny-test"])
    cache = store.open_cache(out, verify="sha256")
    assert "files" in cache.teacher_entry("b") and store.PROMPTS not in cache.teacher_entry("b")["files"]
    monkeypatch.setattr(prompts, "write_prompts", real)
    _add(out, b, prompts=True, prompt_sets=["tiny-test"])
    after = prompts.read_prompts(path)
    assert set(after) == set(before) | {"tiny-test"} and after["tiny-test"].emb.shape == (2, 1, 24)
    assert all(np.array_equal(after[n].emb, s.emb) for n, s in before.items())
    assert store.open_cache(out, verify="sha256").teacher_entry("b")["files"][store.PROMPTS] == store.file_digest(path)
    assert _digests(out, skip_teacher="b") == others  # the primary's prompts.h5 has no tiny-test: not rewritten
    mtime = path.stat().st_mtime_ns
    _add(out, b, prompts=True, prompt_sets=["tiny-test"])
    assert path.stat().st_mtime_ns == mtime


def test_fit_whitening_of_an_added_teacher(two_teacher_cache, tmp_path):
    """`fit-whitening --teacher b`: fitted on b's train embeddings, written under CACHE/teachers/b/, found by
    targetspace for that teacher only; an unknown name is refused with the cache's teachers."""
    from kdpipe import targetspace, whiten
    from kdpipe.errors import MissingInput

    out = tmp_path / "c"
    shutil.copytree(two_teacher_cache, out)
    report = whiten.run(whiten.WhitenConfig(cache=str(out), mode="joint", teacher="b", progress=False))
    folder = out / store.TEACHERS_DIR / "b"
    assert report["whitening"] == str(folder / whiten.WHITENING_H5) and (folder / whiten.WHITENING_JSON).exists()
    assert not (out / whiten.WHITENING_H5).exists() and not (out / whiten.WHITENING_JSON).exists()
    assert report["teacher_name"] == "b" and report["modes"]["joint"]["train_cov"]["ok"]
    assert "shapes" in report["teacher_raw"]["zero_shot"]  # b's own prompts (24-dim)
    cache = store.open_cache(out)
    train = cache.load_split("train", teacher="b")
    rows = np.concatenate([train.img.reshape(-1, 24), train.txt]).astype(np.float64)
    w = targetspace.load_whitening(cache, "joint", teacher="b")
    assert w.W.shape == (24, 24) and w.n == len(rows)
    np.testing.assert_allclose(w.mu, rows.mean(0), atol=1e-9)
    assert targetspace.whitening_path(cache, "b") == folder / whiten.WHITENING_H5
    assert targetspace.whitening_path(cache) == targetspace.whitening_path(cache, "tiny-clip") == out / "whitening.h5"
    targets = targetspace.load_targets(cache, "joint", teacher="b")
    assert targets.source == str(folder / whiten.WHITENING_H5) and targets.params["image"]["W"].shape == (24, 24)
    with pytest.raises(MissingInput, match="no whitening at"):  # the primary's own is not b's
        targetspace.load_targets(cache, "joint")
    shutil.copy(folder / whiten.WHITENING_H5, out / whiten.WHITENING_H5)
    with pytest.raises(store.CacheError, match="fitted on embeddings of teacher"):
        targetspace.load_targets(cache, "joint")
    with pytest.raises(store.CacheError, match="has no teacher 'zz'; it has tiny-clip, b"):
        whiten.run(whiten.WhitenConfig(cache=str(out), teacher="zz", progress=False))


def test_teacher_eval_of_an_added_teacher(two_teacher_cache, tmp_path):
    """`eval --teacher CACHE --teacher-name b`: b's own figures from its embeddings and prompts, written to
    CACHE/teachers/b/teacher_eval.json."""
    from kdpipe import evaluate, metrics

    out = tmp_path / "c"
    shutil.copytree(two_teacher_cache, out)
    result = CliRunner().invoke(app, ["eval", "--teacher", str(out), "--teacher-name", "b", "--device", "cpu",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    cache = store.open_cache(out)
    path = out / store.TEACHERS_DIR / "b" / store.TEACHER_EVAL_JSON
    assert cache.teacher_eval_path("b") == path and not (out / store.TEACHER_EVAL_JSON).exists()
    report = json.loads(path.read_text())
    assert store.same_fingerprint(report["teacher"], cache.teacher_entry("b")["fingerprint"])
    held = cache.load_split("val", teacher="b")
    want = metrics.retrieval_recall(torch.from_numpy(held.img[:, 0].astype(np.float32)),
                                    torch.from_numpy(held.txt.astype(np.float32)), torch.from_numpy(held.txt_to_img))
    assert report["metrics"]["i2t_R@1"]["teacher"] == pytest.approx(want["i2t_R@1"])
    assert "zeroshot/shapes/top1" in report["metrics"]
    with pytest.raises(BadValue, match="--teacher-name"):
        evaluate.run(evaluate.EvalConfig(run=str(out), teacher_name="b"))


def test_cli_fit_whitening_unknown_teacher(two_teacher_cache):
    result = CliRunner().invoke(app, ["fit-whitening", str(two_teacher_cache), "--teacher", "zz", "--no-progress"])
    assert result.exit_code != 0 and "no teacher 'zz'; it has tiny-clip, b" in result.output
    assert not (two_teacher_cache / store.TEACHERS_DIR / "zz").exists()


@pytest.mark.slow
def test_two_process_gloo_add_equals_one_process(one_teacher_cache, two_teacher_cache, tmp_path):
    """`extract --add-teacher` under torchrun (2 ranks, gloo): rank r writes the shards i % 2 == r (here 2 + 1 of
    train, 1 + 0 of val), rank 0 lists them all and writes the prompts; the same files as one process."""
    out = tmp_path / "c"
    shutil.copytree(one_teacher_cache, out)
    before = _digests(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kdpipe.cli",
           "extract", "--add-teacher", "--teacher", str(_teacher_b(tmp_path / "b.json")), "--teacher-name", "b",
           "--out", str(out), "--batch-size", "4", "--workers", "0", "--device", "cpu", "--allow-random-init"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _digests(out, skip_teacher="b") == before
    cache, ref = store.open_cache(out, verify="sha256"), store.open_cache(two_teacher_cache)
    for split in ("train", "val"):
        mine, theirs = cache.teacher_entry("b")["splits"][split], ref.teacher_entry("b")["splits"][split]
        assert [s["name"] for s in mine["shards"]] == [s["name"] for s in theirs["shards"]]
        assert (mine["count"], mine["captions"]) == (theirs["count"], theirs["captions"])
        got, want = cache.load_split(split, teacher="b"), ref.load_split(split, teacher="b")
        assert got.keys == want.keys and np.array_equal(got.txt_offsets, want.txt_offsets)
        np.testing.assert_allclose(got.img.astype(np.float32), want.img.astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(got.txt.astype(np.float32), want.txt.astype(np.float32), atol=2e-3)
    prompts_b = cache.teacher_prompts_path("b")
    assert cache.teacher_entry("b")["files"] == {store.PROMPTS: store.file_digest(prompts_b)}


SLOW_ADD = """
import sys, time
from kdpipe import extract
from kdpipe.cli.main import app
real = extract.embed_batch
def slow(*a, **kw):
    time.sleep(0.4)
    return real(*a, **kw)
extract.embed_batch = slow
app()
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and SIGKILL")
def test_sigkill_mid_add_then_rerun(one_teacher_cache, two_teacher_cache, tmp_path):
    """A real `kill -9` of `extract --add-teacher` after its first shard: the other files keep their bytes,
    and the same command finishes the teacher with the embeddings of an uninterrupted add."""
    out = tmp_path / "c"
    shutil.copytree(one_teacher_cache, out)
    before = _digests(out)
    b = _teacher_b(tmp_path / "b.json")
    args = ["extract", "--add-teacher", "--teacher", str(b), "--teacher-name", "b", "--out", str(out), "--device",
            "cpu", "--workers", "0", "--batch-size", "4", "--allow-random-init"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_ADD, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / "train" / "teachers" / "b" / "shard-000000.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert first.exists() and not (out / "val" / "teachers" / "b" / "shard-000000.json").exists()
    assert _digests(out, skip_teacher="b") == before
    _add(out, b)
    assert _digests(out, skip_teacher="b") == before
    assert not list(out.rglob(".*.tmp")), "the re-run removes the killed run's temporary files"
    cache, ref = store.open_cache(out, verify="sha256"), store.open_cache(two_teacher_cache)
    for split in ("train", "val"):
        got, want = cache.load_split(split, teacher="b"), ref.load_split(split, teacher="b")
        assert got.keys == want.keys and np.array_equal(got.img, want.img) and np.array_equal(got.txt, want.txt)
