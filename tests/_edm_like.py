"""A tiny network with NVIDIA EDM's EDMPrecond interface, for loader tests (pickled by the tests)."""

from __future__ import annotations

import torch
from torch import nn


class TinyEDMPrecond(nn.Module):
    """D(x, sigma) = c_skip x + c_out F(c_in x) with a 1x1 conv F, as EDMPrecond computes it."""

    def __init__(self, channels: int = 1, resolution: int = 4, label_dim: int = 0) -> None:
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = resolution, channels, label_dim
        self.sigma_min, self.sigma_max, self.sigma_data = 0.002, 80.0, 0.5
        self.f = nn.Conv2d(channels, channels, 1)

    def forward(self, x, sigma, class_labels=None):
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        sd2 = self.sigma_data**2
        c_skip, c_out, c_in = sd2 / (s**2 + sd2), s * self.sigma_data / (s**2 + sd2).sqrt(), 1 / (s**2 + sd2).sqrt()
        return c_skip * x + c_out * self.f(c_in * x)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class UserDenoiser:
    """A user object with the denoiser contract (for python:module:factory)."""

    sigma_min, sigma_max, shape = 0.01, 10.0, (1, 4, 4)

    def __call__(self, x, sigma):
        return x / (1 + sigma.reshape(-1, 1, 1, 1).to(x.dtype) ** 2)


def make_user_denoiser():
    return UserDenoiser()


def make_broken():
    return object()
