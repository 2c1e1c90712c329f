"""The errors cqf raises for bad input. The CLI prints their message on one line and exits non-zero."""

__all__ = ["CQFError", "CheckpointError", "ConfigError", "DataError", "TrainingError"]


class CQFError(Exception):
    """Base class: a problem the user can fix; the message names the problem and the fix."""


class ConfigError(CQFError, ValueError):
    """Unknown config key, wrong type or impossible combination."""


class DataError(CQFError):
    """Missing, unreadable or wrongly shaped data set."""


class CheckpointError(CQFError):
    """Missing, corrupt or foreign checkpoint."""


class TrainingError(CQFError):
    """Training cannot go on (e.g. a non-finite loss)."""
