"""Shared fixtures: the small float64 quadratic with closed forms (:func:`_oracles.make_quadratic`), and
the runnable modules of the repository."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from _oracles import DT, Quadratic, make_quadratic, nonsingleton, rel_err  # noqa: F401  (also imported from here)

# The Betty adapter's tests live in tests/betty/: with tests/ on sys.path (as pytest puts it) that folder
# imports as an empty namespace package named ``betty`` when Betty is not installed, and
# ``pytest.importorskip("betty")`` would then not skip. Without Betty, ``import betty`` fails as it should.
_betty = importlib.util.find_spec("betty")
if _betty is not None and _betty.origin is None:
    sys.modules["betty"] = None


@pytest.fixture
def quad() -> Quadratic:
    return make_quadratic()


def runnable(package: str) -> list[str]:
    """The modules of the repository's ``package`` (``benchmarks``, ``recipes``) that users run as
    ``python -m package.<name>``: every ``*.py`` with a ``__main__`` block, not ``_private`` ones."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / package
    return sorted(p.stem for p in root.glob("*.py")
                  if not p.stem.startswith("_") and 'if __name__ == "__main__"' in p.read_text())
