"""Loss terms against hand-computed cases (blendsign.losses)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from blendsign.config import LossConfig
from blendsign.losses import box_loss, center_loss, kd_loss, total_loss, weighted_ce

LN2, LN3 = math.log(2), math.log(3)


def test_weighted_ce_hand_computed() -> None:
    # Sample A: uniform logits, class 0 → CE = ln 3. Sample B: logits (0, 0, ln 2), class 2 → p = 2/4, CE = ln 2.
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, LN2]])
    target = torch.tensor([0, 2])
    # Weighted mean as torch's cross_entropy(weight=...): (1·ln 3 + 20·ln 2) / (1 + 20).
    assert weighted_ce(logits, target, (1.0, 2.0, 20.0)).item() == pytest.approx((LN3 + 20 * LN2) / 21)
    assert weighted_ce(logits, target, (1.0, 1.0, 1.0)).item() == pytest.approx((LN3 + LN2) / 2)


def test_weighted_ce_weights_scale_each_sample_gradient() -> None:
    # Three samples with uniform logits, one per class: equal CE and equal-norm CE gradients, so each sample's
    # gradient is in the ratio of its class weight, 1 : 2 : 20.
    logits = torch.zeros(3, 3, requires_grad=True)
    weighted_ce(logits, torch.tensor([0, 1, 2]), (1.0, 2.0, 20.0)).backward()
    norms = logits.grad.norm(dim=1)
    assert (norms / norms[0]).tolist() == pytest.approx([1.0, 2.0, 20.0])


def test_center_loss_hand_computed() -> None:
    # Cells with targets 1, 0.5, 0 and logit 0 (p = 0.5), α = 2, β = 4:
    #   center:     −(1 − 0.5)² · ln 0.5             = ln 2 / 4
    #   y = 0.5:    −(1 − 0.5)⁴ · 0.5² · ln 0.5      = ln 2 / 64
    #   y = 0:      −1 · 0.5² · ln 0.5               = ln 2 / 4
    # Sum over cells / 1 center = 33/64 · ln 2.
    heat = torch.tensor([1.0, 0.5, 0.0]).view(1, 1, 1, 3)
    loss = center_loss(torch.zeros(1, 1, 1, 3), heat, alpha=2, beta=4)
    assert loss.item() == pytest.approx(33 / 64 * LN2)


def test_center_loss_is_bce_at_zero_exponents() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 6, 6, generator=g) * 3
    heat = torch.rand(2, 1, 6, 6, generator=g) * 0.9
    heat[0, 0, 1, 2] = heat[0, 0, 4, 4] = heat[1, 0, 3, 3] = 1.0  # three centers
    bce = F.binary_cross_entropy_with_logits(logits, heat.eq(1).float(), reduction="sum") / 3
    assert center_loss(logits, heat, alpha=0, beta=0).item() == pytest.approx(bce.item(), rel=1e-6)


def test_center_loss_normalisation_and_stability() -> None:
    # No centers: divided by 1; two identical slices: twice the sum over twice the centers.
    heat = torch.zeros(1, 1, 2, 2)
    assert center_loss(torch.zeros(1, 1, 2, 2), heat, alpha=2, beta=4).item() == pytest.approx(4 * LN2 / 4)
    heat[0, 0, 0, 0] = 1.0
    one = center_loss(torch.zeros(1, 1, 2, 2), heat, alpha=2, beta=4)
    two = center_loss(torch.zeros(2, 1, 2, 2), heat.repeat(2, 1, 1, 1), alpha=2, beta=4)
    assert two.item() == pytest.approx(one.item())
    # Extreme logits: a confidently wrong center costs ≈ its logit, finite with finite gradients.
    logits = torch.tensor([[[[-200.0, 200.0]]]], requires_grad=True)
    loss = center_loss(logits, torch.tensor([[[[1.0, 0.0]]]]), alpha=2, beta=4)
    loss.backward()
    assert loss.item() == pytest.approx(400.0)
    assert torch.isfinite(logits.grad).all()


def test_box_loss_hand_computed() -> None:
    # One positive cell: predicted (1, 1, 1, 3), target (1, 1.5, 1, 1) → |d| = 0, 0.5, 0, 2
    # smooth L1 (β = 1): 0, 0.5·0.5² = 0.125, 0, 2 − 0.5 = 1.5 → mean of the 4 = 0.40625.
    pred = torch.tensor([[1.0, 99.0], [1.0, 99.0], [1.0, 99.0], [3.0, 99.0]]).view(1, 4, 1, 2)
    reg = torch.tensor([[1.0, 0.0], [1.5, 0.0], [1.0, 0.0], [1.0, 0.0]]).view(1, 4, 1, 2)
    mask = torch.tensor([[[True, False]]])  # the second cell's huge error is ignored
    assert box_loss(pred, reg, mask).item() == pytest.approx(0.40625)


def test_box_loss_without_positives_is_zero_with_grad() -> None:
    pred = torch.rand(2, 4, 3, 3, requires_grad=True)
    loss = box_loss(pred, torch.zeros(2, 4, 3, 3), torch.zeros(2, 3, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_kd_loss_zero_when_student_is_teacher() -> None:
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    for t in (1.0, 2.0):
        assert kd_loss(logits, F.softmax(logits / t, dim=1), t).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_hand_computed() -> None:
    # Row 1: teacher (0.5, 0.5, 0), student uniform: KL = 2 · 0.5 · ln(0.5 / (1/3)) + 0 = ln 1.5.
    # Row 2: teacher = student → 0. Batch mean: ln 1.5 / 2.
    teacher = torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert kd_loss(torch.zeros(2, 3), teacher, 1.0).item() == pytest.approx(math.log(1.5) / 2)


def test_kd_loss_temperature_squared() -> None:
    g = torch.Generator().manual_seed(2)
    student, teacher_logits = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    t = 2.0
    p = F.softmax(teacher_logits / t, dim=1)
    q = F.softmax(student / t, dim=1)
    kl = (p * (p.log() - q.log())).sum(dim=1).mean()
    assert kd_loss(student, p, t).item() == pytest.approx(4 * kl.item(), rel=1e-5)


def _case(n: int = 2, h: int = 4) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = {
        "logits": torch.randn(n, 3, generator=g, requires_grad=True),
        "det": torch.randn(n, 5, h, h, generator=g, requires_grad=True),
    }
    heat = torch.zeros(n, 1, h, h)
    heat[0, 0, 1, 1] = 1.0
    mask = torch.zeros(n, h, h, dtype=torch.bool)
    mask[0, :2, :2] = True
    batch = {
        "label": torch.tensor([2, 0]),
        "heatmap": heat,
        "reg": torch.rand(n, 4, h, h, generator=g),
        "reg_mask": mask,
    }
    return out, batch


def test_total_loss_combines_terms() -> None:
    out, batch = _case()
    cfg = LossConfig(box_loss_weight=0.5)
    teacher = F.softmax(torch.randn(2, 3), dim=1)
    terms = total_loss(out, batch, cfg, teacher_probs=teacher)
    assert set(terms) == {"cls", "center", "box", "det", "kd", "total"}
    cls = weighted_ce(out["logits"], batch["label"], cfg.class_weights)
    center = center_loss(out["det"][:, :1], batch["heatmap"], alpha=2.0, beta=4.0)
    box = box_loss(out["det"][:, 1:], batch["reg"], batch["reg_mask"])
    kd = kd_loss(out["logits"], teacher, 1.0)
    assert terms["det"].item() == pytest.approx((center + 0.5 * box).item())
    # Defaults λ1 = 1, λ2 = 10 (paper §Optimization).
    assert terms["total"].item() == pytest.approx((cls + 1.0 * (center + 0.5 * box) + 10.0 * kd).item())
    terms["total"].backward()
    assert out["logits"].grad.abs().sum() > 0 and out["det"].grad.abs().sum() > 0


def test_total_loss_switches() -> None:
    out, batch = _case()
    cfg = LossConfig()
    plain = total_loss(out, batch, cfg)  # no teacher: no kd
    assert plain["kd"].item() == 0.0
    assert plain["total"].item() == pytest.approx((plain["cls"] + plain["det"]).item())

    no_det = total_loss(out, {"label": batch["label"]}, replace(cfg, use_det=False))  # det keys not needed
    assert no_det["center"].item() == no_det["box"].item() == no_det["det"].item() == 0.0
    assert no_det["total"].item() == pytest.approx(plain["cls"].item())

    no_cls = total_loss(out, batch, replace(cfg, use_cls=False, lambda_det=2.0))
    assert no_cls["cls"].item() == 0.0
    assert no_cls["total"].item() == pytest.approx(2.0 * plain["det"].item())
    no_cls["total"].backward()
    assert out["logits"].grad is None  # the classification logits take no part

    teacher = F.softmax(torch.randn(2, 3), dim=1)
    kd_only = total_loss(out, batch, replace(cfg, use_cls=False, use_det=False), teacher_probs=teacher)
    assert kd_only["total"].item() == pytest.approx(10.0 * kd_only["kd"].item())
