"""Evaluation math on embeddings: retrieval Recall@K, zero-shot classification, agreement.

Pure torch, no files: the eval stage (and train's validation) loads embeddings and calls these. Every function
works in float32 whatever the input dtype (caches hold fp16) and on the inputs' device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _unit(x: Tensor) -> Tensor:
    """[N, D] -> float32 rows of unit length."""
    return F.normalize(x.float(), dim=-1)


def _recall_from_ranks(ranks: Tensor, ks: Sequence[int], prefix: str) -> dict[str, float]:
    """ranks [Q] (0 = best) -> {"{prefix}_R@K": share of queries with rank < K}."""
    return {f"{prefix}_R@{k}": (ranks < k).double().mean().item() for k in ks}


def require_finite(x: Tensor, what: str) -> None:
    """Refuse x [N, D] when any row holds NaN or inf: ValueError "{what} have 3 non-finite rows of 500".

    A NaN score compares False with everything, so whatever the rank rule it silently turns
    into a hit or a miss: a diverged model must fail loudly rather than get a figure.
    """
    bad = int((~torch.isfinite(x)).any(dim=-1).sum())
    if bad:
        raise ValueError(f"{what} have {bad} non-finite rows of {x.shape[0]}")


def _i2t_ranks(img: Tensor, txt: Tensor, txt_to_img: Tensor, chunk: int) -> Tensor:
    """Rank of each image's best-scoring caption -> LongTensor [N]: other images' texts scoring >= it.

    The image's own captions never count (none beats the best; one that ties it is as correct).
    An image with no caption gets the largest long (never a hit, whatever K).
    """
    ranks = []
    for start in range(0, img.shape[0], chunk):
        sims = img[start : start + chunk] @ txt.T  # [c, M]: the only big tensor, c x M
        ids = torch.arange(start, start + sims.shape[0], device=img.device)
        positive = txt_to_img[None, :] == ids[:, None]  # [c, M]
        best = sims.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        rank = ((sims >= best) & ~positive).sum(dim=1)
        ranks.append(rank.masked_fill(~positive.any(dim=1), torch.iinfo(torch.long).max))
    return torch.cat(ranks)


def _t2i_ranks(img: Tensor, txt: Tensor, txt_to_img: Tensor, chunk: int) -> Tensor:
    """Rank of each caption's own image -> LongTensor [M]: other images scoring >= it."""
    ranks = []
    for start in range(0, txt.shape[0], chunk):
        sims = txt[start : start + chunk] @ img.T  # [c, N]
        correct = sims.gather(1, txt_to_img[start : start + chunk, None])  # [c, 1]
        ranks.append((sims >= correct).sum(dim=1) - 1)  # - 1: the own image ties itself
    return torch.cat(ranks)


def retrieval_recall(
    img: Tensor,
    txt: Tensor,
    txt_to_img: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
    img_name: str = "image embeddings",
    txt_name: str = "text embeddings",
) -> dict[str, float]:
    """Recall@K both ways with every caption of every image (CLIP_benchmark definition).

    img [N, D], txt [M, D] (normalised here), txt_to_img [M] long: the image of each caption.
    Image -> text: an image is a hit at K when ANY of its captions is among the K most
    similar texts. Text -> image: a caption is a hit when its image is among the K most
    similar images. Returns {"i2t_R@1": ..., "t2i_R@1": ..., ...}, each in [0, 1].

    A query's rank is the number of OTHER candidates scoring at least as high as its (best)
    correct one: ties count against the query, so a collapsed model (a constant tower, two
    images with identical captions) gets no credit for them, and the result does not depend
    on how a top-k kernel orders equal scores. Without ties the figures are CLIP_benchmark's
    ``recall_at_k`` (tested). Rows holding NaN or inf are refused with a ValueError naming
    them by ``img_name`` / ``txt_name`` (e.g. "val split: student image embeddings").
    Similarities are computed ``chunk`` queries at a time: peak memory is chunk x max(N, M)
    floats, never N x M (COCO 5k x 25k, or 25k x 125k).
    """
    require_finite(img, img_name)
    require_finite(txt, txt_name)
    img, txt = _unit(img), _unit(txt)
    txt_to_img = txt_to_img.to(device=img.device, dtype=torch.long)
    if txt_to_img.shape != (txt.shape[0],):
        raise ValueError(f"txt_to_img must have shape [{txt.shape[0]}], got {list(txt_to_img.shape)}")
    if txt_to_img.numel() and (txt_to_img.min() < 0 or txt_to_img.max() >= img.shape[0]):
        raise ValueError(f"txt_to_img holds image indices outside [0, {img.shape[0]})")
    i2t = _recall_from_ranks(_i2t_ranks(img, txt, txt_to_img, chunk), ks, "i2t")
    t2i = _recall_from_ranks(_t2i_ranks(img, txt, txt_to_img, chunk), ks, "t2i")
    return {**i2t, **t2i}


def zero_shot_classifier(class_emb: Tensor) -> Tensor:
    """Prompt-ensemble classifier: class_emb [K, T, D] (class x template) -> weights [D, K].

    Each template embedding is normalised, averaged per class, and the mean re-normalised:
    the same arithmetic as ``open_clip.build_zero_shot_classifier``, so cached prompt
    embeddings give the classifier the teacher would have built live.
    """
    per_class = _unit(class_emb).mean(dim=1)  # [K, D]
    per_class = per_class / per_class.norm(dim=1, keepdim=True)
    return per_class.T


def _logits(img: Tensor, classifier: Tensor) -> Tensor:
    """img [N, D] @ classifier [D, K] -> [N, K] cosine scores."""
    if img.shape[1] != classifier.shape[0]:
        raise ValueError(f"image dim {img.shape[1]} does not match classifier dim {classifier.shape[0]}")
    return _unit(img) @ classifier.float().to(img.device)


def zero_shot_logits(img: Tensor, classifier: Tensor, scale: float) -> Tensor:
    """A CLIP model's class logits: img [N, D] (any norm), classifier [D, K] -> scale · img/|img| @ classifier [N, K].

    With the teacher's image embeddings, its prompt-ensemble classifier and its logit scale, these
    are the teacher's zero-shot logits (open_clip's ``logit_scale.exp() * image_features @ classifier``).
    """
    return scale * _logits(img, classifier)


def zero_shot_predictions(img: Tensor, classifier: Tensor, chunk: int = 4096) -> Tensor:
    """Predicted class per image: img [N, D], classifier [D, K] -> LongTensor [N]."""
    preds = [_logits(img[s : s + chunk], classifier).argmax(dim=1) for s in range(0, img.shape[0], chunk)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=img.device)


def zero_shot_accuracy(
    img: Tensor,
    classifier: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (1, 5),
    chunk: int = 4096,
) -> dict[str, float]:
    """Top-K accuracy: img [N, D], classifier [D, K], labels [N] long -> {"top1": ..., "top5": ...}.

    With fewer classes than K, top-K is 1.0 by definition (every class is in the top K).
    """
    if img.shape[0] == 0:
        raise ValueError("zero_shot_accuracy needs at least one image")
    labels = labels.to(device=img.device, dtype=torch.long)
    k_max = min(max(ks), classifier.shape[1])
    hits = [_top_hits(_logits(img[s : s + chunk], classifier), labels[s : s + chunk], k_max)
            for s in range(0, img.shape[0], chunk)]
    hit = torch.cat(hits)
    return {f"top{k}": hit[:, :k].any(dim=1).double().mean().item() for k in ks}


def _top_hits(logits: Tensor, labels: Tensor, k_max: int) -> Tensor:
    """[N, k_max] bool: whether the label sits at each of the first k_max places of the ranking."""
    return logits.topk(k_max, dim=1).indices == labels[:, None]


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-K accuracy of class logits [N, K] for labels [N] -> {"top1": ..., "top5": ...} (K < k: 1.0)."""
    if logits.shape[0] == 0:
        raise ValueError("topk_accuracy needs at least one row")
    hit = _top_hits(logits, labels.to(device=logits.device, dtype=torch.long), min(max(ks), logits.shape[1]))
    return {f"top{k}": hit[:, :k].any(dim=1).double().mean().item() for k in ks}


def agreement(
    student_img: Tensor,
    teacher_img: Tensor,
    classifier_s: Tensor | None = None,
    classifier_t: Tensor | None = None,
) -> dict[str, float]:
    """How closely a student follows its teacher on the same images.

    student_img, teacher_img [N, D] (same space, e.g. the student projected to the teacher
    dim). Returns {"cosine": mean cosine}, plus {"top1_agreement": share of images whose
    zero-shot top-1 class is the same} when a classifier [D, K] is given. ``classifier_t``
    defaults to ``classifier_s`` (an image-only student classifies with the teacher's text).
    """
    if student_img.shape != teacher_img.shape:
        raise ValueError(f"student {list(student_img.shape)} and teacher {list(teacher_img.shape)} shapes differ")
    out = {"cosine": (_unit(student_img) * _unit(teacher_img)).sum(dim=1).mean().item()}
    if classifier_s is not None:
        classifier_t = classifier_s if classifier_t is None else classifier_t
        same = zero_shot_predictions(student_img, classifier_s) == zero_shot_predictions(teacher_img, classifier_t)
        out["top1_agreement"] = same.double().mean().item()
    return out


def with_ratios(student: dict[str, float], teacher: dict[str, float]) -> dict[str, dict]:
    """Pair each student metric with the teacher's: {m: {"student", "teacher", "ratio"}}.

    ratio = student / teacher; None when the teacher lacks the metric or scores 0.
    """
    out = {}
    for name, s in student.items():
        t = teacher.get(name)
        out[name] = {"student": s, "teacher": t, "ratio": s / t if t else None}
    return out


def modality_gap(img: Tensor, txt: Tensor) -> float:
    """‖mean(x̂_img) − mean(x̂_txt)‖: the distance between the centroids of the unit image rows
    img [N, D] and unit text rows txt [M, D] (Liang et al., "Mind the Gap", 2022); 0 ≤ gap ≤ 2."""
    require_finite(img, "image embeddings")
    require_finite(txt, "text embeddings")
    return float((F.normalize(img.double(), dim=-1).mean(0) - F.normalize(txt.double(), dim=-1).mean(0)).norm())


def effective_rank(x: Tensor) -> float:
    """exp(entropy of σ/Σσ) of the unit rows x [N, D], σ their singular values (RankMe, Garrido et
    al. 2023, after Roy & Vetterli 2007): 1 when every row is the same direction, min(N, D) when
    the rows spread evenly over every direction. Low values are "feature collapse"."""
    require_finite(x, "embeddings")
    s = torch.linalg.svdvals(F.normalize(x.double(), dim=-1))
    p = s / s.sum().clamp_min(1e-300)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()))


# --------------------------------------------------------------------------- a model's view of a split, several teachers


@dataclass
class Embeddings:
    """One model's view of a split: its image rows, caption rows and zero-shot classifiers, in one space.

    img [N, D] (one row per image, the split's HDF5 order), txt [M, D] (every caption),
    classifiers {dataset: [D, K]} zero-shot weights. Rows need not be normalised.
    """

    img: Tensor
    txt: Tensor
    classifiers: dict[str, Tensor] = field(default_factory=dict)


def zeroshot_metrics(e: Embeddings, labels: Tensor, names: Iterable[str] | None = None) -> dict[str, float]:
    """Zero-shot top-1/top-5 ("zeroshot/{name}/top1", ...) of each classifier of ``e`` (``names``: only
    those) on the labelled images; labels [N] long (−1: unknown)."""
    known, out = labels >= 0, {}
    if not known.any():
        return out
    for name, classifier in e.classifiers.items():
        if names is None or name in names:
            acc = zero_shot_accuracy(e.img[known], classifier, labels[known])
            out.update({f"zeroshot/{name}/{k}": v for k, v in acc.items()})
    return out


def top1_captions(img: Tensor, txt: Tensor, chunk: int = 1024) -> Tensor:
    """[N] index of each image's most similar caption (cosine): img [N, D], txt [M, D], in chunks of images."""
    txt = F.normalize(txt.float(), dim=-1)
    return torch.cat([(F.normalize(img[i:i + chunk].float(), dim=-1) @ txt.T).argmax(dim=1)
                      for i in range(0, img.shape[0], chunk)])


def ensemble_embeddings(members: list[tuple[float, Embeddings]]) -> Embeddings:
    """The ensemble as embeddings: concat_k(√w_k · x̂_k) per row, so that its cosine between an image and a
    caption is Σ_k w_k cos_k (the teachers' weighted average similarity; weights sum to 1, rows stay unit).
    Its classifiers, for the sets every member has, likewise: concat_k(√w_k · c_k) per class (columns)."""
    def cat(rows: list[Tensor], dim: int = 1) -> Tensor:
        return torch.cat([math.sqrt(w) * F.normalize(x.float(), dim=dim)
                          for (w, _), x in zip(members, rows)], dim=dim)

    shared = [n for n in members[0][1].classifiers if all(n in e.classifiers for _, e in members)]
    return Embeddings(cat([e.img for _, e in members]), cat([e.txt for _, e in members]),
                      {n: cat([e.classifiers[n] for _, e in members], dim=0) for n in shared})


def teacher_rows(student: Embeddings, teacher: Embeddings, txt_to_img: Tensor, labels: Tensor, prefix: str,
                 chunk: int = 1024) -> dict[str, dict]:
    """The student against one teacher (or the ensemble) whose space may differ from the student's.

    Retrieval: the student's figures next to that teacher's own. ``agreement/i2t_top1``: the share of
    images whose most similar caption is the same for the student and the teacher (each in its own space).
    Zero-shot, for each prompt set both have a classifier of: the student's top-1/top-5 with its own
    classifier next to the teacher's with its own (its prompts), and ``agreement/{set}/top1``, the share
    of images whose predicted class is the same. labels [N] long (−1: unknown).
    """
    s = retrieval_recall(student.img, student.txt, txt_to_img, chunk=chunk)
    t = retrieval_recall(teacher.img, teacher.txt, txt_to_img, chunk=chunk)
    same = top1_captions(student.img, student.txt, chunk) == top1_captions(teacher.img, teacher.txt, chunk)
    s["agreement/i2t_top1"], t["agreement/i2t_top1"] = same.double().mean().item(), 1.0
    shared = [n for n in student.classifiers if n in teacher.classifiers]
    s.update(zeroshot_metrics(student, labels, shared))
    t.update(zeroshot_metrics(teacher, labels, shared))
    for name in shared:
        same = (zero_shot_predictions(student.img, student.classifiers[name])
                == zero_shot_predictions(teacher.img, teacher.classifiers[name]))
        s[f"agreement/{name}/top1"], t[f"agreement/{name}/top1"] = same.double().mean().item(), 1.0
    return {f"{prefix}/{k}": v for k, v in with_ratios(s, t).items()}
