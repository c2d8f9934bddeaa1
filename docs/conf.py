"""Sphinx configuration of the hodl_plugin documentation (built with -W: warnings are errors)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "hodl_plugin"
author = "hodl_plugin developers"
copyright = "2026, hodl_plugin developers"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = ["_static"]
# MathJax bundled (docs/_static/mathjax, Apache-2.0): formulas render without network access
mathjax_path = "mathjax/tex-chtml.js"
html_theme_options = {"description": "HODL for Betty & TorchOpt", "fixed_sidebar": True, "page_width": "1100px"}
doctest_global_setup = "import torch\nimport hodl_plugin as hp"
suppress_warnings = ["config.cache"]
# docstring examples are run by pytest --doctest-modules in their own modules (make test);
# the doctest builder runs the explicit ``.. doctest::`` blocks of these pages
doctest_test_doctest_blocks = ""
