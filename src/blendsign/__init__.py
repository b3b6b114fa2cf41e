"""blendsign: blend-sign and intracranial-hemorrhage slice classifier for head CT.

Stages are library functions (``blendsign.ingest.ingest``, ...) that take a config and paths and
return a small result object; the CLI, the Kubeflow components and the tests all call them.
"""

__version__ = "0.1.0"

CLASSES: tuple[str, str, str] = ("non_ich", "normal_ich", "blend_sign")
"""Slice classes in label-index order (paper §Data collection and labeling)."""

METRICS: tuple[str, ...] = ("sensitivity", "specificity", "f1", "auc")
"""Per-class metrics, one class against the rest (paper §Evaluation metrics)."""
