"""Out-of-distribution flag: how far a slice's features lie from the training slices'.

The score is the Mahalanobis distance of the slice's pooled last-block features (the classification branch's
GAP input, ``[C]``) to the nearest training class mean under one shared covariance (Lee et al., NeurIPS 2018),
the covariance shrunk by Ledoit–Wolf (``C`` is 512–2048, the training slices a few thousand). A slice is
flagged when its score exceeds the conformal ``quantile`` (0.99) of held-out training slices' scores
(:func:`conformal_quantile`): the training scans are split in two halves, each half scored by the statistics of
the other, so that the threshold is what unseen slices of the training distribution reach, not the smaller
in-sample distances; the stored means and covariance are then fitted on all training slices. The state travels
in the checkpoint (``ood``) and so with the registered model.
"""

from __future__ import annotations

import math

import numpy as np
import torch

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


def fit(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, quantile: float = QUANTILE
        ) -> dict[str, torch.Tensor | float]:
    """The OOD state from the training slices' pooled ``features [n, C]``, class ``labels [n]`` and scan
    ``groups [n]``: ``mean [K', C]``, ``precision [C, C]`` (float32 tensors), ``threshold``, ``quantile``."""
    features = np.asarray(features, dtype=np.float64)
    labels, groups = np.asarray(labels), np.asarray(groups)
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
            "threshold": conformal_quantile(scores, quantile), "quantile": float(quantile)}


def conformal_quantile(scores: np.ndarray, quantile: float) -> float:
    """The split-conformal threshold: the ``⌈(n + 1)·q⌉``-th smallest of ``n`` held-out ``scores``, so that a new
    slice from the same distribution exceeds it with probability ≤ 1 − q; the largest score when n is too small
    for that (n < q / (1 − q), e.g. fewer than 99 slices at q = 0.99)."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    k = math.ceil((len(ordered) + 1) * quantile)
    return float(ordered[min(k, len(ordered)) - 1])


def score(state: dict[str, torch.Tensor | float], features: torch.Tensor) -> torch.Tensor:
    """``[N]`` scores of pooled ``features [N, C]`` relative to the threshold: > 1 means out of distribution."""
    means, precision = state["mean"], state["precision"]
    assert isinstance(means, torch.Tensor) and isinstance(precision, torch.Tensor)
    f = features.float()
    return _distances(f, means.to(f.device), precision.to(f.device)) / float(state["threshold"])
