"""Teachers: loading, fingerprints, exact text trimming, weight sources, offline failures."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from kdpipe import teachers, weights
from kdpipe.store import describe_teacher, same_fingerprint
from kdpipe.teachers import load_teacher
from kdpipe.weights import (
    TEACHERS,
    cached_checkpoint,
    resolve_arch,
    resolve_quickgelu,
)

TINY_CFG = json.loads((weights.CONFIG_DIR / "tiny-clip.json").read_text())
CAPTIONS = [
    "a dog",
    "a small red circle to the left of a large blue square at the bottom of the picture",
    "two cats",
    "a photo of a very long and winding road through green hills under a cloudy sky at dusk",
]
FINGERPRINT_KEYS = {"name", "label", "pretrained", "checkpoint_sha256", "open_clip_version", "quickgelu", "preprocess",
                    "embed_dim", "logit_scale", "context_length"}


@pytest.fixture(scope="module")
def tiny() -> teachers.Teacher:
    torch.manual_seed(0)
    return load_teacher("tiny-clip")


def _write_config(path: Path, text_overrides: dict | None = None, wrapper: dict | None = None) -> Path:
    cfg = json.loads(json.dumps(TINY_CFG))
    cfg["text_cfg"].update(text_overrides or {})
    path.write_text(json.dumps({"model_cfg": cfg, **wrapper} if wrapper else cfg))
    return path


def _state_dict(t: teachers.Teacher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in t.model.state_dict().items()}


def _fake_hub_file(hub: Path, repo: str, sd: dict[str, torch.Tensor]) -> Path:
    """A file where huggingface_hub would have cached it: models--org--repo/{refs/main, snapshots/<rev>/}."""
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("rev1")
    (root / "snapshots" / "rev1").mkdir(parents=True)
    path = root / "snapshots" / "rev1" / "open_clip_model.safetensors"
    save_file(sd, str(path))
    return path


def test_shipped_registry_lists_configs():
    assert {"tiny-clip", "shapes-vit"} <= set(TEACHERS.names())
    for name in ("tiny-clip", "shapes-vit"):
        cfg = json.loads(TEACHERS.get(name).read_text())
        assert {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg)


def test_tiny_fingerprint_has_every_field(tiny):
    fp = tiny.fingerprint
    assert FINGERPRINT_KEYS <= set(fp)
    assert fp["name"] == "tiny-clip" and fp["pretrained"] is None and fp["checkpoint_sha256"] is None
    assert fp["open_clip_version"] == open_clip.__version__
    assert fp["quickgelu"] is False
    assert fp["preprocess"] == {"size": 32, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                                "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic",
                                "resize_mode": "shortest"}
    assert fp["preprocess_source"] == "architecture-default"
    assert fp["embed_dim"] == tiny.embed_dim == 32
    assert fp["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5) and fp["logit_scale"] == tiny.logit_scale
    assert fp["context_length"] == tiny.context_length == 77
    assert json.loads(json.dumps(fp)) == fp  # goes into manifest.json unchanged
    assert not tiny.model.training and not any(p.requires_grad for p in tiny.model.parameters())


def test_encode_shapes_are_raw_features(tiny):
    img = tiny.encode_images(torch.randn(5, 3, 32, 32))
    txt = tiny.encode_texts(CAPTIONS)
    assert img.shape == (5, 32) and txt.shape == (4, 32)
    assert img.dtype == txt.dtype == torch.float32
    assert not torch.allclose(txt.norm(dim=1), torch.ones(4), atol=1e-3)  # un-normalised
    assert tiny.tokenize(CAPTIONS).shape == (4, 77) and tiny.tokenize(CAPTIONS).dtype == torch.long


def test_trimmed_text_equals_untrimmed(tiny):
    tokens = tiny.tokenize(CAPTIONS)
    trimmed = tiny.trim_tokens(tokens)
    longest = int((tokens != 0).sum(dim=1).max())  # SOT ... EOT of the longest caption
    assert tiny.is_causal_text and tiny.can_trim
    assert trimmed.shape == (4, longest) and longest < 30  # far fewer tokens than the 77 context
    fast, full = tiny.encode_texts(CAPTIONS, trim=True), tiny.encode_texts(CAPTIONS, trim=False)
    assert torch.allclose(fast, full, atol=1e-5)
    assert torch.nn.functional.cosine_similarity(fast, full).min() >= 0.9999
    ref = tiny.model.encode_text(tokens)  # open_clip's own forward
    assert torch.allclose(fast, ref, atol=1e-5)


def test_caption_longer_than_context_is_not_cut_short(tiny):
    long = " ".join(["word"] * 120)
    tokens = tiny.tokenize([long, "a cat"])
    assert tiny.trim_tokens(tokens).shape[1] == 77
    assert torch.allclose(tiny.encode_texts([long, "a cat"]), tiny.encode_texts([long, "a cat"], trim=False), atol=1e-5)


def test_empty_caption_refused(tiny):
    with pytest.raises(ValueError, match="empty caption"):
        tiny.encode_texts(["a cat", "  "])


def test_non_causal_tower_is_never_trimmed(tmp_path):
    cfg = _write_config(tmp_path / "bidir.json", {"no_causal_mask": True})
    t = load_teacher(str(cfg), allow_random_init=True)
    assert not t.is_causal_text and not t.can_trim
    tokens = t.tokenize(CAPTIONS)
    assert t.trim_tokens(tokens).shape == tokens.shape
    # In a bidirectional tower the padding changes the output, so trimming would have been wrong:
    assert not torch.allclose(t._encode_trimmed(tokens[:, :20]), t.model.encode_text(tokens), atol=1e-4)
    assert torch.equal(t.encode_texts(CAPTIONS, trim=True), t.model.encode_text(tokens).float())


def test_last_token_pooling_is_not_trimmed(tmp_path):
    cfg = _write_config(tmp_path / "lastpool.json", {"pool_type": "last"})
    t = load_teacher(str(cfg), allow_random_init=True)
    assert t.is_causal_text and not t.can_trim  # causal, but pools at the (moving) last position
    tokens = t.tokenize(CAPTIONS)
    assert t.trim_tokens(tokens).shape == tokens.shape


def test_unknown_name_lists_valid_ones():
    with pytest.raises(KeyError) as err:
        load_teacher("ViT-Nope-99")
    msg = str(err.value)
    assert "tiny-clip" in msg and "shapes-vit" in msg and "list_models" in msg


def test_open_clip_name_without_weights_needs_the_flag():
    with pytest.raises(ValueError, match="random weights"):
        load_teacher("ViT-B-32")


def test_uncached_tag_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        load_teacher("ViT-B-32", "laion2b_s34b_b79k")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "laion2b_s34b_b79k" in msg and "--pretrained" in msg and str(tmp_path / "hf" / "hub") in msg


def test_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(weights, "_reachable", lambda url, timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="unreachable.*--pretrained"):
        weights.fetch_tag_checkpoint("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path / "hub"))
    assert time.monotonic() - start < 10


def test_cached_tag_is_found_without_network(tmp_path):
    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")
    path = _fake_hub_file(tmp_path, cfg["hf_hub"].strip("/"), {"w": torch.zeros(1)})
    assert cached_checkpoint(cfg, str(tmp_path)) == str(path)
    assert cached_checkpoint(cfg, str(tmp_path / "empty")) is None


def test_quickgelu_tags_resolve_to_quickgelu_variant(monkeypatch):
    assert resolve_quickgelu("ViT-B-32", "openai") == ("ViT-B-32-quickgelu", False)
    assert resolve_quickgelu("ViT-B-32", "laion400m_e32") == ("ViT-B-32-quickgelu", False)
    assert resolve_quickgelu("ViT-B-32", "laion2b_s34b_b79k") == ("ViT-B-32", False)
    assert resolve_quickgelu("ViT-B-32-quickgelu", "openai") == ("ViT-B-32-quickgelu", False)
    with pytest.raises(ValueError, match="laion2b_s34b_b79k"):  # lists the valid tags
        resolve_quickgelu("ViT-B-32", "no-such-tag")
    monkeypatch.setattr(open_clip, "list_models", lambda: ["ViT-B-32"])  # no -quickgelu config shipped
    assert resolve_quickgelu("ViT-B-32", "openai") == ("ViT-B-32", True)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_cached_tag_loads_with_the_tags_preprocessing(tiny, tmp_path, monkeypatch, quick_gelu):
    # A pretend open_clip tag for tiny-clip, served from a pre-filled hub cache, offline.
    tag_cfg = {"hf_hub": "org/tiny-clip/", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
               "interpolation": "bilinear", "resize_mode": "squash", "quick_gelu": quick_gelu}
    real = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg",
                        lambda m, t: tag_cfg if (m, t) == ("tiny-clip", "faketag") else real(m, t))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _fake_hub_file(tmp_path / "hub", "org/tiny-clip", _state_dict(tiny))
    t = load_teacher("tiny-clip", "faketag")
    fp = t.fingerprint
    assert fp["pretrained"] == "faketag" and fp["preprocess_source"] == "pretrained-tag"
    assert fp["preprocess"] == {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                                "resize_mode": "squash"}
    assert fp["quickgelu"] is quick_gelu  # no tiny-clip-quickgelu config: QuickGELU is forced instead
    acts = {type(m).__name__ for m in t.model.modules()}
    assert ("QuickGELU" in acts) is quick_gelu
    if not quick_gelu:
        assert torch.equal(t.encode_texts(CAPTIONS), tiny.encode_texts(CAPTIONS))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_round_trip(tiny, tmp_path, suffix):
    path = tmp_path / f"tiny{suffix}"
    gen = torch.Generator().manual_seed(1)
    sd = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
          for k, v in _state_dict(tiny).items()}
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    loaded = load_teacher("tiny-clip", str(path))
    again = load_teacher("tiny-clip", str(path))
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded.encode_images(x), again.encode_images(x))
    assert torch.equal(loaded.encode_texts(CAPTIONS), again.encode_texts(CAPTIONS))
    assert loaded.fingerprint["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.fingerprint["pretrained"] is None
    fresh = load_teacher("tiny-clip")  # random init is seeded: the same teacher every load ...
    assert torch.equal(fresh.encode_texts(CAPTIONS), tiny.encode_texts(CAPTIONS))
    # ... and the weights really came from the file
    assert not torch.allclose(loaded.encode_texts(CAPTIONS), tiny.encode_texts(CAPTIONS))


def test_config_json_path_teacher(tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = _write_config(run / "config.json")
    save_file(_state_dict(tiny), str(run / "model.safetensors"))
    t = load_teacher(str(cfg), str(run / "model.safetensors"))
    assert torch.equal(t.encode_texts(CAPTIONS), tiny.encode_texts(CAPTIONS))
    fp = t.fingerprint
    # content-derived name: the same config elsewhere (or addressed another way) is the same teacher
    assert fp["name"].startswith("kdpipe-config-") and fp["embed_dim"] == 32 and fp["checkpoint_sha256"]
    assert same_fingerprint(fp, {**fp, "open_clip_version": "0.0.1"})
    assert not same_fingerprint(fp, {**fp, "checkpoint_sha256": "0" * 64})
    assert "config" not in open_clip.list_models()  # registered under a name that shadows nothing


def test_a_teacher_is_shown_by_the_name_the_user_gave_it(tiny, tmp_path):
    """The fingerprint's label: a shipped name, a config file's stem or recorded name, or its folder for a
    generic config.json; the registered kdpipe-config-DIGEST only gives its digest."""
    assert tiny.fingerprint["label"] == "tiny-clip" and describe_teacher(tiny.fingerprint) == "tiny-clip (random init)"
    weights_file = tmp_path / "weights.safetensors"
    save_file(_state_dict(tiny), str(weights_file))
    sha = hashlib.sha256(weights_file.read_bytes()).hexdigest()[:12]
    mine = load_teacher(str(_write_config(tmp_path / "my-vit.json")), str(weights_file)).fingerprint
    digest = mine["name"].removeprefix("kdpipe-my-vit-")
    assert describe_teacher(mine) == f"my-vit (config {digest}, weights {sha})"
    for folder, wrapper, label in (("teacher", {"preprocess_cfg": {}}, "teacher"),
                                   ("other", {"preprocess_cfg": {}, "name": "shapes-vit"}, "shapes-vit")):
        (tmp_path / folder).mkdir()
        fp = load_teacher(str(_write_config(tmp_path / folder / "config.json", wrapper=wrapper)),
                          str(weights_file)).fingerprint
        assert fp["label"] == label and describe_teacher(fp) == f"{label} (config {digest}, weights {sha})"


def test_the_label_never_decides_whether_two_teachers_are_the_same():
    fp = {"name": "kdpipe-config-d370a4ef650b", "label": "shapes-vit", "pretrained": None,
          "checkpoint_sha256": "28f4034c9abd" + "0" * 52, "open_clip_version": "3.3.0", "embed_dim": 64}
    older = {k: v for k, v in fp.items() if k != "label"}  # a cache written before labels
    assert same_fingerprint(fp, older) and same_fingerprint(fp, {**fp, "label": "teacher"})
    assert not same_fingerprint(fp, {**fp, "checkpoint_sha256": "1" * 64})
    assert describe_teacher(fp) == "shapes-vit (config d370a4ef650b, weights 28f4034c9abd)"
    assert describe_teacher(older) == "kdpipe-config-d370a4ef650b (weights 28f4034c9abd)"
    tagged = {"name": "ViT-B-32-quickgelu", "label": "ViT-B-32", "pretrained": "openai", "checkpoint_sha256": None}
    assert describe_teacher(tagged) == "ViT-B-32 (openai)"


def test_config_json_wrapper_sets_preprocess(tmp_path):
    pp = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear", "resize_mode": "squash"}
    cfg = _write_config(tmp_path / "open_clip_config.json", wrapper={"preprocess_cfg": pp})
    t = load_teacher(str(cfg), allow_random_init=True)
    assert t.preprocess.mean == (0.5, 0.5, 0.5) and t.preprocess.std == (0.25, 0.25, 0.25)
    assert t.preprocess.interpolation == "bilinear" and t.preprocess.size == 32
    assert t.preprocess.resize_mode == "squash" and "fill_color" not in t.fingerprint["preprocess"]
    assert t.fingerprint["preprocess_source"] == "config"


def test_longest_records_its_fill_colour_and_unknown_modes_are_refused(tmp_path):
    pp = {"resize_mode": "longest", "fill_color": 128}
    t = load_teacher(str(_write_config(tmp_path / "longest.json", wrapper={"preprocess_cfg": pp})),
                     allow_random_init=True)
    assert t.preprocess.resize_mode == "longest" and t.preprocess.fill_color == 128
    assert t.fingerprint["preprocess"]["fill_color"] == 128  # the pad colour changes view 0's pixels
    bad = _write_config(tmp_path / "letterbox.json", wrapper={"preprocess_cfg": {"resize_mode": "letterbox"}})
    with pytest.raises(ValueError, match="'letterbox'.*shortest, squash, longest"):
        load_teacher(str(bad), allow_random_init=True)


def test_config_json_needs_weights_or_flag(tmp_path):
    cfg = _write_config(tmp_path / "config.json")
    with pytest.raises(ValueError, match="random weights"):
        load_teacher(str(cfg))
    with pytest.raises(ValueError, match="no pretrained tags"):
        load_teacher(str(cfg), "openai")


def test_bad_weight_sources(tmp_path):
    with pytest.raises(ValueError, match="no pretrained tag 'openai'.*--pretrained /path"):
        load_teacher("tiny-clip", "openai")
    with pytest.raises(FileNotFoundError):
        load_teacher("tiny-clip", str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError):
        resolve_arch(str(tmp_path / "missing.json"))
    bad = tmp_path / "notaconfig.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not an open_clip model config"):
        resolve_arch(str(bad))


def _values_and_grads(model: torch.nn.Module, forward, tokens: torch.Tensor):
    model.zero_grad()
    out = forward(model, tokens)
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_module_encode_text_trims_with_the_same_values_and_gradients(tmp_path):
    """The shared trimmed forward (pretraining trains through it): values and gradients of open_clip's own."""
    resolve_arch("tiny-clip")  # registers the shipped configs with open_clip
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip")
    tokens = open_clip.get_tokenizer("tiny-clip")(CAPTIONS)
    trimmed, g_trim = _values_and_grads(model, teachers.encode_text, tokens)
    full, g_full = _values_and_grads(model, lambda m, t: m.encode_text(t), tokens)
    assert torch.allclose(trimmed, full, atol=1e-5)
    assert g_trim.keys() == g_full.keys() and "token_embedding.weight" in g_trim
    for name in g_trim:  # float32 summation-order noise only: 1e-5 of each gradient's scale
        assert (g_trim[name] - g_full[name]).abs().max() <= 1e-5 * g_full[name].abs().max(), name
    # a tower pooled at the last position cannot be trimmed: open_clip's forward, bit for bit
    last = load_teacher(str(_write_config(tmp_path / "lastpool.json", {"pool_type": "last"})),
                        allow_random_init=True).model
    assert torch.equal(teachers.encode_text(last, tokens), last.encode_text(tokens))
