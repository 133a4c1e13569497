"""FID, KID, Inception Score and precision/recall, computed by torch-fidelity's own code.

stepopt does not reimplement these metrics: :func:`fidelity_metrics` hands the samples to
``torch_fidelity.calculate_metrics`` (Heusel et al. 2017 for FID, Bińkowski et al. 2018 for KID,
Salimans et al. 2016 for the Inception Score, Kynkäänniemi et al. 2019 for precision/recall)
through :class:`FidelityOptions`, a frozen dataclass whose fields are exactly torch-fidelity's
keyword names. It is validated on construction, so a misspelled option is an error, never a
silently ignored keyword.

Feature extractors: any registered with torch-fidelity; ``inception-v3-compat`` (the standard FID
network, whose weights must be on disk: ``--feature-weights PATH`` or torch's hub cache, checked
before torch-fidelity could try to download them) and ``stepopt-digits-cnn`` (FID-digits, see
:mod:`stepopt.metrics.digits_features`).

Reference sets (``input2``): the name of a torch-fidelity registered dataset (``stepopt-digits``,
``cifar10-train``, ...; never downloaded here), an image folder, or an ``.npz`` with EDM's keys
``mu`` and ``sigma`` (FID only). For an ``.npz`` torch-fidelity computes the statistics of the
samples with its own feature extractor (``fid_input_id_to_statistics``) and the distance with its
own ``fid_statistics_to_metric``, the two steps ``calculate_metrics`` takes for FID.

Image convention: torch-fidelity takes ``(B, C, H, W)`` images on the 0..255 scale. Samples in
[-1, 1] are mapped by ``(x + 1) * 127.5`` and clamped; Inception gets them rounded to ``uint8``
with three channels (grey images repeated), which is what a PNG holds; the digits extractor gets
the unrounded float64 values (see :mod:`stepopt.metrics.digits_features`).

In ``stepopt eval`` (the ``fidelity`` kind registered here) the requests are grouped by feature
extractor, each group's weights and reference resolved and checked before any sampling, and each
schedule gets one ``calculate_metrics`` call per group, on rank 0 only under ``torchrun``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity import metric_fid
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import DATASETS_REGISTRY, FEATURE_EXTRACTORS_REGISTRY

from stepopt.cache import fidelity_cache_dir
from stepopt.errors import StepoptError
from stepopt.metrics import (
    INCEPTION_EXTRACTOR,
    EvalContext,
    MetricKind,
    MetricRequest,
    digits_features,
    register_metric_kind,
)
from stepopt.schedule import Schedule

INCEPTION = INCEPTION_EXTRACTOR
DIGITS = digits_features.EXTRACTOR_NAME
FIDELITY_METRICS = ("fid", "kid", "isc", "prc")
BINARY_METRICS = ("fid", "kid", "prc")

# torch-fidelity's result keys, as constants.
KEY_FID = torch_fidelity.KEY_METRIC_FID
KEY_KID_MEAN = torch_fidelity.KEY_METRIC_KID_MEAN
KEY_KID_STD = torch_fidelity.KEY_METRIC_KID_STD
KEY_ISC_MEAN = torch_fidelity.KEY_METRIC_ISC_MEAN
KEY_ISC_STD = torch_fidelity.KEY_METRIC_ISC_STD
KEY_PRECISION = torch_fidelity.KEY_METRIC_PRECISION
KEY_RECALL = torch_fidelity.KEY_METRIC_RECALL
KEY_F_SCORE = torch_fidelity.KEY_METRIC_F_SCORE

# Feature dimension of (extractor, layer), to check an .npz reference before the call.
FEATURE_DIMS = {(INCEPTION, "2048"): 2048, (INCEPTION, "768"): 768, (DIGITS, digits_features.FEATURE_PENULTIMATE): 64}


# Where stepopt's defaults differ from torch-fidelity's (every other default is torch-fidelity's own).
STEPOPT_DEFAULTS: dict[str, Any] = {
    "feature_extractor": INCEPTION,  # torch-fidelity picks by metric; eval's --feature-extractor
    "cuda": False,  # set from --device
    "kid_subset_size": None,  # min(1000, number of samples), resolved by fidelity_metrics
    "datasets_download": False,  # nothing is downloaded
    "save_cpu_ram": True,  # no DataLoader worker processes for in-memory samples
    "verbose": False,
}


def _default(name: str) -> Any:
    return STEPOPT_DEFAULTS[name] if name in STEPOPT_DEFAULTS else DEFAULTS.get(name)


@dataclass(frozen=True)
class FidelityOptions:
    """Keyword arguments of ``torch_fidelity.calculate_metrics``; every field name is torch-fidelity's.

    Defaults are torch-fidelity's (``torch_fidelity.defaults.DEFAULTS``) except those in
    :data:`STEPOPT_DEFAULTS`.
    """

    isc: bool = _default("isc")
    fid: bool = _default("fid")
    kid: bool = _default("kid")
    prc: bool = _default("prc")
    feature_extractor: str = _default("feature_extractor")
    feature_layer_isc: str | None = _default("feature_layer_isc")
    feature_layer_fid: str | None = _default("feature_layer_fid")
    feature_layer_kid: str | None = _default("feature_layer_kid")
    feature_layer_prc: str | None = _default("feature_layer_prc")
    feature_extractor_weights_path: str | None = _default("feature_extractor_weights_path")
    feature_extractor_internal_dtype: Literal["float32", "float64"] | None = _default(
        "feature_extractor_internal_dtype"
    )
    batch_size: int = _default("batch_size")
    cuda: bool = _default("cuda")
    isc_splits: int = _default("isc_splits")
    kid_subsets: int = _default("kid_subsets")
    kid_subset_size: int | None = _default("kid_subset_size")
    kid_kernel: Literal["poly", "rbf"] = _default("kid_kernel")
    kid_kernel_poly_degree: int = _default("kid_kernel_poly_degree")
    kid_kernel_poly_gamma: float | None = _default("kid_kernel_poly_gamma")
    kid_kernel_poly_coef0: float = _default("kid_kernel_poly_coef0")
    kid_kernel_rbf_sigma: float = _default("kid_kernel_rbf_sigma")
    prc_neighborhood: int = _default("prc_neighborhood")
    prc_batch_size: int = _default("prc_batch_size")
    samples_shuffle: bool = _default("samples_shuffle")
    samples_find_deep: bool = _default("samples_find_deep")
    samples_find_ext: str = _default("samples_find_ext")
    samples_resize_and_crop: int = _default("samples_resize_and_crop")
    datasets_root: str | None = _default("datasets_root")
    datasets_download: bool = _default("datasets_download")
    cache_root: str | None = _default("cache_root")
    cache: bool = _default("cache")
    input2_cache_name: str | None = _default("input2_cache_name")
    rng_seed: int = _default("rng_seed")
    save_cpu_ram: bool = _default("save_cpu_ram")
    verbose: bool = _default("verbose")

    def __post_init__(self) -> None:
        unknown = [f.name for f in dataclasses.fields(self) if f.name not in DEFAULTS]
        if unknown:  # a torch-fidelity version that renamed an option: fail loudly, never drop it
            raise StepoptError(
                f"torch-fidelity {torch_fidelity.__version__} has no option(s) {', '.join(unknown)};"
                " install the version stepopt supports (>= 0.3)"
            )
        for name in ("batch_size", "isc_splits", "kid_subsets", "prc_neighborhood", "prc_batch_size"):
            if getattr(self, name) < 1:
                raise StepoptError(f"torch-fidelity option {name} = {getattr(self, name)}: expected an integer >= 1")
        if self.kid_subset_size is not None and self.kid_subset_size < 2:
            raise StepoptError(f"kid_subset_size = {self.kid_subset_size}: expected an integer >= 2 or null")
        if self.kid_kernel not in ("poly", "rbf"):
            raise StepoptError(f"kid_kernel = {self.kid_kernel!r}: expected 'poly' or 'rbf'")
        if self.kid_kernel_rbf_sigma <= 0:
            raise StepoptError(f"kid_kernel_rbf_sigma = {self.kid_kernel_rbf_sigma}: expected a number > 0")
        if self.feature_extractor_internal_dtype not in (None, "float32", "float64"):
            raise StepoptError(
                f"feature_extractor_internal_dtype = {self.feature_extractor_internal_dtype!r}:"
                " expected float32, float64 or null"
            )
        if self.feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
            raise StepoptError(
                f"unknown feature extractor '{self.feature_extractor}';"
                f" expected one of {', '.join(FEATURE_EXTRACTORS_REGISTRY)}"
            )

    def replace(self, **changes: Any) -> FidelityOptions:
        return dataclasses.replace(self, **changes)

    def to_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for ``torch_fidelity.calculate_metrics``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def settings(self, metric: str) -> dict[str, Any]:
        """The options that determine ``metric``'s value (recorded next to it)."""
        keys = {
            "fid": ("feature_layer_fid",),
            "kid": (
                "feature_layer_kid",
                "kid_subsets",
                "kid_subset_size",
                "kid_kernel",
                "kid_kernel_poly_degree",
                "kid_kernel_poly_gamma",
                "kid_kernel_poly_coef0",
                "kid_kernel_rbf_sigma",
                "rng_seed",
            ),
            "isc": ("feature_layer_isc", "isc_splits", "samples_shuffle", "rng_seed"),
            "prc": ("feature_layer_prc", "prc_neighborhood"),
        }[metric]
        out: dict[str, Any] = {"feature_extractor": self.feature_extractor}
        if self.feature_extractor_internal_dtype is not None:
            out["feature_extractor_internal_dtype"] = self.feature_extractor_internal_dtype
        out.update({k: getattr(self, k) for k in keys if not k.startswith("kid_kernel_") or self.kid_kernel in k})
        layer = f"feature_layer_{metric}"
        if out[layer] is None:  # record the layer torch-fidelity resolves by default
            cls = FEATURE_EXTRACTORS_REGISTRY[self.feature_extractor]
            out[layer] = cls.get_default_feature_layer_for_metric(metric)
        return out


# -- feature extractor weights ---------------------------------------------------------------------


def inception_hub_path() -> Path:
    """Where torch's hub cache keeps the Inception weights torch-fidelity would download."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


def inception_weights(path: str | os.PathLike[str] | None = None) -> Path:
    """The Inception-v3 weights file: ``path`` if given, else torch's hub cache; one-line error if absent."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise StepoptError(f"`feature_weights` {p}: no such file (the Inception-v3 weights for FID)")
        return p
    hub = inception_hub_path()
    if hub.is_file():
        return hub
    raise StepoptError(
        f"Inception-v3 weights not found (stepopt never downloads them): fetch {URL_INCEPTION_V3}"
        f" elsewhere and pass it as `feature_weights`, or put the file at {hub}"
    )


def _file_fingerprint(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def extractor_weights(extractor: str, path: str | None = None) -> tuple[str | None, str]:
    """(weights path to hand to torch-fidelity, fingerprint) for a feature extractor."""
    if extractor == DIGITS:
        return path, digits_features.weights_fingerprint(path)
    if extractor == INCEPTION:
        p = inception_weights(path)
        return str(p), _file_fingerprint(p)
    if path is None or not Path(path).is_file():
        raise StepoptError(
            f"feature extractor '{extractor}' needs its weights file (`feature_weights`);"
            " stepopt never downloads weights"
        )
    return path, _file_fingerprint(path)


# -- images -------------------------------------------------------------------------------------------


def to_images(samples: torch.Tensor, extractor: str) -> torch.Tensor:
    """Samples in [-1, 1] ``(N, C, H, W)`` -> torch-fidelity images for ``extractor`` (0..255 scale)."""
    if samples.ndim != 4:
        raise StepoptError(f"image metrics need samples of shape (N, C, H, W), got {tuple(samples.shape)}")
    img = digits_features.to_image_scale(samples)
    if extractor == DIGITS:
        return img
    img = img.round().to(torch.uint8)
    if img.shape[1] == 1:
        img = img.expand(-1, 3, -1, -1).contiguous()
    if img.shape[1] != 3:
        raise StepoptError(f"{extractor} needs 1- or 3-channel images, got {img.shape[1]} channels")
    return img


# -- references ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """The reference set (torch-fidelity's ``input2``): a dataset name, an image folder or an .npz of mu/sigma."""

    kind: Literal["dataset", "folder", "npz"]
    value: str

    def describe(self) -> str:
        return self.value if self.kind == "dataset" else f"{self.kind}:{self.value}"


def resolve_reference(spec: str | None, extractor: str) -> Reference | None:
    """Parse ``--reference``; the digits extractor defaults to the real digits (``stepopt-digits``)."""
    if spec is None:
        return Reference("dataset", digits_features.DATASET_NAME) if extractor == DIGITS else None
    if spec in DATASETS_REGISTRY:
        return Reference("dataset", spec)
    p = Path(spec)
    if p.is_dir():
        return Reference("folder", str(p))
    if p.is_file() and p.suffix == ".npz":
        return Reference("npz", str(p))
    raise StepoptError(
        f"`reference` {spec}: not an image folder, an .npz of mu/sigma, or a torch-fidelity dataset"
        f" ({', '.join(DATASETS_REGISTRY)})"
    )


def load_npz_statistics(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """EDM-style reference statistics: arrays ``mu`` (D,) and ``sigma`` (D, D)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z or "sigma" not in z:
                raise StepoptError(f"`reference` {path}: expected arrays 'mu' and 'sigma', found {', '.join(z.files)}")
            mu, sigma = np.asarray(z["mu"]), np.asarray(z["sigma"])
    except (OSError, ValueError) as e:
        raise StepoptError(f"`reference` {path}: not a readable .npz ({e.__class__.__name__})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise StepoptError(f"`reference` {path}: mu {mu.shape} and sigma {sigma.shape} must be (D,) and (D, D)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise StepoptError(f"`reference` {path}: mu/sigma contain non-finite values")
    return mu, sigma


def _folder_cache_name(folder: str, options: FidelityOptions) -> str:
    """A cache name for an image folder: changes whenever any matching file is added, removed or modified."""
    exts = {e.strip().lower() for e in options.samples_find_ext.split(",") if e.strip()}
    h = hashlib.sha256(f"{options.samples_find_deep}|{options.samples_resize_and_crop}".encode())
    root = Path(folder).resolve()
    files = root.rglob("*") if options.samples_find_deep else root.iterdir()
    for f in sorted(p for p in files if p.is_file() and p.suffix.lower().lstrip(".") in exts):
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return f"stepopt-folder-{h.hexdigest()[:16]}"


# -- the call ------------------------------------------------------------------------------------------


def _call(options: FidelityOptions, input1: Dataset, input2: Any) -> dict[str, float]:
    try:
        return dict(torch_fidelity.calculate_metrics(input1=input1, input2=input2, **options.to_kwargs()))
    except (ValueError, RuntimeError, AssertionError) as e:
        why = " ".join(str(e).split()) or f"{e.__class__.__name__} (inputs of mismatched shape or dtype?)"
        raise StepoptError(f"torch-fidelity: {why}") from None


def _npz_fid(options: FidelityOptions, input1: Dataset, ref: Reference) -> dict[str, float]:
    """FID against an .npz of mu/sigma, by torch-fidelity's own statistics and distance (module docstring)."""
    mu, sigma = load_npz_statistics(ref.value)
    fe = options.feature_extractor
    kwargs = {**options.replace(fid=True, kid=False, isc=False, prc=False).to_kwargs(), "input1": input1}
    layer = metric_fid.resolve_feature_layer_for_metric("fid", **kwargs)
    dim = FEATURE_DIMS.get((fe, layer))
    if dim is not None and mu.shape[0] != dim:
        raise StepoptError(
            f"`reference` {ref.value}: statistics of dimension {mu.shape[0]}, but {fe} layer {layer} gives {dim}"
        )
    try:
        extractor = metric_fid.create_feature_extractor(fe, [layer], **kwargs)
        stats = metric_fid.fid_input_id_to_statistics(1, extractor, layer, **kwargs)
        # torch-fidelity compares statistics of equal dtypes: the reference takes the samples' ones.
        ref_stats = {"mu": mu.astype(stats["mu"].dtype), "sigma": sigma.astype(stats["sigma"].dtype)}
        return dict(metric_fid.fid_statistics_to_metric(stats, ref_stats, options.verbose))
    except (ValueError, RuntimeError, AssertionError) as e:
        why = " ".join(str(e).split()) or f"{e.__class__.__name__} (inputs of mismatched shape or dtype?)"
        raise StepoptError(f"torch-fidelity: {why}") from None


def check_request(metrics: Sequence[str], reference: Reference | None, options: FidelityOptions) -> list[str]:
    """Validate a metric set against its reference (before any sampling); returns the metrics, deduplicated."""
    wanted = list(dict.fromkeys(metrics))
    bad = [m for m in wanted if m not in FIDELITY_METRICS]
    if bad or not wanted:
        raise StepoptError(f"unknown torch-fidelity metric(s) {bad}; expected some of {', '.join(FIDELITY_METRICS)}")
    binary = [m for m in wanted if m in BINARY_METRICS]
    if binary and reference is None:
        raise StepoptError(
            f"{', '.join(binary)} with {options.feature_extractor} need `reference`: an image folder,"
            f" an .npz of mu/sigma, or a torch-fidelity dataset name ({', '.join(DATASETS_REGISTRY)})"
        )
    if reference is not None and reference.kind == "npz" and any(m in ("kid", "prc") for m in wanted):
        raise StepoptError(
            f"`reference` {reference.value}: kid and prc need reference images, an .npz only has mu/sigma"
        )
    return wanted


def fidelity_metrics(
    images: torch.Tensor,
    metrics: Sequence[str],
    reference: Reference | None,
    options: FidelityOptions,
    weights_fingerprint: str | None = None,
) -> tuple[dict[str, Any], FidelityOptions]:
    """Compute ``metrics`` (subset of fid, kid, isc, prc) for ``images`` with torch-fidelity.

    ``images`` are torch-fidelity images (:func:`to_images`). Returns ``{"fid": float, "kid":
    {"mean", "std"}, "isc": {"mean", "std"}, "prc": {"precision", "recall", "f_score"}}`` (the
    requested ones) and the options actually used (``kid_subset_size`` resolved).
    """
    wanted = check_request(metrics, reference, options)
    binary = [m for m in wanted if m in BINARY_METRICS]
    n = int(images.shape[0])
    if n < 2:
        raise StepoptError(f"torch-fidelity metrics need at least 2 samples, got {n}")
    if "isc" in wanted and n < options.isc_splits:
        raise StepoptError(f"isc with isc_splits = {options.isc_splits} needs at least that many samples, got {n}")
    if options.kid_subset_size is None:
        options = options.replace(kid_subset_size=min(1000, n))
    if options.cache and options.cache_root is None and weights_fingerprint is not None:
        options = options.replace(
            cache_root=str(fidelity_cache_dir(options.feature_extractor, weights_fingerprint)),
        )
    input1 = digits_features.ImageTensorDataset(images)
    flags = {m: m in wanted for m in FIDELITY_METRICS}
    raw: dict[str, float] = {}
    if reference is not None and reference.kind == "npz":
        if "fid" in wanted:
            raw.update(_npz_fid(options, input1, reference))
        if "isc" in wanted:
            raw.update(_call(options.replace(**{**flags, "fid": False}), input1, None))
    else:
        input2: Any = None
        opts = options.replace(**flags)
        if reference is not None and binary:
            input2 = reference.value
            if reference.kind == "folder" and opts.cache:
                opts = opts.replace(input2_cache_name=_folder_cache_name(reference.value, opts))
        raw.update(_call(opts, input1, input2))
    out: dict[str, Any] = {}
    if "fid" in wanted:
        out["fid"] = float(raw[KEY_FID])
    if "kid" in wanted:
        out["kid"] = {"mean": float(raw[KEY_KID_MEAN]), "std": float(raw[KEY_KID_STD])}
    if "isc" in wanted:
        out["isc"] = {"mean": float(raw[KEY_ISC_MEAN]), "std": float(raw[KEY_ISC_STD])}
    if "prc" in wanted:
        out["prc"] = {
            "precision": float(raw[KEY_PRECISION]),
            "recall": float(raw[KEY_RECALL]),
            "f_score": float(raw[KEY_F_SCORE]),
        }
    return out, options


def fidelity_options_from(values: Mapping[str, Any]) -> FidelityOptions:
    """Build options from a mapping, rejecting unknown keys with the list of valid ones."""
    names = [f.name for f in dataclasses.fields(FidelityOptions)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise StepoptError(f"unknown torch-fidelity option '{unknown[0]}'; valid options: {', '.join(names)}")
    return FidelityOptions(**values)


class FidelityMetric:
    """The ``fidelity`` kind: requests grouped by feature extractor (``None``: the evaluation's
    ``feature_extractor``), each group's options, reference and weights resolved once at setup."""

    def __init__(self, requests: Sequence[MetricRequest], ctx: EvalContext) -> None:
        cfg = ctx.config
        self.groups: dict[str, list[MetricRequest]] = {}
        for r in requests:
            self.groups.setdefault(r.extractor or cfg.feature_extractor, []).append(r)
        self.resolved: dict[str, tuple[FidelityOptions, Reference | None, str]] = {}
        for fe, rs in self.groups.items():
            wpath, wfp = extractor_weights(fe, cfg.feature_weights if fe == cfg.feature_extractor else None)
            ref = resolve_reference(cfg.reference, fe)
            opts = cfg.fidelity.replace(
                feature_extractor=fe,
                feature_extractor_weights_path=wpath,
                batch_size=cfg.batch_size,
                cuda=ctx.device.type == "cuda",
                cache=cfg.cache,
            )
            check_request([r.base or "" for r in rs], ref, opts)  # fail before any sampling
            self.resolved[fe] = (opts, ref, wfp)

    def prepare(self) -> None:
        pass

    def compute(self, schedule: Schedule, samples: torch.Tensor) -> list[tuple[str, Any, dict[str, Any]]]:
        out = []
        for fe, rs in self.groups.items():
            opts, ref, wfp = self.resolved[fe]
            values, used = fidelity_metrics(to_images(samples, fe), [r.base or "" for r in rs], ref, opts, wfp)
            for r in rs:
                settings = {
                    **used.settings(r.base or ""),
                    "weights": wfp,
                    "reference": None if ref is None else ref.describe(),
                    "torch_fidelity": torch_fidelity.__version__,
                }
                out.append((r.name, values[r.base or ""], settings))
        return out


register_metric_kind(MetricKind("fidelity", FidelityMetric, stage=1, main_rank_only=True))
