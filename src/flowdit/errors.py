"""Exceptions that carry a message meant for the user.

The command-line tool prints these as one line (``flowdit: error: ...``) instead of a
traceback, so every message must name the bad key, value, file or shape by itself.
"""


class FlowditError(Exception):
    """Base class: an error whose message is shown to the user as it is."""


class ConfigError(FlowditError, ValueError):
    """A bad configuration key or value, or a bad command-line argument."""


class DataError(FlowditError, ValueError):
    """A dataset that is missing, malformed, or does not match what was asked."""


class CheckpointError(FlowditError, ValueError):
    """A checkpoint that is missing, truncated, corrupt, or from another model."""
