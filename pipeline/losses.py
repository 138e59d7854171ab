"""Distillation losses of CLIP-KD (Yang et al., CVPR 2024), computed from cached teacher embeddings.

Contract (open_clip's distill task): every loss is an ``nn.Module`` whose ``forward(batch)``
takes a dict of named tensors and returns a dict of named terms, already multiplied by the
loss weight; the total is their sum (``total_loss``) and the dict is what gets logged.

Batch keys (all [B, D], D = teacher embed dim):
  s_img          student image embeddings (projected, un-normalised)
  s_txt          student text embeddings; absent for an image-only student, in which case the
                 student's text side *is* the teacher's ``t_txt`` (constant, no gradient)
  t_img, t_txt   cached teacher embeddings (normalised; normalised again here, so whitened
                 targets work too)
  s_img_masked   student on the masked input (``mfd`` only)
  labels [B]     int64 class labels, −1 = unknown (``hinton`` only, optional)
  class_emb [K, D]  teacher embeddings of the class prompts (``hinton`` only, optional)
  s_logits, t_logits [B, K]  the student's class-head logits and the teacher's zero-shot logits
                 over the class prompts (``hinton`` only, with ``train --labels``; an ensemble's
                 teachers' dicts each hold their own t_logits)
  teachers       an ensemble of K teachers only: a list, one dict per teacher, the first being the
                 student's own space (the top-level t_img / t_txt / s_* are its own), each
                 {t_img, t_txt [B, D_k]; s_img, s_txt, s_img_masked [B, D_k]: the student through
                 that teacher's projection head (present as the top-level ones are); weight: float,
                 the weights summing to 1; logit_scale: float, τ_k; class_emb [K, D_k] and
                 t_logits [B, K] (optional)}

Ensembles (MobileCLIP's reinforced training). A loss over similarity *distributions* (crd, hinton)
compares the student with the weighted average of the teachers' probabilities,
p = Σ_k w_k softmax(τ_k · logits_k) (``ensemble_log_probs``), each teacher at its own scale.
A *feature* loss (fd, mfd, icl, gd, afd: ``per_teacher = True``) is built once per teacher (its
D_k, τ_k, its own parameters) and its terms are Σ_k w_k · term_k over the teachers' dicts
(``PerTeacher``). ``clip`` has no teacher targets (its positives are the diagonal): it runs once,
in the student's own space. Without ``teachers`` every loss is the single-teacher one, unchanged.

ŝ below is the L2-normalised student embedding, t the normalised teacher embedding.

Losses are world-agnostic: terms that compare across the batch (clip, crd, icl, gd, afd,
in-batch hinton) treat B as the whole batch, so under DDP the trainer gathers features from
every rank first (open_clip's ``gather_features``) and passes the gathered tensors. Losses own
parameters (logit scales, fusion heads): the trainer optimises them, syncs their gradients
across ranks, and saves them in its checkpoints.

Computation is in float32 for half inputs and with autocast switched off (bf16 logits lose the
ranking), in the inputs' dtype otherwise (float64 for gradcheck).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss
from torch import nn

from .errors import BadValue
from .registry import Registry

log = logging.getLogger("kdpipe")

LOSSES: Registry[type["DistillLoss"]] = Registry("loss")

CLIP_INIT_SCALE = 1 / 0.07  # CLIP's initial logit scale (≈ 14.29)
MAX_SCALE = 100.0  # CLIP clamps the logit scale at 100


# --------------------------------------------------------------------------- helpers


def _unit(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, D] L2-normalised, upcast from half precision."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return F.normalize(x, dim=-1)


def _diag_targets(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device)


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of [B, B] logits whose positives sit on the diagonal."""
    return F.cross_entropy(logits, _diag_targets(logits.shape[0], logits.device))


def kl_logits(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) ‖ softmax(student)) per row, averaged over rows. [N, K] each."""
    return kl_log_probs(F.log_softmax(teacher, dim=-1), student)


def kl_log_probs(teacher_log_p: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ softmax(student)) per row, averaged over rows; p given as log-probabilities. [N, K] each."""
    return F.kl_div(F.log_softmax(student, dim=-1), teacher_log_p, log_target=True, reduction="batchmean")


def ensemble_log_probs(logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """log Σ_k w_k softmax(logits_k) per row: K teachers' [N, C] logits -> [N, C] log-probabilities.

    The average of the teachers' probabilities (not of their logits), as MobileCLIP's ensemble;
    ``weights`` sum to 1. Computed as a logsumexp of log w_k + log_softmax(logits_k).
    """
    return torch.logsumexp(torch.stack([F.log_softmax(z, dim=-1) + math.log(w) for z, w in zip(logits, weights)]),
                           dim=0)


def teacher_log_probs(batch: dict[str, Any], scale: float,
                      logits: Callable[[float, dict[str, Any]], torch.Tensor]) -> torch.Tensor:
    """The teacher's log-probabilities [N, C] of ``logits(τ, teacher's dict)``; for an ensemble, of
    the teachers' weighted average (``ensemble_log_probs``, each at its own τ_k). ``scale``: the
    single teacher's τ (the batch itself is its dict)."""
    if "teachers" not in batch:
        return F.log_softmax(logits(scale, batch), dim=-1)
    members = batch["teachers"]
    return ensemble_log_probs([logits(m["logit_scale"], m) for m in members], [m["weight"] for m in members])


def one_minus_cos(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mean_i (1 − cos(s_i, t_i)) for [B, D] inputs."""
    return (1 - (_unit(s) * _unit(t)).sum(-1)).mean()


def contrastive_grads(anchors: torch.Tensor, keys: torch.Tensor, scale: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradients of InfoNCE, in units of (B / scale).

    For L = (1/B) Σ_i CE(scale · a_i Kᵀ, i) with P = softmax(scale · A Kᵀ) (rows) and Y = I:
        ∂L/∂a_i = (scale/B) Σ_j (P − Y)_ij k_j      ->  ∂L/∂A = (scale/B) (P − Y) K
        ∂L/∂k_j = (scale/B) Σ_i (P − Y)_ij a_i      ->  ∂L/∂K = (scale/B) (P − Y)ᵀ A
    Returned without the scale/B factor, i.e. (P − Y) K and (P − Y)ᵀ A, each [B, D]: the
    per-anchor gradient of the summed loss divided by the scale, O(1) whatever B, D, scale.
    anchors, keys: [B, D] normalised.
    """
    logits = scale * anchors @ keys.T
    residual = logits.softmax(dim=-1) - torch.eye(logits.shape[0], dtype=logits.dtype, device=logits.device)
    return residual @ keys, residual.T @ anchors


def mean_softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the row softmaxes of ``logits`` [..., B, K] -> scalar."""
    log_p = logits.log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def entropy_matched_scale(ref_cos: torch.Tensor, cos: torch.Tensor, ref_scale: float,
                          lo: float = 1e-2, hi: float = 1e4, iters: int = 60) -> float:
    """The logit scale τ at which softmax(τ·cos) is as sharp as softmax(ref_scale·ref_cos).

    ref_cos, cos: [n, B, B] cross-modal cosine blocks of the same image-text pairs in two
    spaces (e.g. the teacher's raw space and its whitened space). Sharpness is the mean row
    entropy of the softmax over rows (image→text) and columns (text→image), as CRD uses both.
    Entropy falls monotonically as τ grows, so τ is found by bisection on log τ in [lo, hi]
    (clamped to the bounds if the target entropy lies outside what ``cos`` can reach).
    """
    def entropy(c: torch.Tensor, tau: float) -> float:
        return float((mean_softmax_entropy(tau * c) + mean_softmax_entropy(tau * c.transpose(-1, -2))) / 2)

    target = entropy(ref_cos.double(), ref_scale)
    cos = cos.double()
    log_lo, log_hi = math.log(lo), math.log(hi)
    for _ in range(iters):
        mid = (log_lo + log_hi) / 2
        if entropy(cos, math.exp(mid)) > target:  # too flat: sharpen
            log_lo = mid
        else:
            log_hi = mid
    return math.exp((log_lo + log_hi) / 2)


class LogitScale(nn.Module):
    """A learnable logit scale, stored as its log (CLIP's parametrisation), capped at ``max_scale``.

    The cap is applied to the parameter in place after each optimizer step (``clamp_``), as
    open_clip does, never in ``forward``: a clamp in forward has zero gradient at the cap, so
    a scale initialised at a real CLIP teacher's 100 (whose exp(log 100) rounds just above 100
    in float32) could never move, and a scale that crossed the cap could never come back.
    """

    def __init__(self, init: float = CLIP_INIT_SCALE, learnable: bool = True, max_scale: float = MAX_SCALE) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)), requires_grad=learnable)
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Cap the parameter at log(max_scale) in place (call after the optimizer step)."""
        self.log_scale.clamp_(max=math.log(self.max_scale))


def clamp_logit_scales(module: nn.Module) -> None:
    """Apply every ``LogitScale``'s cap inside ``module`` (after each optimizer step)."""
    for child in module.modules():
        if isinstance(child, LogitScale):
            child.clamp_()


class DistillLoss(nn.Module):
    """Base class: holds the weight; subclasses implement ``terms(batch) -> {term: tensor}``.

    ``forward`` runs ``terms`` with autocast off, so logits and softmaxes stay in float32 even
    when the student ran under bf16/fp16 autocast.
    """

    default_weight: float = 1.0
    per_teacher: bool = False  # an ensemble builds one per teacher (feature losses); see the module docstring

    def __init__(self, weight: float, embed_dim: int, teacher_logit_scale: float, text_student: bool = False) -> None:
        super().__init__()
        self.weight = float(weight)
        self.embed_dim = embed_dim
        self.teacher_logit_scale = float(teacher_logit_scale)
        self.text_student = text_student

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.autocast(device_type=batch["t_img"].device.type, enabled=False):
            return self.terms(batch)

    @classmethod
    def uses_labels(cls, **options: Any) -> bool:
        """Whether this loss, built with ``options``, trains on class labels when the batch has them
        (accuracy on those classes is then supervised, not zero-shot)."""
        return False

    def terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def sides(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ŝ_img, ŝ_txt or t_txt, t_img, t_txt), all normalised [B, D]."""
        t_txt = _unit(batch["t_txt"])
        s_txt = _unit(batch["s_txt"]) if "s_txt" in batch else t_txt
        return _unit(batch["s_img"]), s_txt, _unit(batch["t_img"]), t_txt


# --------------------------------------------------------------------------- the losses


@LOSSES.register("clip")
class ClipTaskLoss(DistillLoss):
    """Symmetric InfoNCE between student image and student (or teacher) text (open_clip ClipLoss).

    Learnable logit scale, initialised at 1/0.07, clamped at 100. Term: ``clip``.
    """

    def __init__(self, weight: float, embed_dim: int, teacher_logit_scale: float, text_student: bool = False,
                 init_scale: float = CLIP_INIT_SCALE) -> None:
        super().__init__(weight, embed_dim, teacher_logit_scale, text_student)
        self.logit_scale = LogitScale(init_scale)
        self.clip_loss = OpenClipLoss()  # world_size=1: features arrive gathered

    def terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s_img, s_txt, _, _ = self.sides(batch)
        return {"clip": self.weight * self.clip_loss(s_img, s_txt, self.logit_scale())}


@LOSSES.register("fd")
class FeatureDistillation(DistillLoss):
    """Feature distillation: λ · mean_i (1 − cos(ŝ_i, t_i)) per modality. Terms: ``fd_img``, ``fd_txt``.

    The weight *is* λ. CLIP-KD uses w · MSE(ŝ, t) on unit vectors, and MSE = ‖ŝ − t‖²/D =
    (2 − 2cos)/D, so its weight maps to λ = 2w/D (``fd_lambda_from_mse``): CLIP-KD's fd 2000
    at D = 512 is fd=7.8125 here. Unlike the MSE weight, λ means the same at every D.
    ``fd_txt`` exists only with a text student (an image-only student's text side is the teacher).
    Ensemble: one per teacher, against the student through that teacher's head.
    """

    default_weight = 7.8125
    per_teacher = True

    def terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = {"fd_img": self.weight * one_minus_cos(batch["s_img"], batch["t_img"])}
        if "s_txt" in batch:
            terms["fd_txt"] = self.weight * one_minus_cos(batch["s_txt"], batch["t_txt"])
        return terms


def fd_lambda_from_mse(mse_weight: float, embed_dim: int) -> float:
    """CLIP-KD's MSE weight w on unit vectors -> λ of λ·(1 − cos): λ = 2w/D."""
    return 2.0 * mse_weight / embed_dim


@LOSSES.register("mfd")
class MaskedFeatureDistillation(DistillLoss):
    """FD between the student on a *masked* image and the teacher's unmasked view: λ·mean(1 − cos).

    Needs ``s_img_masked`` (see ``mask_images``). Same λ semantics as ``fd``. Term: ``mfd``.
    Ensemble: one per teacher, as ``fd``.
    """

    default_weight = 7.8125
    per_teacher = True

    def terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "s_img_masked" not in batch:
            raise KeyError("mfd needs 's_img_masked' (the student's embeddings of mask_images(x))")
        return {"mfd": self.weight * one_minus_cos(batch["s_img_masked"], batch["t_img"])}


@LOSSES.register("crd")
class ContrastiveRelationalDistillation(DistillLoss):
    """KL(softmax(τ_t t_img t_txtᵀ) ‖ softmax(τ_s ŝ_img ŝ_txtᵀ)) over rows (image→text) and
    columns (text→image) of the B×B logits, averaged; temperature 1. Term: ``crd``.

    τ_t is the teacher's (fixed) logit scale; τ_s is this loss's learnable scale, initialised
    at τ_t so a student that equals the teacher starts at zero loss (CLIP-KD reuses the
    student's CLIP scale, which starts at 14.3 while its teachers sit at 100).

    Ensemble: softmax(τ_t t_img t_txtᵀ) becomes Σ_k w_k softmax(τ_k t^k_img t^k_txtᵀ), rows and
    columns each (the student stays in its own space, the first teacher's; τ_s starts at its τ).
    """

    def __init__(self, weight: float, embed_dim: int, teacher_logit_scale: float, text_student: bool = False,
                 learn_scale: bool = True) -> None:
        super().__init__(weight, embed_dim, teacher_logit_scale, text_student)
        self.logit_scale = LogitScale(teacher_logit_scale, learnable=learn_scale)

    def terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s_img, s_txt, _, _ = self.sides(batch)
        student = self.logit_scale() * s_img @ s_txt.T
        rows = teacher_log_probs(batch, self.teacher_logit_scale,
                                 lambda tau, t: tau * _unit(t["t_img"]) @ _unit(t["t_txt"]).T)
        cols = teacher_log_probs(batch, self.teacher_logit_scale,
                                 lambda tau, t: (tau * _unit(t["t_img"]) @ _unit(t["t_txt"]).T).T)
        loss = (kl_log_probs(rows, student) + kl_log_probs(cols, student.T)) / 2
        return {"crd": self.weight * loss}


@LOSSES.register("icl")
class InteractiveContrastiveLearning(DistillLoss):
    """InfoNCE with student anchors against teacher keys of the other modality. Term: ``icl``.

    (ŝ_img vs t_txt + ŝ_txt vs t_img) / 2; only the first with an image-only student (the
    second would have no student in it). Scale: a learnable *log* scale exponentiated as in
    CLIP, initialised at 1/0.07 and clamped at 100. CLIP-KD initialises its parameter to
    log(1/0.07) but multiplies without exp(), i.e. a learnable linear scale starting at 2.66 —
    a much softer softmax. We keep CLIP's parametrisation so the scale can reach the sharp
    values the teacher uses; ``init_scale=2.66`` reproduces CLIP-KD's starting point.
    Ensemble: one per teacher (its own scale), the student through that teacher's head.
    """

    per_teacher = True

    def __init__(self, weight: float, embed_dim: int, teacher_logit_scale: float, text_student: bool = False,
                 init_scale: float = CLIP_INIT_SCALE) -> None:
        super().__init__(weight, embed_dim, teacher_logit_scale, text_student)
        self.logit_scale = LogitScale(init_scale)

    def terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s_img, _, t_img, t_txt = self.sides(batch)
        scale = self.logit_scale()
        loss = info_nce(scale * s_img @ t_txt.T)
        if "s_txt" in batch:
            loss = (loss + info_nce(scale * _unit(batch["s_txt"]) @ t_img.T)) / 2
        return {"icl": self.weight * loss}


@LOSSES.register("gd")
class GradientDistillation(DistillLoss):
    """Match the closed-form gradients of the contrastive loss, teacher vs student. Term: ``gd``.

    For both directions (image anchors vs text keys, text anchors vs image keys) and both
    gradients (w.r.t. anchors and keys), ``contrastive_grads`` gives G = (P − Y)K and
    (P − Y)ᵀA — the true gradients times B/τ. Both sides use the teacher's scale τ_t (fixed),
    so the term only measures the features and is exactly 0 when student == teacher.
    gd = Σ_{4 gradients} mean_i ‖G^s_i − G^t_i‖²  (squared error summed over D, mean over rows).

    Units vs CLIP-KD: its ``get_grad`` computes logits = a·kᵀ / s with s the *exponentiated*
    scale (≈ 100), i.e. gradients of an almost uniform softmax, then (P' − Y)K / (s·B), and
    takes the element-wise MSE (another 1/D); its weight 1e8 compensates those factors
    (1/(s²B²D) ≈ 1e-13 at B = 1024). No constant converts it, as the softmaxes differ; here
    the term is O(1) for any B, D, τ, so the default weight is 1, not 1e8.

    Ensemble: one per teacher (G^s and G^t subtract in that teacher's space, at its τ_k).
    """

    per_teacher = True

    def terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s_img, s_txt, t_img, t_txt = self.sides(batch)
        tau = self.teacher_logit_scale
        loss = s_img.new_zeros(())
        for s_pair, t_pair in (((s_img, s_txt), (t_img, t_txt)), ((s_txt, s_img), (t_txt, t_img))):
            for g_s, g_t in zip(contrastive_grads(*s_pair, tau), contrastive_grads(*t_pair, tau)):
                loss = loss + (g_s - g_t).pow(2).sum(-1).mean()
        return {"gd": self.weight * loss}


@LOSSES.register("afd")
class AugmentedFeatureDistillation(DistillLoss):
    """Fusion: normalise(Linear(concat(ŝ, t))) per modality, then a CLIP loss with its own scale.

    The fusion heads (Linear 2D -> D) belong to this loss and are dropped after training.
    Without a text student the text side is t_txt as is (nothing to fuse). Term: ``afd``.
    Ensemble: one per teacher (fusion heads 2D_k -> D_k).
    """

    per_teacher = True

    def __init__(self, weight: float, embed_dim: int, teacher_logit_scale: float, text_student: bool = False,
                 init_scale: float = CLIP_INIT_SCALE) -> None:
        super().__init__(weight, embed_dim, teacher_logit_scale, text_student)
        self.fuse_img = nn.Linear(2 * embed_dim, embed_dim)
        # Only built with a text student: unused parameters would upset DDP.
        self.fuse_txt = nn.Linear(2 * embed_dim, embed_dim) if text_student else None
        self.logit_scale = LogitScale(init_scale)
        self.clip_loss = OpenClipLoss()

    def terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s_img, _, t_img, t_txt = self.sides(batch)
        img = _unit(self.fuse_img(torch.cat([s_img, t_img], dim=-1)))
        if "s_txt" in batch:
            if self.fuse_txt is None:
                raise ValueError("afd got 's_txt' but was built with text_student=False")
            txt = _unit(self.fuse_txt(torch.cat([_unit(batch["s_txt"]), t_txt], dim=-1)))
        else:
            txt = t_txt
        return {"afd": self.weight * self.clip_loss(img, txt, self.logit_scale())}


HINTON_ALPHA = 0.5  # KD share; the hard-label CE gets 1 − α (the CIFAR seed's mix)


@LOSSES.register("hinton")
class HintonDistillation(DistillLoss):
    """Temperature KD on image logits: α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α)·CE(z_s, y).

    Logits, first that applies: the batch's ``s_logits`` / ``t_logits`` (a student class head and
    the teacher's zero-shot logits, ``train --labels``: task KD as in VLM_Distillation); over the
    class prompts when ``class_emb`` is given (z = τ_t·x·cᵀ); else over the batch's texts
    (z_s = τ_t·ŝ_img·(ŝ_txt or t_txt)ᵀ, z_t = τ_t·t_img·t_txtᵀ). Prompt and text logits use the
    teacher's fixed scale τ_t on both sides. The hard-label CE needs class logits and ``labels``
    (−1 ignored); otherwise the term is the KD part alone (α·T²·KL). α = 0 is the CE alone (no
    teacher: the baseline of task KD). Defaults T = 4, α = 0.5. Term: ``hinton``.

    Ensemble: softmax(z_t/T) becomes Σ_k w_k softmax(z^k_t/T). Head logits: each teacher's dict has its
    own ``t_logits`` (already at its τ_k); prompt or text logits: z^k_t at τ_k (over the class prompts,
    each teacher's dict then needs its own ``class_emb``); the student keeps the first teacher's τ.
    """

    def __init__(self, weight: float, embed_dim: int, teacher_logit_scale: float, text_student: bool = False,
                 T: float = 4.0, alpha: float = HINTON_ALPHA) -> None:
        super().__init__(weight, embed_dim, teacher_logit_scale, text_student)
        if T <= 0 or not 0 <= alpha <= 1:
            raise BadValue(f"hinton needs T > 0 and 0 <= alpha <= 1, got T={T}, alpha={alpha}")
        self.T, self.alpha = T, alpha

    @classmethod
    def uses_labels(cls, **options: Any) -> bool:
        """The hard-label CE has weight 1 − α: labels are used unless α = 1."""
        return float(options.get("alpha", HINTON_ALPHA)) < 1

    def terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s_img, s_txt, _, _ = self.sides(batch)
        tau = self.teacher_logit_scale
        if "s_logits" in batch:  # a class head against the teacher's zero-shot logits (train --labels)
            z_s = batch["s_logits"].float()
            z_t = teacher_log_probs(batch, tau, lambda _, t: t["t_logits"].float() / self.T)
        else:
            over = "class_emb" if "class_emb" in batch else "t_txt"  # class prompts, else the batch's texts
            z_s = tau * s_img @ (_unit(batch["class_emb"]) if over == "class_emb" else s_txt).T
            z_t = teacher_log_probs(batch, tau,
                                    lambda tau_k, t: tau_k * _unit(t["t_img"]) @ _unit(t[over]).T / self.T)
        loss = self.alpha * self.T**2 * kl_log_probs(z_t, z_s / self.T)
        labels = batch.get("labels")
        class_logits = "s_logits" in batch or "class_emb" in batch
        if class_logits and labels is not None and bool((labels >= 0).any()):
            loss = loss + (1 - self.alpha) * F.cross_entropy(z_s, labels, ignore_index=-1)
        return {"hinton": self.weight * loss}


# --------------------------------------------------------------------------- masking (mfd)


def mask_images(x: torch.Tensor, kind: str, ratio: float = 0.75, patch_size: int = 16,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero about ``ratio`` of each image's pixels: x [B, C, H, W] -> masked copy.

    "patch": round(ratio·N) of the N patch_size×patch_size grid cells, chosen per image (ViTs).
    "block": one random rectangle of area ≈ ratio·H·W, aspect ratio log-uniform within what fits
    (and within [1/3, 3]), at a random position (random block erasing, for CNNs).
    Zero is the dataset mean in normalised pixel space. Random numbers come from ``generator``
    (CPU) so masks are reproducible.
    """
    if not 0.0 <= ratio <= 1.0:
        raise BadValue(f"mask ratio must be in [0, 1], got {ratio}")
    if kind == "patch":
        keep = _patch_keep(x.shape, ratio, patch_size, generator)
    elif kind == "block":
        keep = _block_keep(x.shape, ratio, generator)
    else:
        raise ValueError(f"unknown mask kind {kind!r}; valid: block, patch")
    return x * keep.to(device=x.device, dtype=x.dtype)[:, None]


def _patch_keep(shape: torch.Size, ratio: float, patch: int, gen: torch.Generator | None) -> torch.Tensor:
    """[B, H, W] 0/1 keep-mask with round(ratio·N) whole grid cells dropped per image."""
    b, _, h, w = shape
    gh, gw = -(-h // patch), -(-w // patch)
    n_drop = round(ratio * gh * gw)
    order = torch.rand(b, gh * gw, generator=gen).argsort(dim=1)
    keep = torch.ones(b, gh * gw)
    keep.scatter_(1, order[:, :n_drop], 0.0)
    keep = keep.view(b, gh, gw).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    return keep[:, :h, :w]


def _block_keep(shape: torch.Size, ratio: float, gen: torch.Generator | None) -> torch.Tensor:
    """[B, H, W] 0/1 keep-mask with one random rectangle of area ≈ ratio·H·W dropped per image."""
    b, _, h, w = shape
    area = ratio * h * w
    lo = max(area / w**2, 1 / 3) if ratio > 0 else 1.0  # aspect a = bh/bw; bh ≤ H and bw ≤ W bound it
    hi = min(h**2 / max(area, 1e-12), 3.0) if ratio > 0 else 1.0
    lo, hi = min(lo, hi), max(lo, hi)
    aspect = torch.exp(math.log(lo) + torch.rand(b, generator=gen) * (math.log(hi) - math.log(lo)))
    bh = (area * aspect).sqrt().round().clamp(0, h)
    bw = (area / bh.clamp(min=1)).round().clamp(0, w)
    y0 = (torch.rand(b, generator=gen) * (h - bh + 1)).floor()
    x0 = (torch.rand(b, generator=gen) * (w - bw + 1)).floor()
    ys, xs = torch.arange(h)[None, :], torch.arange(w)[None, :]
    in_y = (ys >= y0[:, None]) & (ys < (y0 + bh)[:, None])  # [B, H]
    in_x = (xs >= x0[:, None]) & (xs < (x0 + bw)[:, None])  # [B, W]
    return 1.0 - (in_y[:, :, None] & in_x[:, None, :]).float()


# --------------------------------------------------------------------------- building


def parse_losses(spec: str) -> dict[str, float]:
    """"fd=7.8,crd=1,icl=1" -> {"fd": 7.8, "crd": 1.0, "icl": 1.0}; a bare name takes its default weight.

    Raises ValueError for an empty spec, a repeated name or a weight that is not a finite
    number ≥ 0, and KeyError (listing ``LOSSES.names()``) for an unknown name.
    """
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise BadValue(f"empty loss spec {spec!r}; expected e.g. 'fd=7.8,crd=1,icl=1' (losses: {', '.join(LOSSES.names())})")
    weights: dict[str, float] = {}
    for item in items:
        name, has_weight, value = (part.strip() for part in item.partition("="))
        cls = LOSSES.get(name)
        if name in weights:
            raise BadValue(f"loss {name!r} given twice in {spec!r}")
        weights[name] = _parse_weight(name, value) if has_weight else cls.default_weight
    return weights


def _parse_weight(name: str, value: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        raise BadValue(f"loss weight for {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(weight) or weight < 0:
        raise BadValue(f"loss weight for {name!r} must be finite and >= 0, got {value!r}")
    return weight


def build_losses(weights: dict[str, float], embed_dim: int, teacher_logit_scale: float,
                 text_student: bool = False, **options: dict[str, Any]) -> nn.ModuleDict:
    """One module per weighted loss. ``options`` are per-loss kwargs, e.g. ``hinton={"T": 2}``."""
    unknown = sorted(set(options) - set(weights))
    if unknown:
        raise BadValue(f"options given for losses not in use: {unknown}; in use: {sorted(weights)}")
    for name in ("fd", "mfd"):
        if weights.get(name, 0) > 100:
            log.warning("%s=%g is λ of λ·(1 − cos), not CLIP-KD's MSE weight (that maps to λ = 2w/D = %.4g)",
                        name, weights[name], fd_lambda_from_mse(weights[name], embed_dim))
    return nn.ModuleDict({
        name: LOSSES.get(name)(weight, embed_dim, teacher_logit_scale, text_student, **options.get(name, {}))
        for name, weight in weights.items()
    })


def label_losses(weights: dict[str, float], options: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Names of the weighted losses that train on class labels when the data has them (e.g. hinton, α < 1)."""
    options = options or {}
    return [name for name, weight in weights.items()
            if weight > 0 and LOSSES.get(name).uses_labels(**options.get(name, {}))]


class PerTeacher(nn.Module):
    """A feature loss against each teacher of an ensemble: term = Σ_k w_k · term_k.

    ``members[k]`` is the loss built for teacher k (its D_k, its τ_k, its own parameters) and sees
    the batch with teacher k's dict over it (the student through teacher k's head, k's targets).
    ``shares`` keeps the last forward's w_k · term_k per term (detached, teacher order), for logging
    (``teacher_shares``): what each teacher adds to the logged sum.
    """

    def __init__(self, members: Sequence[DistillLoss]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.shares: dict[str, list[torch.Tensor]] = {}

    @property
    def teacher_logit_scale(self) -> float:
        return self.members[0].teacher_logit_scale

    @property
    def logit_scale(self) -> "LogitScale | None":
        """The first teacher's (what ``logit_scales`` logs)."""
        return getattr(self.members[0], "logit_scale", None)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        shared = {k: v for k, v in batch.items() if k != "teachers"}
        terms: dict[str, torch.Tensor] = {}
        shares: dict[str, list[torch.Tensor]] = {}
        for member, teacher in zip(self.members, batch["teachers"], strict=True):
            for name, value in member({**shared, **teacher}).items():
                share = teacher["weight"] * value
                terms[name] = terms[name] + share if name in terms else share
                shares.setdefault(name, []).append(share.detach())
        self.shares = shares
        return terms


def teacher_shares(losses: nn.ModuleDict) -> dict[str, list[torch.Tensor]]:
    """The per-teacher losses' last terms split by teacher: {term: [w_k · term_k, in teacher order]} (their
    sum is the term); {} without an ensemble. crd and hinton have none: they average probabilities."""
    return {name: values for loss in losses.values() if isinstance(loss, PerTeacher)
            for name, values in loss.shares.items()}


def build_ensemble_losses(weights: dict[str, float], teachers: Sequence[tuple[int, float]],
                          text_student: bool = False, **options: dict[str, Any]) -> nn.ModuleDict:
    """``build_losses`` for an ensemble of (embed_dim, logit_scale) teachers, the first the student's space.

    A ``per_teacher`` loss becomes a ``PerTeacher`` of one module per teacher; the others are built
    once, with the first teacher's D and τ, and average the teachers' probabilities themselves.
    """
    built = build_losses(weights, *teachers[0], text_student=text_student, **options)
    for name, weight in weights.items():
        cls = LOSSES.get(name)
        if cls.per_teacher:
            others = [cls(weight, dim, scale, text_student, **options.get(name, {})) for dim, scale in teachers[1:]]
            built[name] = PerTeacher([built[name], *others])
    return built


def compute_terms(losses: nn.ModuleDict, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run every loss on the batch and merge their named terms."""
    terms: dict[str, torch.Tensor] = {}
    for loss in losses.values():
        terms.update(loss(batch))
    return terms


def total_loss(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of the (already weighted) terms."""
    if not terms:
        raise ValueError("no loss terms to sum")
    values = list(terms.values())
    return sum(values[1:], values[0])


def logit_scales(losses: nn.ModuleDict) -> dict[str, float]:
    """Current value of each loss-owned logit scale, for logging: {"clip_scale": 14.3, ...}."""
    return {f"{name}_scale": float(loss.logit_scale().detach()) for name, loss in losses.items()
            if isinstance(getattr(loss, "logit_scale", None), LogitScale)}
