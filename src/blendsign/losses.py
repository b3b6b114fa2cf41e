"""Training losses (paper §Classification branch, §Detection branch, §Self-knowledge distillation, §Optimization).

The paper's formula images are missing from the text; our reading, stated once here and in :func:`total_loss`:

    L     = L_cls + λ1·L_det + λ2·L_kd                                  (§Optimization, λ1 = 1, λ2 = 10)
    L_cls = weighted cross-entropy, class weights 1, 2, 20              (§Classification branch)
    L_det = L_center + box_loss_weight·L_box                            (§Detection branch)
    L_center = CenterNet's penalty-reduced focal loss on the Gaussian-rendered center heatmap (the paper's "log
               loss over center vs not-center", "following Duan et al. we perform Gaussian rendering")
    L_box = smooth L1 on the (left, right, top, bottom) distances (FCOS)
    L_kd  = KL(teacher ‖ student) of the classification branch's predictions (§Self-knowledge distillation)

Every loss works in float32 whatever the dtype of its inputs (mixed precision).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from blendsign.config import LossConfig

__all__ = ["box_loss", "center_loss", "kd_loss", "total_loss", "weighted_ce"]


def weighted_ce(logits: Tensor, target: Tensor, weights: Sequence[float] | Tensor) -> Tensor:
    """Weighted cross-entropy, WCE (paper §Classification branch, ``w = 1, 2, 20``).

    The weighted mean of torch's ``cross_entropy(weight=...)``: ``Σ_i w[y_i]·CE_i / Σ_i w[y_i]`` over the batch.

    Args:
        logits: ``[N, num_classes]``.
        target: ``[N]`` long class indices.
        weights: ``num_classes`` class weights.
    """
    w = torch.as_tensor(weights, dtype=torch.float32, device=logits.device)  # [num_classes]
    return F.cross_entropy(logits.float(), target, weight=w)


def center_loss(center_logits: Tensor, heatmap: Tensor, *, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """Penalty-reduced focal loss on the center heatmap (CenterNet; paper §Detection branch, L_cls of L_det).

    With ``p = sigmoid(logit)`` and the Gaussian-rendered target ``y``, summed over all cells and divided by the
    number of centers (cells with ``y == 1``; at least 1)::

        −(1 − p)^α · log p                  where y == 1
        −(1 − y)^β · p^α · log(1 − p)       elsewhere

    ``log p`` and ``log(1 − p)`` are ``logsigmoid(±logit)``, finite for any logit. With ``α = β = 0`` this is the
    binary cross-entropy against the 0/1 center map, summed over cells / number of centers.

    Args:
        center_logits: ``[N, 1, h, w]`` (channel 0 of the detection map).
        heatmap: ``[N, 1, h, w]`` targets in [0, 1], exactly 1.0 at centers (:func:`blendsign.targets.encode_targets`).
        alpha: focal exponent (``LossConfig.focal_alpha``).
        beta: penalty-reduction exponent near centers (``LossConfig.focal_beta``).
    """
    x, y = center_logits.float(), heatmap.float()
    pos = y.eq(1.0)  # [N, 1, h, w]
    log_p, log_1mp = F.logsigmoid(x), F.logsigmoid(-x)  # log p, log(1 − p)
    p, one_minus_p = torch.sigmoid(x), torch.sigmoid(-x)
    pos_loss = -(one_minus_p.pow(alpha) * log_p)  # [N, 1, h, w]
    neg_loss = -((1 - y).pow(beta) * p.pow(alpha) * log_1mp)  # [N, 1, h, w]
    loss = torch.where(pos, pos_loss, neg_loss).sum()
    return loss / pos.sum().clamp(min=1)


def box_loss(reg_pred: Tensor, reg: Tensor, mask: Tensor) -> Tensor:
    """Smooth L1 (β = 1 stride unit) on the box distances at positive cells (FCOS; paper §Detection branch).

    The mean over the positive cells' 4 distances; ``0`` (still attached to the graph) when there are none.

    Args:
        reg_pred: ``[N, 4, h, w]`` predicted (left, right, top, bottom) distances, stride units.
        reg: ``[N, 4, h, w]`` target distances.
        mask: ``[N, h, w]`` bool, positive cells.
    """
    pred = reg_pred.float().permute(0, 2, 3, 1)[mask]  # [P, 4]
    if pred.numel() == 0:
        return reg_pred.float().sum() * 0.0
    target = reg.float().permute(0, 2, 3, 1)[mask]  # [P, 4]
    return F.smooth_l1_loss(pred, target, beta=1.0, reduction="mean")


def kd_loss(student_logits: Tensor, teacher_probs: Tensor, temperature: float = 1.0) -> Tensor:
    """Self-knowledge distillation: ``KL(teacher ‖ student)`` (paper §Self-knowledge distillation).

    ``T² · mean_i Σ_c t_ic · (log t_ic − log s_ic)`` with ``s = softmax(student_logits / T)``; the ``T²`` keeps
    gradient magnitudes comparable across temperatures (Hinton et al. 2015) and is 1 at the default ``T = 1``.

    Args:
        student_logits: ``[N, num_classes]``.
        teacher_probs: ``[N, num_classes]``, already ``softmax(teacher_logits / T)`` (no gradient needed).
        temperature: ``T`` (``LossConfig.kd_temperature``).
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)  # [N, C]
    kl = F.kl_div(log_s, teacher_probs.float(), reduction="batchmean")
    return kl * temperature**2


def total_loss(
    out: dict[str, Tensor],
    batch: dict[str, Tensor],
    cfg: LossConfig,
    teacher_probs: Tensor | None = None,
) -> dict[str, Tensor]:
    """All loss terms and their total (paper §Optimization).

    The paper's formula image is missing; we read it as ``L = L_cls + λ1·L_det + λ2·L_kd`` with
    ``L_det = L_center + box_loss_weight·L_box`` (the detection branch's log loss on center points plus the
    smooth-L1 box term, paper §Detection branch). ``L_cls`` is the weighted cross-entropy against the labels and
    stays on in the distillation rounds; ``L_kd`` is added only when ``teacher_probs`` is given.

    Args:
        out: model output: ``logits`` ``[N, 3]``, ``det`` ``[N, 5, h, w]``.
        batch: ``label`` ``[N]`` long, ``heatmap`` ``[N, 1, h, w]``, ``reg`` ``[N, 4, h, w]``, ``reg_mask``
            ``[N, h, w]`` bool (the detection keys are only read when ``cfg.use_det``).
        cfg: weights and switches (``use_cls``, ``use_det``, ``lambda_det``, ``lambda_kd``, ...).
        teacher_probs: ``[N, 3]`` teacher predictions at ``cfg.kd_temperature``, or None (no distillation).

    Returns:
        ``cls``, ``center``, ``box``, ``det``, ``kd`` (each the unweighted term; 0 when switched off) and
        ``total`` (the weighted sum, to backpropagate).
    """
    logits = out["logits"]
    zero = logits.new_zeros((), dtype=torch.float32)
    cls = weighted_ce(logits, batch["label"], cfg.class_weights) if cfg.use_cls else zero
    if cfg.use_det:
        det = out["det"]  # [N, 5, h, w]
        center = center_loss(det[:, :1], batch["heatmap"], alpha=cfg.focal_alpha, beta=cfg.focal_beta)
        box = box_loss(det[:, 1:], batch["reg"], batch["reg_mask"])
        det_loss = center + cfg.box_loss_weight * box
    else:
        center = box = det_loss = zero
    kd = kd_loss(logits, teacher_probs, cfg.kd_temperature) if teacher_probs is not None else zero
    total = cls + cfg.lambda_det * det_loss + cfg.lambda_kd * kd
    return {"cls": cls, "center": center, "box": box, "det": det_loss, "kd": kd, "total": total}
