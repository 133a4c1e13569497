"""Constants the command line needs before any heavy import (no torch here)."""

DEFAULT_MODEL = "builtin:gmm-digits"
