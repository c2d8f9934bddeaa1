"""Doctest collection of the recipes: the Betty form of ISGD imports Betty, an extra (skipped without it)."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("betty") is not None else ["_isgd_betty.py"]
