"""The schedule value object and its file format, ``stepopt.schedule/v1``.

A :class:`Schedule` is frozen and validated on construction: the grid is finite, strictly
decreasing and inside the model's sigma range, and ``nfe`` is exactly what the recorded solver
makes on it. Files are YAML with a fixed key order and floats written with ``repr`` precision,
so ``load(save(s)) == s`` and ``dump(load(text)) == text``; they are read as untrusted data
(:mod:`stepopt.safeyaml`: safe loader, no aliases, bounded size and depth). Older format versions
are upgraded through :data:`MIGRATIONS`; unknown ones are rejected.
"""

from __future__ import annotations

import importlib.resources
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from stepopt import safeyaml
from stepopt._lazy import is_tensor
from stepopt.errors import ScheduleValidationError
from stepopt.frames import PURE_NOISE_DOMAINS, TIME_DOMAINS
from stepopt.io import atomic_write_text
from stepopt.solvers.dpmpp import LEGACY_VARIANT_3M
from stepopt.solvers.registry import FINAL_STEPS, SolverIdentity, get_solver

if TYPE_CHECKING:
    import torch

FORMAT_V1 = "stepopt.schedule/v1"
CURRENT_FORMAT = FORMAT_V1

# Migration hook: maps an older format string to a function that upgrades a loaded mapping by
# one version (returning a mapping whose ``format`` is newer). Empty while v1 is the only version.
MIGRATIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def _legacy_dpmpp_3m_variant(data: dict[str, Any]) -> dict[str, Any]:
    """v1 files written before dpmpp-3m had variants (``variant`` null or absent) mean the exact form."""
    solver = data.get("solver")
    if isinstance(solver, Mapping) and solver.get("name") == "dpmpp-3m" and solver.get("variant") is None:
        data = {**data, "solver": {**solver, "variant": LEGACY_VARIANT_3M}}
        prov = data.get("provenance")
        if isinstance(prov, Mapping):
            note = f"solver.variant: null -> {LEGACY_VARIANT_3M} (dpmpp-3m file from before the variants)"
            data["provenance"] = {**prov, "migrated": [*prov.get("migrated", []), note]}
    return data


# Upgrades within the current format: content whose meaning changed without a new version (each
# maps a loaded mapping to its current meaning; applied after the format migrations, in order).
CONTENT_MIGRATIONS: tuple[Callable[[dict[str, Any]], dict[str, Any]], ...] = (_legacy_dpmpp_3m_variant,)

TOP_KEYS = (
    "format",
    "model",
    "solver",
    "nfe",
    "sigmas",
    "model_sigmas",
    "timesteps",
    "final_step",
    "method",
    "metrics",
    "provenance",
)
MODEL_KEYS = ("id", "fingerprint", "sigma_min", "sigma_max", "time", "shift", "mu")
# Written only when set (flow models), so files of other models keep their exact bytes.
OPTIONAL_MODEL_KEYS = ("shift", "mu")
SOLVER_KEYS = ("name", "order", "variant", "lower_order_final")
METHOD_KEYS = ("name", "config", "objective", "seed", "seconds")
REQUIRED_TOP = ("format", "model", "solver", "nfe", "sigmas", "method")

# Relative slack when checking a grid against the model's range (values written with repr
# round-trip exactly, so this only absorbs arithmetic done by other tools).
RANGE_RTOL = 1e-9


def _fail(key: str, value: Any, expected: str) -> ScheduleValidationError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ScheduleValidationError(f"'{key}' = {shown}: expected {expected}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _float(key: str, v: Any, *, positive: bool = False) -> float:
    if not _is_number(v) or not math.isfinite(float(v)):
        raise _fail(key, v, "a finite number")
    if positive and float(v) <= 0:
        raise _fail(key, v, "a number > 0")
    return float(v)


def _float_list(key: str, v: Any, first_inf: bool = False) -> tuple[float, ...]:
    """Finite numbers; with ``first_inf`` the first entry may also be ``+inf`` (pure noise)."""
    if isinstance(v, np.ndarray) or is_tensor(v):
        v = v.tolist()
    if not isinstance(v, (list, tuple)):
        raise _fail(key, v, "a list of numbers")
    out = []
    for i, x in enumerate(v):
        if first_inf and i == 0 and _is_number(x) and float(x) == math.inf:
            out.append(math.inf)
        else:
            out.append(_float(f"{key}[{i}]", x))
    return tuple(out)


@dataclass(frozen=True)
class ModelRef:
    """Which model a schedule belongs to: loader id, parameter fingerprint and sigma range.

    ``sigma_max`` is ``inf`` exactly for models whose time domain includes pure noise
    (:data:`~stepopt.frames.PURE_NOISE_DOMAINS`, e.g. ``flow``). ``shift`` / ``mu``: the flow
    pipeline's time shift (static) or dynamic ``mu`` the schedule was made for (flow models only).
    """

    id: str
    fingerprint: str
    sigma_min: float
    sigma_max: float
    time: str = "sigma"
    shift: float | None = None
    mu: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise _fail("model.id", self.id, "a non-empty loader id such as 'builtin:gmm-digits'")
        if not isinstance(self.fingerprint, str) or not self.fingerprint:
            raise _fail("model.fingerprint", self.fingerprint, "a string such as 'sha256:...'")
        if self.time not in TIME_DOMAINS:
            raise _fail("model.time", self.time, f"one of {', '.join(TIME_DOMAINS)}")
        lo = _float("model.sigma_min", self.sigma_min, positive=True)
        if self.time in PURE_NOISE_DOMAINS and _is_number(self.sigma_max) and self.sigma_max == math.inf:
            hi = math.inf
        else:
            hi = _float("model.sigma_max", self.sigma_max, positive=True)
        if not hi > lo:
            raise _fail("model.sigma_max", self.sigma_max, f"greater than model.sigma_min = {lo!r}")
        for key in OPTIONAL_MODEL_KEYS:
            v = getattr(self, key)
            if v is None:
                continue
            if self.time != "flow":
                raise _fail(f"model.{key}", v, f"null: only flow models have a {key} (model.time is {self.time})")
            object.__setattr__(self, key, _float(f"model.{key}", v, positive=key == "shift"))
        object.__setattr__(self, "sigma_min", lo)
        object.__setattr__(self, "sigma_max", hi)

    @property
    def from_pure_noise(self) -> bool:
        """The model's range includes pure noise (``sigma_max = inf``)."""
        return self.sigma_max == math.inf

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in MODEL_KEYS if k not in OPTIONAL_MODEL_KEYS or getattr(self, k) is not None}


@dataclass(frozen=True)
class MethodInfo:
    """How the grid was made: method name, full resolved config, objective, seed, wall time."""

    name: str
    config: Mapping[str, Any] = field(default_factory=dict)
    objective: Mapping[str, Any] | None = None
    seed: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise _fail("method.name", self.name, "a non-empty method name such as 'logsnr'")
        if not isinstance(self.config, Mapping):
            raise _fail("method.config", self.config, "a mapping of option -> value")
        if self.objective is not None and not isinstance(self.objective, Mapping):
            raise _fail("method.objective", self.objective, "a mapping or null")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise _fail("method.seed", self.seed, "an integer or null")
        if self.seconds is not None:
            object.__setattr__(self, "seconds", _float("method.seconds", self.seconds))
        object.__setattr__(self, "config", dict(self.config))
        if self.objective is not None:
            object.__setattr__(self, "objective", dict(self.objective))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": dict(self.config),
            "objective": None if self.objective is None else dict(self.objective),
            "seed": self.seed,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class Schedule:
    """A validated, immutable sampling schedule (N+1 sigmas) with its full origin."""

    model: ModelRef
    solver: SolverIdentity
    nfe: int
    sigmas: tuple[float, ...]
    method: MethodInfo
    model_sigmas: tuple[float, ...] | None = None
    timesteps: tuple[float, ...] | None = None
    final_step: str = "none"
    metrics: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)

    format = CURRENT_FORMAT

    def __post_init__(self) -> None:
        sig = _float_list("sigmas", self.sigmas, first_inf=True)
        object.__setattr__(self, "sigmas", sig)
        if len(sig) < 2:
            raise _fail("sigmas", list(sig), "at least 2 values (sigma_max ... sigma_min)")
        for i, s in enumerate(sig):
            if i and math.isinf(s):
                raise _fail(f"sigmas[{i}]", s, "a finite number (only sigmas[0] may be .inf, pure noise)")
            if s <= 0:
                raise _fail(f"sigmas[{i}]", s, "a value > 0 (a final jump to 0 is 'final_step: denoise')")
            if i and not s < sig[i - 1]:
                raise _fail(f"sigmas[{i}]", s, f"strictly decreasing values (sigmas[{i - 1}] = {sig[i - 1]!r})")
        lo, hi = self.model.sigma_min, self.model.sigma_max
        if math.isinf(sig[0]) and not self.model.from_pure_noise:
            raise _fail(
                "sigmas[0]",
                sig[0],
                f"a finite number: model.time '{self.model.time}' with sigma_max = {hi!r} has no pure-noise"
                " point (only models with sigma_max: .inf, e.g. flow models, start at .inf)",
            )
        if sig[0] > hi * (1 + RANGE_RTOL):
            raise _fail("sigmas[0]", sig[0], f"at most model.sigma_max = {hi!r}")
        if sig[-1] < lo * (1 - RANGE_RTOL):
            raise _fail(f"sigmas[{len(sig) - 1}]", sig[-1], f"at least model.sigma_min = {lo!r}")
        for name in ("model_sigmas", "timesteps"):
            v = getattr(self, name)
            if v is None:
                continue
            # model_sigmas[0] is .inf exactly when sigmas[0] is: the state there is noise-scaled.
            vals = _float_list(name, v, first_inf=name == "model_sigmas" and math.isinf(sig[0]))
            if len(vals) != len(sig):
                raise _fail(name, list(vals), f"{len(sig)} values, one per entry of sigmas, or null")
            if name == "model_sigmas":
                if math.isinf(sig[0]) and not math.isinf(vals[0]):
                    raise _fail("model_sigmas[0]", vals[0], ".inf, as sigmas[0] (the state at pure noise)")
                for i, s in enumerate(vals):
                    if s <= 0:
                        raise _fail(f"model_sigmas[{i}]", s, "a value > 0")
            object.__setattr__(self, name, vals)
        if not isinstance(self.solver, SolverIdentity):
            raise _fail("solver", self.solver, "a solver identity")
        try:
            spec = get_solver(self.solver.name)
            resolved = spec.identity(self.solver.order, self.solver.variant, self.solver.lower_order_final)
        except Exception as e:  # StepoptError from the registry: re-raise naming the key
            raise ScheduleValidationError(f"'solver': {e}") from None
        if resolved != self.solver:
            raise _fail("solver", self.solver.to_dict(), f"a complete identity, e.g. {resolved.to_dict()}")
        if self.final_step not in FINAL_STEPS:
            raise _fail("final_step", self.final_step, f"one of {', '.join(FINAL_STEPS)}")
        if not isinstance(self.nfe, int) or isinstance(self.nfe, bool):
            raise _fail("nfe", self.nfe, "an integer")
        want = spec.nfe(self.solver, len(sig) - 1, self.final_step)
        if self.nfe != want:
            raise _fail(
                "nfe",
                self.nfe,
                f"{want}: solver {self.solver} makes {want} evaluations on {len(sig) - 1} steps"
                f" with final_step {self.final_step}",
            )
        if not isinstance(self.metrics, Mapping):
            raise _fail("metrics", self.metrics, "a mapping")
        if not isinstance(self.provenance, Mapping):
            raise _fail("provenance", self.provenance, "a mapping")
        object.__setattr__(self, "metrics", dict(self.metrics))
        object.__setattr__(self, "provenance", dict(self.provenance))

    # -- convenience -------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        return len(self.sigmas) - 1

    def sigmas_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The grid as a float64 tensor (imports torch)."""
        import torch

        return torch.tensor(self.sigmas, dtype=torch.float64, device=device)

    def model_sigmas_tensor(self, device: torch.device | str | None = None) -> torch.Tensor | None:
        if self.model_sigmas is None:
            return None
        import torch

        return torch.tensor(self.model_sigmas, dtype=torch.float64, device=device)

    def diffusers_kwargs(self, force: bool = False) -> dict[str, Any]:
        """How diffusers reproduces this schedule: scheduler class and kwargs, ``set_timesteps`` call, scales.

        See :func:`stepopt.export.diffusers_export`; raises ``ExportRefused`` where diffusers cannot
        express the solver identity exactly (``force=True`` lists the differences instead).
        """
        from stepopt.export import diffusers_export

        return diffusers_export(self, force)

    def to_k_diffusion(self, device: torch.device | str | None = None, force: bool = False) -> torch.Tensor:
        """The sigma tensor k-diffusion samplers take (float64; a trailing 0 for ``final_step: denoise``)."""
        import torch

        from stepopt.export import k_diffusion_sigmas

        return torch.tensor(k_diffusion_sigmas(self, force), dtype=torch.float64, device=device)

    def replace(self, **changes: Any) -> Schedule:
        return replace(self, **changes)

    # -- plain data ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "model": self.model.to_dict(),
            "solver": self.solver.to_dict(),
            "nfe": self.nfe,
            "sigmas": list(self.sigmas),
            "model_sigmas": None if self.model_sigmas is None else list(self.model_sigmas),
            "timesteps": None if self.timesteps is None else list(self.timesteps),
            "final_step": self.final_step,
            "method": self.method.to_dict(),
            "metrics": _plain(self.metrics),
            "provenance": _plain(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Schedule:
        """Validate a loaded mapping (any supported format version) into a Schedule."""
        if not isinstance(data, Mapping):
            raise _fail("<document>", data, "a mapping with the keys of stepopt.schedule/v1")
        data = migrate(dict(data))
        unknown = [k for k in data if k not in TOP_KEYS]
        if unknown:
            raise _fail(unknown[0], data[unknown[0]], f"no such key; valid keys: {', '.join(TOP_KEYS)}")
        for k in REQUIRED_TOP:
            if k not in data:
                raise ScheduleValidationError(f"missing required key '{k}'")
        model = _section(data, "model", MODEL_KEYS, required=MODEL_KEYS[:4])
        solver = _section(data, "solver", SOLVER_KEYS, required=("name", "order"))
        method = _section(data, "method", METHOD_KEYS, required=("name",))
        if not _is_number(solver["order"]) or int(solver["order"]) != solver["order"]:
            raise _fail("solver.order", solver["order"], "an integer")
        if solver.get("variant") is not None and not isinstance(solver["variant"], str):
            raise _fail("solver.variant", solver["variant"], "a string or null")
        lof = solver.get("lower_order_final")
        if lof is not None and not isinstance(lof, bool):
            raise _fail("solver.lower_order_final", lof, "true, false or null")
        ident = SolverIdentity(
            name=str(solver["name"]),
            order=int(solver["order"]),
            variant=solver.get("variant"),
            lower_order_final=lof,
        )
        return cls(
            model=ModelRef(**model),
            solver=ident,
            nfe=data["nfe"],
            sigmas=data["sigmas"],
            model_sigmas=data.get("model_sigmas"),
            timesteps=data.get("timesteps"),
            final_step=data.get("final_step", "none"),
            method=MethodInfo(
                name=method["name"],
                config=method.get("config") or {},
                objective=method.get("objective"),
                seed=method.get("seed"),
                seconds=method.get("seconds"),
            ),
            metrics=data.get("metrics") or {},
            provenance=data.get("provenance") or {},
        )

    # -- YAML ------------------------------------------------------------------------------------
    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    @classmethod
    def from_yaml(cls, text: str) -> Schedule:
        try:
            data = safeyaml.load(text)
        except yaml.YAMLError as e:
            raise ScheduleValidationError(f"not valid YAML: {' '.join(str(e).split())}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the file atomically (temporary file, then rename)."""
        return atomic_write_text(path, self.to_yaml())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Schedule:
        """Read and validate a schedule file (or a shipped one, ``published:NAME``); errors name the file."""
        p = resolve_schedule_path(path)
        try:
            text = safeyaml.read_text(p)
        except safeyaml.InputFileError as e:
            raise ScheduleValidationError(f"{path}: {e}") from None
        try:
            return cls.from_yaml(text)
        except ScheduleValidationError as e:
            raise ScheduleValidationError(f"{path}: {e}") from None


PUBLISHED_PREFIX = "published:"


def data_dir(name: str) -> Path:
    """A folder of files shipped inside the package (``published``: schedules, ``configs``: method defaults)."""
    return Path(str(importlib.resources.files("stepopt") / "data" / name))


def published_names() -> list[str]:
    """Names of the published schedules that ship with stepopt (``published:NAME``)."""
    folder = data_dir("published")
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def is_published(path: str | os.PathLike[str]) -> bool:
    return str(path).startswith(PUBLISHED_PREFIX)


def resolve_schedule_path(path: str | os.PathLike[str]) -> Path:
    """``published:NAME`` -> the shipped file; any other path as given."""
    text = str(path)
    if not is_published(text):
        return Path(path)
    name = text[len(PUBLISHED_PREFIX) :].removesuffix(".yaml")
    if name not in published_names():
        raise ScheduleValidationError(
            f"{text}: no published schedule '{name}'; shipped: {', '.join(published_names()) or 'none'}"
        )
    return data_dir("published") / f"{name}.yaml"


def _section(data: Mapping[str, Any], name: str, keys: Sequence[str], required: Sequence[str]) -> dict[str, Any]:
    sec = data.get(name)
    if not isinstance(sec, Mapping):
        raise _fail(name, sec, f"a mapping with keys {', '.join(keys)}")
    for k in sec:
        if k not in keys:
            raise _fail(f"{name}.{k}", sec[k], f"no such key; valid keys: {', '.join(keys)}")
    for k in required:
        if k not in sec:
            raise ScheduleValidationError(f"missing required key '{name}.{k}'")
    return dict(sec)


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Upgrade a loaded mapping to :data:`CURRENT_FORMAT` through :data:`MIGRATIONS`, then
    :data:`CONTENT_MIGRATIONS`."""
    seen: set[str] = set()
    while True:
        fmt = data.get("format")
        if fmt == CURRENT_FORMAT:
            for upgrade in CONTENT_MIGRATIONS:
                data = upgrade(data)
            return data
        if fmt is None:
            raise ScheduleValidationError(
                f"missing required key 'format' (expected '{CURRENT_FORMAT}'); is this a stepopt schedule file?"
            )
        if fmt in MIGRATIONS and fmt not in seen:
            seen.add(fmt)
            data = MIGRATIONS[fmt](data)
            continue
        raise _fail(
            "format",
            fmt,
            f"'{CURRENT_FORMAT}' (this stepopt reads {', '.join([CURRENT_FORMAT, *MIGRATIONS])};"
            " a newer stepopt may read this file)",
        )


def _plain(v: Any) -> Any:
    """Convert numpy/torch scalars and tuples to plain YAML-safe Python values."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return _plain(v.tolist())
    if is_tensor(v):
        return _plain(v.detach().cpu().tolist())
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (Path, str)):
        return str(v)  # also str subclasses such as torch's TorchVersion
    return v


class _Dumper(yaml.SafeDumper):
    """Block style for mappings; flow style for lists of scalars (one line per grid)."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(not isinstance(x, (list, dict)) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_float(dumper: yaml.SafeDumper, data: float) -> yaml.Node:
    if math.isnan(data):
        text = ".nan"
    elif math.isinf(data):
        text = ".inf" if data > 0 else "-.inf"
    else:
        text = repr(data)
        if "." not in text and "e" in text:  # YAML 1.1 floats need a dot: 1e-05 -> 1.0e-05
            mant, exp = text.split("e")
            text = f"{mant}.0e{exp}"
        elif "." not in text and "e" not in text:
            text += ".0"
    return dumper.represent_scalar("tag:yaml.org,2002:float", text)


_Dumper.add_representer(list, _represent_list)  # type: ignore[arg-type]
_Dumper.add_representer(tuple, _represent_list)  # type: ignore[arg-type]
_Dumper.add_representer(float, _represent_float)  # type: ignore[arg-type]


def dump_yaml(data: Mapping[str, Any]) -> str:
    """YAML text with the given key order and exact (repr) floats."""
    return yaml.dump(
        _plain(data), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1 << 16, allow_unicode=True
    )
