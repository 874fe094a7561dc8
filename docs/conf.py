"""Sphinx configuration of the pyro_latdiff API reference.

Build (what CI runs; warnings are errors):

    sphinx-build -W -b html docs docs/_build/html

Each page lists its modules in an ``autosummary`` block; adding a module to the
reference is one line there.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import pyro_latdiff  # noqa: E402

project = "pyro_latdiff"
author = "the pyro_latdiff authors"
copyright = "the pyro_latdiff authors"
version = release = pyro_latdiff.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

templates_path = ["_templates"]
exclude_patterns = ["_build"]

# One page per module, generated from the autosummary blocks (into docs/generated/).
autosummary_generate = True
autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

html_theme = "alabaster"
html_static_path = []


def _resolve_top_level(app, env, node, contnode):
    """``pyro_latdiff.X``, the path users import the main names from, links to the
    module where ``X`` is documented."""
    module, _, name = node.get("reftarget", "").rpartition(".")
    if module != "pyro_latdiff" or name not in pyro_latdiff.__all__:
        return None
    target = f"{getattr(pyro_latdiff, name).__module__}.{name}"
    return env.get_domain("py").resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], target, node, contnode
    )


def setup(app):
    app.connect("missing-reference", _resolve_top_level)
