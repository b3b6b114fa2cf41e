"""The champion-gated model registry and the model card.

A new version of the registered model (default ``blendsign``) is first judged against trivial models
(:func:`baseline_verdict`: every class's CV AUC above chance by a margin, accuracy at least the majority class's
share): one that fails is ``rejected`` (a version tag, no alias), the first version too. Otherwise it gets the
alias ``champion`` only when its cross-validated promotion metric (default ``cv_auc_blend_sign``) beats the
current champion's by more than a margin, else ``challenger``. The decision is written into the version
description.
Every version carries tags (data fingerprint, git commit, preset, CV metrics) and a model card.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blendsign import CLASSES, METRICS
from blendsign.errors import ConfigError, InputError

if TYPE_CHECKING:
    from blendsign.head_to_head import HeadToHead

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
TOKEN_TAG = "champion_token"  # registered-model tag: changes whenever the champion alias moves


PROMOTION_METRICS = ("cv_accuracy", *(f"cv_{m}_{c}" for m in METRICS for c in CLASSES))


def check_promotion_metric(metric: str) -> str:
    """Refuse an unknown promotion metric before hours of training, not at registration."""
    if metric not in PROMOTION_METRICS:
        raise ConfigError(f"promotion metric {metric!r} unknown; choose cv_<metric>_<class> with metric in "
                         f"{list(METRICS)} and class in {list(CLASSES)}, e.g. cv_auc_blend_sign")
    return metric


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    new_value: float
    champion_value: float | None  # the previous champion's metric (None: there was none)
    champion_version: str | None
    text: str
    rejected: bool = False  # refused by the baseline gate: neither champion nor challenger

    @property
    def alias(self) -> str | None:
        """The alias this version gets: champion, challenger, or none (rejected)."""
        return CHAMPION if self.promoted else None if self.rejected else CHALLENGER


def baseline_verdict(metrics: dict[str, Any], margin: float) -> list[str]:
    """:func:`blendsign.baselines.shortfalls` of an evaluation's ``metrics.json`` (:func:`evaluate.read_metrics`);
    one made before baselines existed is judged on its AUCs alone."""
    from blendsign.baselines import shortfalls

    return shortfalls(metrics["cv"], _baselines_cv(metrics), margin)


def _baselines_cv(metrics: dict[str, Any]) -> dict[str, Any]:
    """Each baseline's CV means of an evaluation's ``metrics.json`` (empty for one made before baselines)."""
    return {k: b["cv"] for k, b in metrics.get("baselines", {}).items()}


CV_BASIS = "cross-validated, each version on the data it was trained with"


def decide(new_value: float, champion_value: float | None, *, metric: str, margin: float,
           champion_version: str | None, basis: str = CV_BASIS) -> Promotion:
    """Champion gate: promote when there is no champion or ``new > champion + margin`` (NaN never wins);
    ``basis`` says what the two values were measured on."""
    if math.isnan(new_value):
        return Promotion(False, new_value, champion_value, champion_version,
                         f"not promoted: {metric} is undefined for this version")
    if champion_value is None:
        return Promotion(True, new_value, None, None, f"promoted: first champion ({metric} {new_value:.4f})")
    if new_value > champion_value + margin:
        return Promotion(True, new_value, champion_value, champion_version,
                         f"promoted: {metric} {new_value:.4f} beats champion v{champion_version} "
                         f"({champion_value:.4f}) by more than {margin:g} ({basis})")
    return Promotion(False, new_value, champion_value, champion_version,
                     f"challenger: {metric} {new_value:.4f} does not beat champion v{champion_version} "
                     f"({champion_value:.4f}) by more than {margin:g} ({basis})")


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
        *_baseline_section(metrics),
        "## Limitations",
        "- The paper's data came from one hospital and an Asian population; performance on other scanners, "
        "protocols and populations must be checked locally before use.",
        "- Blend-sign prevalence was kept high on purpose (paper: blend : normal ICH : non-ICH ≈ 1 : 9 : 22); "
        "predictive values at the prevalence of an emergency department will be lower than these figures suggest.",
        "- Labels are a majority vote of readers who disagree most on the blend sign (κ above); the model "
        "inherits that uncertainty, which self-knowledge distillation only partly absorbs.",
        "- Grad-CAM and the detection boxes are coarse localisations, not segmentations.",
        "- Every scored slice carries `ood_score` and `out_of_distribution`: the Mahalanobis distances of its "
        "feature statistics at every stage of the network to the training slices', each relative to its "
        "threshold, together the 0.99 quantile of held-out training slices (> 1: flagged). A flagged slice is "
        "unlike anything the model was trained on; its probabilities say little."
        + (f" Held-out slices flagged in cross-validation: "
           f"{sum(metrics['ood_flagged'].values()) / len(metrics['ood_flagged']):.1%}."
           if metrics.get("ood_flagged") else ""),
        (f"- Trained with preset `{preset}`, which is made for the embedded synthetic cohort (`make demo`, the "
         "test suite): its numbers say nothing about clinical performance, and it has never seen a real CT."
         if preset in ("demo", "ci") else
         f"- Trained with preset `{preset}` on the dataset above; whether that data resembles the site's own must "
         "be checked there."),
        "",
        "## Registry decision",
        promotion.text,
        "",
    ])


def _baseline_section(metrics: dict[str, Any]) -> list[str]:
    """The card's comparison with the trivial baselines (none for an evaluation made before they existed)."""
    from blendsign.baselines import baseline_table

    baselines = _baselines_cv(metrics)
    if not baselines:
        return []
    return ["## Against trivial baselines", "The same held-out folds (mean over folds): `prior` = the training "
            "class shares for every slice (no skill), `hu_rule` = one HU feature per slice (share of intracranial "
            "pixels at acute-blood density) with a logistic regression.", "",
            baseline_table(metrics["cv"], baselines), ""]


def _champion(client: Any, name: str, metric: str) -> tuple[str | None, float | None, str | None]:
    """(champion version, its ``metric`` tag, the registered model's champion token); ``None`` where absent."""
    from mlflow.exceptions import MlflowException

    token = client.get_registered_model(name).tags.get(TOKEN_TAG)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None, token
    return str(current.version), float(current.tags.get(metric, "nan")), token


@dataclass(frozen=True)
class Registration:
    """A version whose gate decision is made but not yet published (:func:`prepare` → :func:`publish`)."""

    name: str
    version: str
    metric: str
    value: float
    promotion: Promotion
    token: str | None  # the champion token read with the champion


def prepare(client: Any, *, name: str, run_id: str, metric: str, value: float, margin: float,
            head_to_head: HeadToHead | None = None, refusals: Sequence[str] = ()) -> Registration:
    """The version of ``name`` logged from ``run_id`` (the latest, if several) and the gate's decision against
    the champion as it is now. Writes nothing. ``client`` is an ``mlflow.MlflowClient``.

    With ``head_to_head`` (:mod:`blendsign.head_to_head`) comparing this very champion on scans it never trained
    on, the gate compares the two there; otherwise ``value`` (the cross-validated metric) against the
    champion's own, and the decision says why. ``refusals`` (:func:`baseline_verdict`): the version is rejected
    whatever the champion, the first version too."""
    versions = [v for v in client.search_model_versions(f"name='{name}'") if v.run_id == run_id]
    if not versions:
        raise InputError(f"no version of {name!r} was logged from run {run_id}")
    version = str(max(versions, key=lambda v: int(v.version)).version)
    champion_version, champion_value, token = _champion(client, name, metric)
    basis, new_value = CV_BASIS, value
    if champion_version is not None and head_to_head is not None:
        pair = head_to_head.values(metric) if head_to_head.champion_version == champion_version else None
        if pair is not None:
            new_value, champion_value = pair
            basis = (f"both on the {head_to_head.scans} scans ({head_to_head.slices} slices) of this dataset "
                     f"that v{champion_version} never trained on: this version's out-of-fold predictions")
        elif head_to_head.champion_version != champion_version:
            basis += (f"; the held-out comparison was made with v{head_to_head.champion_version}, not the "
                      "current champion")
        else:
            basis += f"; no held-out comparison: {head_to_head.reason or f'{metric} undefined on the new scans'}"
    if refusals:
        promotion = Promotion(False, value, champion_value, champion_version,
                              "rejected: no better than a trivial model: " + "; ".join(refusals), rejected=True)
    else:
        promotion = decide(new_value, champion_value, metric=metric, margin=margin,
                           champion_version=champion_version, basis=basis)
    return Registration(name, version, metric, value, promotion, token)


class ChampionChangedError(RuntimeError):
    """The champion moved between reading it and moving it: the decision compared against another model."""


def _move_champion(client: Any, name: str, version: str, previous: str | None) -> None:
    """Set a new champion token (read back: a concurrent writer's token means we lost), keep the previous
    champion as ``previous-champion``, and move ``champion`` — last."""
    token = f"v{version}-{uuid.uuid4().hex[:12]}"
    client.set_registered_model_tag(name, TOKEN_TAG, token)
    if client.get_registered_model(name).tags.get(TOKEN_TAG) != token:
        raise ChampionChangedError("another registration wrote the champion token at the same moment")
    if previous is not None:
        client.set_registered_model_alias(name, PREVIOUS, previous)
    client.set_registered_model_alias(name, CHAMPION, version)


def publish(client: Any, reg: Registration, *, tags: dict[str, str], card: Callable[[Promotion], str]) -> Promotion:
    """Write ``tags``, the gate's result and the card (``card(decision)``), then move the alias (last). Returns
    the final decision: a promotion whose champion changed since :func:`prepare` becomes a challenger, saying so."""
    promotion = reg.promotion
    if promotion.promoted:
        now_version, _, now_token = _champion(client, reg.name, reg.metric)
        if (now_version, now_token) != (promotion.champion_version, reg.token):
            was = f"v{promotion.champion_version}" if promotion.champion_version else "none"
            promotion = _refused(promotion, f"champion changed from {was} to v{now_version} during this "
                                            "registration")

    def describe(decision: Promotion) -> None:
        for key, val in {**tags, reg.metric: f"{reg.value:.6f}", "promotion": decision.text}.items():
            client.set_model_version_tag(reg.name, reg.version, key, str(val))
        client.update_model_version(reg.name, reg.version, description=card(decision))

    describe(promotion)
    if promotion.rejected:
        client.set_model_version_tag(reg.name, reg.version, "rejected", "true")
    if promotion.promoted:
        try:
            _move_champion(client, reg.name, reg.version, promotion.champion_version)
        except ChampionChangedError as exc:
            promotion = _refused(promotion, str(exc))
            describe(promotion)
    if promotion.alias == CHALLENGER:
        client.set_registered_model_alias(reg.name, CHALLENGER, reg.version)
    (log.warning if promotion.rejected else log.info)("%s v%s: %s", reg.name, reg.version, promotion.text)
    return promotion


def _refused(promotion: Promotion, why: str) -> Promotion:
    return Promotion(False, promotion.new_value, promotion.champion_value, promotion.champion_version,
                     f"not promoted: {why}; the gate compared against a champion that is no longer current "
                     f"(was: {promotion.text}); register again to compare with the current one")


def register_version(
    client: Any,
    *,
    name: str,
    run_id: str,
    metric: str,
    value: float,
    margin: float,
    tags: dict[str, str],
    card: Callable[[str, Promotion], str] | str,
    head_to_head: HeadToHead | None = None,
    refusals: Sequence[str] = (),
) -> tuple[str, Promotion]:
    """Register the model logged in ``run_id`` (latest version of ``name`` from that run) behind the gate:
    :func:`prepare`, then :func:`publish` with ``card`` (text, or made from the version and the final decision).

    ``client`` is an ``mlflow.MlflowClient``. Returns (version, final decision).
    """
    reg = prepare(client, name=name, run_id=run_id, metric=metric, value=value, margin=margin,
                  head_to_head=head_to_head, refusals=refusals)
    return reg.version, publish(client, reg, tags=tags,
                                card=lambda decision: card(reg.version, decision) if callable(card) else card)


def rollback(client: Any, name: str) -> tuple[str, str]:
    """Move ``champion`` back to ``previous-champion``; the demoted version becomes ``previous-champion`` (a
    second rollback undoes the first) and is tagged ``rolled_back``. Returns (new champion, demoted version)."""
    from mlflow.exceptions import MlflowException

    try:
        back = str(client.get_model_version_by_alias(name, PREVIOUS).version)
        demoted = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        raise InputError(f"{name!r} has no {PREVIOUS!r} and {CHAMPION!r} to roll back between") from None
    client.set_model_version_tag(name, demoted, "rolled_back", f"champion v{demoted} rolled back to v{back}")
    _move_champion(client, name, back, demoted)
    log.info("%s: champion rolled back from v%s to v%s", name, demoted, back)
    return back, demoted
