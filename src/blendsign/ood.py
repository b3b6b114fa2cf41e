"""Out-of-distribution flag: how far a slice's features lie from the training slices'.

Per stage of the trunk (:data:`blendsign.model.STAT_STAGES`), the slice's channel means and standard deviations
(``[2·C]``, the network's ``stage_stats``) are compared with the training slices' by the Mahalanobis distance to
the nearest class mean under one shared covariance, shrunk by Ledoit–Wolf (Lee et al., NeurIPS 2018, who also
combine the stages: early ones see texture, noise and contrast, where a real scan differs from a synthetic one
long before the last block's content features do). Each stage's distance is divided by its own threshold, the
split-conformal quantile ``1 − (1 − q)/L`` of held-out training slices' distances (:func:`conformal_quantile`;
Bonferroni over the ``L`` stages, so that the maximum over stages exceeds 1 for at most ``1 − q`` of unseen
in-distribution slices): the training scans are split in two halves, each half scored by the statistics of the
other, so that the threshold is what unseen slices of the training distribution reach, not the smaller
in-sample distances; the stored means and covariances are then fitted on all training slices. The score is the
largest ratio; a slice is flagged when it exceeds 1. The state travels in the checkpoint (``ood``) and so with
the registered model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from blendsign.errors import InputError

log = logging.getLogger(__name__)

QUANTILE = 0.99  # share of unseen in-distribution slices left unflagged


def _statistics(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class means ``[K', C]`` (classes present) and the shrunk shared precision ``[C, C]``."""
    from sklearn.covariance import LedoitWolf

    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    return means, LedoitWolf(assume_centered=True).fit(centred).precision_


def _distances(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """``[N]``: the Mahalanobis distance of ``features [N, C]`` to the nearest of ``means [K', C]`` under
    ``precision [C, C]`` (fitting in float64, serving in float32 on the model's device)."""
    diff = features[:, None, :] - means[None]  # [N, K', C]
    d2 = torch.einsum("nkc,cd,nkd->nk", diff, precision, diff)
    return d2.min(dim=1).values.clamp_min(0).sqrt()


VERSION = 2  # 2: every stage's statistics; 1 (before 2026-12-03): the last block's pooled features only


def fit(stats: Sequence[np.ndarray], labels: np.ndarray, groups: np.ndarray, *, quantile: float = QUANTILE
        ) -> dict[str, Any]:
    """The OOD state from the training slices' ``stats`` (per stage ``[n, D_l]``), class ``labels [n]`` and scan
    ``groups [n]``: per stage ``mean [K', D_l]``, ``precision [D_l, D_l]`` (float32 tensors) and ``threshold``;
    the overall ``quantile`` and :data:`VERSION`."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    per_stage = 1 - (1 - quantile) / len(stats)
    return {"version": VERSION, "quantile": float(quantile),
            "stages": [_fit_stage(np.asarray(f, dtype=np.float64), labels, groups, per_stage) for f in stats]}


def _fit_stage(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, quantile: float) -> dict[str, Any]:
    scans = np.unique(groups)
    half = np.isin(groups, scans[::2])

    def distances(rows: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
        return _distances(*map(torch.from_numpy, (features[rows], means, precision))).numpy()

    held_out = []
    for fit_on in (half, ~half):
        if fit_on.sum() > 1 and (~fit_on).any():
            means, precision = _statistics(features[fit_on], labels[fit_on])
            held_out.append(distances(~fit_on, means, precision))
    means, precision = _statistics(features, labels)
    scores = np.concatenate(held_out) if held_out else distances(np.ones(len(features), bool), means, precision)
    return {"mean": torch.from_numpy(means.astype(np.float32)),
            "precision": torch.from_numpy(precision.astype(np.float32)),
            "threshold": conformal_quantile(scores, quantile)}


def usable(state: dict[str, Any] | None, where: str) -> dict[str, Any] | None:
    """``state`` if this version scores it, else None with a warning naming ``where`` (a checkpoint trained
    before :data:`VERSION`: retraining gives it the flag)."""
    if state is not None and state.get("version") != VERSION:
        log.warning("%s: out-of-distribution statistics of an older blendsign (version %s, this one reads %d): "
                    "no ood_score until the model is trained again", where, state.get("version", 1), VERSION)
        return None
    return state


def conformal_quantile(scores: np.ndarray, quantile: float) -> float:
    """The split-conformal threshold: the ``⌈(n + 1)·q⌉``-th smallest of ``n`` held-out ``scores``, so that a new
    slice from the same distribution exceeds it with probability ≤ 1 − q; the largest score when n is too small
    for that (n < q / (1 − q), e.g. fewer than 99 slices at q = 0.99)."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    k = math.ceil((len(ordered) + 1) * quantile)
    return float(ordered[min(k, len(ordered)) - 1])


def score(state: dict[str, Any], stats: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[N]`` scores of per-stage ``stats`` (``[N, D_l]`` each, the network's ``stage_stats``) relative to the
    thresholds: the largest stage's distance / threshold; > 1 means out of distribution."""
    if len(stats) != len(state["stages"]):
        raise InputError(f"{len(stats)} stages of statistics for an OOD state of {len(state['stages'])}")
    ratios = []
    for f, stage in zip(stats, state["stages"], strict=True):
        f = f.float()
        d = _distances(f, stage["mean"].to(f.device), stage["precision"].to(f.device))  # [N]
        ratios.append(d / float(stage["threshold"]))
    return torch.stack(ratios).amax(dim=0)
