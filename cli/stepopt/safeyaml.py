"""Reading YAML that comes from elsewhere (schedule files, method configs) without trusting it.

Schedule files are data that people download and share, so reading one must be cheap and bounded
whatever it holds. :func:`load` is ``yaml.safe_load`` (only plain scalars, lists and mappings are
constructed) with three limits on top:

* **no aliases or anchors** (``&a`` / ``*a``): a kilobyte of nested aliases expands to billions of
  nodes (the "billion laughs" attack), and stepopt never writes them;
* **nesting depth** at most :data:`MAX_DEPTH` levels (deeper documents would otherwise exhaust the
  recursion of the composer);
* **size** at most :data:`MAX_BYTES`: :func:`read_text` stops reading there, so a huge file (or
  a device such as ``/dev/zero``) is refused before it is parsed.

The limits are checked on the parser's event stream, before any node is built; with libyaml (the
C parser) a megabyte is checked and loaded in well under a second.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, NodeEvent

MAX_BYTES = 1 << 20  # a schedule with 1000 steps and all optional grids is ~80 KB
MAX_DEPTH = 32  # schedule files nest 3 levels (method.config.<option> lists: 4)

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YAMLLimitError(yaml.YAMLError):
    """A YAML document that is well-formed but outside what stepopt reads (alias, depth, size)."""


def _where(event: Any) -> str:
    mark = getattr(event, "start_mark", None)
    return f"line {mark.line + 1}: " if mark is not None else ""


def check(text: str, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES) -> None:
    """Raise :class:`YAMLLimitError` (or ``yaml.YAMLError`` for bad syntax) for a document over the limits."""
    if len(text) > max_bytes:
        raise YAMLLimitError(f"document of {len(text)} characters is larger than the limit of {max_bytes}")
    depth = 0
    for ev in yaml.parse(text, Loader=_Loader):
        if isinstance(ev, AliasEvent):
            raise YAMLLimitError(f"{_where(ev)}aliases (*{ev.anchor}) are not allowed")
        if isinstance(ev, NodeEvent) and ev.anchor is not None:
            raise YAMLLimitError(f"{_where(ev)}anchors (&{ev.anchor}) are not allowed")
        if isinstance(ev, CollectionStartEvent):
            depth += 1
            if depth > max_depth:
                raise YAMLLimitError(f"{_where(ev)}nested more than {max_depth} levels deep")
        elif isinstance(ev, CollectionEndEvent):
            depth -= 1


def load(text: str, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES) -> Any:
    """``yaml.safe_load(text)`` within the limits (aliases, anchors, depth, size); raises ``yaml.YAMLError``."""
    check(text, max_depth, max_bytes)
    return yaml.load(text, Loader=_Loader)  # a safe loader: CSafeLoader or SafeLoader


class InputFileError(Exception):
    """A file that cannot be read as text: missing, not a regular file, too large, not UTF-8."""


def read_text(path: str | os.PathLike[str], max_bytes: int = MAX_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes`` bytes (reads no more than that).

    Raises :class:`InputFileError` with a short reason (no file name: callers prefix it).
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise InputFileError("no such file") from None
    except OSError as e:
        raise InputFileError(f"cannot read ({e.strerror or e.__class__.__name__})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputFileError("is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise InputFileError("not a regular file")
    if st.st_size > max_bytes:
        raise InputFileError(f"file of {st.st_size} bytes is larger than the limit of {max_bytes} bytes")
    try:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise InputFileError(f"cannot read ({e.strerror or e.__class__.__name__})") from None
    if len(data) > max_bytes:
        raise InputFileError(f"file is larger than the limit of {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(f"not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r})") from None
