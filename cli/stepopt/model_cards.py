"""What schedule-writing commands need to know about a built-in model, without loading it.

``stepopt baseline`` on the default model needs only its id, sigma range, noise frame and
fingerprint; :func:`model_card` gives those for built-ins whose parameters are plain arrays, with
numpy alone (no torch), and None for every other model id (callers then load the model).
The fingerprint is the one the loaded model reports (a test compares them).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np

from stepopt.fingerprint import fingerprint_arrays
from stepopt.frames import EDM, NoiseFrame, frame_ref_fields
from stepopt.schedule import ModelRef


@dataclass(frozen=True)
class ModelCard:
    """A model's metadata, standing in for the model where no network is evaluated."""

    id: str
    fingerprint: str
    sigma_min: float
    sigma_max: float
    frame: NoiseFrame
    device: str = "cpu"
    integer_timesteps: bool = False

    @property
    def time_domain(self) -> str:
        return self.frame.time_domain

    def ref(self) -> ModelRef:
        return ModelRef(
            self.id, self.fingerprint, self.sigma_min, self.sigma_max, self.time_domain, **frame_ref_fields(self.frame)
        )


def _gmm_digits() -> ModelCard:
    with resources.files("stepopt.data").joinpath("gmm_digits.npz").open("rb") as f:
        p = np.load(f)
        arrays = [np.asarray(p[k], dtype=np.float64) for k in ("weights", "means", "covariances")]
    return ModelCard("builtin:gmm-digits", fingerprint_arrays(arrays), 0.002, 80.0, EDM(0.002, 80.0))


_CARDS = {"builtin:gmm-digits": _gmm_digits}


def model_card(model_id: str) -> ModelCard | None:
    """The card of a built-in model that needs no torch to describe, else None."""
    fn = _CARDS.get(model_id)
    return fn() if fn is not None else None
