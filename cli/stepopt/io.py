"""Atomic file writing: write to a temporary file in the target folder, then rename.

No command ever leaves a half-written output file behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from stepopt import distributed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, every_rank: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    A symlink is written through (its target is replaced, the link stays). An ``OSError`` while
    writing (a full disk, a lost permission) names ``path``, not the temporary file. Among several
    ``torch.distributed`` ranks, which all hold the same results, only rank 0 writes (the others
    write to a scratch file that is dropped), unless ``every_rank`` (files a rank owns, such as
    the teacher cache entries it computed).
    """
    if not every_rank and not distributed.is_main():
        with tempfile.TemporaryDirectory(prefix="stepopt-rank-") as scratch:
            yield Path(scratch) / Path(path).name
        return
    target = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory; expected a file path", str(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and (e.filename is None or str(e.filename) == tmp):
            raise OSError(e.errno, f"cannot write: {e.strerror or e}", str(path)) from e
        raise


def atomic_write(
    path: str | os.PathLike[str], writer: Callable[[IO[Any]], object], binary: bool = False, *, every_rank: bool = False
) -> Path:
    """Call ``writer(f)`` on a temporary file, then rename it onto ``path`` (see :func:`atomic_path`)."""
    with (
        atomic_path(path, every_rank=every_rank) as tmp,
        open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f,
    ):
        writer(f)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, every_rank: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(text), every_rank=every_rank)
