"""stepopt: better few-step diffusion sampling by optimized time steps."""

__version__ = "0.1.0"
