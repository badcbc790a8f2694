"""Errors that describe a problem with what was asked for.

Every error here carries one message that names the offending value and what
was expected. The command line prints that message and exits with status 2,
without a traceback; library callers catch them like any ValueError.
"""

from __future__ import annotations

__all__ = ["LearnsparseError", "ConfigError", "ShapeError", "CheckpointError", "DataError", "DivergenceError"]


class LearnsparseError(Exception):
    """Base class: a problem with the input, the configuration or a file."""


class ConfigError(LearnsparseError, ValueError):
    """A bad setting: unknown name, out-of-range number, conflicting options."""


class ShapeError(LearnsparseError, ValueError):
    """An array of the wrong shape or dtype was passed to a layer or model."""


class DataError(LearnsparseError, ValueError):
    """A data set that is missing, unreadable or malformed."""


class CheckpointError(LearnsparseError, ValueError):
    """A checkpoint that is missing, corrupt, or does not match the model."""


class DivergenceError(LearnsparseError, FloatingPointError):
    """Training diverged: a non-finite loss, parameter, gradient or buffer, or an exploding loss."""
