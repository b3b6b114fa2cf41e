"""The errors blendsign raises on purpose: something a person can fix, said in one line.

Every class is a ``ValueError``, so callers that caught ``ValueError`` keep working. The CLI prints these (and
MLflow's ``MlflowException``, S3's client errors and file-system errors naming a path) as one line and exits 2;
anything else is a bug and keeps its traceback. Argument checks of the numerical core (a tensor of the wrong
shape) stay plain ``ValueError``: they are the caller's bug.
"""

from __future__ import annotations


class BlendsignError(ValueError):
    """A problem with what blendsign was given or found, not with blendsign itself."""


class ConfigError(BlendsignError):
    """A configuration that cannot be used: preset, site file, cluster profile, option, environment variable."""


class InputError(BlendsignError):
    """Input that cannot be used as a whole: an annotation CSV, a dataset folder, a checkpoint, a request."""


class UnusableFileError(BlendsignError):
    """One file that cannot be used (not CT, broken pixel data): reported and skipped, the run goes on. The
    message is the reason reported for it and holds no identifiers."""
