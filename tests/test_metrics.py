"""Unit tests for kdpipe.metrics: retrieval recall, zero-shot classifier/accuracy, agreement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from kdpipe.metrics import (
    agreement,
    retrieval_recall,
    with_ratios,
    zero_shot_accuracy,
    zero_shot_classifier,
    zero_shot_predictions,
)


def dense_recall(img, txt, txt_to_img, ks):
    """Brute-force reference: full similarity matrix, full sort, position of the first hit."""
    img, txt = F.normalize(img.float(), dim=1), F.normalize(txt.float(), dim=1)
    sims = img @ txt.T  # [N, M]
    out = {}
    order = sims.argsort(dim=1, descending=True)  # texts per image, best first
    owner = txt_to_img[order]  # [N, M] image id of each ranked text
    first_i2t = (owner == torch.arange(img.shape[0])[:, None]).float().argmax(dim=1)
    order_t = sims.T.argsort(dim=1, descending=True)  # images per text, best first
    first_t2i = (order_t == txt_to_img[:, None]).float().argmax(dim=1)
    for k in ks:
        out[f"i2t_R@{k}"] = (first_i2t < k).double().mean().item()
    for k in ks:
        out[f"t2i_R@{k}"] = (first_t2i < k).double().mean().item()
    return out


def random_world(n: int, d: int, seed: int):
    """n images with 1..5 captions each; captions are noisy copies of their image."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g)
    counts = torch.randint(1, 6, (n,), generator=g)
    txt_to_img = torch.repeat_interleave(torch.arange(n), counts)
    txt = img[txt_to_img] + 1.2 * torch.randn(len(txt_to_img), d, generator=g)
    # rows of arbitrary length: the function must normalise itself
    img = img * torch.rand(n, 1, generator=g).add(0.5)
    return img, txt, txt_to_img


def test_identical_embeddings_give_perfect_recall():
    img = F.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    r = retrieval_recall(img, img.clone(), torch.arange(20), chunk=6)
    assert set(r) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert all(v == 1.0 for v in r.values())


def test_hand_built_case_half_recall_at_1():
    # 4 images on the axes, 2 captions each. Captions of images 0, 1 sit on their image;
    # captions of image 2 lean to axis 3 and those of image 3 to axis 2 (swapped).
    e = torch.eye(4)
    img = e.clone()
    txt = torch.stack([
        e[0], e[0], e[1], e[1],
        0.9 * e[3] + 0.1 * e[2], 0.8 * e[3] + 0.2 * e[2],
        0.9 * e[2] + 0.1 * e[3], 0.8 * e[2] + 0.2 * e[3],
    ])
    txt_to_img = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    r = retrieval_recall(img, txt, txt_to_img, ks=(1, 2, 3), chunk=3)
    assert r["i2t_R@1"] == 0.5  # images 2, 3 rank the other's captions first
    assert r["i2t_R@2"] == 0.5  # ... both of them
    assert r["i2t_R@3"] == 1.0
    assert r["t2i_R@1"] == 0.5  # captions 4..7 point at the wrong image
    assert r["t2i_R@2"] == 1.0
    assert r == dense_recall(img, txt, txt_to_img, (1, 2, 3))


@pytest.mark.parametrize("chunk", [1, 7, 10, 37, 1000])
def test_chunked_recall_equals_dense_reference(chunk):
    img, txt, txt_to_img = random_world(37, 16, seed=chunk)
    ks = (1, 5, 10)
    got = retrieval_recall(img, txt, txt_to_img, ks=ks, chunk=chunk)
    want = dense_recall(img, txt, txt_to_img, ks)
    assert got == want
    # the noise level makes the task neither trivial nor hopeless, so the check has teeth
    assert 0.0 < got["i2t_R@1"] < 1.0 and 0.0 < got["t2i_R@1"] < 1.0


def test_recall_half_precision_inputs_match_float32():
    img, txt, txt_to_img = random_world(25, 32, seed=3)
    img, txt = F.normalize(img, dim=1).half(), F.normalize(txt, dim=1).half()
    assert retrieval_recall(img, txt, txt_to_img, chunk=4) == dense_recall(img, txt, txt_to_img, (1, 5, 10))


def test_ties_count_in_the_querys_favour():
    # two identical images with identical captions: every score ties, rank = #strictly greater = 0
    v = F.normalize(torch.ones(1, 4), dim=1)
    r = retrieval_recall(v.repeat(2, 1), v.repeat(2, 1), torch.tensor([0, 1]), ks=(1,))
    assert r == {"i2t_R@1": 1.0, "t2i_R@1": 1.0}


def test_image_without_captions_is_a_miss():
    img = torch.eye(3)
    r = retrieval_recall(img, img[:2], torch.tensor([0, 1]), ks=(1, 5))
    assert r["i2t_R@1"] == pytest.approx(2 / 3) and r["i2t_R@5"] == pytest.approx(2 / 3)
    assert r["t2i_R@1"] == 1.0


def test_recall_rejects_bad_index():
    with pytest.raises(ValueError, match="outside"):
        retrieval_recall(torch.eye(2), torch.eye(2), torch.tensor([0, 2]))


class FakeTokenizer:
    """Maps each prompt string to its row in a fixed embedding table."""

    def __init__(self, texts: list[str]) -> None:
        self.index = {t: i for i, t in enumerate(texts)}

    def __call__(self, texts):
        return torch.tensor([self.index[t] for t in texts])


class FakeModel(torch.nn.Module):
    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def encode_text(self, tokens, normalize: bool = False):
        x = self.table[tokens]
        return F.normalize(x, dim=-1) if normalize else x


def test_zero_shot_classifier_equals_open_clip():
    classnames = [f"class{i}" for i in range(7)]
    templates = ["a photo of a {}.", "a drawing of a {}.", "{} again"]
    texts = [t.format(c) for c in classnames for t in templates]
    table = torch.randn(len(texts), 12, generator=torch.Generator().manual_seed(0)) * 3
    want = build_zero_shot_classifier(
        FakeModel(table), FakeTokenizer(texts), classnames, templates, num_classes_per_batch=3
    )
    got = zero_shot_classifier(table.reshape(7, 3, 12))
    assert got.shape == (12, 7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    torch.testing.assert_close(got.norm(dim=0), torch.ones(7))


def test_zero_shot_accuracy_hand_case():
    classifier = torch.eye(4)  # D = K = 4: class k scores coordinate k
    img = torch.tensor([
        [0.9, 0.3, 0.1, 0.0],  # ranking 0,1,2,3 ; label 0 -> top1
        [0.9, 0.3, 0.1, 0.0],  # label 1 -> top2
        [0.1, 0.2, 0.9, 0.3],  # ranking 2,3,1,0 ; label 0 -> top4 only
        [0.0, 0.0, 0.2, 1.0],  # label 3 -> top1
    ])
    labels = torch.tensor([0, 1, 0, 3])
    acc = zero_shot_accuracy(img, classifier, labels, ks=(1, 2, 3), chunk=3)
    assert acc == {"top1": 0.5, "top2": 0.75, "top3": 0.75}
    assert zero_shot_predictions(img, classifier, chunk=3).tolist() == [0, 0, 2, 3]
    # K larger than the class count: every label is in the "top 5"
    assert zero_shot_accuracy(img, classifier, labels)["top5"] == 1.0


def test_agreement():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(6, 5, generator=g)
    classifier = F.normalize(torch.randn(5, 3, generator=g), dim=0)
    same = agreement(teacher * 2, teacher, classifier)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-6) and same["top1_agreement"] == 1.0
    assert agreement(-teacher, teacher)["cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert "top1_agreement" not in agreement(teacher, teacher)

    # hand case: classifier = identity, 2 of 4 students pick another class
    t = torch.eye(4)[[0, 1, 2, 3]]
    s = torch.eye(4)[[0, 1, 3, 2]]
    out = agreement(s, t, torch.eye(4))
    assert out == {"cosine": 0.5, "top1_agreement": 0.5}
    # separate classifiers: student's permuted classifier undoes the swap
    perm = torch.eye(4)[:, [0, 1, 3, 2]]
    assert agreement(s, t, perm, torch.eye(4))["top1_agreement"] == 1.0


def test_with_ratios():
    out = with_ratios({"top1": 0.6, "R@1": 0.2, "extra": 1.0}, {"top1": 0.8, "R@1": 0.0})
    assert out["top1"] == {"student": 0.6, "teacher": 0.8, "ratio": pytest.approx(0.75)}
    assert out["R@1"]["ratio"] is None
    assert out["extra"] == {"student": 1.0, "teacher": None, "ratio": None}
