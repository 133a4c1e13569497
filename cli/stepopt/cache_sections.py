"""The sections of the on-disk cache (a light module: ``stepopt cache --help`` needs the names only)."""

SECTIONS = ("teacher", "fidelity")
