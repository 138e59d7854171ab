"""Zero-shot prompt sets: class names, templates, teacher encoding and the prompts.h5 round trip."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from kdpipe import prompts
from kdpipe.prompts import PROMPT_SETS, PromptSet, build_prompt_sets, encode_prompts, read_prompts, write_prompts
from kdpipe.teachers import load_teacher


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_teacher("tiny-clip")


def test_registered_sets_are_well_formed():
    assert {"shapes", "cifar10", "cifar100", "imagenet", "imagenet-simple"} <= set(PROMPT_SETS.names())
    sizes = {"cifar10": (10, 18), "cifar100": (100, 18), "imagenet": (1000, 80), "imagenet-simple": (1000, 7)}
    for name, (k, t) in sizes.items():
        classnames, templates = PROMPT_SETS.get(name)()
        assert (len(classnames), len(templates)) == (k, t)
        assert all(tpl.count("{}") == 1 for tpl in templates)
    assert all(len(set(PROMPT_SETS.get(n)()[0])) == k for n, (k, _) in sizes.items() if "imagenet" not in n)
    assert PROMPT_SETS.get("imagenet")()[1][0] == "a bad photo of a {}."  # open_clip's lambdas, as strings
    assert PROMPT_SETS.get("imagenet-simple")()[1][0] == "itap of a {}."
    assert PROMPT_SETS.get("imagenet-simple")()[0] == PROMPT_SETS.get("imagenet")()[0]
    cifar100, _ = PROMPT_SETS.get("cifar100")()
    assert cifar100[:3] == ["apple", "aquarium fish", "baby"] and cifar100[-1] == "worm"
    assert "_" not in "".join(cifar100)


def test_shapes_set_uses_the_shapes_world_names():
    from kdpipe.data.shapes import SHAPES

    classnames, templates = PROMPT_SETS.get("shapes")()
    assert classnames == list(SHAPES) and templates


def test_unknown_set_lists_valid_ones():
    with pytest.raises(KeyError, match="cifar10"):
        PROMPT_SETS.get("mnist")


def test_encode_prompts_shape_norm_and_order(tiny):
    classnames, templates = ["circle", "square", "star"], ["a photo of a {}", "there is a {}"]
    emb = encode_prompts(tiny, classnames, templates, batch_size=4)  # batches cross class boundaries
    assert emb.shape == (3, 2, 32) and emb.dtype == np.float16
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=-1), 1.0, atol=2e-3)
    one = tiny.encode_texts(["there is a square"])[0]
    assert np.allclose(emb[1, 1].astype(np.float32), (one / one.norm()).numpy(), atol=2e-3)
    assert not np.allclose(emb[0, 1], emb[1, 1], atol=1e-2)


def test_build_prompt_sets_adds_data_set_only_for_new_labels(tiny):
    from kdpipe.data.shapes import SHAPES

    sets = build_prompt_sets(tiny, names=("shapes", "cifar10"), extra_classnames=list(SHAPES))
    assert set(sets) == {"shapes", "cifar10"}
    assert sets["cifar10"].emb.shape == (10, 18, 32)
    sets = build_prompt_sets(tiny, names=("cifar10",), extra_classnames=["cat", "lamp"])
    assert set(sets) == {"cifar10", "data"} and sets["data"].classnames == ["cat", "lamp"]
    assert prompts.find_set(sets, ["cat", "lamp"]) == "data" and prompts.find_set(sets, ["lamp"]) is None


def test_prompts_h5_round_trip(tiny, tmp_path):
    sets = build_prompt_sets(tiny, names=("shapes", "cifar10"))
    path = tmp_path / "prompts.h5"
    write_prompts(path, sets)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic writer's temp name: gone after the rename
    back = read_prompts(path)
    assert set(back) == set(sets)
    for name, s in sets.items():
        assert back[name].classnames == s.classnames and back[name].templates == s.templates
        assert back[name].emb.dtype == np.float16 and np.array_equal(back[name].emb, s.emb)
    with h5py.File(path) as f:  # strings stored as utf-8 string datasets (readable from any h5 tool)
        assert h5py.check_string_dtype(f["cifar10/classnames"].dtype).encoding == "utf-8"
    write_prompts(path, {"cifar10": sets["cifar10"]})  # rewriting replaces the whole file
    assert set(read_prompts(path)) == {"cifar10"}


def test_prompt_set_checks_shape():
    with pytest.raises(ValueError, match="2 classes x 3 templates"):
        PromptSet(["a", "b"], ["{}", "a {}", "the {}"], np.zeros((2, 2, 4), np.float16))
