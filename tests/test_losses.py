"""Distillation losses: hand-computed values, zero at the teacher, gradients, spec parsing, masking.

The reference values below are written with explicit per-element loops and ``math`` so they
share no code with ``kdpipe.losses``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdpipe.losses import (
    LOSSES,
    LogitScale,
    PerTeacher,
    build_ensemble_losses,
    build_losses,
    clamp_logit_scales,
    compute_terms,
    contrastive_grads,
    ensemble_log_probs,
    entropy_matched_scale,
    fd_lambda_from_mse,
    label_losses,
    logit_scales,
    mean_softmax_entropy,
    mask_images,
    teacher_shares,
    parse_losses,
    total_loss,
)

B, D, TAU_T = 3, 4, 100.0


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread

CLIP_SCALE = 1 / 0.07


# --------------------------------------------------------------------------- references


def unit_rows(x: torch.Tensor) -> list[list[float]]:
    rows = []
    for row in x.tolist():
        norm = math.sqrt(sum(v * v for v in row))
        rows.append([v / norm for v in row])
    return rows


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def logits(scale: float, a: list[list[float]], k: list[list[float]]) -> list[list[float]]:
    return [[scale * dot(ai, kj) for kj in k] for ai in a]


def transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*m)]


def log_softmax_row(row: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(v) for v in row))
    return [v - lse for v in row]


def ce_diag(z: list[list[float]]) -> float:
    """mean_i −log softmax(z_i)[i]"""
    return sum(-log_softmax_row(row)[i] for i, row in enumerate(z)) / len(z)


def ce(z: list[list[float]], labels: list[int]) -> float:
    return sum(-log_softmax_row(row)[y] for row, y in zip(z, labels)) / len(z)


def kl_rows(teacher: list[list[float]], student: list[list[float]]) -> float:
    """mean_i Σ_j p_t (log p_t − log p_s)"""
    total = 0.0
    for zt, zs in zip(teacher, student):
        lt, ls = log_softmax_row(zt), log_softmax_row(zs)
        total += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
    return total / len(teacher)


def mean_one_minus_cos(s: torch.Tensor, t: torch.Tensor) -> float:
    return sum(1 - dot(a, b) for a, b in zip(unit_rows(s), unit_rows(t))) / len(s)


def make_batch(seed: int = 0, b: int = B, d: int = D, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {k: torch.randn(b, d, generator=g, dtype=dtype) for k in ("s_img", "s_txt", "t_img", "t_txt", "s_img_masked")}
    batch["t_img"] = F.normalize(batch["t_img"], dim=-1)
    batch["t_txt"] = F.normalize(batch["t_txt"], dim=-1)
    return batch


def teacher_as_student(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**batch, "s_img": 3 * batch["t_img"], "s_txt": 0.5 * batch["t_txt"], "s_img_masked": 2 * batch["t_img"]}


def one(name: str, weight: float = 1.0, text_student: bool = True, **opts):
    return LOSSES.get(name)(weight, D, TAU_T, text_student, **opts)


# --------------------------------------------------------------------------- hand-computed values


@pytest.mark.parametrize("text_student", [True, False])
def test_clip_matches_hand_computed_symmetric_infonce(text_student):
    batch = make_batch()
    if not text_student:
        del batch["s_txt"]
    img = unit_rows(batch["s_img"])
    txt = unit_rows(batch["s_txt"] if text_student else batch["t_txt"])
    z = logits(CLIP_SCALE, img, txt)
    expected = 2.0 * (ce_diag(z) + ce_diag(transpose(z))) / 2
    got = one("clip", 2.0, text_student)(batch)
    assert set(got) == {"clip"}
    assert got["clip"].item() == pytest.approx(expected, rel=1e-5)


def test_fd_matches_hand_computed_and_clipkd_mse_mapping():
    batch = make_batch()
    got = one("fd", 5.0)(batch)
    assert got["fd_img"].item() == pytest.approx(5 * mean_one_minus_cos(batch["s_img"], batch["t_img"]), rel=1e-5)
    assert got["fd_txt"].item() == pytest.approx(5 * mean_one_minus_cos(batch["s_txt"], batch["t_txt"]), rel=1e-5)
    # CLIP-KD: w · MSE(ŝ, t) on unit vectors == λ · mean(1 − cos) with λ = 2w/D
    w = 2000.0
    s_hat = F.normalize(batch["s_img"], dim=-1)
    clipkd = w * F.mse_loss(s_hat, batch["t_img"])
    ours = one("fd", fd_lambda_from_mse(w, D))(batch)["fd_img"]
    assert ours.item() == pytest.approx(clipkd.item(), rel=1e-5)
    assert fd_lambda_from_mse(2000, 512) == pytest.approx(7.8125)
    assert set(one("fd")({k: v for k, v in batch.items() if k != "s_txt"})) == {"fd_img"}  # image-only


def test_mfd_matches_hand_computed_and_needs_masked_features():
    batch = make_batch()
    got = one("mfd", 3.0)(batch)
    assert got["mfd"].item() == pytest.approx(3 * mean_one_minus_cos(batch["s_img_masked"], batch["t_img"]), rel=1e-5)
    with pytest.raises(KeyError, match="s_img_masked"):
        one("mfd")({k: v for k, v in batch.items() if k != "s_img_masked"})


def test_crd_matches_hand_computed_kl_both_ways():
    batch = make_batch()
    loss = one("crd", 1.5)
    with torch.no_grad():
        loss.logit_scale.log_scale.fill_(math.log(20.0))  # a student scale different from τ_t
    zs = logits(20.0, unit_rows(batch["s_img"]), unit_rows(batch["s_txt"]))
    zt = logits(TAU_T, unit_rows(batch["t_img"]), unit_rows(batch["t_txt"]))
    expected = 1.5 * (kl_rows(zt, zs) + kl_rows(transpose(zt), transpose(zs))) / 2
    assert loss(batch)["crd"].item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("text_student", [True, False])
def test_icl_matches_hand_computed(text_student):
    batch = make_batch()
    if not text_student:
        del batch["s_txt"]
    t_img, t_txt = unit_rows(batch["t_img"]), unit_rows(batch["t_txt"])
    img_to_txt = ce_diag(logits(CLIP_SCALE, unit_rows(batch["s_img"]), t_txt))
    if text_student:
        expected = (img_to_txt + ce_diag(logits(CLIP_SCALE, unit_rows(batch["s_txt"]), t_img))) / 2
    else:
        expected = img_to_txt
    assert one("icl", 1.0, text_student)(batch)["icl"].item() == pytest.approx(expected, rel=1e-5)
    clipkd_start = one("icl", 1.0, text_student, init_scale=2.66)
    assert logit_scales(torch.nn.ModuleDict({"icl": clipkd_start}))["icl_scale"] == pytest.approx(2.66, rel=1e-6)


def test_contrastive_grads_equal_autograd_gradients_of_infonce():
    torch.manual_seed(0)
    a = F.normalize(torch.randn(5, 6, dtype=torch.float64), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(5, 6, dtype=torch.float64), dim=-1).requires_grad_()
    scale = 7.0
    loss = F.cross_entropy(scale * a @ k.T, torch.arange(5))
    grad_a, grad_k = torch.autograd.grad(loss, (a, k))
    g_a, g_k = contrastive_grads(a.detach(), k.detach(), scale)
    # closed form is returned in units of B/scale
    torch.testing.assert_close(g_a * scale / 5, grad_a)
    torch.testing.assert_close(g_k * scale / 5, grad_k)


def test_gd_matches_autograd_reference():
    batch = make_batch(dtype=torch.float64)

    def autograd_grads(anchor: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anchor = F.normalize(anchor, dim=-1).detach().requires_grad_()
        key = F.normalize(key, dim=-1).detach().requires_grad_()
        loss = F.cross_entropy(TAU_T * anchor @ key.T, torch.arange(B))
        g_a, g_k = torch.autograd.grad(loss, (anchor, key))
        return g_a * B / TAU_T, g_k * B / TAU_T

    expected = 0.0
    for (sa, sk), (ta, tk) in [(("s_img", "s_txt"), ("t_img", "t_txt")), (("s_txt", "s_img"), ("t_txt", "t_img"))]:
        for g_s, g_t in zip(autograd_grads(batch[sa], batch[sk]), autograd_grads(batch[ta], batch[tk])):
            expected += sum(sum(v * v for v in row) for row in (g_s - g_t).tolist()) / B
    got = one("gd", 2.0).double()(batch)["gd"].item()
    assert got == pytest.approx(2.0 * expected, rel=1e-9)


def test_afd_with_identity_fusion_is_clip_on_summed_features():
    batch = make_batch()
    loss = one("afd")
    eye = torch.eye(D)
    with torch.no_grad():
        for head in (loss.fuse_img, loss.fuse_txt):
            head.weight.copy_(torch.cat([eye, eye], dim=1))  # Linear([ŝ, t]) = ŝ + t
            head.bias.zero_()
    fused = []
    for s_key, t_key in (("s_img", "t_img"), ("s_txt", "t_txt")):
        s, t = unit_rows(batch[s_key]), unit_rows(batch[t_key])
        fused.append(unit_rows(torch.tensor([[x + y for x, y in zip(a, b)] for a, b in zip(s, t)])))
    z = logits(CLIP_SCALE, fused[0], fused[1])
    expected = (ce_diag(z) + ce_diag(transpose(z))) / 2
    assert loss(batch)["afd"].item() == pytest.approx(expected, rel=1e-5)


def test_afd_image_only_has_no_text_head_and_rejects_text():
    loss = one("afd", text_student=False)
    assert loss.fuse_txt is None
    batch = make_batch()
    with pytest.raises(ValueError, match="text_student"):
        loss(batch)
    del batch["s_txt"]
    assert torch.isfinite(loss(batch)["afd"])


def test_hinton_class_prompts_with_labels_matches_hand_computed():
    batch = make_batch()
    g = torch.Generator().manual_seed(5)
    batch["class_emb"] = F.normalize(torch.randn(5, D, generator=g), dim=-1)
    batch["labels"] = torch.tensor([2, 0, -1])  # −1: unknown, left out of the CE
    T, alpha = 4.0, 0.5
    classes = unit_rows(batch["class_emb"])
    zs = logits(TAU_T, unit_rows(batch["s_img"]), classes)
    zt = logits(TAU_T, unit_rows(batch["t_img"]), classes)
    kd = kl_rows([[v / T for v in r] for r in zt], [[v / T for v in r] for r in zs])
    expected = alpha * T * T * kd + (1 - alpha) * ce(zs[:2], [2, 0])
    assert one("hinton")(batch)["hinton"].item() == pytest.approx(expected, rel=1e-5)


def test_hinton_in_batch_without_labels_is_pure_kd():
    batch = make_batch()
    T = 2.0
    zs = logits(TAU_T / T, unit_rows(batch["s_img"]), unit_rows(batch["s_txt"]))
    zt = logits(TAU_T / T, unit_rows(batch["t_img"]), unit_rows(batch["t_txt"]))
    expected = 0.3 * T * T * kl_rows(zt, zs)
    assert one("hinton", T=T, alpha=0.3)(batch)["hinton"].item() == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError):
        one("hinton", T=0.0)


def test_label_losses_names_what_trains_on_labels():
    """hinton's CE (weight 1 − α) uses labels unless α = 1; no other loss reads them; weight 0 is off."""
    assert label_losses({"hinton": 1.0, "fd": 7.8, "crd": 1.0}) == ["hinton"]
    assert label_losses({"hinton": 1.0}, {"hinton": {"alpha": 1.0}}) == []
    assert label_losses({"hinton": 0.0}) == []
    assert label_losses({name: 1.0 for name in LOSSES.names() if name != "hinton"}) == []


# --------------------------------------------------------------------------- student == teacher


@pytest.mark.parametrize("name", ["fd", "mfd", "crd", "gd", "hinton"])
def test_zero_when_student_equals_teacher(name):
    batch = teacher_as_student(make_batch(seed=3, b=8, d=16))  # norms differ: losses normalise
    terms = LOSSES.get(name)(1.0, 16, TAU_T, True)(batch)
    for value in terms.values():
        assert abs(value.item()) < 1e-5


def aligned_teacher(seed: int, b: int = 8, d: int = 16, noise: float = 1.0) -> dict[str, torch.Tensor]:
    """A batch whose teacher texts sit near their images, as a trained CLIP teacher's do."""
    batch = make_batch(seed=seed, b=b, d=d)
    batch["t_txt"] = F.normalize(batch["t_img"] + noise * batch["t_txt"], dim=-1)
    return batch


@pytest.mark.parametrize("name", ["clip", "icl"])
def test_teacher_student_scores_lower_than_perturbed(name):
    # InfoNCE is not minimal at the teacher (any more separable pairing scores lower), but on
    # average a random perturbation of the teacher's embeddings makes the pairing worse
    good = teacher_as_student(aligned_teacher(seed=3))
    loss = LOSSES.get(name)(1.0, 16, TAU_T, True)
    g = torch.Generator().manual_seed(9)
    worse = []
    for _ in range(20):
        bad = {**good, "s_img": good["s_img"] + 3 * torch.randn(8, 16, generator=g),
               "s_txt": good["s_txt"] + 0.5 * torch.randn(8, 16, generator=g)}
        worse.append(loss(bad)[name].item())
    assert loss(good)[name].item() < sum(worse) / len(worse)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", LOSSES.names())
def test_gradcheck_float64(name):
    torch.manual_seed(0)
    batch = make_batch(seed=1, dtype=torch.float64)
    batch["class_emb"] = F.normalize(torch.randn(4, D, dtype=torch.float64), dim=-1)
    batch["labels"] = torch.tensor([1, 3, 0])
    loss = one(name).double()
    keys = ("s_img", "s_txt", "s_img_masked")

    def f(*student):
        return total_loss(loss({**batch, **dict(zip(keys, student))}))

    inputs = tuple(batch[k].clone().requires_grad_() for k in keys)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_loss_owned_parameters_get_gradients_and_are_in_the_state_dict():
    losses = build_losses({"clip": 1, "crd": 1, "icl": 1, "afd": 1}, D, TAU_T, text_student=True)
    total_loss(compute_terms(losses, make_batch())).backward()
    params = dict(losses.named_parameters())
    assert {"clip.logit_scale.log_scale", "crd.logit_scale.log_scale", "icl.logit_scale.log_scale",
            "afd.fuse_img.weight", "afd.fuse_txt.weight", "afd.logit_scale.log_scale"} <= set(params)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    assert set(params) <= set(losses.state_dict())


def test_logit_scale_is_capped_at_100_in_place_after_the_step():
    loss = one("clip")
    with torch.no_grad():
        loss.logit_scale.log_scale.fill_(math.log(500.0))
    clamp_logit_scales(torch.nn.ModuleDict({"clip": loss, "fd": one("fd")}))
    assert loss.logit_scale().item() == pytest.approx(100.0)
    assert logit_scales(torch.nn.ModuleDict({"clip": loss, "fd": one("fd")})) == {"clip_scale": pytest.approx(100.0)}


def test_a_scale_at_the_cap_still_learns_to_go_down():
    # A real CLIP teacher's scale is 100, and exp(log 100) rounds above 100 in float32: a clamp in
    # forward gave it zero gradient, so CRD's scale (initialised at τ_t) was frozen from step 0.
    scale = LogitScale(100.0)
    assert scale().item() > 100.0  # the float32 rounding that froze it
    scale().backward()  # d(scale)/d(log_scale) = scale: a loss that asks for a lower scale
    assert scale.log_scale.grad.item() == pytest.approx(100.0, rel=1e-5)
    opt = torch.optim.SGD(scale.parameters(), lr=1e-3)
    opt.step()
    scale.clamp_()
    assert scale().item() == pytest.approx(100.0 * math.exp(-0.1), rel=1e-5)


def test_crd_scale_initialised_at_a_clip_teacher_s_100_moves_under_training():
    crd = build_losses({"crd": 1}, D, 100.0)["crd"]
    batch = aligned_teacher(seed=1, b=16, d=D, noise=0.5)
    total_loss(compute_terms(torch.nn.ModuleDict({"crd": crd}), batch)).backward()
    assert crd.logit_scale.log_scale.grad is not None and crd.logit_scale.log_scale.grad.abs().item() > 1e-6


def test_entropy_matched_scale_reproduces_the_reference_sharpness():
    gen = torch.Generator().manual_seed(0)
    ref = F.normalize(torch.randn(4, 8, D, generator=gen), dim=-1)
    ref_cos = ref @ F.normalize(ref + 0.5 * torch.randn(4, 8, D, generator=gen), dim=-1).transpose(1, 2)
    # the same pairs with cosines squeezed 4x (as whitening spreads targets): the matched scale is 4x
    assert entropy_matched_scale(ref_cos, ref_cos / 4, 30.0) == pytest.approx(120.0, rel=1e-6)
    assert entropy_matched_scale(ref_cos, ref_cos, 30.0) == pytest.approx(30.0, rel=1e-6)
    tau = entropy_matched_scale(ref_cos, ref_cos**3, 30.0)
    both = lambda c: (mean_softmax_entropy(c) + mean_softmax_entropy(c.transpose(1, 2))) / 2  # noqa: E731
    assert float(both(tau * ref_cos**3)) == pytest.approx(float(both(30.0 * ref_cos)), rel=1e-6)


@pytest.mark.parametrize("spec, target", [("fd=8,crd=1,icl=1", 0.95), ("crd=1", 0.5), ("gd=1", 0.4), ("hinton=1", 0.5)])
def test_losses_pull_free_student_features_to_the_teacher(spec, target):
    # image-only student: free embeddings optimised against a fixed teacher; the CLIP-KD recipe
    # lands on the teacher, relational losses alone (crd, gd, hinton) only constrain it partly
    batch = aligned_teacher(seed=4, b=16, d=8, noise=0.3)
    s_img = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    losses = build_losses(parse_losses(spec), 8, TAU_T, text_student=False)
    opt = torch.optim.Adam([s_img, *losses.parameters()], lr=0.05)
    cos0 = F.cosine_similarity(s_img, batch["t_img"]).mean().item()
    assert cos0 < 0.1
    for _ in range(300):
        opt.zero_grad()
        total_loss(compute_terms(losses, {"s_img": s_img, "t_img": batch["t_img"], "t_txt": batch["t_txt"]})).backward()
        opt.step()
    assert F.cosine_similarity(s_img, batch["t_img"]).mean().item() > target


def test_half_precision_inputs_and_autocast_compute_in_float32():
    losses = build_losses({"clip": 1, "crd": 1, "gd": 1, "afd": 1}, D, TAU_T, text_student=True)
    batch = make_batch()
    reference = compute_terms(losses, batch)
    half = {k: v.to(torch.bfloat16) for k, v in batch.items()}
    terms = compute_terms(losses, half)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = compute_terms(losses, batch)
    for name, value in reference.items():
        assert under_autocast[name].dtype == torch.float32
        assert under_autocast[name].item() == pytest.approx(value.item(), rel=1e-6)


# --------------------------------------------------------------------------- spec parsing / building


def test_parse_losses_reads_weights_and_defaults():
    assert parse_losses("fd=2000, crd=1,icl=1") == {"fd": 2000.0, "crd": 1.0, "icl": 1.0}
    assert parse_losses("crd,fd") == {"crd": 1.0, "fd": 7.8125}  # bare name: default weight
    assert parse_losses("gd=1e-2") == {"gd": 0.01}


@pytest.mark.parametrize("spec, error, match", [
    ("", ValueError, "empty"),
    (" , ", ValueError, "empty"),
    ("fd=abc", ValueError, "number"),
    ("fd=", ValueError, "number"),
    ("fd=-1", ValueError, ">= 0"),
    ("fd=nan", ValueError, "finite"),
    ("fd=1,fd=2", ValueError, "twice"),
    ("kd=1", KeyError, "afd, clip, crd, fd, gd, hinton, icl, mfd"),
])
def test_parse_losses_errors(spec, error, match):
    with pytest.raises(error, match=match):
        parse_losses(spec)


def test_build_losses_options_and_warnings(caplog):
    losses = build_losses({"hinton": 1.0, "fd": 2000.0}, 512, TAU_T, hinton={"T": 2.0, "alpha": 0.9})
    assert losses["hinton"].T == 2.0 and losses["hinton"].alpha == 0.9
    assert "7.812" in caplog.text  # fd=2000 looks like a CLIP-KD MSE weight: the warning says λ
    with pytest.raises(ValueError, match="not in use"):
        build_losses({"fd": 1.0}, D, TAU_T, hinton={"T": 2.0})
    with pytest.raises(TypeError):
        build_losses({"fd": 1.0}, D, TAU_T, fd={"bogus": 1})


def test_total_loss_sums_terms():
    terms = {"a": torch.tensor(1.5), "b": torch.tensor(2.0), "c": torch.tensor(-0.5)}
    assert total_loss(terms).item() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        total_loss({})


# --------------------------------------------------------------------------- masking


def test_patch_mask_zeroes_exactly_the_ratio_of_patches():
    x = torch.rand(4, 3, 64, 64) + 0.5  # no natural zeros
    out = mask_images(x, "patch", ratio=0.75, patch_size=16, generator=torch.Generator().manual_seed(0))
    zero = out == 0
    assert zero.float().mean().item() == pytest.approx(0.75)
    assert torch.equal(zero[:, 0], zero[:, 2])  # all channels masked together
    cells = zero[:, 0].view(4, 4, 16, 4, 16).float().mean(dim=(2, 4))  # per 16×16 cell
    assert set(cells.unique().tolist()) == {0.0, 1.0}  # whole patches, nothing partial
    assert (cells.sum(dim=(1, 2)) == 12).all()
    assert not torch.equal(zero[0], zero[1])  # a different mask per image
    torch.testing.assert_close(out[~zero], x[~zero])  # the rest untouched
    again = mask_images(x, "patch", ratio=0.75, patch_size=16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_block_mask_erases_one_rectangle_of_about_ratio_area():
    x = torch.rand(16, 3, 64, 64) + 0.5
    out = mask_images(x, "block", ratio=0.5, generator=torch.Generator().manual_seed(1))
    zero = out[:, 0] == 0
    for z in zero:
        rows, cols = z.any(dim=1).nonzero(), z.any(dim=0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert int(z.sum()) == int(box)  # a single filled rectangle
        assert abs(z.float().mean().item() - 0.5) < 0.03
    boxes = {(int(z.nonzero()[0, 0]), int(z.nonzero()[0, 1])) for z in zero}
    assert len(boxes) > 4  # positions vary


def test_mask_images_edge_cases():
    x = torch.rand(2, 3, 32, 32) + 0.5
    assert torch.equal(mask_images(x, "block", ratio=0.0), x)
    assert torch.equal(mask_images(x, "patch", ratio=0.0, patch_size=8), x)
    assert (mask_images(x, "block", ratio=1.0) == 0).all()
    odd = mask_images(torch.ones(1, 3, 20, 20), "patch", ratio=0.5, patch_size=8)  # 3×3 grid, ragged edge
    assert 0.2 < (odd == 0).float().mean().item() < 0.8
    with pytest.raises(ValueError, match="patch"):
        mask_images(x, "random", ratio=0.5)
    with pytest.raises(ValueError, match="ratio"):
        mask_images(x, "patch", ratio=1.5)


# --------------------------------------------------------------------------- ensembles


def _e(i: int, dim: int) -> list[float]:
    return [1.0 if j == i else 0.0 for j in range(dim)]


def _pair_ensemble(w_a: float, tau_a: float, tau_b: float) -> dict:
    """Two teachers of two images: A (D = 2) pairs image i with caption i, B (D = 3) with the other caption.

    The batch's top level is A's (the student's own space); the student equals A. Teacher logits:
    A = τ_A·I, B = τ_B·(1 − I). The student is fed through B's (here: padding) head as well.
    """
    a_img = a_txt = torch.tensor([_e(0, 2), _e(1, 2)], dtype=torch.float64)
    b_img, b_txt = torch.tensor([_e(0, 3), _e(1, 3)], dtype=torch.float64), torch.tensor([_e(1, 3), _e(0, 3)], dtype=torch.float64)
    s_b = torch.tensor([_e(0, 3), _e(0, 3)], dtype=torch.float64)  # the student through B's head: row 1 wrong
    return {"s_img": a_img.clone(), "s_txt": a_txt.clone(), "t_img": a_img, "t_txt": a_txt, "teachers": [
        {"t_img": a_img, "t_txt": a_txt, "s_img": a_img.clone(), "s_txt": a_txt.clone(), "weight": w_a, "logit_scale": tau_a},
        {"t_img": b_img, "t_txt": b_txt, "s_img": s_b, "s_txt": s_b.clone(), "weight": 1 - w_a, "logit_scale": tau_b}]}


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_ensemble_log_probs_average_probabilities_not_logits():
    """w = (1/4, 3/4) over softmax([0, ln 3]) = (1/4, 3/4) and softmax([ln 3, 0]) = (3/4, 1/4)."""
    got = ensemble_log_probs([torch.tensor([[0.0, math.log(3)]]), torch.tensor([[math.log(3), 0.0]])], [0.25, 0.75])
    assert torch.allclose(got.exp(), torch.tensor([[0.25 * 0.25 + 0.75 * 0.75, 0.25 * 0.75 + 0.75 * 0.25]]))
    one = torch.tensor([[0.3, -1.2, 2.0]])
    assert torch.equal(ensemble_log_probs([one], [1.0]), F.log_softmax(one, dim=-1))  # one teacher: its own


def test_crd_and_hinton_learn_the_ensembles_average_probabilities_each_at_its_own_scale():
    """A at τ = ln 3 gives rows (3/4, 1/4); B at τ = ln 9 on the swapped captions (1/10, 9/10). Equal
    weights: p = (0.425, 0.575) for row 0 (mirrored for row 1 and for the columns); the student (= A,
    its scale starting at A's ln 3) has q = (3/4, 1/4). crd = KL(p ‖ q); hinton (T = 1, α = 1) the same."""
    batch = _pair_ensemble(0.5, math.log(3), math.log(9))
    p = [0.5 * 0.75 + 0.5 * 0.1, 0.5 * 0.25 + 0.5 * 0.9]
    expected = _kl(p, [0.75, 0.25])
    built = build_ensemble_losses({"crd": 1.0, "hinton": 2.0}, [(2, math.log(3)), (3, math.log(9))],
                                  hinton={"T": 1.0, "alpha": 1.0}).double()
    terms = compute_terms(built, batch)
    assert terms["crd"].item() == pytest.approx(expected, rel=1e-6)  # the learnt scale starts as a float32 log
    assert terms["hinton"].item() == pytest.approx(2.0 * expected, rel=1e-12)
    assert not isinstance(built["crd"], PerTeacher)  # one module, in the student's space
    alone = compute_terms(built, {k: v for k, v in batch.items() if k != "teachers"})  # A alone: student = teacher
    assert alone["crd"].item() == pytest.approx(0.0, abs=1e-12)


def test_feature_losses_are_built_per_teacher_and_weighted():
    """fd with λ = 2: A's term is 0 (student = A); through B's head row 0 matches and row 1 is orthogonal
    (1 − cos = 0, 1: mean 1/2). w_A = 1/4: fd_img = fd_txt = 2 · (1/4 · 0 + 3/4 · 1/2) = 0.75."""
    batch = _pair_ensemble(0.25, math.log(3), math.log(9))
    batch["teachers"][1]["s_txt"] = torch.tensor([_e(1, 3), _e(1, 3)], dtype=torch.float64)  # row 0 right
    built = build_ensemble_losses({"fd": 2.0, "icl": 1.0, "afd": 1.0, "gd": 1.0}, [(2, 5.0), (3, 7.0)],
                                  text_student=True).double()
    terms = compute_terms(built, batch)
    assert terms["fd_img"].item() == pytest.approx(0.75, rel=1e-12)
    assert terms["fd_txt"].item() == pytest.approx(0.75, rel=1e-12)
    fd, afd, gd = built["fd"], built["afd"], built["gd"]
    assert isinstance(fd, PerTeacher) and [m.embed_dim for m in fd.members] == [2, 3]
    assert [m.fuse_img.in_features for m in afd.members] == [4, 6]  # fusion heads 2·D_k -> D_k
    assert [m.teacher_logit_scale for m in gd.members] == [5.0, 7.0]
    icl = built["icl"]
    by_hand = sum(t["weight"] * icl.members[k]({**batch, **t})["icl"] for k, t in enumerate(batch["teachers"]))
    assert torch.allclose(terms["icl"], by_hand, rtol=0, atol=1e-12)


def test_per_teacher_terms_are_kept_split_by_teacher_for_logging():
    """fd's term (λ = 2, w = 1/4, 3/4): A adds 1/4 · 0, B 3/4 · 2 · 1/2; the shares sum to the logged term.
    crd averages probabilities (no share); one teacher: no shares."""
    batch = _pair_ensemble(0.25, math.log(3), math.log(9))
    built = build_ensemble_losses({"fd": 2.0, "crd": 1.0}, [(2, 5.0), (3, 7.0)], text_student=True).double()
    terms = compute_terms(built, batch)
    shares = teacher_shares(built)
    assert set(shares) == {"fd_img", "fd_txt"}
    assert [v.item() for v in shares["fd_img"]] == pytest.approx([0.0, 0.75], abs=1e-12)
    for name, values in shares.items():
        assert torch.allclose(sum(values), terms[name], rtol=0, atol=1e-12)
        assert not any(v.requires_grad for v in values)  # for logging only: no graph kept
    assert teacher_shares(build_losses({"fd": 2.0}, 2, 5.0)) == {}
