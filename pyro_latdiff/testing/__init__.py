"""Reference problems with closed-form answers, shared by tests, examples and users."""

from .linear import LinearSDE, ou_problem, ou_terminal_variance

__all__ = ["LinearSDE", "ou_problem", "ou_terminal_variance"]
