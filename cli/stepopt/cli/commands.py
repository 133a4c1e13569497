"""Registers every command module with the application."""

from stepopt.cli import baseline, inspect, optimize, sample  # noqa: F401
