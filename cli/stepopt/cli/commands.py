"""Registers every command module with the application."""

from stepopt.cli import baseline, eval, inspect, optimize, plot, sample  # noqa: F401
