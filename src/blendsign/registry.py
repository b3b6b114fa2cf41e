"""The champion-gated model registry and the model card.

A new version of the registered model (default ``blendsign``) gets the alias ``champion`` only when its
cross-validated promotion metric (default ``cv_auc_blend_sign``) beats the current champion's by more
than a margin; otherwise it gets ``challenger``. The comparison is written into the version description.
Every version carries tags (data fingerprint, git commit, preset, CV metrics) and a model card.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from blendsign import CLASSES, METRICS

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"


PROMOTION_METRICS = ("cv_accuracy", *(f"cv_{m}_{c}" for m in METRICS for c in CLASSES))


def check_promotion_metric(metric: str) -> str:
    """Refuse an unknown promotion metric before hours of training, not at registration."""
    if metric not in PROMOTION_METRICS:
        raise ValueError(f"promotion metric {metric!r} unknown; choose cv_<metric>_<class> with metric in "
                         f"{list(METRICS)} and class in {list(CLASSES)}, e.g. cv_auc_blend_sign")
    return metric


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    new_value: float
    champion_value: float | None  # the previous champion's metric (None: there was none)
    champion_version: str | None
    text: str


def decide(new_value: float, champion_value: float | None, *, metric: str, margin: float,
           champion_version: str | None) -> Promotion:
    """Champion gate: promote when there is no champion or ``new > champion + margin`` (NaN never wins)."""
    if math.isnan(new_value):
        return Promotion(False, new_value, champion_value, champion_version,
                         f"not promoted: {metric} is undefined for this version")
    if champion_value is None:
        return Promotion(True, new_value, None, None, f"promoted: first champion ({metric} {new_value:.4f})")
    if new_value > champion_value + margin:
        return Promotion(True, new_value, champion_value, champion_version,
                         f"promoted: {metric} {new_value:.4f} beats champion v{champion_version} "
                         f"({champion_value:.4f}) by more than {margin:g}")
    return Promotion(False, new_value, champion_value, champion_version,
                     f"challenger: {metric} {new_value:.4f} does not beat champion v{champion_version} "
                     f"({champion_value:.4f}) by more than {margin:g}")


def model_card(*, name: str, version: str, mode: str, preset: str, metrics: dict[str, Any],
               agreement: dict[str, Any], ingest: dict[str, Any], fingerprint: str, commit: str,
               promotion: Promotion, command: str, image: str | None = None) -> str:
    """Markdown model card: intended use, data, metrics with CIs, limitations (paper §Discussion)."""
    cv, ci = metrics["cv"], metrics["ci"]
    rows = []
    for c in CLASSES:
        cells = []
        for m in ("sensitivity", "specificity", "f1", "auc"):
            mean, sd = cv[f"{m}_{c}"]
            lo, hi = ci.get(f"{m}_{c}", (math.nan, math.nan))
            cells.append(f"{mean:.3f} ± {sd:.3f} [{lo:.3f}, {hi:.3f}]")
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    kappa = agreement.get("fleiss_kappa", {})
    counts = agreement.get("gold_counts", {})
    excluded = ", ".join(f"{k} {v}" for k, v in ingest.get("excluded", {}).items())
    return "\n".join([
        f"# Model card: {name} v{version}",
        "",
        "## Intended use",
        "Decision support for reading non-contrast head CT: per axial slice, the probabilities of no intracranial "
        "hemorrhage, hemorrhage (EDH, SDH, SAH, IPH, IVH) and the blend sign (a marker of hematoma expansion), "
        "with the detection branch's boxes and Grad-CAM maps. It does not replace a radiologist's read; it is "
        "not for patients younger than 7, postoperative patients or contrast-enhanced series (excluded in "
        "training, as in the paper).",
        "",
        "## Model",
        f"Method of Prior knowledge-based precise diagnosis of blend sign (classification + detection branches, "
        f"self-knowledge distillation). Registered as: {mode}. Preset `{preset}`. Source commit `{commit}`"
        + (f"; trained in image `{image}`" + ("" if "@sha256:" in image else " (named by tag, not by digest: compile "
                                               "the pipeline with a digest reference to pin it)") if image else "")
        + ".",
        f"Reproduce: `{command}`.",
        "",
        "## Data",
        f"Dataset fingerprint `{fingerprint}`: {ingest.get('scans_written', '?')} scans, "
        f"{ingest.get('slices_written', '?')} slices (excluded studies: {excluded or 'none'}). Gold standard: "
        f"majority vote of {agreement.get('readers', '?')} readers; slices per class "
        + ", ".join(f"{c} {counts.get(c, 0)}" for c in CLASSES)
        + ". Reader agreement (Fleiss' κ): "
        + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} n/a" for k, v in kappa.items()) + ".",
        "",
        "## Expected performance (cross-validation)",
        f"{len(metrics.get('per_fold', {}))}-fold patient-level cross-validation; mean ± sd over folds "
        "[95% CI, bootstrap over scans]; decision rule: argmax.",
        "",
        "| class | sensitivity | specificity | F1 | AUC |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        "Scan level: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.get("scan", {}).items()) + ".",
        "",
        "## Limitations",
        "- The paper's data came from one hospital and an Asian population; performance on other scanners, "
        "protocols and populations must be checked locally before use.",
        "- Blend-sign prevalence was kept high on purpose (paper: blend : normal ICH : non-ICH ≈ 1 : 9 : 22); "
        "predictive values at the prevalence of an emergency department will be lower than these figures suggest.",
        "- Labels are a majority vote of readers who disagree most on the blend sign (κ above); the model "
        "inherits that uncertainty, which self-knowledge distillation only partly absorbs.",
        "- Grad-CAM and the detection boxes are coarse localisations, not segmentations.",
        "- If this model was trained on the embedded synthetic cohort (preset `demo` or `ci`), its numbers say "
        "nothing about clinical performance.",
        "",
        "## Registry decision",
        promotion.text,
        "",
    ])


def register_version(
    client: Any,
    *,
    name: str,
    run_id: str,
    metric: str,
    value: float,
    margin: float,
    tags: dict[str, str],
    card: str,
) -> tuple[str, Promotion]:
    """Register the model logged in ``run_id`` (latest version of ``name`` from that run), apply the gate.

    ``client`` is an ``mlflow.MlflowClient``. Returns (version, decision).
    """
    from mlflow.exceptions import MlflowException

    versions = [v for v in client.search_model_versions(f"name='{name}'") if v.run_id == run_id]
    if not versions:
        raise ValueError(f"no version of {name!r} was logged from run {run_id}")
    version = max(versions, key=lambda v: int(v.version)).version
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        champion_value: float | None = float(current.tags.get(metric, "nan"))
        champion_version: str | None = current.version
    except MlflowException:
        champion_value, champion_version = None, None
    promotion = decide(value, champion_value, metric=metric, margin=margin, champion_version=champion_version)
    for key, val in {**tags, metric: f"{value:.6f}", "promotion": promotion.text}.items():
        client.set_model_version_tag(name, version, key, str(val))
    client.set_registered_model_alias(name, CHAMPION if promotion.promoted else CHALLENGER, version)
    client.update_model_version(name, version, description=card)
    log.info("%s v%s: %s", name, version, promotion.text)
    return version, promotion
