"""Sphinx configuration for the fixedpoint documentation.

Build (warnings are errors):

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys

# The package is normally installed (editable) in the environment that builds the
# docs; putting the repository root first also lets a plain checkout build them.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import fixedpoint  # noqa: E402

project = "fixedpoint"
author = "fixedpoint developers"
copyright = "fixedpoint developers, BSD-3-Clause"
release = fixedpoint.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: $...$ and $$...$$ math (rendered by MathJax), amsmath environments,
# and anchors for headings so that pages can link to sections.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc / numpydoc
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the numpydoc sections document the types
numpydoc_show_class_members = False  # avoids autosummary stub tables (and their warnings)
numpydoc_class_members_toctree = False

html_theme = "alabaster"
html_title = f"fixedpoint {release}"
html_static_path: list[str] = []
