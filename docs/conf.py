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
