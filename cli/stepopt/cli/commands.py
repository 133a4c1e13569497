"""Registers every command module with the application."""

from stepopt.cli import baseline, eval, export, inspect, optimize, plot, sample  # noqa: F401
