"""The on-disk cache: teacher outputs (per seed) and torch-fidelity's reference statistics.

Location: ``$STEPOPT_CACHE_DIR`` when set, else platformdirs' ``user_cache_dir("stepopt")``
(``~/.cache/stepopt`` on Linux). Layout::

    <root>/teacher/<key hash>/key.json      the full key, human-readable
    <root>/teacher/<key hash>/<seed>.npy    one teacher output per seed, shape = the model's shape
    <root>/teacher/<key hash>/<seed>.sha256 its digest, bound to the full key and the seed
    <root>/fidelity/<extractor>-<weights hash>/...   torch-fidelity's own cache (reference features/stats)

A teacher entry is keyed by everything its value depends on (model fingerprint, teacher
configuration, sigma range, dtype, shape); seeds are files inside it, so any subset or superset
of seeds reuses what is there, and outputs are stored batch by batch as they are computed, so an
interrupted run resumes where it stopped. Every write is atomic (temporary file, then rename). A
value is used only when its digest (sha256 of the full key, the seed and the file's bytes) matches:
a file copied from another entry or seed, planted, truncated or edited, or one that has the wrong
shape or dtype or holds non-finite values, counts as missing and is recomputed and overwritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
import torch

from stepopt.cache_sections import SECTIONS
from stepopt.errors import StepoptError
from stepopt.io import atomic_path, atomic_write_text

ENV_VAR = "STEPOPT_CACHE_DIR"
KEY_FILE = "key.json"
DIGEST_SUFFIX = ".sha256"


def cache_root() -> Path:
    """``$STEPOPT_CACHE_DIR`` or the user cache directory of stepopt."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("stepopt"))


def _key_text(key: Mapping[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)


def key_hash(key: Mapping[str, Any]) -> str:
    """A stable short hash of a JSON-able key (sorted keys, floats by repr)."""
    return hashlib.sha256(_key_text(key).encode()).hexdigest()[:24]


def entry_digest(key: Mapping[str, Any], seed: int, data: bytes) -> str:
    """The digest stored beside a seed's file: binds its bytes to the full key and the seed."""
    h = hashlib.sha256()
    h.update(_key_text(key).encode())
    h.update(b"\0seed=%d\0" % int(seed))
    h.update(data)
    return h.hexdigest()


_NP_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


@dataclass(frozen=True)
class TeacherCache:
    """Per-seed teacher outputs under ``root/teacher`` (``root`` defaults to :func:`cache_root`)."""

    root: Path | None = None

    @property
    def base(self) -> Path:
        return (self.root if self.root is not None else cache_root()) / "teacher"

    def entry(self, key: Mapping[str, Any]) -> Path:
        return self.base / key_hash(key)

    def load(
        self, key: Mapping[str, Any], seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype
    ) -> dict[int, torch.Tensor]:
        """The cached outputs among ``seeds`` (missing and corrupt ones are left out)."""
        folder = self.entry(key)
        if not folder.is_dir():
            return {}
        want_dtype = np.dtype(_NP_DTYPES.get(dtype, np.float64))
        out: dict[int, torch.Tensor] = {}
        for s in seeds:
            arr = _read_verified(folder, key, int(s))
            if arr is None or arr.shape != tuple(shape) or arr.dtype != want_dtype or not np.isfinite(arr).all():
                continue
            out[int(s)] = torch.from_numpy(arr).to(dtype)
        return out

    def store(self, key: Mapping[str, Any], seeds: Sequence[int], values: torch.Tensor) -> None:
        """Write ``values[i]`` as the entry of ``seeds[i]`` (atomically, one file per seed)."""
        folder = self.entry(key)
        folder.mkdir(parents=True, exist_ok=True)
        key_file = folder / KEY_FILE
        if not key_file.exists():
            atomic_write_text(key_file, json.dumps(key, sort_keys=True, indent=1, default=str) + "\n", every_rank=True)
        arr = values.detach().cpu().numpy()
        for s, row in zip(seeds, arr, strict=True):
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(row), allow_pickle=False)
            data = buf.getvalue()
            with atomic_path(folder / f"{int(s)}.npy", every_rank=True) as tmp:
                tmp.write_bytes(data)
            atomic_write_text(
                folder / f"{int(s)}{DIGEST_SUFFIX}", entry_digest(key, int(s), data) + "\n", every_rank=True
            )


def _read_verified(folder: Path, key: Mapping[str, Any], seed: int) -> np.ndarray | None:
    """The array of ``seed`` if its file matches its digest; None when missing, corrupt or foreign."""
    try:
        data = (folder / f"{seed}.npy").read_bytes()
        digest = (folder / f"{seed}{DIGEST_SUFFIX}").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if digest != entry_digest(key, seed, data):
        return None
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None


def fidelity_cache_dir(extractor: str, weights_fingerprint: str, root: Path | None = None) -> Path:
    """Where torch-fidelity caches reference features/statistics for one extractor and its weights."""
    digest = weights_fingerprint.split(":")[-1][:16]
    return (root if root is not None else cache_root()) / "fidelity" / f"{extractor}-{digest}"


def _walk(path: Path) -> Iterable[Path]:
    if not path.exists():
        return []
    return (p for p in path.rglob("*") if p.is_file())


def cache_info(root: Path | None = None) -> dict[str, Any]:
    """Size report: per section the number of files, bytes and entries (teacher keys / extractors)."""
    base = root if root is not None else cache_root()
    sections: dict[str, Any] = {}
    for name in SECTIONS:
        folder = base / name
        files = list(_walk(folder))
        entries = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        sections[name] = {
            "files": len(files),
            "bytes": sum(f.stat().st_size for f in files),
            "entries": len(entries),
        }
    teacher_keys = []
    tdir = base / "teacher"
    if tdir.is_dir():
        for d in sorted(p for p in tdir.iterdir() if p.is_dir()):
            try:
                key = json.loads((d / KEY_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                key = None
            teacher_keys.append({"entry": d.name, "seeds": sum(1 for _ in d.glob("*.npy")), "key": key})
    return {
        "root": str(base),
        "bytes": sum(s["bytes"] for s in sections.values()),
        "sections": sections,
        "teacher_entries": teacher_keys,
    }


def clear_cache(section: str | None = None, root: Path | None = None) -> dict[str, int]:
    """Delete one section (``teacher`` / ``fidelity``) or all of stepopt's cache; returns what was removed."""
    if section is not None and section not in SECTIONS:
        raise StepoptError(f"unknown cache section '{section}'; expected one of {', '.join(SECTIONS)}")
    base = root if root is not None else cache_root()
    names = SECTIONS if section is None else (section,)
    removed = {"files": 0, "bytes": 0}
    for name in names:
        folder = base / name
        for f in _walk(folder):
            removed["files"] += 1
            removed["bytes"] += f.stat().st_size
        if folder.exists():
            shutil.rmtree(folder)
    return removed
