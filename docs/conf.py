"""Sphinx configuration: Markdown pages through MyST, API reference from Google-style docstrings (napoleon).

Build: ``make docs`` (``sphinx-build -W``: every warning is an error).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

project = "lightning-gfm"
author = "lightning-gfm contributors"
copyright = "2026, lightning-gfm contributors"  # noqa: A001 - Sphinx's name
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # dataclass "Attributes:" sections must not clash with the autodoc'd fields
nitpicky = False

html_theme = "furo"
html_title = "lightning-gfm"
