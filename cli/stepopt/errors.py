"""Exceptions that the command line maps to one clear line and exit code 1.

The library raises these; only the CLI layer prints them.
"""

from __future__ import annotations


class StepoptError(Exception):
    """A user-facing error: bad input, a missing file, an inconsistent option."""


class ScheduleValidationError(StepoptError):
    """A schedule (file or value) violates the v1 contract; the message names key, value, expectation."""


class ConfigError(StepoptError):
    """A method configuration has an unknown key or a value of the wrong type."""
