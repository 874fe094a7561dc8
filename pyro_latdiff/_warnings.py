"""Warnings the package emits; the test suite turns them into errors."""


class LatentDiffusionWarning(UserWarning):
    """A warning about a latent-diffusion model, guide or estimate."""
