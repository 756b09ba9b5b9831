"""Exceptions for mistakes a user can fix.

The entry points print these as one line (no traceback) and exit with code 2. Anything else is a bug and keeps
its traceback.
"""


class UserError(ValueError):
    """A mistake in the user's input (config, data, paths); the message says how to fix it."""


class ConfigError(UserError):
    """An unknown, missing or wrongly typed configuration value."""


class DataError(UserError):
    """Missing, empty, corrupt or mismatched training data."""
