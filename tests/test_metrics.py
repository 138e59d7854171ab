"""Unit tests for kdpipe.metrics: retrieval recall, zero-shot classifier/accuracy, agreement."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.metrics import zeroshot_retrieval as clip_benchmark
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from kdpipe import metrics
from kdpipe.metrics import (
    agreement,
    retrieval_recall,
    with_ratios,
    zero_shot_accuracy,
    zero_shot_classifier,
    zero_shot_predictions,
)


def reference_recall(img, txt, txt_to_img, ks):
    """CLIP_benchmark's figures: its ``recall_at_k`` on the scores and positive pairs its
    ``evaluate`` builds. Hits are averaged in float64 as ours are (it averages in float32)."""
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    scores = txt @ img.T  # [M, N]
    positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
    positive_pairs[torch.arange(len(scores)), txt_to_img] = True
    out = {}
    for direction, s, pos in (("i2t", scores.T, positive_pairs.T), ("t2i", scores, positive_pairs)):
        for k in ks:
            hit = clip_benchmark.recall_at_k(s, pos, k) > 0
            out[f"{direction}_R@{k}"] = hit.double().mean().item()
    return out


def random_world(n: int, d: int, seed: int, counts: torch.Tensor | None = None):
    """n images with 1..5 captions each (or ``counts``); captions are noisy copies of their image."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g)
    counts = torch.randint(1, 6, (n,), generator=g) if counts is None else counts
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
    assert r == reference_recall(img, txt, txt_to_img, (1, 2, 3))


@pytest.mark.parametrize("chunk", [1, 7, 10, 37, 1000])
def test_chunked_recall_equals_clip_benchmark_recall_at_k(chunk):
    img, txt, txt_to_img = random_world(37, 16, seed=chunk)
    ks = (1, 5, 10)
    got = retrieval_recall(img, txt, txt_to_img, ks=ks, chunk=chunk)
    want = reference_recall(img, txt, txt_to_img, ks)
    assert got == want
    # the noise level makes the task neither trivial nor hopeless, so the check has teeth
    assert 0.0 < got["i2t_R@1"] < 1.0 and 0.0 < got["t2i_R@1"] < 1.0


def test_recall_half_precision_inputs_match_float32():
    img, txt, txt_to_img = random_world(25, 32, seed=3)
    img, txt = F.normalize(img, dim=1).half(), F.normalize(txt, dim=1).half()
    assert retrieval_recall(img, txt, txt_to_img, chunk=4) == reference_recall(img, txt, txt_to_img, (1, 5, 10))


class IndexedModel(torch.nn.Module):
    """A CLIP-like model whose "images" and "tokens" are row indices into fixed embedding tables."""

    def __init__(self, img: torch.Tensor, txt: torch.Tensor) -> None:
        super().__init__()
        self.img, self.txt = img, txt

    def encode_image(self, index: torch.Tensor) -> torch.Tensor:
        return self.img[index]

    def encode_text(self, index: torch.Tensor) -> torch.Tensor:
        return self.txt[index]


def test_recall_equals_clip_benchmark_evaluate():
    # CLIP_benchmark's whole retrieval path: batches of (images, captions per image), its
    # dataloader_with_indices, positive pairs, recall_at_k both ways. 32 images and 64 captions
    # (1..3 per image): every figure is a multiple of 1/64, exact in its float32 average too.
    counts = torch.tensor([1, 2, 3, 2] * 8)
    img, txt, txt_to_img = random_world(32, 16, seed=11, counts=counts)
    captions = [[f"caption {j}" for j in (txt_to_img == i).nonzero().flatten().tolist()] for i in range(32)]
    batches = [(torch.arange(s, min(s + 5, 32)), captions[s : s + 5]) for s in range(0, 32, 5)]

    def tokenizer(texts: list[str]) -> torch.Tensor:
        return torch.tensor([int(t.split()[1]) for t in texts])

    ks = (1, 5, 10)
    want = clip_benchmark.evaluate(IndexedModel(img, txt), batches, tokenizer, "cpu", amp=False, recall_k_list=ks)
    got = retrieval_recall(img, txt, txt_to_img, ks=ks, chunk=7)
    for k in ks:
        assert got[f"i2t_R@{k}"] == want[f"text_retrieval_recall@{k}"]
        assert got[f"t2i_R@{k}"] == want[f"image_retrieval_recall@{k}"]
    assert 0.0 < got["i2t_R@1"] < 1.0 and 0.0 < got["t2i_R@1"] < 1.0


def test_ties_count_against_the_query():
    # two identical images with identical captions: every score ties, so each correct candidate
    # has one other candidate at least as good: rank 1 both ways
    v = F.normalize(torch.ones(1, 4), dim=1)
    r = retrieval_recall(v.repeat(2, 1), v.repeat(2, 1), torch.tensor([0, 1]), ks=(1, 2))
    assert r == {"i2t_R@1": 0.0, "i2t_R@2": 1.0, "t2i_R@1": 0.0, "t2i_R@2": 1.0}


def test_hand_built_ties():
    # 3 images on the axes, 2 captions each. Caption 3 (image 1) is an exact copy of caption 0
    # (image 0); captions 4, 5 are both exactly image 2 (a tie between correct captions).
    e = torch.eye(3)
    txt = torch.stack([e[0], e[0] + 0.5 * e[1], e[1], e[0], e[2], e[2]])
    txt_to_img = torch.tensor([0, 0, 1, 1, 2, 2])
    r = retrieval_recall(e, txt, txt_to_img, ks=(1, 2, 3), chunk=2)
    # I->T: image 0's best caption (0, score 1) ties caption 3 of image 1: rank 1.
    #       image 2's two captions tie each other at 1 and nothing else reaches 1: rank 0.
    assert (r["i2t_R@1"], r["i2t_R@2"], r["i2t_R@3"]) == (2 / 3, 1.0, 1.0)
    # T->I: caption 3 scores 1 on image 0 and 0 on its own image 1, tied by image 2: rank 2.
    assert (r["t2i_R@1"], r["t2i_R@2"], r["t2i_R@3"]) == (5 / 6, 5 / 6, 1.0)


def test_constant_image_tower_scores_chance():
    # every image embeds to the same vector: all images tie for every caption (rank N - 1),
    # and only the image that owns the single best-scoring caption finds one first
    n = 12
    _, txt, txt_to_img = random_world(n, 16, seed=5)
    img = torch.randn(1, 16, generator=torch.Generator().manual_seed(6)).repeat(n, 1)
    r = retrieval_recall(img, txt, txt_to_img, ks=(1, 5, 10, 12))
    assert (r["t2i_R@1"], r["t2i_R@5"], r["t2i_R@10"], r["t2i_R@12"]) == (0.0, 0.0, 0.0, 1.0)
    assert r["i2t_R@1"] == 1 / n


def test_constant_text_tower_scores_chance():
    # every caption embeds to the same vector: for I->T every other image's caption ties the
    # best own one; for T->I only the captions of the image scoring highest are hits
    img, txt, txt_to_img = random_world(12, 16, seed=7)
    txt = txt[:1].repeat(len(txt), 1)
    r = retrieval_recall(img, txt, txt_to_img, ks=(1, 10))
    others = len(txt) - torch.bincount(txt_to_img, minlength=12)  # texts of other images, per image
    assert others.min() >= 10 and r["i2t_R@1"] == 0.0 and r["i2t_R@10"] == 0.0
    top = (F.normalize(img, dim=1) @ F.normalize(txt[0], dim=0)).argmax()
    assert r["t2i_R@1"] == (txt_to_img == top).double().mean().item()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rows_are_refused_with_their_count(bad):
    img, txt, txt_to_img = random_world(10, 8, seed=2)
    broken = img.clone()
    broken[[1, 4, 7], 3] = bad
    with pytest.raises(ValueError, match=r"^image embeddings have 3 non-finite rows of 10$"):
        retrieval_recall(broken, txt, txt_to_img)
    broken = txt.clone()
    broken[[0, 2], :] = bad
    with pytest.raises(ValueError, match=rf"^val split: teacher text embeddings have 2 non-finite rows of {len(txt)}$"):
        retrieval_recall(img, broken, txt_to_img, txt_name="val split: teacher text embeddings")


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


def test_modality_gap_by_hand():
    img = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # unit rows e1, e2: centroid (0.5, 0.5)
    txt = torch.tensor([[-1.0, 0.0], [-5.0, 0.0]])  # centroid (−1, 0)
    assert metrics.modality_gap(img, txt) == pytest.approx(math.hypot(1.5, 0.5), abs=1e-12)
    assert metrics.modality_gap(img, img * 7) == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        metrics.modality_gap(torch.full((2, 2), float("nan")), txt)


def test_effective_rank_by_hand():
    assert metrics.effective_rank(torch.ones(10, 4)) == pytest.approx(1.0, abs=1e-9)  # collapsed: one direction
    assert metrics.effective_rank(torch.eye(4) * 3) == pytest.approx(4.0, abs=1e-9)  # evenly over 4 directions
    # rows e1, e1, e2 -> σ = (√2, 1) -> p = (√2, 1)/(√2 + 1)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([math.sqrt(2), 1.0], dtype=torch.float64) / (math.sqrt(2) + 1)
    assert metrics.effective_rank(x) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-9)
