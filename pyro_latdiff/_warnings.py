"""Warnings the package emits; the test suite turns them into errors."""


class LatentDiffusionWarning(UserWarning):
    """A warning about a latent-diffusion model, guide or estimate."""


class GuideQualityWarning(UserWarning):
    """The fitted guide looks far from the posterior (see :func:`~pyro_latdiff.fit`'s
    ``check``): its posterior spread is likely too narrow."""
